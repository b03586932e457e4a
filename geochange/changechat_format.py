"""The ChangeChat / DeltaVLM instruction texts and answer formats, in one place.

The sample-data generator writes answers with these functions and the DeltaVLM
sub-task scorers parse them back, so both always agree.
"""
from __future__ import annotations

CAPTION_PROMPT = "Please briefly describe the changes in these two images."
YESNO_PROMPT = "Please judge whether these two images have changed. Please answer yes or no."
COUNT_PROMPT = "Please determine how many roads and buildings have changed?"
LOCALIZATION_PROMPT = (
    "Please indicate the locations where changes have occurred in the buildings and roads, using a 3x3 grid "
    "(namely, 'top', 'center', and 'bottom' vertically and 'left', 'center', 'right' horizontally)."
)

GRID_ROWS = ("top", "center", "bottom")
GRID_COLS = ("left", "center", "right")


def cell_name(row: int, col: int) -> str:
    """Grid cell (row, col), 0-based, as text: 'top left', ..., 'center' for the middle cell."""
    if (row, col) == (1, 1):
        return "center"
    return f"{GRID_ROWS[row]} {GRID_COLS[col]}"


def yesno_answer(changed: bool) -> str:
    return "yes" if changed else "no"


def count_answer(roads: int, buildings: int) -> str:
    return f"roads: {roads}, buildings: {buildings}"


def localization_answer(road_cells: list[tuple[int, int]], building_cells: list[tuple[int, int]]) -> str:
    def cells(found: list[tuple[int, int]]) -> str:
        return "[" + ", ".join(cell_name(r, c) for r, c in sorted(set(found))) + "]"

    return f"roads {cells(road_cells)}, buildings {cells(building_cells)}"
