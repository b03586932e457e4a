"""Processes taking turns on an output: an OS lock on a ``.lock`` file beside a run directory, a results file or a
generated model folder. A writer holds it for its whole run (a second writer stops); a first-use build holds it
briefly (the others wait, then use what was built).

The lock is ``fcntl.flock`` on an open file, so the OS drops it when the process ends, however it
ends: a killed run never leaves its output locked. The ``.lock`` file itself may stay; it is only
a handle (it names the last holder's pid and machine, for the message a second writer gets, and a token other
nodes read back to check they see the same run directory).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import tempfile
import uuid
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


class LockedOutput:
    """An output this process opened for writing (a run directory, a results file): a ``with`` block gives up its
    ``lock`` at the end, however it ends (None: a process that holds none, as torchrun's other ranks)."""
    lock: WriterLock | None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.lock is not None:
            self.lock.release()


@contextmanager
def released_on_error(lock: WriterLock | None) -> Iterator[None]:
    """Give up ``lock`` if the block raises: what opens an output keeps its lock only once all of it is ready (and
    hands it to its ``LockedOutput``)."""
    try:
        yield
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def lock_path(target: str | Path) -> Path:
    """``runs/<run>`` -> ``runs/<run>.lock``; ``results/<run>.jsonl`` -> ``results/<run>.jsonl.lock``."""
    target = Path(target)
    return target.parent / f"{target.name}.lock"


def _flock(handle, path: Path, operation: int) -> None:
    """``fcntl.flock``, with one line where the filesystem has no locks (Lustre mounted without ``-o flock``, some
    NFS setups: ENOSYS, EOPNOTSUPP, ENOLCK) instead of a traceback."""
    try:
        fcntl.flock(handle, operation)
    except BlockingIOError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL):
            raise
        handle.close()
        raise UserError(f"cannot lock {path}: its filesystem does not support file locks ({os.strerror(exc.errno)}); "
                        "mount it with locks (Lustre: -o flock) or put this output on a filesystem that has them "
                        "(OUTPUT_DIR, RESULTS_DIR, GEOLLAVA_CHECKPOINTS_DIR)") from None


def lock_for_writing(target: str | Path, what: str) -> WriterLock:
    """Hold the lock of ``target`` for this process, or stop with one line when another process holds it.

    ``what`` names the output in that line (e.g. "the run directory runs/x")."""
    path = lock_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+", encoding="utf-8")
    try:
        _flock(handle, path, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.readline().strip() or "another process"
        handle.close()
        raise UserError(f"{what} is being written by another process ({holder}, lock {path}); "
                        f"wait for it to finish or stop it") from None
    handle.seek(0)
    handle.truncate()
    # the token: no other lock file says the same, so another node reading this back sees this very file
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\ntoken {uuid.uuid4().hex}\n")
    handle.flush()
    os.fsync(handle.fileno())  # another node reads it back (engines.check_shared_directory)
    return WriterLock(handle, path)


@contextmanager
def wait_for_lock(target: str | Path) -> Iterator[None]:
    """Hold the lock of ``target`` for a short job that others may want at the same time (a first-use build):
    they wait for it instead of stopping."""
    path = lock_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as handle:
        _flock(handle, path, fcntl.LOCK_EX)
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


def build_folder_once(target: Path, is_built: Callable[[Path], bool], build: Callable[[Path], None],
                      announce: str) -> Path:
    """``target`` as ``build(staging)`` makes it: a staging folder beside ``target``, swapped in whole once built (an
    interrupted build is never used). A folder ``is_built`` accepts is returned as it is. Processes asking at once
    take turns (a lock beside it): the first builds (printing ``announce``), the others wait on the lock, not in a
    collective of their process group (a long build cannot time it out), then use what was built."""
    if is_built(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with wait_for_lock(target):
        if is_built(target):  # built by another process while this one waited
            return target
        print(announce)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            build(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    return target


def save_pretrained_here(model, folder: Path) -> None:
    """``model.save_pretrained(folder)`` by this process, whatever its rank: once a process group exists,
    transformers 5 writes only on global rank 0, but a folder built under a lock (``build_folder_once``: a pruned
    base, a tiny twin) is written by whichever process took the lock, on every node whose folder is its own."""
    model.should_save_on_this_rank = lambda is_main_process: is_main_process  # this instance only
    try:
        model.save_pretrained(folder)
    finally:
        del model.should_save_on_this_rank


def build_once(target: Path, version: int, build: Callable[[Path], None], *, seed: int, what: str) -> Path:
    """A generated model folder (a tiny twin) built once by ``build_folder_once``: ``build(staging)`` runs under
    ``torch.manual_seed(seed)`` (the caller's random state is kept), and a ``tiny.json`` marker records ``version``.
    A folder whose marker holds ``version`` is used as it is; any other (older builder, damaged marker) is rebuilt.
    """
    def seeded(staging: Path) -> None:
        import torch  # here, not at the top: the results notebook reads this package without loading torch

        rng_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            build(staging)
            (staging / MARKER).write_text(json.dumps({"version": version, "seed": seed}))
        finally:
            torch.random.set_rng_state(rng_state)

    return build_folder_once(target, lambda folder: _is_current(folder / MARKER, version), seeded,
                             f"building the tiny offline {what} in {target} (once)")
