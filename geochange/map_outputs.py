"""What a scene's tile answers become: the ChangeChat answers parsed (changed or not, counts of roads and buildings,
3x3 grid cells), one record per tile, ``changes.geojson`` (RFC 7946: WGS84 longitude / latitude, one polygon per
tile and one per changed grid cell, for QGIS or a browser map), ``overview.png`` (before | after | change map) and the
summary (tiles answered / skipped / changed, counts summed).
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.warp import transform_geom
from rasterio.windows import Window

from . import changechat_format as cc
from .errors import UserError
from .fileio import atomic_path, atomic_write_text
from .rasters import WGS84, Grid, RasterPair
from .tiles import TileImages

# Decimal places of longitude / latitude in the GeoJSON: 1e-7 degrees is about a centimetre.
COORDINATE_DECIMALS = 7
# The overview's panels: at most this many pixels a side (a decimated read), at this size in inches.
OVERVIEW_SIDE = 1024
PANEL_INCHES = 6.0
OVERVIEW_DPI = 130
# A tile drawn smaller than this (in the picture's pixels) gets no number: it would be unreadable.
MIN_NUMBERED_TILE_PX = 14


# ----------------------------------------------------------------------------------------------- questions, answers

def resolve_questions(questions) -> dict[str, str]:
    """``QUESTIONS`` as {label: question}: a ChangeChat task label (``caption``, ``changed?``, ``how many?``,
    ``where?``) stands for its question; any other text is asked as it is (and is its own label)."""
    if isinstance(questions, str):
        questions = (questions,)
    if not isinstance(questions, (list, tuple)) or not questions:
        raise UserError(f"QUESTIONS={questions!r}: give a tuple of questions or task labels "
                        f"({', '.join(cc.TASK_QUESTIONS)})")
    resolved: dict[str, str] = {}
    for entry in questions:
        if not isinstance(entry, str) or not entry.strip():
            raise UserError(f"QUESTIONS: {entry!r} is not a question (a non-empty text)")
        label = entry.strip()
        if label in resolved:
            raise UserError(f"QUESTIONS: {label!r} is asked twice")
        resolved[label] = cc.TASK_QUESTIONS.get(label, label)
    return resolved


def is_no_change_caption(caption: str) -> bool:
    """DeltaVLM's released rule (test-cls.ipynb): a caption that is one of LEVIR-CC's no-change sentences says no
    change (compared after DeltaVLM's text normalisation, so case and a final full stop do not matter)."""
    return cc.normalise_text(caption, None) in {cc.normalise_text(s, None) for s in cc.NO_CHANGE_SENTENCES}


def parse_answers(questions: dict[str, str], answers: dict[str, str]) -> dict[str, Any]:
    """What the suite reads from ChangeChat answers: ``changed`` (the yes/no answer; without one, the caption by the
    released no-change rule; None when neither says), ``roads`` / ``buildings`` counts and ``road_cells`` /
    ``building_cells`` (3x3 grid labels), None for what no answer gives."""
    parsed: dict[str, Any] = {"changed": None, "changed_from": None, "roads": None, "buildings": None,
                              "road_cells": None, "building_cells": None}
    for label, question in questions.items():
        task, text = cc.task_of(question), answers[label]
        if task == "yesno" and parsed["changed"] is None:
            said = cc.parse_yesno_answer(text)
            parsed.update({"changed": said, "changed_from": "yes/no" if said is not None else None})
        elif task == "count" and parsed["roads"] is None and parsed["buildings"] is None:
            parsed["roads"], parsed["buildings"] = cc.parse_count_answer(text)
        elif task == "localization" and parsed["road_cells"] is None and parsed["building_cells"] is None:
            roads, buildings = cc.parse_localization_answer(text)
            parsed["road_cells"] = None if roads is None else sorted(roads, key=cc.GRID_LABELS.index)
            parsed["building_cells"] = None if buildings is None else sorted(buildings, key=cc.GRID_LABELS.index)
    if parsed["changed"] is None:
        caption = next((answers[label] for label, q in questions.items() if cc.task_of(q) == "caption"), None)
        if caption:
            parsed.update({"changed": not is_no_change_caption(caption), "changed_from": "caption"})
    return parsed


def tile_record(grid: Grid, images: TileImages, answers: dict[str, str] | None,
                questions: dict[str, str]) -> dict[str, Any]:
    """A tile's line of ``tiles.jsonl``: where it is (window in grid pixels; bounds in the grid's CRS when there is
    one), why it was skipped or each question's answer and what they say."""
    tile = images.tile
    window = tile.window
    record: dict[str, Any] = {
        "id": tile.id, "number": tile.number, "row": tile.row, "col": tile.col,
        "window": [int(window.col_off), int(window.row_off), int(window.width), int(window.height)],
        "bounds": list(grid.bounds(window)) if grid.georeferenced else None,
        "nodata": images.nodata, "skipped": images.skipped, "answers": None, "parsed": None}
    if answers is not None:
        record.update({"answers": answers, "parsed": parse_answers(questions, answers)})
    return record


# ----------------------------------------------------------------------------------------------- summary

def summarize(records: list[dict]) -> dict[str, Any]:
    """Tiles answered / skipped (by reason) / changed, and the counts of roads and buildings summed."""
    answered = [r for r in records if r["answers"] is not None]
    changed = Counter(r["parsed"]["changed"] for r in answered)
    return {"tiles": len(records), "answered": len(answered), "skipped": len(records) - len(answered),
            "skipped_by_reason": dict(sorted(Counter(r["skipped"] for r in records if r["skipped"]).items())),
            "changed": changed[True], "unchanged": changed[False], "change_unknown": changed[None],
            "roads": sum(r["parsed"]["roads"] or 0 for r in answered),
            "buildings": sum(r["parsed"]["buildings"] or 0 for r in answered)}


def format_summary(summary: dict[str, Any]) -> str:
    reasons = ", ".join(f"{n} {why}" for why, n in summary["skipped_by_reason"].items())
    unknown = f", {summary['change_unknown']} not said" if summary["change_unknown"] else ""
    return (f"{summary['tiles']} tiles: {summary['answered']} answered, {summary['skipped']} skipped"
            f"{f' ({reasons})' if reasons else ''}; {summary['changed']} changed, {summary['unchanged']} unchanged"
            f"{unknown}; new roads {summary['roads']}, new buildings {summary['buildings']}")


# ----------------------------------------------------------------------------------------------- GeoJSON

def cell_window(window: Window, label: str) -> Window:
    """The 3x3 grid cell ``label`` ('top-left' ... 'bottom-right') of a tile's window."""
    row_name, col_name = label.split("-")
    row, col = cc.GRID_ROWS.index(row_name), cc.GRID_COLS.index(col_name)
    return Window(window.col_off + col * window.width / 3, window.row_off + row * window.height / 3,
                  window.width / 3, window.height / 3)


def wgs84_polygon(grid: Grid, window: Window) -> dict:
    """The window's outline as a GeoJSON Polygon in WGS84 (GDAL's transform, counter-clockwise as RFC 7946 asks)."""
    left, bottom, right, top = grid.bounds(window)
    ring = [(left, bottom), (right, bottom), (right, top), (left, top), (left, bottom)]
    polygon = transform_geom(grid.crs, WGS84, {"type": "Polygon", "coordinates": [ring]},
                             precision=COORDINATE_DECIMALS)
    return {"type": "Polygon", "coordinates": [[list(point) for point in part] for part in polygon["coordinates"]]}


def geojson(grid: Grid, records: list[dict], questions: dict[str, str]) -> dict:
    """A FeatureCollection: one Polygon per tile (``kind`` tile: number, row, column, each question's answer as
    ``answer: <label>``, what the answers say, or why it was skipped), then one per 3x3 cell an answer named as
    changed (``kind`` road cell / building cell, with its tile's number)."""
    features, cells = [], []
    for record in records:
        window = Window(*record["window"])
        parsed = record["parsed"] or {}
        properties = {"kind": "tile", "tile": record["number"], "row": record["row"], "col": record["col"],
                      "skipped": record["skipped"], "nodata": record["nodata"]}
        for label in questions:
            properties[f"answer: {label}"] = (record["answers"] or {}).get(label)
        for key in ("changed", "changed_from", "roads", "buildings"):
            properties[key.replace("_", " ")] = parsed.get(key)
        for key in ("road_cells", "building_cells"):
            properties[key.replace("_", " ")] = None if parsed.get(key) is None else ", ".join(parsed[key])
        features.append({"type": "Feature", "geometry": wgs84_polygon(grid, window), "properties": properties})
        for category in ("road", "building"):
            for label in parsed.get(f"{category}_cells") or ():
                cells.append({"type": "Feature", "geometry": wgs84_polygon(grid, cell_window(window, label)),
                              "properties": {"kind": f"{category} cell", "tile": record["number"],
                                             "row": record["row"], "col": record["col"], "cell": label}})
    return {"type": "FeatureCollection", "features": features + cells}


def write_geojson(path: Path, grid: Grid, records: list[dict], questions: dict[str, str]) -> Path:
    return atomic_write_text(path, json.dumps(geojson(grid, records, questions), ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------------------------- the picture

def _marks(records: list[dict], scale: float) -> tuple[dict[str, list[tuple[float, float, float, float]]], list[int]]:
    """The overview's boxes (x, y, width, height in picture pixels) by kind: changed, answered and skipped tiles, and
    the 3x3 cells the answers name; and the changed tiles' numbers, in the order of their boxes."""
    marks: dict[str, list] = {"changed": [], "answered": [], "skipped": [], "road": [], "building": []}
    numbers = []
    for record in records:
        window = Window(*(value * scale for value in record["window"]))
        parsed = record["parsed"] or {}
        kind = "skipped" if record["skipped"] else "changed" if parsed.get("changed") else "answered"
        marks[kind].append(window)
        if kind == "changed":
            numbers.append(record["number"])
        for category in ("road", "building"):
            marks[category] += [cell_window(window, label) for label in parsed.get(f"{category}_cells") or ()]
    # matplotlib puts pixel centres on whole numbers: a box from an edge starts half a pixel before
    return {kind: [(w.col_off - 0.5, w.row_off - 0.5, w.width, w.height) for w in windows]
            for kind, windows in marks.items()}, numbers


def write_overview(path: Path, pair: RasterPair, records: list[dict], *, title: str, subtitle: str) -> Path:
    """``overview.png``: before | after | change map side by side (a decimated read of each date, stretched as the
    tiles were), changed tiles outlined in red and numbered in all three, the change map with the grid cells the
    answers name, skipped tiles hatched, and a legend. Each kind of box is one collection: fast with many tiles."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import PatchCollection
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    (before, before_valid), (after, after_valid) = pair.sample(OVERVIEW_SIDE)
    pictures = [pair.stretch.apply(before, before_valid), pair.stretch.apply(after, after_valid)]
    grey = pictures[1].mean(axis=2, keepdims=True).repeat(3, axis=2)
    pictures.append((grey * 0.55 + 255 * 0.2).astype(np.uint8))  # the change map's faded background
    scale = pictures[0].shape[1] / pair.grid.width  # picture pixels per grid pixel
    marks, numbers = _marks(records, scale)
    height_inches = PANEL_INCHES * pictures[0].shape[0] / pictures[0].shape[1]
    figure = Figure(figsize=(3 * PANEL_INCHES, height_inches + 1.6), dpi=OVERVIEW_DPI)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 3)
    names = (f"before: {pair.before.path.name}", f"after: {pair.after.path.name}", "change map")

    def boxes(ax, kind: str, **style) -> None:
        if marks[kind]:
            ax.add_collection(PatchCollection([Rectangle((x, y), w, h) for x, y, w, h in marks[kind]], **style))

    for index, (ax, picture, name) in enumerate(zip(axes, pictures, names)):
        ax.imshow(picture, interpolation="lanczos" if scale < 1 else "nearest")
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        if index == 2:
            boxes(ax, "skipped", facecolor="0.8", hatch="///", edgecolor="0.5", linewidth=0.3, alpha=0.7)
            boxes(ax, "answered", facecolor="none", edgecolor="0.35", linewidth=0.4)
            boxes(ax, "changed", facecolor="red", edgecolor="none", alpha=0.35)
            boxes(ax, "road", facecolor="orange", edgecolor="none", alpha=0.45)
            boxes(ax, "building", facecolor="deepskyblue", edgecolor="none", alpha=0.45)
        boxes(ax, "changed", facecolor="none", edgecolor="red", linewidth=1.4)
        for number, (x, y, width, height) in zip(numbers, marks["changed"]):
            if width >= MIN_NUMBERED_TILE_PX:
                ax.text(x + width / 2, y + height / 2, str(number), color="white", ha="center", va="center",
                        fontsize=max(5.0, min(11.0, width / 5)), weight="bold",
                        bbox={"facecolor": "red", "alpha": 0.7, "pad": 1, "edgecolor": "none"})
    legend = [Patch(facecolor="red", alpha=0.35, edgecolor="red", label="changed tile (number as in changes.geojson)"),
              Patch(facecolor="none", edgecolor="0.35", label="answered, no change said"),
              Patch(facecolor="0.8", hatch="///", edgecolor="0.5", label="skipped (nodata or all zero)"),
              Patch(facecolor="orange", alpha=0.6, label="grid cell with a new road"),
              Patch(facecolor="deepskyblue", alpha=0.6, label="grid cell with a new building")]
    figure.legend(handles=legend, loc="lower center", ncol=5, fontsize=8, frameon=False)
    figure.suptitle(f"{title}\n{subtitle}", fontsize=10)
    figure.subplots_adjust(left=0.01, right=0.99, top=1 - 0.75 / (height_inches + 1.6),
                           bottom=0.55 / (height_inches + 1.6), wspace=0.03)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", pil_kwargs={"compress_level": 1})  # fast; a few MB at most
    return path
