"""The bundled synthetic sample data set, in the GeoLLaVA and the ChangeChat formats.

Only the annotation JSON files are committed (``annotations/sample_*.json``); the
images and videos are regenerated from each record's ``seed`` on first use by
``ensure_sample_media()`` into ``data/sample/`` (git-ignored).

    python common.py sample-data          # rewrite the annotation JSONs and all media (the example GeoTIFF pair too)
    python common.py sample-data --check  # exit 1 if the committed JSONs differ from the generator
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .. import changechat_format as cc
from ..errors import UserError
from ..fileio import atomic_write_text
from ..paths import ANNOTATIONS_DIR, SAMPLE_DIR
from ..process import prepare_process
from .geotiffs import ensure_example_scene
from .scenes import Change, make_scene_pair, render_pair
from ..video import write_image, write_video

SAMPLE_TRAIN = ANNOTATIONS_DIR / "sample_train.json"
SAMPLE_VAL = ANNOTATIONS_DIR / "sample_val.json"
SAMPLE_CHANGECHAT_CAPTIONS = ANNOTATIONS_DIR / "sample_changechat_captions.json"
SAMPLE_CHANGECHAT_INSTRUCTIONS = ANNOTATIONS_DIR / "sample_changechat_instructions.json"
SAMPLE_VIDEO_DIR = SAMPLE_DIR / "videos"
SAMPLE_CHANGECHAT_ROOT = SAMPLE_DIR / "changechat"

SPLIT_SIZES = {"train": 300, "val": 60}
# Scene seeds are split offset + index, so every pair can be redrawn on its own.
SPLIT_SEED_OFFSETS = {"train": 100_000, "val": 200_000}
REFERENCES_PER_PAIR = 5

QUESTIONS = (
    "What changed between these two satellite images?",
    "Describe the changes between the first and the second image of this area.",
    "What is different in the later satellite image?",
    "Summarize how this place changed over time.",
)
NO_CHANGE_CAPTIONS = (
    "no significant change.",
    "the two images show no obvious change.",
    "nothing has changed in this area.",
    "the scene is the same in both images.",
    "there are no visible changes between the two scenes.",
)
# Caption place words per 3x3 cell (row, col); ChangeChat answers use changechat_format.cell_name instead.
CELL_PLACES = {
    (0, 0): "in the upper left", (0, 1): "at the top", (0, 2): "in the upper right",
    (1, 0): "on the left", (1, 1): "in the center", (1, 2): "on the right",
    (2, 0): "in the lower left", (2, 1): "at the bottom", (2, 2): "in the lower right",
}
ROAD_PLACES = {
    ("row", 0): "across the top", ("row", 1): "across the center", ("row", 2): "across the bottom",
    ("col", 0): "down the left side", ("col", 1): "down the center", ("col", 2): "down the right side",
}
# Five phrasings per change type; {n} count word, {s} plural s, {was} was/were, {has} has/have, {place}.
CLAUSES = {
    "construction": (
        "{n} new building{s} appeared {place}",
        "{n} new building{s} {was} built {place}",
        "{n} building{s} {was} constructed {place}",
        "{place}, {n} new building{s} {has} been built",
        "{n} new building{s} now stand{v} {place}",
    ),
    "demolition": (
        "{n} building{s} {was} demolished {place}",
        "{n} building{s} {place} {has} been torn down",
        "{n} building{s} disappeared {place}",
        "{place}, {n} building{s} {was} removed",
        "{n} building{s} {place} {was} knocked down",
    ),
    "new_road": (
        "a new road now runs {place}",
        "a road was built {place}",
        "a new road appeared {place}",
        "a new road has been paved {place}",
        "a new road has been built {place}",
    ),
    "cleared_trees": (
        "trees were cleared {place}",
        "a group of trees was removed {place}",
        "the trees {place} were cut down",
        "{place}, the trees have been cleared",
        "the trees {place} are gone",
    ),
    "water_level_rose": (
        "the pond {place} has grown",
        "the water level {place} rose",
        "the pond {place} expanded",
        "{place}, the pond has become larger",
        "the water {place} now covers a larger area",
    ),
    "water_level_fell": (
        "the pond {place} has shrunk",
        "the water level {place} dropped",
        "the pond {place} became smaller",
        "{place}, the pond has dried up partly",
        "the water {place} now covers a smaller area",
    ),
    "new_parking_lot": (
        "a new parking lot appeared {place}",
        "a parking lot was built {place}",
        "a new parking area was paved {place}",
        "{place}, a new parking lot has been built",
        "a parking lot now fills the ground {place}",
    ),
    "new_solar_rows": (
        "{n} row{s} of solar panels {was} installed {place}",
        "{n} new solar panel row{s} appeared {place}",
        "{n} row{s} of solar panels {was} built {place}",
        "{place}, {n} row{s} of solar panels {has} been added",
        "{n} new row{s} of solar panels now stand{v} {place}",
    ),
}


# --------------------------------------------------------------------------- captions

def change_place(change: Change) -> str:
    """Where a change is, in caption words: one cell, or the band a road runs through."""
    cells = set(change.cells)
    for index in range(3):
        if cells >= {(index, c) for c in range(3)} and all(r == index for r, _ in cells):
            return ROAD_PLACES[("row", index)]
        if cells >= {(r, index) for r in range(3)} and all(c == index for _, c in cells):
            return ROAD_PLACES[("col", index)]
    if len(cells) == 1:
        return CELL_PLACES[next(iter(cells))]
    # Not produced by the generator (changes stay in one cell or one band); kept for completeness.
    return "in the " + " and ".join(cc.cell_name(r, c) for r, c in sorted(cells))


def change_clause(change: Change, phrasing: int) -> str:
    key = f"water_level_{change.detail}" if change.type == "water_level" else change.type
    template = CLAUSES[key][phrasing % REFERENCES_PER_PAIR]
    plural = change.count != 1
    return template.format(n=cc.NUMBER_WORDS[change.count], s="s" if plural else "", was="were" if plural else "was",
                           has="have" if plural else "has", v="" if plural else "s", place=change_place(change))


def caption(changes: tuple[Change, ...] | list[Change], phrasings: list[int]) -> str:
    """One caption: the changes' clauses joined by '; ', or the no-change sentence."""
    if not changes:
        return NO_CHANGE_CAPTIONS[phrasings[0] % len(NO_CHANGE_CAPTIONS)] if phrasings else NO_CHANGE_CAPTIONS[0]
    return "; ".join(change_clause(c, p) for c, p in zip(changes, phrasings)) + "."


