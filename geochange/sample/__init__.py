"""The bundled synthetic sample data set: top-down before/after scenes with known changes (``scenes.py``) and the
annotation files and media drawn from them (``data.py``, ``python common.py sample-data``)."""
