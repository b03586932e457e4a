"""The twin scripts stay in step: one recipe, two model families."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# What must differ between the twins: the file names, the family, the model id and its display name.
FAMILY_WORDS = {
    "videollava": ["videollava_finetune", "videollava_test", '"videollava"', "LanguageBind/Video-LLaVA-7B-hf", "Video-LLaVA"],
    "llavanext": ["llavanext_finetune", "llavanext_eval", '"llavanext"', "llava-hf/LLaVA-NeXT-Video-7B-hf",
                  "LLaVA-NeXT-Video"],
}
# Lines that may differ beyond those words: facts about each model that the comments state.
MAY_DIFFER = ("MAX_LENGTH = ",)


def neutral_lines(script: str, family: str) -> list[str]:
    """The script's code and comments after its docstring, with the family's own words replaced by placeholders."""
    text = (REPO / script).read_text(encoding="utf-8")
    body = text[text.index('"""', 3) + 3:]
    for index, word in enumerate(FAMILY_WORDS[family]):
        body = body.replace(word, f"<{index}>")
    return [line for line in body.splitlines() if not line.startswith(MAY_DIFFER)]


def constants(script: str) -> dict[str, object]:
    tree = ast.parse((REPO / script).read_text(encoding="utf-8"))
    return {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and node.targets[0].id.isupper()}


@pytest.mark.parametrize("videollava,llavanext", [("videollava_finetune.py", "llavanext_finetune.py"),
                                                  ("videollava_test.py", "llavanext_eval.py")])
def test_twin_scripts_differ_only_in_the_model(videollava, llavanext):
    assert neutral_lines(videollava, "videollava") == neutral_lines(llavanext, "llavanext")
    ours, theirs = constants(videollava), constants(llavanext)
    assert list(ours) == list(theirs)
    assert {name for name in ours if ours[name] != theirs[name]} == {"MODEL_ID"}
