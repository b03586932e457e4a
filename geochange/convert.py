"""Data from one form to another: fMoW pairs sheets to videos, and each model family eats the other's data.

    python common.py pairs-to-videos SHEET OUT_DIR [IMAGE_ROOT] [--size WxH] [--max-side N] [--strict]
    python common.py changechat-to-videos ANNOTATIONS IMAGE_ROOT OUT_DIR [--split NAME] [--size WxH] [--max-side N]
    python common.py videos-to-pairs ANNOTATIONS VIDEO_DIR OUT_DIR [--split NAME]

``changechat-to-videos``: LEVIR-CC captions (``LevirCCcaptions.json``, or the caption split) or ChangeChat
instruction records -> ``OUT_DIR/videos/*.mp4`` (one 2-frame video per image pair, before frame first) and
``OUT_DIR/<name>.json`` in GeoLLaVA's format, one record per question. Every reference caption is kept under
``references`` (the video evaluation scores against all of them, as the bi-temporal papers do), and so are
``changeflag`` and ``split``. A multi-turn record becomes one record per turn (``<id>_turn<k>``, the ids
DeltaVLM's batch mode gives them), with ``source_id`` and ``turn`` so the way back rebuilds it.

``pairs-to-videos``: GeoLLaVA trained on fMoW image pairs stored as videos but never released the step that makes
them; this is it (a pairs sheet as GeoLLaVA released it -> one 2-frame video per row).

``videos-to-pairs``: GeoLLaVA videos + JSON -> ``OUT_DIR/A/<video>.png``, ``OUT_DIR/B/<video>.png`` (the first
and last frame) and ``OUT_DIR/<name>.json`` in ChangeChat's format: records holding the caption prompt and
``references`` become caption-split records (``captions``), the others instruction records.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .annotations import (ChangeChatSample, Sample, describe_test_set, load_annotations, load_changechat,
                          read_annotation_json, source_note_path)
from .changechat_format import CAPTION_PROMPT
from .errors import UserError
from .fileio import atomic_write_text, file_sha256
from .process import prepare_process
from .video import (bounded_size, crop_to_even, read_image, read_video_frames, resize_image, write_image,
                    write_video)

PAIR_COLUMNS = ("image_path1", "image_path2")
# The processors resize to 224 (Video-LLaVA) and 336 px (LLaVA-NeXT-Video); fMoW images run to thousands of
# pixels, and a 2000x1800 clip takes ~0.4 s to decode, too slow to feed a GPU. 512 keeps headroom above 336.
DEFAULT_MAX_SIDE = 512


@dataclass(frozen=True)
class SheetOptions:
    """How a pairs sheet becomes videos.

    ``resize``: a pair whose images differ in size is resized to one size (``size``, else the before image's);
    ``False`` stops at such a pair. ``size``: (width, height) for every video. ``max_side``: videos are scaled
    down (never up) so their longer side is at most this; ``None`` or 0 keeps the images' size.
    """
    resize: bool = True
    size: tuple[int, int] | None = None
    max_side: int | None = DEFAULT_MAX_SIDE


def _read_sheet(sheet_path: Path):
    import pandas as pd

    if not sheet_path.is_file():
        raise UserError(f"pairs sheet {sheet_path} does not exist")
    suffix = sheet_path.suffix.lower()
    try:
        if suffix in (".xlsx", ".xlsm", ".xls"):
            table = pd.read_excel(sheet_path, dtype=str)
        elif suffix in (".csv", ".tsv", ".txt"):
            table = pd.read_csv(sheet_path, dtype=str, sep="\t" if suffix == ".tsv" else ",")
        else:
            raise UserError(f"pairs sheet {sheet_path}: unsupported type {suffix!r} (use .xlsx or .csv)")
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"cannot read pairs sheet {sheet_path}: {exc}") from None
    table.columns = [str(c).strip() for c in table.columns]
    return table


def _where(sheet_path: Path, row: int) -> str:
    # Row numbers as in the file: the header is line 1, the first pair line 2.
    return f"{sheet_path}, row {row} (line {row + 2})"


def _cell(table, sheet_path: Path, row: int, column: str) -> str:
    value = table[column].iloc[row]
    if value is None or (isinstance(value, float) and np.isnan(value)) or not str(value).strip():
        raise UserError(f"{_where(sheet_path, row)}: empty {column}")
    return str(value).strip()


def geollava_video_name(image_path1: str, image_path2: str) -> str:
    """GeoLLaVA's released video name: ``airport_hangar_0_4-airport_hangar_0_1.mp4`` (the stems without ``_rgb``)."""
    def stem(path: str) -> str:
        name = Path(path.replace("\\", "/")).stem
        return name[: -len("_rgb")] if name.endswith("_rgb") else name

    return f"{stem(image_path1)}-{stem(image_path2)}.mp4"


def _video_name(table, sheet_path: Path, row: int) -> str:
    if "video" in table.columns:
        name = _cell(table, sheet_path, row, "video")
    elif "id" in table.columns:
        name = _cell(table, sheet_path, row, "id")
    else:
        return geollava_video_name(*(_cell(table, sheet_path, row, column) for column in PAIR_COLUMNS))
    name = name if name.lower().endswith(".mp4") else f"{name}.mp4"
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise UserError(f"{_where(sheet_path, row)}: video name {name!r} must stay inside the output folder")
    return name


def image_candidates(written: str, root: Path) -> list[Path]:
    """Where a sheet's image path may be, in order: relative paths under ``root``; an absolute path as written,
    then under ``root`` by its trailing components (``/Datasets/val/x/y.jpg`` -> ``root/Datasets/val/x/y.jpg``,
    ``root/val/x/y.jpg``, ``root/x/y.jpg``, ``root/y.jpg``), since released sheets hold their authors' paths."""
    path = Path(written.replace("\\", "/")).expanduser()
    if not path.is_absolute() and not path.drive:
        return [root / path]
    parts = path.parts[1:]
    return [path] + [root.joinpath(*parts[start:]) for start in range(len(parts))]


def locate_image(written: str, root: Path) -> Path:
    """The first existing candidate of ``image_candidates``; a miss names where it looked."""
    candidates = image_candidates(written, root)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    shown = ", ".join(map(str, candidates[:4])) + (f" and {len(candidates) - 4} more" if len(candidates) > 4 else "")
    raise UserError(f"image {written} not found (image root {root}; looked at {shown})")


def fit_pair(before: np.ndarray, after: np.ndarray, options: SheetOptions) -> tuple[np.ndarray, np.ndarray, bool]:
    """(before, after, whether the sizes differed): both at one even size, bounded by ``options.max_side``."""
    differ = before.shape != after.shape
    if differ and not options.resize:
        raise UserError(f"image sizes differ: {before.shape[1]}x{before.shape[0]} and "
                        f"{after.shape[1]}x{after.shape[0]} (drop --strict to resize them to one size)")
    width, height = options.size or bounded_size(before.shape[1], before.shape[0], options.max_side)
    before, after = resize_image(before, (width, height)), resize_image(after, (width, height))
    if min(before.shape[:2]) < 2:
        raise UserError(f"image too small for a video ({before.shape[1]}x{before.shape[0]})")
    return crop_to_even(before), crop_to_even(after), differ


def _plan_row(table, sheet_path: Path, row: int, root: Path, out_dir: Path, first_row_of: dict[str, int]):
    """(video path, before image, after image) for one row; images are looked up only for videos still to make."""
    name = _video_name(table, sheet_path, row)
    if name in first_row_of:
        raise UserError(f"video name {name!r} repeats row {first_row_of[name]}")
    first_row_of[name] = row
    target = out_dir / name
    written = [_cell(table, sheet_path, row, column) for column in PAIR_COLUMNS]
    if target.exists():
        return target, None, None
    return target, locate_image(written[0], root), locate_image(written[1], root)


def pairs_sheet_to_videos(sheet_path: str | Path, out_dir: str | Path, image_root: str | Path | None = None,
                          options: SheetOptions = SheetOptions()) -> list[Path]:
    """One 2-frame video (before frame first) per row of a pairs sheet; returns the videos of the good rows.

    Columns ``image_path1``, ``image_path2`` (GeoLLaVA's sheets add category, location_id, timestamps...).
    Videos are named by the sheet's ``video`` or ``id`` column, else GeoLLaVA's scheme (``geollava_video_name``).
    Image paths are found under ``image_root`` (default: the sheet's folder), absolute ones by their trailing
    components too. Videos already in ``out_dir`` are kept, so an interrupted run resumes where it stopped.
    A bad row (missing image, empty cell, unreadable image...) gets one line and is skipped; the other rows are
    converted, then a UserError counts the bad rows.
    """
    sheet_path, out_dir = Path(sheet_path), Path(out_dir)
    table = _read_sheet(sheet_path)
    missing_columns = [c for c in PAIR_COLUMNS if c not in table.columns]
    if missing_columns:
        raise UserError(f"pairs sheet {sheet_path} lacks column(s) {', '.join(missing_columns)} "
                        f"(it has: {', '.join(table.columns) or 'none'})")
    root = Path(image_root) if image_root is not None else sheet_path.parent

    # Every row is checked before any video is made, so problems show early, one line each.
    bad: list[str] = []
    plan: list[tuple[int, Path, Path | None, Path | None]] = []  # (row, video, before, after)
    first_row_of: dict[str, int] = {}
    for row in range(len(table)):
        try:
            plan.append((row, *_plan_row(table, sheet_path, row, root, out_dir, first_row_of)))
        except UserError as exc:
            message = str(exc)
            bad.append(message if message.startswith(str(sheet_path)) else f"{_where(sheet_path, row)}: {message}")
            print(f"bad row: {bad[-1]}", file=sys.stderr)

    made, failed = pairs_to_videos([(_where(sheet_path, row), target, before, after)
                                    for row, target, before, after in plan], options, out_dir)
    bad += failed
    if bad:
        raise UserError(f"pairs sheet {sheet_path}: {len(bad)} of {len(table)} rows could not be converted "
                        f"(one line each above; first: {bad[0]}); the {len(made)} other videos are in {out_dir}")
    return made


def pairs_to_videos(jobs: list[tuple[str, Path, Path | None, Path | None]], options: SheetOptions, out_dir: Path
                    ) -> tuple[list[Path], list[str]]:
    """Make the videos of ``jobs`` = (where, video, before image, after image); a video already there is kept
    (its images may be None). Returns (the videos there at the end, one line per job that failed), the failures
    printed as they come, with a progress bar and a count of the pairs whose sizes differed."""
    todo = [job for job in jobs if not job[1].exists()]
    if len(todo) < len(jobs):
        print(f"{len(jobs) - len(todo)} of {len(jobs)} videos already in {out_dir}; making the other {len(todo)}")
    bad: list[str] = []
    resized = 0
    for where, target, before_path, after_path in tqdm(todo, desc="pairs -> videos", unit="video",
                                                       disable=not todo):
        try:
            before, after, differ = fit_pair(read_image(before_path), read_image(after_path), options)
            write_video([before, after], target)
            resized += differ
        except UserError as exc:
            bad.append(f"{where}: {exc}")
            tqdm.write(f"bad row: {bad[-1]}", file=sys.stderr)
    if resized:
        print(f"{resized} of {len(todo)} pairs had images of different sizes; resized to one size "
              f"({'x'.join(map(str, options.size)) if options.size else 'the before image size'})")
    return [target for _, target, *_ in jobs if target.exists()], bad


def _size_argument(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 512x512") from None
    if width < 2 or height < 2:
        raise UserError(f"--size {text!r}: width and height must be at least 2")
    return width, height


SHEET_USAGE = ("pairs-to-videos SHEET OUT_DIR [IMAGE_ROOT] [--size WxH] [--max-side N] [--strict]\n"
               "  --size WxH    every video at this size (default: the before image's, bounded by --max-side)\n"
               f"  --max-side N  longest side at most N pixels, never upscaled (default {DEFAULT_MAX_SIDE}; 0 = keep)\n"
               "  --strict      stop at a pair whose images differ in size instead of resizing it")


def parse_size_options(argv: list[str], usage: str = SHEET_USAGE) -> tuple[list[str], SheetOptions]:
    """(the other arguments, the options) of a command line with ``--size``, ``--max-side``, ``--strict``."""
    positional, options = [], {}
    args = list(argv)
    while args:
        arg = args.pop(0)
        key, _, value = arg.partition("=")
        if key in ("--size", "--max-side") and not value:
            if not args:
                raise UserError(f"{key} needs a value; usage: {usage}")
            value = args.pop(0)
        if key == "--size":
            options["size"] = _size_argument(value)
        elif key == "--max-side":
            if not value.isdigit():
                raise UserError(f"--max-side {value!r}: expected a whole number of pixels (0 = no bound)")
            options["max_side"] = int(value) or None
        elif arg == "--strict":
            options["resize"] = False
        elif arg.startswith("-"):
            raise UserError(f"unknown option {arg!r}; usage: {usage}")
        else:
            positional.append(arg)
    return positional, SheetOptions(**options)


def pairs_to_videos_main(argv: list[str] | None = None) -> int:
    """``pairs-to-videos SHEET OUT_DIR [IMAGE_ROOT] [options]``."""
    prepare_process()
    positional, options = parse_size_options(sys.argv[1:] if argv is None else argv)
    if len(positional) not in (2, 3):
        raise UserError(f"usage: python common.py {SHEET_USAGE}")
    written = pairs_sheet_to_videos(positional[0], positional[1], positional[2] if len(positional) == 3 else None,
                                    options)
    print(f"{len(written)} videos in {positional[1]}")
    return 0


# --------------------------------------------------------------------------- between the families

CHANGECHAT_USAGE = ("changechat-to-videos ANNOTATIONS IMAGE_ROOT OUT_DIR [--split NAME] [--size WxH] [--max-side N] "
                    "[--strict]")
PAIRS_USAGE = "videos-to-pairs ANNOTATIONS VIDEO_DIR OUT_DIR [--split NAME]"


def write_converted(records: list[dict[str, Any]], source: Path, out_dir: Path, split: str | None) -> Path:
    """``out_dir/<source name>[_<split>].json``, and beside it the note naming the source file (name and hash), so
    that results on the converted file name the same test set as results on the source."""
    path = atomic_write_text(out_dir / f"{source.stem}{f'_{split}' if split else ''}.json",
                             json.dumps(records, indent=1, ensure_ascii=False) + "\n")
    origin = describe_test_set(source, None)
    note = {"converted_from": {"file": origin["file"], "sha256": origin["sha256"]}, "sha256": file_sha256(path)}
    atomic_write_text(source_note_path(path), json.dumps(note, indent=1) + "\n")
    return path


def _pair_names(samples: list[ChangeChatSample]) -> dict[tuple[Path, Path], str]:
    """One video name per distinct image pair: the before image's stem, numbered when two pairs share it."""
    names: dict[tuple[Path, Path], str] = {}
    taken: set[str] = set()
    for sample in samples:
        key = (sample.image_a, sample.image_b)
        if key in names:
            continue
        name, number = sample.image_a.stem, 1
        while f"{name}.mp4" in taken:
            number += 1
            name = f"{sample.image_a.stem}_{number}"
        names[key] = f"{name}.mp4"
        taken.add(names[key])
    return names


def geollava_records(sample: ChangeChatSample, video: str) -> list[dict[str, Any]]:
    """The GeoLLaVA records of one ChangeChat sample: one per turn, every reference kept."""
    records = []
    for turn, (question, answer) in enumerate(sample.turns, start=1):
        record: dict[str, Any] = {
            "id": sample.id if len(sample.turns) == 1 else f"{sample.id}_turn{turn}", "video": video,
            "conversations": [{"from": "human", "value": f"<video>\n{question}"}, {"from": "gpt", "value": answer}]}
        if turn == 1 and sample.references:
            record["references"] = list(sample.references)
        if len(sample.turns) > 1:
            record["source_id"], record["turn"] = sample.id, turn
        if sample.changeflag is not None:
            record["changeflag"] = sample.changeflag
        if sample.split is not None:
            record["split"] = sample.split
        records.append(record)
    return records


def changechat_to_videos(annotations: str | Path, image_root: str | Path | None, out_dir: str | Path, *,
                         split: str | None = None, options: SheetOptions = SheetOptions()) -> Path:
    """Convert a ChangeChat / LEVIR-CC file (see the module doc); returns the GeoLLaVA JSON's path.

    Resumable (videos already there are kept); an image pair that cannot be converted gets one line, the others
    are converted, then a UserError counts the failures (the JSON is written only when every pair converted)."""
    annotations, out_dir = Path(annotations), Path(out_dir)
    samples = load_changechat(annotations, image_root, split=split)
    if not samples:
        raise UserError(f"{annotations}: no records to convert")
    names = _pair_names(samples)
    video_dir = out_dir / "videos"
    jobs = [(f"{annotations}: pair {a} -> {b}", video_dir / name, a, b) for (a, b), name in names.items()]
    made, bad = pairs_to_videos(jobs, options, video_dir)
    if bad:
        raise UserError(f"{annotations}: {len(bad)} of {len(jobs)} image pairs could not be converted (one line "
                        f"each above; first: {bad[0]}); the {len(made)} other videos are in {video_dir}")
    records = [record for sample in samples
               for record in geollava_records(sample, names[(sample.image_a, sample.image_b)])]
    path = write_converted(records, annotations, out_dir, split)
    named_splits = sorted({s.split for s in samples if s.split is not None})
    print(f"{len(records)} records on {len(names)} videos: {path}\nvideo models: VAL_ANNOTATIONS={path} "
          f"VIDEO_DIR={video_dir}" + (f" (records of splits {', '.join(named_splits)}: SPLIT=... picks one)"
                                      if len(named_splits) > 1 else ""))
    return path


def _changechat_record(group: list[tuple[Sample, dict]], image_a: str, image_b: str) -> dict[str, Any]:
    """One ChangeChat record from the GeoLLaVA records of one source record (in turn order)."""
    first, raw = group[0]
    record: dict[str, Any] = {"id": raw.get("source_id", first.id)}
    if len(group) == 1 and first.references and first.question == CAPTION_PROMPT:
        record.update(image_A=image_a, image_B=image_b, captions=list(first.references))
    else:
        record["image"] = [image_a, image_b]
        turns = []
        for number, (sample, _) in enumerate(group):
            placeholder = "<image>\n" if number == 0 else ""
            turns += [{"from": "human", "value": f"{placeholder}{sample.question}"},
                      {"from": "gpt", "value": sample.answer}]
        record["conversations"] = turns
        if first.references:
            record["references"] = list(first.references)
    for key in ("changeflag", "split"):
        if raw.get(key) is not None:
            record[key] = raw[key]
    return record


def videos_to_pairs(annotations: str | Path, video_dir: str | Path | None, out_dir: str | Path, *,
                    split: str | None = None) -> Path:
    """Convert GeoLLaVA videos + JSON (see the module doc); returns the ChangeChat JSON's path. Resumable."""
    annotations, out_dir = Path(annotations), Path(out_dir)
    samples = load_annotations(annotations, video_dir, split=split)
    if not samples:
        raise UserError(f"{annotations}: no records to convert")
    # The loaded samples are checked; their raw records add what Sample does not hold (changeflag, turn...).
    raw_of = {str(r["id"]) if r.get("id") not in (None, "") else Path(r["video"]).stem: r
              for r in read_annotation_json(annotations)}
    videos = list(dict.fromkeys(sample.video for sample in samples))
    todo = [v for v in videos if not ((out_dir / "A" / f"{v.stem}.png").exists()
                                     and (out_dir / "B" / f"{v.stem}.png").exists())]
    if len(todo) < len(videos):
        print(f"{len(videos) - len(todo)} of {len(videos)} image pairs already in {out_dir}")
    for video in tqdm(todo, desc="videos -> pairs", unit="video", disable=not todo):
        before, after = read_video_frames(video, 2)
        write_image(before, out_dir / "A" / f"{video.stem}.png")
        write_image(after, out_dir / "B" / f"{video.stem}.png")
    groups: dict[str, list[tuple[Sample, dict]]] = {}
    for sample in samples:
        raw = raw_of[sample.id]
        groups.setdefault(str(raw.get("source_id", sample.id)), []).append((sample, raw))
    records = [_changechat_record(sorted(group, key=lambda pair: pair[1].get("turn", 1)),
                                  f"A/{group[0][0].video.stem}.png", f"B/{group[0][0].video.stem}.png")
               for group in groups.values()]
    path = write_converted(records, annotations, out_dir, split)
    print(f"{len(records)} records on {len(videos)} image pairs: {path}\nDeltaVLM: "
          f"python deltavlm_predict.py TEST_ANNOTATIONS={path}")
    return path


def _split_option(argv: list[str]) -> tuple[list[str], str | None]:
    """(the other arguments, the value of --split NAME / --split=NAME or None)."""
    rest, split = [], None
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--split" or arg.startswith("--split="):
            split = arg.partition("=")[2] or (args.pop(0) if args else "")
            if not split:
                raise UserError("--split needs a name (train, val, test)")
        else:
            rest.append(arg)
    return rest, split


def changechat_to_videos_main(argv: list[str]) -> int:
    prepare_process()
    rest, split = _split_option(argv)
    positional, options = parse_size_options(rest, CHANGECHAT_USAGE)
    if len(positional) != 3:
        raise UserError(f"usage: python common.py {CHANGECHAT_USAGE}")
    changechat_to_videos(*positional, split=split, options=options)
    return 0


def videos_to_pairs_main(argv: list[str]) -> int:
    prepare_process()
    positional, split = _split_option(argv)
    if len(positional) != 3 or any(arg.startswith("-") for arg in positional):
        raise UserError(f"usage: python common.py {PAIRS_USAGE}")
    videos_to_pairs(*positional, split=split)
    return 0
