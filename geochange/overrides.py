"""``python script.py NAME=VALUE ...``: override a script's UPPER_CASE constants.

Editing the constants at the top of a script stays the primary interface; this
only lets a run change some of them without touching the file (nanoGPT style).
"""
from __future__ import annotations

import ast
import dataclasses
import runpy
import sys
from typing import Any

from .devices import is_main_process
from .errors import UserError, install_error_handler
from .paths import REPO_ROOT

_SCALARS = (bool, int, float, str, type(None))
_CONTAINERS = (list, tuple, dict)
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_NONE = {"none", "null"}
# Settings that may hold a password (the demo's login): their overrides are applied, never printed.
SECRET_SETTINGS = frozenset({"AUTH"})


def overridable_names(scope: dict[str, Any]) -> list[str]:
    """The constants a script exposes: UPPER_CASE names bound to plain values."""
    return sorted(
        name for name, value in scope.items()
        if name.isupper() and not name.startswith("_") and isinstance(value, _SCALARS + _CONTAINERS)
    )


def parse_value(name: str, raw: str, default: Any) -> Any:
    """Parse ``raw`` to the type of ``default``; raise UserError naming ``name`` if it does not fit."""
    text = raw.strip()
    # None is accepted where "nothing" makes sense: optional settings and paths.
    if text.lower() in _NONE and (default is None or isinstance(default, str)):
        return None
    if isinstance(default, bool):
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise UserError(f"{name}={raw!r}: expected a boolean (True/False)")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise UserError(f"{name}={raw!r}: expected an integer") from None
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise UserError(f"{name}={raw!r}: expected a number") from None
    if isinstance(default, str):
        return raw
    if isinstance(default, _CONTAINERS):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise UserError(f"{name}={raw!r}: expected a Python {type(default).__name__} literal") from None
        if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
            return type(default)(value)
        if not isinstance(value, type(default)):
            raise UserError(f"{name}={raw!r}: expected a {type(default).__name__}")
        return value
    # default is None: the type is open, so take the most specific reading.
    if text.lower() in _TRUE | _FALSE and text.lower() not in {"0", "1"}:
        return text.lower() in _TRUE
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return raw


def apply_overrides(scope: dict[str, Any], argv: list[str] | None = None, *, quiet: bool = False) -> dict[str, Any]:
    """Apply ``NAME=VALUE`` arguments to the constants in ``scope`` (a script's ``globals()``).

    Returns the overrides applied. An unknown name, a malformed argument or a value
    of the wrong type raises UserError with one line that lists the valid names.
    Also installs the one-line error handler, since every script calls this first.
    """
    install_error_handler()
    argv = sys.argv[1:] if argv is None else list(argv)
    names = overridable_names(scope)
    applied: dict[str, Any] = {}
    for arg in argv:
        if "=" not in arg:
            raise UserError(f"argument {arg!r} is not NAME=VALUE; valid names: {', '.join(names)}")
        name, raw = arg.split("=", 1)
        name = name.strip().lstrip("-")
        if name not in names:
            raise UserError(f"unknown setting {name!r}; valid names: {', '.join(names)}")
        applied[name] = parse_value(name, raw, scope[name])
    for name, value in applied.items():
        scope[name] = value
        if not quiet and is_main_process():  # one line per override, not one per process
            shown = "<hidden>" if name in SECRET_SETTINGS and value is not None else repr(value)
            print(f"override: {name} = {shown}")
    return applied


def settings_of(scope: dict[str, Any]) -> dict[str, Any]:
    """The current value of every constant, JSON-friendly (for run.json / metrics files)."""
    return {name: (list(scope[name]) if isinstance(scope[name], tuple) else scope[name])
            for name in overridable_names(scope)}


def make_settings(values: dict[str, Any], name: str = "Settings"):
    """A typed, frozen settings value from ``{NAME: value}``: ``cfg.LORA_R``, ``cfg.as_dict()``,
    ``dataclasses.replace(cfg, LORA_R=16)``. Each field's type is its value's type (``Any`` for None)."""
    fields = [(key, Any if value is None else type(value)) for key, value in values.items()]
    cls = dataclasses.make_dataclass(name, fields, frozen=True,
                                     namespace={"as_dict": lambda self: dict(vars(self))})
    return cls(**values)


def load_settings(scope: dict[str, Any], argv: list[str] | None = None, *, quiet: bool = False):
    """The scripts' one entry point for settings: apply ``NAME=VALUE`` overrides to the constants in
    ``scope`` (a script's ``globals()``) and return them as one frozen settings value."""
    apply_overrides(scope, argv, quiet=quiet)
    return make_settings(settings_of(scope))


def script_constants(script: str, **overrides):
    """A script's constants as its settings value, read from the file (its ``__main__`` steps do not run), with
    ``overrides`` applied: what ``python <script> NAME=VALUE ...`` would build, for one script to run another's steps
    (evaluation after training reads the evaluation script's own constants)."""
    scope = runpy.run_path(str(REPO_ROOT / script), run_name="constants")
    values = settings_of(scope)
    unknown = sorted(set(overrides) - set(values))
    if unknown:
        raise UserError(f"{script} has no setting {', '.join(unknown)}")
    return make_settings({**values, **overrides})
