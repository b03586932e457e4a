"""Processes taking turns on an output: an OS lock on a ``.lock`` file beside a run directory, a results file or a
generated model folder. A writer holds it for its whole run (a second writer stops); a first-use build holds it
briefly (the others wait, then use what was built).

The lock is ``fcntl.flock`` on an open file, so the OS drops it when the process ends, however it
ends: a killed run never leaves its output locked. The ``.lock`` file itself may stay; it is only
a handle (it names the last holder's pid, for the message a second writer gets).
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from .errors import UserError


class WriterLock:
    """A held lock; ``release()`` (or leaving a ``with`` block) gives it up."""

    def __init__(self, handle, path: Path):
        self._handle, self.path = handle, path

    def release(self) -> None:
        if not self._handle.closed:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()

    def __enter__(self) -> "WriterLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_path(target: str | Path) -> Path:
    """``runs/<run>`` -> ``runs/<run>.lock``; ``results/<run>.jsonl`` -> ``results/<run>.jsonl.lock``."""
    target = Path(target)
    return target.parent / f"{target.name}.lock"


def lock_for_writing(target: str | Path, what: str) -> WriterLock:
    """Hold the lock of ``target`` for this process, or stop with one line when another process holds it.

    ``what`` names the output in that line (e.g. "the run directory runs/x")."""
    path = lock_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UserError(f"{what} is being written by another process ({holder}, lock {path}); "
                        f"wait for it to finish or stop it") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    return WriterLock(handle, path)


@contextmanager
def wait_for_lock(target: str | Path) -> Iterator[None]:
    """Hold the lock of ``target`` for a short job that others may want at the same time (a first-use build):
    they wait for it instead of stopping."""
    path = lock_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)

# The version marker of a finished build (a tiny offline twin of a model family): written last, in a staging
# folder that is swapped in whole, so an interrupted build is never used.
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
        import torch  # here, not at the top: the results notebook reads this package without loading torch

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
