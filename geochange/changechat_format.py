"""The ChangeChat / DeltaVLM instruction texts and answer formats, in one place.

The sample-data generator writes answers with these functions and the DeltaVLM
sub-task scorers parse them back, so both always agree.

Formats follow what DeltaVLM's released sub-task notebooks parse
(hanlinwu/DeltaVLM, ``scripts/test-count.ipynb`` and ``scripts/test-loc.ipynb``):

* counting: the road count comes before the first "new", the building count after
  it, and "no" means zero: ``there are 2 new roads and no new buildings``; nothing
  changed: ``there are no new roads or buildings``;
* localization: one Python-style list of 3x3 cell labels per category, labels as
  ``top-left`` ... ``center-center`` ... ``bottom-right``:
  ``roads ['top-left', 'top-center'] buildings []``;
* yes/no: ``yes`` or ``no`` (the released answers "Yes"/"No", lower-cased).

DeltaVLM lower-cased its training text and replaced ``.!"()*#:;~`` by spaces
(LAVIS's ``BlipCaptionProcessor``), so none of these formats needs those characters.
"""
from __future__ import annotations

import re

CAPTION_PROMPT = "Please briefly describe the changes in these two images."
YESNO_PROMPT = "Please judge whether these two images have changed. Please answer yes or no."
COUNT_PROMPT = "Please determine how many roads and buildings have changed?"
LOCALIZATION_PROMPT = (
    "Please indicate the locations where changes have occurred in the buildings and roads, using a 3x3 grid "
    "(namely, 'top', 'center', and 'bottom' vertically and 'left', 'center', 'right' horizontally)."
)

# ChangeChat's question types by their short labels (the demo's buttons, scene_changes.py's QUESTIONS).
TASK_QUESTIONS = {"caption": CAPTION_PROMPT, "changed?": YESNO_PROMPT, "how many?": COUNT_PROMPT,
                  "where?": LOCALIZATION_PROMPT}
# The no-change sentences of DeltaVLM's released test-cls.ipynb (LEVIR-CC's no-change captions): a caption that is one
# of them says "no change", any other caption "changed".
NO_CHANGE_SENTENCES = ("there is no difference", "the two scenes seem identical", "the scene is the same as before",
                       "no change has occurred", "almost nothing has changed")

GRID_ROWS = ("top", "center", "bottom")
GRID_COLS = ("left", "center", "right")
# The released localization labels, row-major (the order of test-loc.ipynb's label list).
GRID_LABELS = tuple(f"{row}-{col}" for row in GRID_ROWS for col in GRID_COLS)
CATEGORIES = ("roads", "buildings")
TASKS = ("caption", "yesno", "count", "localization", "open")

# LAVIS BlipCaptionProcessor.pre_caption: these characters become spaces, then at most 50 words.
_STRIPPED = re.compile(r"[.!\"()*#:;~]")
MAX_PROMPT_WORDS = 50
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty")
# Zero phrases the released counting notebook recognises, plus the dialog answers' "nothing changed".
_ZERO_COUNT = re.compile(r"no changes? in (?:the )?roads? or buildings?|no new roads? or buildings?"
                         r"|no roads? or buildings?|nothing (?:has )?changed|no change has occurred")


def cell_name(row: int, col: int) -> str:
    """Grid cell (row, col), 0-based, in caption words: 'top left', ..., 'center' for the middle cell."""
    if (row, col) == (1, 1):
        return "center"
    return f"{GRID_ROWS[row]} {GRID_COLS[col]}"


def grid_label(row: int, col: int) -> str:
    """Grid cell (row, col), 0-based, as a released localization label: 'top-left', ..., 'center-center'."""
    return f"{GRID_ROWS[row]}-{GRID_COLS[col]}"


def yesno_answer(changed: bool) -> str:
    return "yes" if changed else "no"


def _count_phrase(count: int, noun: str) -> str:
    return f"{count if count else 'no'} new {noun}{'' if count == 1 else 's'}"


def count_answer(roads: int, buildings: int) -> str:
    """'there are 2 new roads and 1 new building', 'there is 1 new road and no new buildings', ..."""
    if roads == 0 and buildings == 0:
        return "there are no new roads or buildings"
    verb = "is" if roads == 1 else "are"
    return f"there {verb} {_count_phrase(roads, 'road')} and {_count_phrase(buildings, 'building')}"


def localization_answer(road_cells: list[tuple[int, int]], building_cells: list[tuple[int, int]]) -> str:
    """'roads ['top-left', 'center-center'] buildings []': each category's cells, row-major, no repeats."""
    def cells(found: list[tuple[int, int]]) -> str:
        return "[" + ", ".join(f"'{grid_label(r, c)}'" for r, c in sorted(set(found))) + "]"

    return f"roads {cells(road_cells)} buildings {cells(building_cells)}"


