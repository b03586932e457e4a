"""Building a generated model folder once (the tiny offline twins of every model family): into a staging folder,
marked with its builder's version, swapped in whole, so an interrupted build is never used and two processes
that ask at once build it once."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

from .locks import wait_for_lock

# The version marker of a finished build.
MARKER = "tiny.json"


def _is_current(marker: Path, version: int) -> bool:
    try:
        return json.loads(marker.read_text()).get("version") == version
    except (OSError, json.JSONDecodeError):
        return False  # missing, or a damaged marker: a damaged build, rebuilt


def build_once(target: Path, version: int, build: Callable[[Path], None], *, seed: int, what: str) -> Path:
    """``build(staging)`` fills a staging folder beside ``target`` under ``torch.manual_seed(seed)`` (the caller's
    random state is kept), a ``tiny.json`` marker records ``version``, and the folder is swapped in whole. A folder
    whose marker holds ``version`` is returned as it is; any other (older builder, damaged marker) is rebuilt.
    Processes building the same folder at once take turns (a lock beside it): the first builds, the others use it.
    """
    marker = target / MARKER
    if _is_current(marker, version):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with wait_for_lock(target):
        if _is_current(marker, version):  # built by another process while this one waited
            return target
        print(f"building the tiny offline {what} in {target} (once)")
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        rng_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            build(staging)
            (staging / MARKER).write_text(json.dumps({"version": version, "seed": seed}))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            torch.random.set_rng_state(rng_state)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    return target
