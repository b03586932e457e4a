"""Each model family eats the other's data.

    python common.py changechat-to-videos ANNOTATIONS IMAGE_ROOT OUT_DIR [--split NAME] [--size WxH] [--max-side N]
    python common.py videos-to-pairs ANNOTATIONS VIDEO_DIR OUT_DIR [--split NAME]

``changechat-to-videos``: LEVIR-CC captions (``LevirCCcaptions.json``, or the caption split) or ChangeChat
instruction records -> ``OUT_DIR/videos/*.mp4`` (one 2-frame video per image pair, before frame first) and
``OUT_DIR/<name>.json`` in GeoLLaVA's format, one record per question. Every reference caption is kept under
``references`` (the video evaluation scores against all of them, as the bi-temporal papers do), and so are
``changeflag`` and ``split``. A multi-turn record becomes one record per turn (``<id>_turn<k>``, the ids
DeltaVLM's batch mode gives them), with ``source_id`` and ``turn`` so the way back rebuilds it.

``videos-to-pairs``: GeoLLaVA videos + JSON -> ``OUT_DIR/A/<video>.png``, ``OUT_DIR/B/<video>.png`` (the first
and last frame) and ``OUT_DIR/<name>.json`` in ChangeChat's format: records holding the caption prompt and
``references`` become caption-split records (``captions``), the others instruction records.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .annotations import (ChangeChatSample, Sample, describe_test_set, load_annotations, load_changechat,
                          read_annotation_json, source_note_path)
from .changechat_format import CAPTION_PROMPT
from .errors import UserError, install_error_handler
from .fileio import atomic_write_text, file_sha256
from .video import SheetOptions, pairs_to_videos, parse_size_options, read_video_frames, write_image

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
    install_error_handler()
    rest, split = _split_option(argv)
    positional, options = parse_size_options(rest, CHANGECHAT_USAGE)
    if len(positional) != 3:
        raise UserError(f"usage: python common.py {CHANGECHAT_USAGE}")
    changechat_to_videos(*positional, split=split, options=options)
    return 0


def videos_to_pairs_main(argv: list[str]) -> int:
    install_error_handler()
    positional, split = _split_option(argv)
    if len(positional) != 3 or any(arg.startswith("-") for arg in positional):
        raise UserError(f"usage: python common.py {PAIRS_USAGE}")
    videos_to_pairs(*positional, split=split)
    return 0