def main_caption(changes: tuple[Change, ...], rng: np.random.Generator) -> str:
    # A fixed sentence for "no change" gives the model (and the metrics) one clear target.
    if not changes:
        return NO_CHANGE_CAPTIONS[0]
    return caption(changes, [int(rng.integers(REFERENCES_PER_PAIR)) for _ in changes])


def reference_captions(changes: tuple[Change, ...], first: str) -> list[str]:
    """Five distinct references for the LEVIR-CC-style split, the training caption first."""
    candidates = [first] + [caption(changes, [k] * max(len(changes), 1)) for k in range(REFERENCES_PER_PAIR)]
    if len(changes) > 1:
        candidates += [caption(changes[::-1], [k] * len(changes)) for k in range(REFERENCES_PER_PAIR)]
    references: list[str] = []
    for text in candidates:
        if text not in references:
            references.append(text)
    return references[:REFERENCES_PER_PAIR]


# --------------------------------------------------------------------------- records

def scene_seed(split: str, index: int) -> int:
    return SPLIT_SEED_OFFSETS[split] + index


def pair_name(split: str, index: int) -> str:
    return f"{split}_{index:05d}"


def geollava_record(split: str, index: int) -> dict:
    seed = scene_seed(split, index)
    pair = make_scene_pair(seed)
    text_rng = np.random.default_rng([seed, 7])  # separate stream: wording never moves the pictures
    question = QUESTIONS[int(text_rng.integers(len(QUESTIONS)))]
    name = pair_name(split, index)
    return {
        "id": name,
        "video": f"{name}.mp4",
        "conversations": [{"from": "human", "value": f"<video>\n{question}"},
                          {"from": "gpt", "value": main_caption(pair.changes, text_rng)}],
        "seed": seed,
        "changes": [c.to_json() for c in pair.changes],
    }


def _changes_of(record: dict) -> tuple[Change, ...]:
    return tuple(Change(c["type"], c["category"], c["count"], tuple(tuple(cell) for cell in c["cells"]),
                        c.get("detail")) for c in record["changes"])


