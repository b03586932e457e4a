"""Shared logic of geollava-suite: the scripts and ``common.py``'s commands import its modules.

Importing it raises Python's garbage-collector thresholds (``process.collect_less_often``) before a script imports
torch and the libraries after it: at Python's default the collector re-walks their growing heap as they import."""
from .process import collect_less_often

collect_less_often()
