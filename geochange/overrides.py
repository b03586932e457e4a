"""``python script.py [EXPERIMENT_FILE] NAME=VALUE ...``: override a script's UPPER_CASE constants.

Editing the constants at the top of a script stays the primary interface; this
only lets a run change some of them without touching the file (nanoGPT style).
An experiment file (``configs/experiments/<name>.py``) holds a committed set of
them as literal ``NAME = value`` lines, read with ``ast`` (never executed): its
values apply first, the ``NAME=VALUE`` arguments after it.
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import runpy
import sys
from pathlib import Path
from typing import Any

from .devices import is_main_process
from .errors import UserError
from .paths import REPO_ROOT
from .process import prepare_process

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
        return fit_value(f"{name}={raw!r}", value, default)
    # default is None: the type is open, so take the most specific reading.
    if text.lower() in _TRUE | _FALSE and text.lower() not in {"0", "1"}:
        return text.lower() in _TRUE
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return raw


def fit_value(where: str, value: Any, default: Any) -> Any:
    """A Python ``value`` given for a constant whose default is ``default``, as that constant's type (an int where a
    float is, a tuple's items where a list is), or one line naming ``where`` it came from. None fits where the default
    is None or a string (a path, a name); a default of None takes any value."""
    if default is None or (value is None and isinstance(default, str)):
        return value
    kinds = {bool: (bool,), int: (int,), float: (int, float), str: (str,), list: (list, tuple), tuple: (list, tuple),
             dict: (dict,)}[type(default)]
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise UserError(f"{where}: expected {'a' if type(default) is not int else 'an'} {type(default).__name__}, "
                        f"not {value!r}")
    return type(default)(value) if isinstance(default, (float, list, tuple)) else value


@dataclasses.dataclass(frozen=True)
class Experiment:
    """An experiment file as read: its path as given, the sha256 of its bytes (run.json records both) and its
    ``NAME = value`` lines."""
    path: str
    sha256: str
    values: dict[str, Any]

    def record(self) -> dict[str, str]:
        return {"file": self.path, "sha256": self.sha256}


def read_experiment(path: str | Path, defaults: dict[str, Any]) -> Experiment:
    """An experiment file: a docstring, comments and literal ``NAME = value`` lines (read with ``ast``, never run),
    each ``NAME`` one of ``defaults`` (a script's constants) and its value of that constant's type; anything else
    stops in one line naming the file and the line."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"experiment file {path} does not exist (the committed ones: configs/experiments/)")
    data = file.read_bytes()
    try:
        tree = ast.parse(data.decode("utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError) as exc:
        raise UserError(f"experiment file {path}: not Python literals ({exc})") from None
    values: dict[str, Any] = {}
    for node in tree.body:
        where = f"{path}:{node.lineno}"
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            continue  # the docstring
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise UserError(f"{where}: an experiment file holds only NAME = value lines")
        name = node.targets[0].id
        if name not in defaults:
            raise UserError(f"{where}: unknown setting {name!r}; valid names: {', '.join(sorted(defaults))}")
        try:
            value = ast.literal_eval(node.value)
        except ValueError:
            raise UserError(f"{where}: {name} must be a literal value (a number, string, True/False/None, list, "
                            f"dict), not an expression") from None
        values[name] = fit_value(f"{where}: {name}", value, defaults[name])
    return Experiment(str(path), hashlib.sha256(data).hexdigest(), values)


def apply_overrides(scope: dict[str, Any], argv: list[str] | None = None, *, quiet: bool = False) -> dict[str, Any]:
    """Apply ``NAME=VALUE`` arguments to the constants in ``scope`` (a script's ``globals()``).

    Returns the overrides applied. An unknown name, a malformed argument or a value
    of the wrong type raises UserError with one line that lists the valid names.
    Also prepares the process (one-line errors, the garbage collector: ``process.prepare_process``), since
    every script calls this first.
    """
    prepare_process()
    argv = sys.argv[1:] if argv is None else list(argv)
    names = overridable_names(scope)
    applied: dict[str, Any] = {}
    for arg in argv:
        if "=" not in arg:
            raise UserError(f"argument {arg!r} is not NAME=VALUE (an experiment file comes first, before them); "
                            f"valid names: {', '.join(names)}")
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


def make_settings(values: dict[str, Any], name: str = "Settings", *, experiment: Experiment | None = None):
    """A typed, frozen settings value from ``{NAME: value}``: ``cfg.LORA_R``, ``cfg.as_dict()``,
    ``dataclasses.replace(cfg, LORA_R=16)``. Each field's type is its value's type (``Any`` for None).
    ``cfg.experiment``: the experiment file they came from (None: none), not a setting (``as_dict`` leaves it out,
    comparisons ignore it: a run resumes under the same values however they were given)."""
    fields = [(key, Any if value is None else type(value)) for key, value in values.items()]
    fields.append(("experiment", Any, dataclasses.field(default=None, compare=False)))
    cls = dataclasses.make_dataclass(name, fields, frozen=True, namespace={
        "as_dict": lambda self: {key: value for key, value in vars(self).items() if key != "experiment"}})
    return cls(**values, experiment=experiment)


def load_settings(scope: dict[str, Any], argv: list[str] | None = None, *, quiet: bool = False):
    """The scripts' one entry point for settings: ``python <script> [EXPERIMENT_FILE] NAME=VALUE ...``. The
    experiment file's values (``read_experiment``), then the ``NAME=VALUE`` overrides, are applied to the constants
    in ``scope`` (a script's ``globals()``), returned as one frozen settings value (``cfg.experiment``: the file)."""
    prepare_process()
    argv = sys.argv[1:] if argv is None else list(argv)
    experiment = None
    if argv and "=" not in argv[0]:
        experiment = read_experiment(argv[0], {name: scope[name] for name in overridable_names(scope)})
        argv = argv[1:]
        if not quiet and is_main_process():
            print(f"experiment: {experiment.path} (sha256 {experiment.sha256[:12]})")
    applied = apply_overrides(scope, argv, quiet=quiet)  # every argument checked before any is applied
    if experiment is not None:  # the file's values under the arguments'
        scope.update({name: value for name, value in experiment.values.items() if name not in applied})
    return make_settings(settings_of(scope), experiment=experiment)


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
