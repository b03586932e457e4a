"""Where the suite keeps things it generates (all git-ignored)."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
ANNOTATIONS_DIR = REPO_ROOT / "annotations"
# Media regenerated from the committed annotation JSON on first use.
DATA_DIR = Path(os.environ.get("GEOLLAVA_DATA_DIR", REPO_ROOT / "data"))
SAMPLE_DIR = DATA_DIR / "sample"
# Tiny offline checkpoints built once and then loaded through from_pretrained.
CHECKPOINTS_DIR = Path(os.environ.get("GEOLLAVA_CHECKPOINTS_DIR", REPO_ROOT / "checkpoints"))
RUNS_DIR = REPO_ROOT / "runs"
RESULTS_DIR = REPO_ROOT / "results"
