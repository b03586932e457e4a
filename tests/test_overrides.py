import re
import sys
from pathlib import Path

import pytest
from conftest import run_command, run_script

from geochange.errors import UserError
from geochange.overrides import apply_overrides, parse_value, settings_of

REPO = Path(__file__).resolve().parent.parent


def scope():
    return {"MODEL_ID": "x", "USE_LORA": True, "LORA_R": 8, "LR": 2e-4, "VIDEO_DIR": None, "TARGETS": ("q", "v"),
            "lowercase": 1, "_PRIVATE": 3}


def test_values_take_the_constants_type():
    s = scope()
    applied = apply_overrides(s, ["USE_LORA=false", "LORA_R=16", "LR=1e-3", "MODEL_ID=tiny", "VIDEO_DIR=/data/v",
                                  "TARGETS=['a', 'b']"], quiet=True)
    assert s["USE_LORA"] is False and s["LORA_R"] == 16 and s["LR"] == pytest.approx(1e-3)
    assert s["MODEL_ID"] == "tiny" and s["VIDEO_DIR"] == "/data/v" and s["TARGETS"] == ("a", "b")
    assert set(applied) == {"USE_LORA", "LORA_R", "LR", "MODEL_ID", "VIDEO_DIR", "TARGETS"}


@pytest.mark.parametrize("raw,expected", [("True", True), ("yes", True), ("1", True), ("off", False), ("0", False)])
def test_booleans(raw, expected):
    assert parse_value("USE_LORA", raw, True) is expected


def test_int_accepts_no_fraction_and_float_accepts_int():
    assert parse_value("LR", "3", 0.1) == 3.0 and isinstance(parse_value("LR", "3", 0.1), float)
    with pytest.raises(UserError, match="LORA_R='2.5': expected an integer"):
        parse_value("LORA_R", "2.5", 8)


def test_none_for_optional_and_strings_only():
    assert parse_value("VIDEO_DIR", "None", None) is None
    assert parse_value("MODEL_ID", "none", "x") is None
    with pytest.raises(UserError, match="expected an integer"):
        parse_value("LORA_R", "None", 8)
    # an open-typed (None) constant takes the most specific reading
    assert parse_value("LIMIT", "12", None) == 12 and parse_value("X", "runs/a", None) == "runs/a"


@pytest.mark.parametrize("argv,message", [
    (["NOPE=1"], "unknown setting 'NOPE'; valid names: LORA_R, LR, MODEL_ID, TARGETS, USE_LORA, VIDEO_DIR"),
    (["LORA_R"], "is not NAME=VALUE"),
    (["USE_LORA=maybe"], "USE_LORA='maybe': expected a boolean"),
    (["LR=fast"], "LR='fast': expected a number"),
    (["lowercase=2"], "unknown setting 'lowercase'"),
])
def test_bad_arguments_name_the_problem(argv, message):
    s = scope()
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        apply_overrides(s, argv, quiet=True)
    assert s == scope(), "nothing is applied when one argument is bad"


def test_settings_of_lists_constants_only():
    assert settings_of(scope()) == {"LORA_R": 8, "LR": 2e-4, "MODEL_ID": "x", "TARGETS": ["q", "v"], "USE_LORA": True,
                                    "VIDEO_DIR": None}


def test_a_users_mistake_is_one_error_line_and_exit_status_2():
    """The one subprocess test of the error handler: the line, the status, no traceback (every other error-path
    test runs the scripts in-process and catches the UserError)."""
    run = run_command([sys.executable, "videollava_finetune.py", "LORA_RANK=4"])
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown setting 'LORA_RANK'; valid names:")
    assert "MODEL_ID" in lines[0] and "Traceback" not in run.stderr and run.stdout == ""


FINALISED_THEN_FROZEN = """
import atexit, gc, sys
atexit.register(lambda: print("frozen at the end:", gc.get_freeze_count() > 0, flush=True))
import geochange
from geochange.process import YOUNG_COLLECTION_THRESHOLD, prepare_process
# raised by the package's import itself, before a script imports torch
print("thresholds at import:", gc.get_threshold() == (YOUNG_COLLECTION_THRESHOLD, 10, 10), "torch" in sys.modules)
before = atexit._ncallbacks()
prepare_process()
prepare_process()  # load_settings and a command may each call it: one exit handler still
print("exit handlers added:", atexit._ncallbacks() - before, flush=True)
print("thresholds:", gc.get_threshold() == (YOUNG_COLLECTION_THRESHOLD, 10, 10), flush=True)
class Noisy:
    def __del__(self):
        print("finalised", flush=True)
a, b = Noisy(), Noisy()
a.other, b.other = b, a
del a, b
gc.disable()  # the cycle is left for the exit
"""


def test_a_script_process_collects_less_often_and_finalises_its_garbage_before_freezing_the_heap_at_exit():
    """Young collections every YOUNG_COLLECTION_THRESHOLD allocations from the package's import on, before torch
    (Python's 700 re-walked the libraries' growing heap ~10 times as they imported and ran), and at exit the objects
    are frozen out of the interpreter's last collections (2-3 s of CPU with torch, transformers and DeepSpeed loaded),
    after one collection that finalises the garbage left: a cycle of objects with finalizers is finalised before the
    freeze, which would otherwise keep it forever."""
    run = run_command([sys.executable, "-c", FINALISED_THEN_FROZEN])
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["thresholds at import: True False", "exit handlers added: 1", "thresholds: True",
                                     "finalised", "finalised", "frozen at the end: True"]


