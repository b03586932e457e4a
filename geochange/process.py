"""A command line's process: Python's garbage collector stops re-walking what the libraries import (from the moment
the package is imported, ``collect_less_often``), and once it reads its settings, mistakes a user can fix end in one
line (``errors.install_error_handler``) and the heap is frozen at exit.

Why the collector: torch, transformers, PEFT and DeepSpeed make ~700,000 objects as they import, almost all of
them living as long as the process, and transformers imports most of its modules lazily, during the run. At
Python's default thresholds the collector walks the whole growing heap ~10 times meanwhile, and the interpreter
walks it again as it clears its modules at exit, on every process of a torchrun. Measured on a tiny evaluation
(``videollava_test.py MODEL_ID=tiny``, 2 CPU cores): collections 3.2-3.7 s -> 2.3-2.5 s, the exit 4.3-4.5 s ->
0.8 s; the whole command, old and new alternated three times, 34.7-36.5 s -> 29.3-31.3 s. The thresholds are
raised as ``geochange`` is imported, before a script imports torch: importing the training stack (torch,
transformers, PEFT, DeepSpeed, sentence-transformers), alternated four times, took 16.3-18.4 s of CPU at Python's
thresholds and 15.3-16.7 s at ours.
"""
from __future__ import annotations

import atexit
import gc

from .errors import install_error_handler

# Container allocations between young-generation collections (Python's default: 700). Garbage in reference cycles
# is still found within one generation's worth of allocations: in a training or generation loop, within a step.
YOUNG_COLLECTION_THRESHOLD = 10_000

_prepared = False


def freeze_the_heap() -> None:
    """One collection (it finalises the garbage there is, cycles with finalizers too), then every live object out
    of the collections that follow: at exit, the interpreter's own last walks skip them. Files and child processes
    are closed by their owners as before (atexit handlers, reference counts)."""
    gc.collect()
    gc.freeze()


def collect_less_often() -> None:
    """Young collections every ``YOUNG_COLLECTION_THRESHOLD`` allocations (the package calls it as it is imported)."""
    young, *older = gc.get_threshold()
    if 0 < young < YOUNG_COLLECTION_THRESHOLD:  # 0: the collector is off, and stays off
        gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, *older)


def prepare_process() -> None:
    """One-line errors, and the heap frozen at exit (once per process; the scripts call it through ``load_settings``,
    the commands directly). The collector's thresholds were raised as the package was imported."""
    global _prepared
    install_error_handler()
    if _prepared:
        return
    _prepared = True
    atexit.register(freeze_the_heap)  # registered early, so it runs after the handlers the run registers
