"""One fine-tuning and one evaluation script for every video family (MODEL); GeoLLaVA's four script names run them
with their family; each script loads only its own recipe."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
from conftest import Command, TEST_TIMEOUT
from test_layering import import_graph, own_imports

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


def loaded_modules(script: str) -> set[str]:
    """The geochange modules ``python <script>`` loads, in a fresh process, before its settings stop it (an unknown
    setting: exit status 2 after the script's own imports)."""
    command = Command([sys.executable, "-X", "importtime", str(REPO / script), "NO_SUCH_SETTING=1"])
    assert command.process.wait(timeout=TEST_TIMEOUT) == 2, command.output()
    assert "unknown setting 'NO_SUCH_SETTING'" in command.stderr()
    return {line.rsplit("|", 1)[1].strip() for line in command.stderr().splitlines()
            if line.startswith("import time:") and "geochange" in line}


def script_modules(script: str) -> set[str]:
    """The geochange modules ``python <script>`` can load: its imports of ours wherever they stand in the file (and
    in the scripts it imports), closed over the package's import graph, with every module's parent packages (Python
    runs a package's __init__ first). Exact for the package's part: its modules import ours at their tops only
    (test_layering), so the graph is what a process loads."""
    top, _ = import_graph()
    modules = set(top)
    starts: set[str] = set()
    scripts, seen_scripts = [script], set()
    while scripts:
        name = scripts.pop()
        seen_scripts.add(name)
        for node in ast.walk(ast.parse((REPO / name).read_text(encoding="utf-8"))):
            starts |= own_imports(node, "__main__", False, modules)
            imported = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            scripts += [f"{m}.py" for m in imported if (REPO / f"{m}.py").is_file() and f"{m}.py" not in seen_scripts]
    loaded: set[str] = set()
    todo = sorted(starts)
    while todo:
        module = todo.pop()
        parts = module.split(".")
        for name in (".".join(parts[:k]) for k in range(1, len(parts) + 1)):
            if name not in loaded:
                loaded.add(name)
                todo += sorted(top.get(name, ()))
    return loaded


def test_each_script_loads_only_its_own_recipe():
    """DeltaVLM's scripts load nothing of the video models, the video scripts nothing of DeltaVLM, and none loads
    the demo or the scene maps' command (read from the files: what a script and the modules it reaches import)."""
    loads = {script: script_modules(script) for script in
             ("deltavlm_finetune.py", "deltavlm_predict.py", *GEOLLAVA_NAMES, "video_finetune.py", "video_evaluate.py")}
    for script in ("deltavlm_finetune.py", "deltavlm_predict.py"):
        assert not {m for m in loads[script] if m.startswith("geochange.video_llm")}, script
    assert "geochange.deltavlm.training" in loads["deltavlm_finetune.py"]
    for script in (*GEOLLAVA_NAMES, "video_finetune.py", "video_evaluate.py"):
        assert not {m for m in loads[script] if m.startswith("geochange.deltavlm")}, script
    for script in ("videollava_finetune.py", "llavanext_finetune.py"):
        assert "geochange.video_llm.finetune" in loads[script]
    for script in ("videollava_test.py", "llavanext_eval.py"):
        assert "geochange.video_llm.evaluation" in loads[script]
    assert not {m for loaded in loads.values() for m in loaded if m in ("geochange.demo", "geochange.change_maps")}


@pytest.mark.slow
def test_what_a_script_process_loads_is_within_what_its_files_import():
    """The reading of the files above against a real process: everything of ours ``python video_evaluate.py``
    loaded (before an unknown setting stopped it) is in its reading, which also has what it loads later."""
    loaded = loaded_modules("video_evaluate.py")
    assert "geochange.video_llm.evaluation" in loaded and loaded <= script_modules("video_evaluate.py")
