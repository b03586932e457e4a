"""The synthetic scenes and the bundled sample annotations: deterministic, and captions true to the pictures."""
from __future__ import annotations

import json
import re
from collections import deque
from pathlib import Path

import numpy as np
import pytest

import geochange.changechat_format as cc
import geochange.sample.data as sd
from geochange.sample.scenes import (CANVAS, CHANGE_KINDS, GRID_EDGES, LAYER, MARGIN, MIN_CELL_PIXELS, SIZE, Change,
                              ScenePair, make_scene_pair, render_pair)
from geochange.video import read_video_frames


# Per-pixel ground truth read from the scene objects: a label id per kind (rubble and cleared land alike are bare).
LABEL = {"water": 1, "road": 2, "parking": 3, "solar": 4, "rubble": 5, "cleared": 5, "trees": 6, "building": 7}
ROAD, BUILDING = LABEL["road"], LABEL["building"]


def label_maps(pair: ScenePair) -> tuple[np.ndarray, np.ndarray]:
    """The before and after label maps (SIZE x SIZE): each object's footprint, painted in layer order."""
    maps = []
    for objects in (pair.before, pair.after):
        labels = np.zeros((CANVAS, CANVAS), np.uint8)
        for obj in sorted(objects, key=lambda o: LAYER[o.kind]):
            (ys, xs), mask = obj.mask()
            labels[ys, xs][mask] = LABEL[obj.kind]  # basic slicing gives a view: this writes into labels
        maps.append(labels[MARGIN:MARGIN + SIZE, MARGIN:MARGIN + SIZE])
    return maps[0], maps[1]


def load(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))


