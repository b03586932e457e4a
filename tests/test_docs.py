"""The README and docs/*.md: every relative link and #anchor resolves (GitHub's anchor rules), the README fits on a
screen and lists every page, the settings tables name exactly the scripts' constants, the command table exactly
common.py's commands, and CI runs the README's test command."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from geochange.overrides import script_constants

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^ *```.*?^ *```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def prose(text: str) -> str:
    """Markdown without its code: fenced blocks and inline code spans (a `[x](y)` in code is no link)."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def headings(text: str) -> list[tuple[int, str]]:
    """(level, text) of every ATX heading outside code blocks."""
    return [(len(marks), title.strip()) for marks, title in re.findall(r"^(#{1,6}) +(.+?) *#*$", FENCE.sub("", text), re.M)]


def github_anchor(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (letters, digits, '_' and '-' kept), each space a
    hyphen."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor of a page, repeats numbered as GitHub numbers them (``name``, ``name-1``, ``name-2`` ...)."""
    seen: dict[str, int] = {}
    found = set()
    for _, title in headings(page.read_text(encoding="utf-8")):
        anchor = github_anchor(title)
        found.add(anchor if anchor not in seen else f"{anchor}-{seen[anchor]}")
        seen[anchor] = seen.get(anchor, 0) + 1
    return found


def test_github_anchor_rules():
    assert github_anchor("GPU check (`benchmarks/gpu_check.py`)") == "gpu-check-benchmarksgpu_checkpy"
    assert github_anchor("GeoLLaVA / fMoW: the video models") == "geollava--fmow-the-video-models"
    assert github_anchor("What the recipe does right where GeoLLaVA's scripts went wrong") == \
        "what-the-recipe-does-right-where-geollavas-scripts-went-wrong"
    page = REPO / "docs" / "settings.md"
    assert {"fine-tuning-video_finetunepy", "what-a-run-directory-holds"} <= anchors(page)


def section(page: Path, title: str) -> str:
    """The text under the heading ``title`` of ``page``, up to the next heading of its level or above."""
    lines = page.read_text(encoding="utf-8").splitlines()
    level_of = {title_: level for level, title_ in headings("\n".join(lines))}
    start = next(i for i, line in enumerate(lines) if re.match(rf"^#+ +{re.escape(title)} *$", line))
    end = next((i for i in range(start + 1, len(lines))
                if (m := re.match(r"^(#+) ", lines[i])) and len(m.group(1)) <= level_of[title]), len(lines))
    return "\n".join(lines[start + 1:end])


def first_cells(text: str) -> list[str]:
    """The first cell of every table row (header and rule rows included)."""
    return re.findall(r"^\| (.+?) \|", text, re.M)


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for page in PAGES:
        for target in LINK.findall(prose(page.read_text(encoding="utf-8"))):
            if re.match(r"[a-z]+:", target):  # http(s), mailto: not ours to check offline
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(REPO)}: {target}"
            if not linked.exists():
                broken.append(f"{where} (no {path})")
            elif anchor and (linked.suffix != ".md" or anchor not in anchors(linked)):
                broken.append(f"{where} (no heading #{anchor} in {linked.relative_to(REPO)})")
    assert broken == []


def test_the_readme_fits_on_a_screen_and_lists_every_docs_page():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    listed = re.findall(r"^\| \[docs/([\w-]+\.md)\]\(docs/\1\) \| \S", section(REPO / "README.md", "Documentation"),
                        re.M)
    assert sorted(listed) == sorted(path.name for path in (REPO / "docs").glob("*.md"))


def test_ci_runs_the_test_command_the_readme_gives():
    commands = re.findall(r"^(python -m pytest[^#\n]*?) +#", section(REPO / "README.md", "Tests"), re.M)
    assert commands[0] == "python -m pytest -q"  # the whole suite, first
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()
    assert ci[-1] == commands[0]


# Each script's settings table: (page, heading, the scripts it documents).
SETTINGS_TABLES = [
    ("settings.md", "Fine-tuning (`video_finetune.py`)",
     ("video_finetune.py", "videollava_finetune.py", "llavanext_finetune.py")),
    ("settings.md", "Evaluation (`video_evaluate.py`)", ("video_evaluate.py", "videollava_test.py", "llavanext_eval.py")),
    ("deltavlm.md", "Settings", ("deltavlm_predict.py",)),
    ("deltavlm_training.md", "Settings", ("deltavlm_finetune.py",)),
    ("demo.md", "Settings", ("demo.py",)),
    ("scene_changes.md", "Settings", ("scene_changes.py",)),
]


@pytest.mark.parametrize("page, title, scripts", SETTINGS_TABLES, ids=[s[0] for _, _, s in SETTINGS_TABLES])
def test_each_settings_table_names_exactly_its_scripts_constants(page, title, scripts):
    named = {name for cell in first_cells(section(REPO / "docs" / page, title))
             for name in re.findall(r"`([A-Z][A-Z0-9_]*)`", cell)}
    for script in scripts:
        constants = set(script_constants(script).as_dict())
        assert sorted(constants - named) == [], f"{script}'s constants missing from docs/{page}"
        assert sorted(named - constants) == [], f"docs/{page} names constants {script} does not have"


def test_the_data_page_lists_every_command_of_common():
    import common

    table = section(REPO / "docs" / "data.md", "Bring your data")
    listed = [re.match(r"`([\w-]+)", cell).group(1) for cell in first_cells(table) if cell.startswith("`")]
    assert sorted(listed) == sorted(common.COMMANDS)
