"""``make demo``: built-in data, the whole pipeline on a laptop CPU, and the report.

``python -m lesiongen.demo`` runs it (``lesiongen.demo.run``)."""