def blobs(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, each as an array of (y, x) pixels."""
    seen = np.zeros_like(mask, bool)
    found = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        queue, pixels = deque([start]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        found.append(np.array(pixels))
    return found


def cells_of(mask: np.ndarray) -> set[tuple[int, int]]:
    return {(r, c) for r in range(3) for c in range(3)
            if mask[GRID_EDGES[r]:GRID_EDGES[r + 1], GRID_EDGES[c]:GRID_EDGES[c + 1]].sum() >= MIN_CELL_PIXELS}


def cell_of_pixel(y: float, x: float) -> tuple[int, int]:
    return min(int(y) * 3 // SIZE, 2), min(int(x) * 3 // SIZE, 2)


def count_in(clause: str) -> int:
    return next(cc.NUMBER_WORDS.index(w) for w in clause.split() if w in cc.NUMBER_WORDS)


# --------------------------------------------------------------------------- determinism

def test_same_seed_gives_identical_scenes_and_pixels():
    first, again, other = make_scene_pair(200_003), make_scene_pair(200_003), make_scene_pair(200_004)
    assert first == again and first != other
    for a, b in zip(render_pair(first), render_pair(again)):
        assert a.dtype == np.uint8 and a.shape == (256, 256, 3)
        assert np.array_equal(a, b)
    assert not np.array_equal(render_pair(first)[0], render_pair(other)[0])
    # No hidden global state: drawing other scenes in between changes nothing.
    np.random.seed(0)
    assert np.array_equal(render_pair(make_scene_pair(200_003))[1], render_pair(first)[1])


def test_committed_annotations_are_exactly_the_generator_output():
    for path, text in sd.build_annotations().items():
        assert path.read_text(encoding="utf-8") == text, f"{path} is stale: run python common.py sample-data"
    assert sd.stale_annotations() == []


# --------------------------------------------------------------------------- formats

def test_geollava_files_have_the_training_schema():
    train, val = load(sd.SAMPLE_TRAIN), load(sd.SAMPLE_VAL)
    assert (len(train), len(val)) == (300, 60)
    ids = [r["id"] for r in train + val]
    assert len(set(ids)) == 360
    for record in train + val:
        human, gpt = record["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt"
        assert human["value"].startswith("<video>\n") and human["value"][len("<video>\n"):] in sd.QUESTIONS
        assert record["video"] == record["id"] + ".mp4"
        assert (gpt["value"] == "no significant change.") == (record["changes"] == [])
        assert gpt["value"].endswith(".") and gpt["value"] == gpt["value"].lower()
    assert {len(r["changes"]) for r in train} == {0, 1, 2, 3}
    assert {c["type"] for r in train for c in r["changes"]} == set(CHANGE_KINDS)
    assert len({r["conversations"][0]["value"] for r in train}) == len(sd.QUESTIONS)


def test_changechat_files_use_the_format_functions():
    val, captions, instructions = load(sd.SAMPLE_VAL), load(sd.SAMPLE_CHANGECHAT_CAPTIONS), \
        load(sd.SAMPLE_CHANGECHAT_INSTRUCTIONS)
    assert len(captions) == 60 and len(instructions) == 4 * 60
    for record, split, tasks in zip(val, captions, [instructions[i:i + 4] for i in range(0, 240, 4)]):
        name, changes = record["id"], record["changes"]
        assert split["image_A"] == f"A/{name}.png" and split["image_B"] == f"B/{name}.png"
        assert len(split["captions"]) == 5 and len(set(split["captions"])) == 5
        assert split["captions"][0] == record["conversations"][1]["value"]
        assert split["changeflag"] == int(bool(changes))
        roads = [c for c in changes if c["category"] == "road"]
        buildings = [c for c in changes if c["category"] == "building"]
        expected = {
            "caption": (cc.CAPTION_PROMPT, split["captions"][0]),
            "yesno": (cc.YESNO_PROMPT, cc.yesno_answer(bool(changes))),
            "count": (cc.COUNT_PROMPT, cc.count_answer(sum(c["count"] for c in roads),
                                                       sum(c["count"] for c in buildings))),
            "localization": (cc.LOCALIZATION_PROMPT, cc.localization_answer(
                [tuple(x) for c in roads for x in c["cells"]], [tuple(x) for c in buildings for x in c["cells"]])),
        }
        assert [t["id"] for t in tasks] == [f"{name}_{task}" for task in expected]
        for task, (prompt, answer) in zip(tasks, expected.values()):
            assert task["image"] == [split["image_A"], split["image_B"]]
            assert task["conversations"] == [{"from": "human", "value": f"<image>\n{prompt}"},
                                             {"from": "gpt", "value": answer}]
    assert {t["conversations"][1]["value"] for t in instructions if t["id"].endswith("_yesno")} == {"yes", "no"}


def test_answers_follow_changechat_format_when_its_strings_change(monkeypatch):
    monkeypatch.setattr(cc, "count_answer", lambda roads, buildings: f"R={roads} B={buildings}")
    monkeypatch.setattr(cc, "yesno_answer", lambda changed: "Y" if changed else "N")
    monkeypatch.setattr(cc, "COUNT_PROMPT", "how many?")
    record = sd.geollava_record("val", 3)  # three new buildings and a pond that grew
    _, instructions = sd.changechat_records([record])
    answers = {t["id"].rsplit("_", 1)[1]: t["conversations"] for t in instructions}
    assert answers["count"] == [{"from": "human", "value": "<image>\nhow many?"}, {"from": "gpt", "value": "R=0 B=3"}]
    assert answers["yesno"][1]["value"] == "Y"


# --------------------------------------------------------------------------- captions vs pixels

def test_captions_state_exactly_the_drawn_changes():
    records = load(sd.SAMPLE_VAL) + load(sd.SAMPLE_TRAIN)[:60]
    checked_buildings = 0
    for record in records:
        pair = make_scene_pair(record["seed"])
        before, after = label_maps(pair)
        changed = before != after
        # Structure differs exactly in the cells the ground truth names (nothing else moved).
        assert cells_of(changed) == {tuple(cell) for c in record["changes"] for cell in c["cells"]}, record["id"]
        clauses = record["conversations"][1]["value"].rstrip(".").split("; ")
        if not record["changes"]:
            assert not changed.any()
            continue
        assert len(clauses) == len(record["changes"])
        for change, clause in zip(record["changes"], clauses):
            cells = {tuple(cell) for cell in change["cells"]}
            if change["type"] in ("construction", "demolition"):
                added = (after == BUILDING) & (before != BUILDING)
                removed = (before == BUILDING) & (after != BUILDING)
                found = blobs(added if change["type"] == "construction" else removed)
                assert count_in(clause) == change["count"] == len(found), (record["id"], clause)
                assert {cell_of_pixel(*b.mean(axis=0)) for b in found} == cells
                checked_buildings += 1
            if change["type"] == "new_road":
                road = (after == ROAD) & (before != ROAD)
                assert len(cells) == 3 and cells_of(road) == cells
            if change["type"] == "new_solar_rows":
                assert count_in(clause) == change["count"]
            place = sd.change_place(Change(change["type"], change["category"], change["count"],
                                           tuple(cells), change.get("detail")))
            assert place in clause, (record["id"], clause)
    assert checked_buildings >= 15


def test_no_change_pairs_differ_only_by_nuisance():
    seeds = [r["seed"] for r in load(sd.SAMPLE_VAL) if not r["changes"]][:4]
    assert seeds
    for seed in seeds:
        pair = make_scene_pair(seed)
        before, after = render_pair(pair, nuisance=False)
        assert np.array_equal(before, after)
        noisy_before, noisy_after = render_pair(pair)
        # Undo the misregistration and the global gain/tint: what is left is noise, not structure.
        dy, dx = pair.nuisance.shift
        n = pair.nuisance
        crop = slice(4, SIZE - 4)
        moved = noisy_after.astype(float)[crop, crop] / (n.gain * np.array(n.tint))
        aligned = noisy_before.astype(float)[4 + dy:SIZE - 4 + dy, 4 + dx:SIZE - 4 + dx]
        assert np.abs(moved - aligned).mean() < 6
        assert np.abs(noisy_after.astype(float) - noisy_before).mean() > 1  # but the raw images do differ


# --------------------------------------------------------------------------- media

def test_ensure_sample_media_draws_missing_files_once(tmp_path, monkeypatch, user_error):
    val = load(sd.SAMPLE_VAL)[:2]
    train = load(sd.SAMPLE_TRAIN)[:1]
    (tmp_path / "train.json").write_text(json.dumps(train))
    (tmp_path / "val.json").write_text(json.dumps(val))
    monkeypatch.setattr(sd, "SAMPLE_TRAIN", tmp_path / "train.json")
    monkeypatch.setattr(sd, "SAMPLE_VAL", tmp_path / "val.json")
    monkeypatch.setattr(sd, "SAMPLE_VIDEO_DIR", tmp_path / "videos")
    monkeypatch.setattr(sd, "SAMPLE_CHANGECHAT_ROOT", tmp_path / "changechat")
    sd.ensure_sample_media()
    videos = sorted(p.name for p in (tmp_path / "videos").iterdir())
    assert videos == ["train_00000.mp4", "val_00000.mp4", "val_00001.mp4"]
    assert sorted(p.name for p in (tmp_path / "changechat" / "B").iterdir()) == ["val_00000.png", "val_00001.png"]
    frames = read_video_frames(tmp_path / "videos" / "val_00001.mp4")
    expected = render_pair(make_scene_pair(val[1]["seed"]))
    assert np.abs(frames.astype(float) - np.stack(expected)).mean() < 3
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.*")}
    sd.ensure_sample_media()
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.*")} == stamps
    (tmp_path / "videos" / "val_00000.mp4").unlink()
    sd.ensure_sample_media()
    assert (tmp_path / "videos" / "val_00000.mp4").exists()

    val[0]["changes"] = [{"type": "demolition", "category": "building", "count": 1, "cells": [[0, 0]]}]  # stale
    (tmp_path / "val.json").write_text(json.dumps(val))
    user_error(lambda: sd.ensure_sample_media(force=True), str(tmp_path / "val.json"), "val_00000",
               "python common.py sample-data")


def test_bundled_sample_media_is_there(sample_dir):
    assert sample_dir == sd.SAMPLE_DIR
    assert len(list(sd.SAMPLE_VIDEO_DIR.glob("*.mp4"))) >= 360
    frames = read_video_frames(sd.SAMPLE_VIDEO_DIR / "val_00005.mp4", 2)
    assert frames.shape == (2, 256, 256, 3)
    image = sd.SAMPLE_CHANGECHAT_ROOT / "A" / "val_00005.png"
    assert image.exists()


@pytest.mark.parametrize("count,word", [(1, "one"), (3, "three")])
def test_caption_grammar(count, word):
    change = Change("construction", "building", count, ((0, 0),))
    text = sd.caption([change], [0])
    assert text == f"{word} new building{'s' if count > 1 else ''} appeared in the upper left."
    road = Change("new_road", "road", 1, ((0, 1), (1, 1), (2, 1)))
    assert re.search(r"down the center\.$", sd.caption([road], [0]))
