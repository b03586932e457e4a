"""A family is one entry: no code outside ``geochange/video_llm/families.py`` names a family id or an entry, so no
code branches on one (docs, configs and the scripts' settings may name them; the tests pick families by id)."""
from __future__ import annotations

import ast
import json
import re
import subprocess
from pathlib import Path

from geochange.video_llm import families

REPO = Path(__file__).resolve().parent.parent
ENTRY_MODULE = "geochange/video_llm/families.py"
# an id as a word of a string ("videollava", "videollava-tiny"), not inside a file name ("videollava_finetune.py")
FAMILY_ID = re.compile(r"(?<![\w.])(?:" + "|".join(map(re.escape, families.FAMILIES)) + r")(?![\w])")
ENTRY_NAMES = {name for name, value in vars(families).items() if isinstance(value, families.ModelFamily)}


def code_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py", "*.ipynb"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    return [path for path in sorted(set(listed)) if (REPO / path).exists() and path != ENTRY_MODULE
            and not path.startswith(("tests/", "configs/"))]


def source_of(path: str) -> str:
    text = (REPO / path).read_text(encoding="utf-8")
    if path.endswith(".ipynb"):
        cells = json.loads(text)["cells"]
        text = "\n".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "code")
        text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith(("%", "!")))
    return text


def named_families(source: str) -> list[str]:
    """Family ids in the code's strings, and the entries' own names. Docstrings aside (they may name a model as an
    example), and a script's settings (its module-level UPPER_CASE constants, like ``MODEL = "..."``: a value the
    user edits, as a config's)."""
    tree = ast.parse(source)
    allowed = {id(node.body[0].value) for node in ast.walk(tree)
               if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
               and node.body and isinstance(node.body[0], ast.Expr)
               and isinstance(node.body[0].value, ast.Constant) and isinstance(node.body[0].value.value, str)}
    allowed |= {id(constant) for node in tree.body if isinstance(node, ast.Assign)
                and all(isinstance(t, ast.Name) and t.id.isupper() for t in node.targets)
                for constant in ast.walk(node.value)}
    found = [match for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
             and id(node) not in allowed for match in FAMILY_ID.findall(node.value)]
    found += [node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and node.id in ENTRY_NAMES]
    found += [alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
              for alias in node.names if alias.name in ENTRY_NAMES]
    return found


def test_no_code_outside_the_entry_module_names_a_family():
    offenders = {path: names for path in code_files() if (names := named_families(source_of(path)))}
    assert offenders == {}


def test_the_check_finds_what_it_looks_for():
    some_id = next(iter(families.FAMILIES))
    assert named_families(f'if family == "{some_id}":\n    pass\n') == [some_id]
    assert named_families(f'label = f"{some_id}-tiny"\n') == [some_id]
    assert named_families(f'"""Docs: {some_id}."""\nscript = "{some_id}_finetune.py"\n') == []
    assert named_families(f'MODEL = "{some_id}"\n') == []  # a script's setting
    assert named_families(f'def main():\n    MODEL = "{some_id}"\n') == [some_id]  # not at module level
    entry = sorted(ENTRY_NAMES)[0]
    assert named_families(f"from geochange.video_llm.families import {entry}\n") == [entry]