def changechat_records(val_records: list[dict]) -> tuple[list[dict], list[dict]]:
    """(caption split, instruction records) for the val scenes, answers built by changechat_format."""
    captions, instructions = [], []
    for record in val_records:
        name, changes = record["id"], _changes_of(record)
        image = [f"A/{name}.png", f"B/{name}.png"]
        changed = bool(changes)
        references = reference_captions(changes, record["conversations"][1]["value"])
        captions.append({"image_A": image[0], "image_B": image[1], "captions": references,
                         "changeflag": int(changed)})
        roads = [c for c in changes if c.category == "road"]
        buildings = [c for c in changes if c.category == "building"]
        tasks = {
            "caption": (cc.CAPTION_PROMPT, references[0]),
            "yesno": (cc.YESNO_PROMPT, cc.yesno_answer(changed)),
            "count": (cc.COUNT_PROMPT, cc.count_answer(sum(c.count for c in roads), sum(c.count for c in buildings))),
            "localization": (cc.LOCALIZATION_PROMPT,
                             cc.localization_answer([cell for c in roads for cell in c.cells],
                                                    [cell for c in buildings for cell in c.cells])),
        }
        for task, (prompt, answer) in tasks.items():
            instructions.append({"id": f"{name}_{task}", "image": image, "changeflag": int(changed),
                                 "conversations": [{"from": "human", "value": f"<image>\n{prompt}"},
                                                   {"from": "gpt", "value": answer}]})
    return captions, instructions


def dump_records(records: list[dict]) -> str:
    """One record per line: valid JSON, small diffs, and parse errors point at a record's line."""
    lines = [json.dumps(r, ensure_ascii=False, separators=(", ", ": ")) for r in records]
    return "[\n" + ",\n".join(lines) + "\n]\n"


def build_annotations() -> dict[Path, str]:
    """The exact text of every committed sample annotation file."""
    splits = {split: [geollava_record(split, i) for i in range(size)] for split, size in SPLIT_SIZES.items()}
    captions, instructions = changechat_records(splits["val"])
    return {SAMPLE_TRAIN: dump_records(splits["train"]), SAMPLE_VAL: dump_records(splits["val"]),
            SAMPLE_CHANGECHAT_CAPTIONS: dump_records(captions),
            SAMPLE_CHANGECHAT_INSTRUCTIONS: dump_records(instructions)}


def stale_annotations() -> list[Path]:
    """The committed sample annotation files whose text is not the generator's (missing ones included)."""
    return [path for path, text in build_annotations().items()
            if not path.exists() or path.read_text(encoding="utf-8") != text]


def write_annotations() -> list[Path]:
    """Rewrite the sample annotation files whose text differs from the generator's; returns those written."""
    written = []
    for path, text in build_annotations().items():
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            atomic_write_text(path, text)
            written.append(path)
    return written


# --------------------------------------------------------------------------- media

def _load_committed(path: Path) -> list[dict]:
    if not path.exists():
        raise UserError(f"sample annotation file {path} is missing; run: python common.py sample-data")
    return json.loads(path.read_text(encoding="utf-8"))


def ensure_sample_media(force: bool = False) -> Path:
    """Draw the sample videos and ChangeChat images that are not on disk yet; returns SAMPLE_DIR.

    Videos: ``SAMPLE_VIDEO_DIR/<id>.mp4`` for the train and val records; images:
    ``SAMPLE_CHANGECHAT_ROOT/{A,B}/<id>.png`` for the val records. Existing files
    are kept unless ``force``, so the second call costs a few stat() calls.
    """
    jobs = []  # (record, annotation file, outputs still to write)
    for path, is_val in ((SAMPLE_TRAIN, False), (SAMPLE_VAL, True)):
        for record in _load_committed(path):
            outputs = [SAMPLE_VIDEO_DIR / record["video"]]
            if is_val:
                outputs += [SAMPLE_CHANGECHAT_ROOT / "A" / f"{record['id']}.png",
                            SAMPLE_CHANGECHAT_ROOT / "B" / f"{record['id']}.png"]
            todo = outputs if force else [p for p in outputs if not p.exists()]
            if todo:
                jobs.append((record, path, todo))
    for record, path, todo in tqdm(jobs, desc="sample media", unit="pair", disable=not jobs):
        pair = make_scene_pair(record["seed"])
        if [c.to_json() for c in pair.changes] != record["changes"]:
            raise UserError(f"{path}: record {record['id']!r} no longer matches the scene generator; "
                            "run: python common.py sample-data")
        before, after = render_pair(pair)
        for output in todo:
            if output.suffix == ".mp4":
                write_video([before, after], output)
            else:
                write_image(before if output.parent.name == "A" else after, output)
    return SAMPLE_DIR


def main(argv: list[str] | None = None) -> int:
    prepare_process()
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--check"]:
        stale = stale_annotations()
        if stale:
            print("out of date (run python common.py sample-data): " + ", ".join(map(str, stale)),
                  file=sys.stderr)
            return 1
        print("sample annotations match the generator")
        return 0
    if argv:
        raise UserError("usage: python common.py sample-data [--check]")
    for path in write_annotations():
        print(f"wrote {path}")
    ensure_sample_media(force=True)
    before, after = ensure_example_scene(force=True)
    print(f"sample media in {SAMPLE_DIR}; the example scene for scene_changes.py: {before.name}, {after.name}")
    return 0

