"""Counterfactual fairness audit of a classifier: the same lesions on other skin tones (or another concept).

``python -m lesiongen.audit`` runs the stage (``lesiongen.audit.run``)."""
