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
