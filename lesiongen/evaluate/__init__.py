"""Evaluation of a synthetic set: feature spaces, set-to-set metrics, memorisation and faithfulness.

``python -m lesiongen.evaluate`` runs the stage (``lesiongen.evaluate.run``)."""
