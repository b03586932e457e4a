"""One clear line instead of a traceback for mistakes a user can fix."""
from __future__ import annotations

import sys


class UserError(Exception):
    """A problem with settings, input files or data that the user must fix.

    Scripts let it propagate; ``install_error_handler`` turns it into one line on
    stderr and exit status 2, so nothing looks like a crash of the suite itself.
    """


def print_error(exc: UserError) -> None:
    """The one line a ``UserError`` becomes, on stderr."""
    print(f"error: {exc}", file=sys.__stderr__, flush=True)


def _excepthook(exc_type, exc, tb):  # pragma: no cover - exercised through subprocess tests
    # The real stderr, flushed before the exit: torch.distributed wraps this hook with one that swaps sys.stderr for
    # a buffer it writes out only when the hook returns, and this one exits (under torchrun the line was lost).
    if issubclass(exc_type, UserError):
        print_error(exc)
        sys.exit(2)
    if issubclass(exc_type, KeyboardInterrupt):
        print("interrupted: everything written so far is kept; rerun to resume", file=sys.__stderr__, flush=True)
        sys.exit(130)
    sys.__excepthook__(exc_type, exc, tb)


def install_error_handler() -> None:
    sys.excepthook = _excepthook


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message cut to its first line (its type's name when it has none), for one-line errors."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]
