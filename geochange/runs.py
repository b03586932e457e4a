"""A training run on disk, as both recipes keep it: its ``run.json`` (settings, versions, data hashes, curves), the
run directory's name, and whether a rerun may resume it."""
from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import platform
import re
from collections.abc import Collection
from pathlib import Path
from typing import Any

from .errors import UserError
from .fileio import atomic_write_text, file_sha256

RUN_FILE = "run.json"
VALIDATION_DIR = "validation"  # inside a run: each validation's captions and scores (<step or epoch>.jsonl, ...)
# Settings that cannot change what a run trains or how it is scored: a resume may change them. RUN_NAME and
# OUTPUT_DIR only pick the directory, and it is this one (a default name spelt out, a relative path made absolute).
RESUME_MAY_CHANGE = ("OVERWRITE", "NUM_WORKERS", "LOGGING_STEPS", "EVAL_BATCH_SIZE", "SAVE_TOTAL_LIMIT",
                     "DIST_TIMEOUT_MINUTES", "RUN_NAME", "OUTPUT_DIR", "REPORT_TO")


def write_run_file(run_dir: Path, record: dict[str, Any]) -> None:
    atomic_write_text(run_dir / RUN_FILE, json.dumps(record, indent=2, default=str))


def read_run_file(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / RUN_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None


def data_files(cfg, names: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """The annotation files a run read (the settings ``names`` that are set), with their hashes, for run.json."""
    return {name: {"path": str(getattr(cfg, name)), "sha256": file_sha256(getattr(cfg, name))}
            for name in names if getattr(cfg, name)}


def library_versions() -> dict[str, str]:
    """The versions a run was made with, for its run.json."""
    versions = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "deepspeed"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = "missing"
    return versions


def differing_settings(written: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The names whose values differ between settings written earlier and the settings of this run."""
    return sorted(k for k in set(written) | set(now) if written.get(k) != now.get(k))


def setting_token(name: str, value: Any) -> str:
    """A setting as a run name shows it: ``lr0.001``, ``numframes4``, ``lrschedulerlinear`` (the name lower case
    without underscores, the value cut to what a folder name may hold)."""
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return name.lower().replace("_", "") + re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-")[:24]


def settings_record(cfg, distinct: dict[str, Any]) -> dict[str, Any]:
    """run.json's account of a run's settings: every constant, the ``distinct`` ones (``distinct_settings``) as the
    run name shows them (``setting_token``: what the leaderboard label adds), and the experiment file they came from
    with its sha256 (None: none)."""
    return {"settings": cfg.as_dict(), "distinct_settings": {name: setting_token(name, value)
                                                             for name, value in distinct.items()},
            "experiment": cfg.experiment.record() if cfg.experiment else None}


def distinct_settings(settings: dict[str, Any], defaults: dict[str, Any], leave_out: Collection[str]) -> dict[str, Any]:
    """The settings whose values differ from the script's ``defaults`` (its constants), by name, but for
    ``leave_out``: what a default run name ends with (``setting_token``) and its leaderboard label shows, so that two
    runs that differ in what they train never share either. run.json records them (``distinct_settings``)."""
    return {name: settings[name] for name in defaults
            if name not in leave_out and name in settings and settings[name] != defaults[name]}


# A default run name stays this short (a folder name, with room for its lock's suffix and a results file's).
RUN_NAME_LIMIT = 160


def default_run_name(fixed: str, distinct: dict[str, Any]) -> str:
    """``fixed`` (a recipe's scheme) and a ``setting_token`` for each of ``distinct``; past RUN_NAME_LIMIT the tokens
    that fit, then a hash of all of them (two runs with other settings still get other names)."""
    tokens = [setting_token(name, value) for name, value in distinct.items()]
    name = "_".join([fixed, *tokens])
    if len(name) <= RUN_NAME_LIMIT:
        return name
    digest = hashlib.sha256(json.dumps(distinct, sort_keys=True, default=str).encode()).hexdigest()[:8]
    while tokens and len("_".join([fixed, *tokens, digest])) > RUN_NAME_LIMIT:
        tokens.pop()
    return "_".join([fixed, *tokens, digest])


def suggested_run_name(run_name: str, settings: dict[str, Any], differing: list[str]) -> str:
    """A name for a new run beside ``run_name``: the settings that differ appended (``_lr0.001_seed7``)."""
    parts = [setting_token(key, settings.get(key)) for key in differing[:3]]
    return "_".join([run_name, *parts]) if parts else f"{run_name}_2"


def resume_state(run_dir: Path, settings: dict[str, Any], *, overwrite: bool) -> str:
    """What to do with ``run_dir``: ``"new"``, ``"resume"`` (an unfinished run under the same settings, those
    of RESUME_MAY_CHANGE aside) or ``"replace"`` (OVERWRITE=True over a finished run or other settings).
    Without OVERWRITE, a finished run or one written under other settings stops with one line that names the ways
    out: the settings to restore, a new RUN_NAME (or OUTPUT_DIR) beside it, or OVERWRITE=True."""
    record = read_run_file(run_dir)
    if record is None:
        return "resume" if any(run_dir.glob("checkpoint-*")) else "new"
    keep = lambda values: {k: v for k, v in values.items() if k not in RESUME_MAY_CHANGE}  # noqa: E731
    differing = differing_settings(keep(record.get("settings", {})), keep(settings))
    finished = bool(record.get("completed"))
    if not (finished or differing):
        return "resume"
    if overwrite:
        return "replace"
    beside = (f"set RUN_NAME={suggested_run_name(run_dir.name, settings, differing)} (or another OUTPUT_DIR than "
              f"{run_dir.parent}) for a new run beside it, or OVERWRITE=True to train it again (deleting it)")
    if differing:
        raise UserError(f"{run_dir} holds a run with other settings ({', '.join(differing)}); restore them to "
                        f"resume it, {beside}")
    raise UserError(f"{run_dir} already holds a finished run; {beside}")


def check_resume_processes(run_dir: Path, settings: dict[str, Any], processes: int) -> None:
    """A run under DeepSpeed resumes only on as many processes as wrote its checkpoints: each holds one optimizer
    shard per process, and DeepSpeed fails deep inside its loading (after the model has loaded) on another number.
    One line naming both counts instead, before any model loads. ``processes``: this launch's world size; the run's
    own comes from its run.json (``world_size``)."""
    record = read_run_file(run_dir)
    if not settings.get("DEEPSPEED") or not record or record.get("completed"):
        return
    trained_on = record.get("world_size")
    if trained_on in (None, processes) or not any(p.is_dir() for p in run_dir.glob("checkpoint-*")):
        return
    raise UserError(f"{run_dir} was trained on {trained_on} processes under DeepSpeed ({settings['DEEPSPEED']}) and "
                    f"this launch has {processes}: its checkpoints hold one optimizer shard per process and cannot be "
                    f"resumed on another number; resume it on {trained_on} processes (torchrun --nproc_per_node ...), "
                    "or set RUN_NAME (or OUTPUT_DIR) for a new run")

