"""The scripts read the one family entry, and each family's scripts stay in step with the others': one recipe."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from geochange.video_llm.families import FAMILIES

REPO = Path(__file__).resolve().parent.parent
FIRST, *OTHERS = FAMILIES.values()
# Lines that may differ beyond the family's own words: facts about each model that the comments state.
MAY_DIFFER = ("MAX_LENGTH = ",)


def family_words(family) -> list[str]:
    """What must differ between two families' scripts: file names, the family id, the model id, the name."""
    return [Path(family.finetune_script).stem, Path(family.eval_script).stem, f'"{family.id}"',
            family.default_model_id, family.display_name]


def neutral_lines(script: str, family) -> list[str]:
    """The script's code and comments after its docstring, with the family's own words replaced by placeholders."""
    text = (REPO / script).read_text(encoding="utf-8")
    body = text[text.index('"""', 3) + 3:]
    for index, word in enumerate(family_words(family)):
        body = body.replace(word, f"<{index}>")
    return [line for line in body.splitlines() if not line.startswith(MAY_DIFFER)]


def constants(script: str) -> dict[str, object]:
    tree = ast.parse((REPO / script).read_text(encoding="utf-8"))
    return {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and node.targets[0].id.isupper()}


@pytest.mark.parametrize("kind", ["finetune_script", "eval_script"])
@pytest.mark.parametrize("family", OTHERS, ids=[f.id for f in OTHERS])
def test_each_familys_scripts_differ_from_the_first_familys_only_in_the_model(family, kind):
    ours, theirs = getattr(FIRST, kind), getattr(family, kind)
    assert neutral_lines(ours, FIRST) == neutral_lines(theirs, family)
    first, other = constants(ours), constants(theirs)
    assert list(first) == list(other)
    assert {name for name in first if first[name] != other[name]} == {"MODEL_ID"}


@pytest.mark.parametrize("family", FAMILIES.values(), ids=list(FAMILIES))
def test_every_family_entry_names_its_scripts_and_they_use_it(family):
    for script in (family.finetune_script, family.eval_script):
        text = (REPO / script).read_text(encoding="utf-8")
        assert f'family="{family.id}"' in text and constants(script)["MODEL_ID"] == family.default_model_id
    # the family's classes are real transformers classes, and its parts are named in them
    assert family.model_class.__name__ == family.model_class_name
