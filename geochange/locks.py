"""One writer per output: an OS lock on a ``.lock`` file beside a run directory or a results file.

The lock is ``fcntl.flock`` on an open file, so the OS drops it when the process ends, however it
ends: a killed run never leaves its output locked. The ``.lock`` file itself may stay; it is only
a handle (it names the last holder's pid, for the message a second writer gets).
"""
from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