# --------------------------------------------------------------------------- prompts as DeltaVLM saw them

def normalise_text(text: str, max_words: int | None = MAX_PROMPT_WORDS) -> str:
    """DeltaVLM's text processing: lower-case, ``.!"()*#:;~`` -> space, single spaces, first ``max_words`` words."""
    text = _STRIPPED.sub(" ", text.lower())
    text = re.sub(r"\s{2,}", " ", text).strip()
    words = text.split(" ")
    if max_words is not None and len(words) > max_words:
        text = " ".join(words[:max_words])
    return text


def dialog_prompt(history: list[tuple[str, str]], question: str) -> str:
    """A question with the earlier turns, in DeltaVLM's training layout: ``q: .. a: ..  q: <question>``.

    (Un-normalised; ``normalise_text`` then turns the colons into spaces as training did.)
    """
    context = " ".join(f" q: {q} a: {a}" for q, a in history).strip()
    return f"{context}  q: {question}" if context else f"q: {question}"


def task_of(question: str) -> str:
    """Which ChangeChat task a question asks for: caption, yesno, count, localization or open."""
    text = normalise_text(question, None)
    known = {normalise_text(CAPTION_PROMPT, None): "caption", normalise_text(YESNO_PROMPT, None): "yesno",
             normalise_text(COUNT_PROMPT, None): "count", normalise_text(LOCALIZATION_PROMPT, None): "localization"}
    if text in known:
        return known[text]
    if "3x3 grid" in text or ("locations" in text and "changes" in text):
        return "localization"
    if "how many" in text or text.startswith("count"):
        return "count"
    if "yes or no" in text:
        return "yesno"
    if "describe the change" in text:
        return "caption"
    return "open"


# --------------------------------------------------------------------------- parsers

def parse_yesno_answer(text: str) -> bool | None:
    """True for yes (changed), False for no, None when the answer says neither first."""
    match = re.search(r"\b(yes|no)\b", text.lower())
    return None if match is None else match.group(1) == "yes"


def _number(word: str) -> int | None:
    if word.isdigit():
        return int(word)
    if word in ("no", "none"):
        return 0
    if word in ("a", "an", "one", "single"):
        return 1
    return NUMBER_WORDS.index(word) if word in NUMBER_WORDS else None


_NUM = r"(\d+|no|none|an?|single|" + "|".join(NUMBER_WORDS) + r")"


def parse_count_answer(text: str) -> tuple[int | None, int | None]:
    """(roads, buildings) from a counting answer; None for a category the answer does not count.

    Reads digits and number words: 'there are 2 new roads and no new buildings',
    'two roads and three buildings have changed', 'no roads has changed, and no
    buildings has changed', 'roads: 1, buildings: 2', 'there are no new roads or buildings'.
    """
    lowered = normalise_text(text, None)
    if _ZERO_COUNT.search(lowered):
        return 0, 0
    found: list[int | None] = []
    for noun in ("road", "building"):
        # "<n> [new|changed|...] roads" first, then "roads <n>" (as in 'roads: 1').
        before = re.search(rf"\b{_NUM}\s+(?:(?:new|changed|more|additional|modified|different)\s+)?{noun}s?\b", lowered)
        after = re.search(rf"\b{noun}s?\s+{_NUM}\b", lowered)
        match = before or after
        found.append(_number(match.group(1)) if match else None)
    return found[0], found[1]


def _cell_label(raw: str) -> str | None:
    words = re.findall(r"[a-z]+", raw.lower().replace("centre", "center").replace("middle", "center")
                       .replace("upper", "top").replace("lower", "bottom"))
    if words == ["center"]:
        return "center-center"
    if len(words) == 2 and words[0] in GRID_ROWS and words[1] in GRID_COLS:
        return f"{words[0]}-{words[1]}"
    if len(words) == 2 and words[0] in ("left", "right") and words[1] in ("top", "bottom"):  # 'left-top'
        return f"{words[1]}-{words[0]}"
    return None


def parse_localization_answer(text: str) -> tuple[frozenset[str] | None, frozenset[str] | None]:
    """(road cells, building cells) as sets of released labels; None for a category with no ``[...]`` list.

    'roads ['top-left', 'top-center'] buildings []' -> ({'top-left', 'top-center'}, set()).
    Labels written 'top left', 'Top-Left', 'center' (the middle cell) are read too.
    """
    lowered = text.lower()
    parsed: list[frozenset[str] | None] = []
    for noun in ("road", "building"):
        match = re.search(rf"\b{noun}s?\s*:?\s*\[([^\]]*)\]", lowered)
        if match is None:
            parsed.append(None)
            continue
        labels = (_cell_label(part) for part in match.group(1).split(","))
        parsed.append(frozenset(label for label in labels if label is not None))
    return parsed[0], parsed[1]