@pytest.mark.parametrize("script", ["llavanext_eval.py", "deltavlm_finetune.py", "deltavlm_predict.py"])
def test_every_script_rejects_an_unknown_name(script, user_error):
    user_error(lambda: run_script(script, "LORA_RANK=4"), "unknown setting 'LORA_RANK'; valid names:")


def test_load_settings_gives_one_frozen_typed_value():
    import dataclasses

    from geochange.overrides import load_settings

    s = scope()
    cfg = load_settings(s, ["LORA_R=16", "VIDEO_DIR=/v"], quiet=True)
    assert cfg.LORA_R == 16 and cfg.VIDEO_DIR == "/v" and s["LORA_R"] == 16
    assert cfg.as_dict() == settings_of(s)
    assert {f.name: f.type for f in dataclasses.fields(cfg)}["LORA_R"] is int
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.LORA_R = 4
    assert dataclasses.replace(cfg, LORA_R=4).LORA_R == 4 and cfg.LORA_R == 16


def test_an_experiment_file_applies_first_then_the_arguments_and_is_recorded(tmp_path):
    """``python <script> FILE NAME=VALUE``: the file's literal lines, typed as the constants, then the arguments over
    them; the settings carry the file and its sha256 (not as a setting: the same values resume the same run)."""
    import hashlib

    from geochange.overrides import load_settings
    from geochange.runs import settings_record

    file = tmp_path / "exp.py"
    file.write_text('"""A row of a table."""\n# a comment\nLORA_R = 16\nLR = 1  # an int where a float is\n'
                    'TARGETS = ["k"]\nVIDEO_DIR = "/data/v"\n')
    s = scope()
    cfg = load_settings(s, [str(file), "LORA_R=32"], quiet=True)
    assert (cfg.LORA_R, cfg.LR, cfg.TARGETS, cfg.VIDEO_DIR, cfg.USE_LORA) == (32, 1.0, ["k"], "/data/v", True)
    assert isinstance(cfg.LR, float) and s["TARGETS"] == ("k",)
    assert cfg.experiment.sha256 == hashlib.sha256(file.read_bytes()).hexdigest()
    given = load_settings(scope(), ["LORA_R=32", "LR=1.0", "TARGETS=['k']", "VIDEO_DIR=/data/v"], quiet=True)
    assert cfg.as_dict() == given.as_dict() and "experiment" not in cfg.as_dict()
    assert settings_record(cfg, {})["experiment"] == {"file": str(file), "sha256": cfg.experiment.sha256}
    assert settings_record(load_settings(scope(), [], quiet=True), {})["experiment"] is None


@pytest.mark.parametrize("text,message", [
    ("NOPE = 1\n", ":1: unknown setting 'NOPE'; valid names: LORA_R, LR, MODEL_ID"),
    ("LORA_R = 8\nLORA_R = 2.5\n", ":2: LORA_R: expected an int, not 2.5"),
    ("USE_LORA = 1\n", ":1: USE_LORA: expected a bool, not 1"),
    ("LORA_R = True\n", ":1: LORA_R: expected an int, not True"),
    ("LR = 1e-3 * 2\n", ":1: LR must be a literal value"),
    ("import os\n", ":1: an experiment file holds only NAME = value lines"),
    ("LR = (\n", "not Python literals"),
])
def test_a_bad_experiment_file_names_its_line_and_changes_nothing(tmp_path, text, message):
    from geochange.overrides import load_settings

    (tmp_path / "exp.py").write_text(text)
    s = scope()
    with pytest.raises(UserError, match=re.escape(message)):
        load_settings(s, [str(tmp_path / "exp.py"), "LORA_R=4"], quiet=True)
    assert s == scope()
    with pytest.raises(UserError, match="experiment file nowhere.py does not exist"):
        load_settings(s, ["nowhere.py"], quiet=True)
    with pytest.raises(UserError, match="an experiment file comes first"):
        load_settings(s, ["LORA_R=4", str(tmp_path / "exp.py")], quiet=True)


# configs/experiments/<prefix>_*.py is a row for this script
EXPERIMENT_SCRIPTS = {"deltavlm": "deltavlm_finetune.py", "videollava": "video_finetune.py",
                      "llavanext": "video_finetune.py"}


@pytest.mark.parametrize("file", sorted((REPO / "configs" / "experiments").glob("*.py")), ids=lambda path: path.stem)
def test_every_experiment_file_loads_against_its_scripts_constants(file):
    """Each committed experiment file reads as its script would read it (an unknown name or a wrongly typed value
    fails) and its docstring gives the command that runs it."""
    import runpy

    from geochange.overrides import load_settings

    script = EXPERIMENT_SCRIPTS[file.stem.split("_")[0]]
    relative = file.relative_to(REPO).as_posix()
    cfg = load_settings(runpy.run_path(str(REPO / script), run_name="constants"), [relative], quiet=True)
    assert cfg.experiment.values and all(cfg.as_dict()[name] == value for name, value in cfg.experiment.values.items())
    assert f"python {script} {relative}" in file.read_text()
