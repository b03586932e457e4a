"""One fine-tuning and one evaluation script for every video family (MODEL); GeoLLaVA's four script names run them
with their family; each script loads only its own recipe."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import Command, TEST_TIMEOUT

from geochange.overrides import script_constants
from geochange.video_llm.families import FAMILIES, resolve_model_id

REPO = Path(__file__).resolve().parent.parent
# GeoLLaVA's script names: (the one script they run, their family)
GEOLLAVA_NAMES = {"videollava_finetune.py": ("video_finetune.py", "videollava"),
                  "llavanext_finetune.py": ("video_finetune.py", "llavanext"),
                  "videollava_test.py": ("video_evaluate.py", "videollava"),
                  "llavanext_eval.py": ("video_evaluate.py", "llavanext")}


@pytest.mark.parametrize("name", GEOLLAVA_NAMES)
def test_geollavas_script_names_are_the_one_script_with_their_family(name):
    one, family = GEOLLAVA_NAMES[name]
    assert script_constants(name).as_dict() == script_constants(one, MODEL=family).as_dict()
    assert script_constants(name, MAX_NEW_TOKENS=9).MAX_NEW_TOKENS == 9  # its constants are settings
    assert len((REPO / name).read_text().splitlines()) <= 12  # a few lines, nothing of the recipe


@pytest.mark.parametrize("family", FAMILIES.values(), ids=list(FAMILIES))
def test_every_family_is_a_model_setting_of_the_scripts(family, user_error):
    for script in ("video_finetune.py", "video_evaluate.py"):
        cfg = resolve_model_id(script_constants(script, MODEL=family.id))
        assert cfg.MODEL_ID == family.default_model_id  # MODEL_ID=None: the family's 7B model
        assert resolve_model_id(script_constants(script, MODEL=family.id, MODEL_ID="tiny")).MODEL_ID == "tiny"
    # the family's classes are real transformers classes
    assert family.model_class.__name__ == family.model_class_name
    user_error(lambda: resolve_model_id(script_constants("video_finetune.py", MODEL="qwen")),
               "unknown model family 'qwen'; expected one of")


def loaded_modules(*scripts: str) -> list[set[str]]:
    """The geochange modules ``python <script>`` loads, in a fresh process each (side by side), before its settings
    stop it (an unknown setting: exit status 2 after the script's own imports)."""
    commands = [Command([sys.executable, "-X", "importtime", str(REPO / script), "NO_SUCH_SETTING=1"])
                for script in scripts]
    loaded = []
    for command in commands:
        assert command.process.wait(timeout=TEST_TIMEOUT) == 2, command.output()
        assert "unknown setting 'NO_SUCH_SETTING'" in command.stderr()
        loaded.append({line.rsplit("|", 1)[1].strip() for line in command.stderr().splitlines()
                       if line.startswith("import time:") and "geochange" in line})
    return loaded


@pytest.mark.slow
def test_each_script_loads_only_its_own_recipe():
    """DeltaVLM's training loads nothing of the video models, the video scripts nothing of DeltaVLM (a fresh
    process each), and neither loads the demo or the memory table's command."""
    delta, video, evaluation = loaded_modules("deltavlm_finetune.py", "videollava_finetune.py", "video_evaluate.py")
    assert "geochange.deltavlm.training" in delta and not {m for m in delta if m.startswith("geochange.video_llm")}
    assert "geochange.video_llm.finetune" in video and "geochange.video_llm.evaluation" in evaluation
    for loaded in (video, evaluation):
        assert not {m for m in loaded if m.startswith("geochange.deltavlm")}, loaded
    assert not {m for m in delta | video | evaluation if m in ("geochange.demo", "geochange.change_maps")}
