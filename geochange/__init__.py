"""Shared logic of geollava-suite. Scripts import it through ``common.py``."""
