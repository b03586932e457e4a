"""Loading annotation files, with one clear error naming the file and record for every mistake.

GeoLLaVA (video-LLM) schema, shared by the bundled sample and the real 10k/100k files::

    [{"id": "...", "video": "x.mp4",
      "conversations": [{"from": "human", "value": "<video>\\nquestion"}, {"from": "gpt", "value": "answer"}]}]

ChangeChat (bi-temporal) shapes, see ``load_changechat``.
"""
from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .changechat_format import CAPTION_PROMPT
from .errors import UserError
from .fileio import file_sha256
from .video import probe_clip

HUMAN_ROLES = ("human", "user")
ANSWER_ROLES = ("gpt", "assistant")
PLACEHOLDER = re.compile(r"<(?:video|image)>")
# How many missing media files an error lists before it only counts.
MAX_LISTED = 5


@dataclass
class Sample:
    """One GeoLLaVA record: the video and its first question / answer.

    ``references``: every reference answer when the record lists them (``"references": [...]``, e.g. LEVIR-CC's
    five captions converted by ``changechat-to-videos``); empty otherwise. ``split``: the record's ``"split"``.
    """
    id: str
    video: Path
    question: str
    answer: str | None
    references: list[str] = field(default_factory=list)
    split: str | None = None

    def scoring_references(self) -> str | list[str] | None:
        """What the answer is scored against: every reference when the record has them, else its answer."""
        return list(self.references) if self.references else self.answer


@dataclass
class ChangeChatSample:
    """One ChangeChat record: an image pair and its (question, answer) turns.

    For the caption split, ``references`` holds the pair's reference captions and
    ``turns`` is one (caption prompt, first reference) turn.
    """
    id: str
    image_a: Path
    image_b: Path
    changeflag: int | None
    turns: list[tuple[str, str | None]]
    references: list[str] = field(default_factory=list)
    split: str | None = None


def strip_placeholders(text: str) -> str:
    """A human turn without its ``<video>`` / ``<image>`` placeholders and surrounding whitespace."""
    return PLACEHOLDER.sub("", text).strip()


def read_annotation_json(path: Path) -> Any:
    """An annotation file's JSON; a missing, non-UTF-8 or malformed file is one clear UserError."""
    if not path.exists():
        raise UserError(f"annotation file {path} does not exist")
    if not path.is_file():
        raise UserError(f"annotation file {path} is not a file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: files saved by Windows tools may start with a BOM
    except UnicodeDecodeError as exc:
        raise UserError(f"annotation file {path} is not UTF-8 text: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None


def _where(path: Path, index: int, record_id: Any = None) -> str:
    return f"{path}: record {index}" + (f" (id {record_id!r})" if record_id not in (None, "") else "")


def _records(data: Any, path: Path) -> list:
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of records, found a JSON {type(data).__name__}")
    return data


def _text_field(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        found = "missing" if key not in record else f"{type(value).__name__} {value!r}"[:80]
        raise UserError(f"{where}: '{key}' must be a non-empty string ({found})")
    return value.strip()


def _conversation(record: dict, where: str) -> list[tuple[str, str]]:
    """The turns as (role, text), checked."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        found = "missing" if "conversations" not in record else f"a {type(turns).__name__}"
        raise UserError(f"{where}: 'conversations' must be a non-empty list of turns ({found})")
    checked = []
    for number, turn in enumerate(turns):
        if not (isinstance(turn, dict) and isinstance(turn.get("from"), str) and isinstance(turn.get("value"), str)):
            raise UserError(f"{where}: turn {number} must be {{\"from\": str, \"value\": str}}, got {turn!r}"[:300])
        checked.append((turn["from"].strip().lower(), turn["value"]))
    return checked


def _check_unique(ids: list[str], path: Path) -> None:
    first_index: dict[str, int] = {}
    for index, record_id in enumerate(ids):
        if record_id in first_index:
            raise UserError(f"{_where(path, index, record_id)}: duplicate id, already used by record "
                            f"{first_index[record_id]}")
        first_index[record_id] = index


def _check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise UserError(f"limit must be None (all records) or an integer >= 1, got {limit!r}")


def select_split(entries: list, split: str | None, path: Path) -> list:
    """The entries of ``split`` when the file names splits (a ``"split"`` field, as LEVIR-CC's caption file and
    files converted from it have); a file without any ``"split"`` is used whole. Says what was used."""
    if split is None:
        return entries
    counts: dict[str, int] = {}
    for entry in entries:
        if isinstance(entry, dict) and entry.get("split") is not None:
            counts[str(entry["split"])] = counts.get(str(entry["split"]), 0) + 1
    if not counts:
        return entries
    chosen = [e for e in entries if isinstance(e, dict) and str(e.get("split")) == split]
    held = ", ".join(f"{name} {count}" for name, count in counts.items())
    if not chosen:
        raise UserError(f"{path}: no entry of split {split!r} (the file holds: {held}); set SPLIT to one of them")
    print(f"{path}: {len(chosen)} of {len(entries)} entries, split {split!r} (the file holds: {held})")
    return chosen


def _entries(data: Any) -> list:
    return data["images"] if isinstance(data, dict) and isinstance(data.get("images"), list) else \
        data if isinstance(data, list) else []


def source_note_path(path: Path) -> Path:
    """Where a converted annotation file names the file it was converted from (see ``describe_test_set``)."""
    return path.with_name(f"{path.name}.source.json")


def describe_test_set(path: str | Path, split: str | None) -> dict[str, Any]:
    """What a results file was scored on: ``{"file": name, "sha256": hex, "split": split or None}``.

    ``split`` is kept only when the file names splits (else every record was used and the split is None). A file
    written by ``changechat-to-videos`` / ``videos-to-pairs`` holds the same pairs and references as its source,
    so it is named by its source (through the note beside it, honoured while the file is unchanged): the video
    models and DeltaVLM then share a test set on the leaderboard."""
    path = Path(path)
    entries = _entries(read_annotation_json(path))
    names_splits = any(isinstance(e, dict) and e.get("split") is not None for e in entries)
    identity = {"file": path.name, "sha256": file_sha256(path)}
    note = source_note_path(path)
    if note.is_file():
        recorded = json.loads(note.read_text(encoding="utf-8"))
        if recorded.get("sha256") == identity["sha256"]:
            identity = dict(recorded["converted_from"])
    return {**identity, "split": split if names_splits else None}


def _report_missing(path: Path, missing: list[str], total: int, what: str, folder: Path) -> None:
    if missing:
        listed = "; ".join(missing[:MAX_LISTED]) + ("; ..." if len(missing) > MAX_LISTED else "")
        raise UserError(f"{path}: {len(missing)} of {total} {what} missing under {folder}: {listed}")


def _shown(media: Path, folder: Path) -> str:
    # Relative to the folder the message names, so the record's own spelling is recognisable.
    return str(media.relative_to(folder)) if media.is_relative_to(folder) else str(media)


class Samples(list):
    """The samples of an annotation file; ``skipped`` describes the records left out for a bad clip
    (``skip_bad_clips``), so that run.json and the metrics file can count them."""

    def __init__(self, samples=(), skipped: list[str] | None = None):
        super().__init__(samples)
        self.skipped = list(skipped or [])


def _check_clips(samples: list[Sample], path: Path, folder: Path, num_frames: int, skip_bad: bool) -> Samples:
    """Every clip opened once (in parallel, with a progress bar on a large file): all bad ones in one error naming
    the file and each record, before any model loads; or, with ``skip_bad``, left out and described."""
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        problems = list(tqdm(pool.map(lambda s: probe_clip(s.video, num_frames), samples), total=len(samples),
                             desc=f"checking the clips of {path.name}", unit="clip", disable=len(samples) < 200,
                             leave=False))
    bad = [f"record {i} (id {s.id!r}): {_shown(s.video, folder)} {problem}"
           for i, (s, problem) in enumerate(zip(samples, problems)) if problem]
    if bad and not skip_bad:
        listed = "\n  ".join(bad)
        raise UserError(f"{path}: {len(bad)} of {len(samples)} clips cannot be used (under {folder}); fix or remove "
                        f"them, or set SKIP_BAD_CLIPS=True to leave them out:\n  {listed}")
    if bad:
        print(f"SKIP_BAD_CLIPS: left out {len(bad)} of {len(samples)} records of {path} (bad clips): {bad[0]}"
              + (f"; ... ({len(bad)} in all)" if len(bad) > 1 else ""))
    return Samples([s for s, problem in zip(samples, problems) if not problem], bad)


def load_annotations(path: str | Path, video_dir: str | Path | None = None, *, require_answer: bool = True,
                     check_videos: bool = True, limit: int | None = None, split: str | None = None,
                     num_frames: int = 2, skip_bad_clips: bool = False) -> Samples:
    """GeoLLaVA records as Samples, the first ``limit`` of them (all are checked, clips only for those kept).

    ``video`` is resolved against ``video_dir`` (default: the JSON file's folder). ``split``: only the records
    of that split when records carry ``"split"`` (see ``select_split``). ``check_videos``: every clip is opened
    once (readable, at least ``num_frames`` frames, a decodable first frame); the bad ones stop the load in one
    error, or are left out with ``skip_bad_clips`` (counted in ``Samples.skipped``).
    """
    path = Path(path)
    _check_limit(limit)
    records = select_split(_records(read_annotation_json(path), path), split, path)
    folder = Path(video_dir) if video_dir is not None else path.parent
    samples = []
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise UserError(f"{_where(path, index)}: expected a JSON object, found a {type(record).__name__}")
        raw_id = record.get("id")
        where = _where(path, index, raw_id)
        video = _text_field(record, "video", where)
        record_id = str(raw_id) if raw_id not in (None, "") else Path(video).stem
        turns = _conversation(record, where)
        questions = [text for role, text in turns if role in HUMAN_ROLES]
        answers = [text for role, text in turns if role in ANSWER_ROLES]
        if not questions:
            raise UserError(f"{where}: no human turn (a conversation turn with \"from\": \"human\")")
        question = strip_placeholders(questions[0])
        if not question:
            raise UserError(f"{where}: the human turn has no question besides its <video> placeholder")
        answer = answers[0].strip() if answers else None
        if require_answer and not answer:
            raise UserError(f"{where}: no answer (a conversation turn with \"from\": \"gpt\" and a non-empty value)")
        samples.append(Sample(record_id, folder / video, question, answer, _references(record, where),
                              _split_of(record)))
    _check_unique([s.id for s in samples], path)
    if limit is not None:
        samples = samples[:limit]
    if check_videos:
        return _check_clips(samples, path, folder, num_frames, skip_bad_clips)
    return Samples(samples)


def _references(record: dict, where: str) -> list[str]:
    references = record.get("references")
    if references is None:
        return []
    if not (isinstance(references, list) and references and all(isinstance(r, str) and r.strip() for r in references)):
        raise UserError(f"{where}: 'references' must be a non-empty list of non-empty strings")
    return [r.strip() for r in references]


def _split_of(record: dict) -> str | None:
    return None if record.get("split") is None else str(record["split"])


# --------------------------------------------------------------------------- ChangeChat

def _changeflag(record: dict, where: str) -> int | None:
    flag = record.get("changeflag")
    if flag is None:
        return None
    if isinstance(flag, bool) or flag in (0, 1):
        return int(flag)
    raise UserError(f"{where}: 'changeflag' must be 0 or 1, got {flag!r}")


def _instruction_sample(record: dict, where: str, root: Path, require_answer: bool) -> ChangeChatSample:
    images = record.get("image")
    if not (isinstance(images, list) and len(images) == 2 and all(isinstance(i, str) and i.strip() for i in images)):
        raise UserError(f"{where}: 'image' must be a list of two paths [before, after], got {images!r}"[:300])
    turns: list[tuple[str, str | None]] = []
    for role, text in _conversation(record, where):
        if role in HUMAN_ROLES:
            if turns and turns[-1][1] is None and require_answer:
                raise UserError(f"{where}: human turn {len(turns) - 1} has no answer before the next question")
            turns.append((strip_placeholders(text), None))
        elif role in ANSWER_ROLES:
            if not turns or turns[-1][1] is not None:
                raise UserError(f"{where}: an answer turn without a question before it")
            turns[-1] = (turns[-1][0], text.strip())
    if not turns:
        raise UserError(f"{where}: no human turn (a conversation turn with \"from\": \"human\")")
    if require_answer and (turns[-1][1] is None or not all(answer for _, answer in turns)):
        raise UserError(f"{where}: no answer (a conversation turn with \"from\": \"gpt\" and a non-empty value)")
    record_id = record.get("id")
    record_id = str(record_id) if record_id not in (None, "") else Path(images[0]).stem
    return ChangeChatSample(record_id, root / images[0].strip(), root / images[1].strip(), _changeflag(record, where),
                            turns, split=_split_of(record))


def _caption_sample(record: dict, where: str, root: Path) -> ChangeChatSample:
    image_a, image_b = _text_field(record, "image_A", where), _text_field(record, "image_B", where)
    captions = record.get("captions")
    if not (isinstance(captions, list) and captions and all(isinstance(c, str) and c.strip() for c in captions)):
        raise UserError(f"{where}: 'captions' must be a non-empty list of non-empty strings")
    references = [c.strip() for c in captions]
    record_id = record.get("id")
    record_id = str(record_id) if record_id not in (None, "") else Path(image_a).stem
    return ChangeChatSample(record_id, root / image_a, root / image_b, _changeflag(record, where),
                            [(CAPTION_PROMPT, references[0])], references, _split_of(record))


def _levir_cc_records(data: dict, path: Path) -> list[dict]:
    """LEVIR-CC's own caption file as caption-split records.

    Its shape: ``{"images": [{"filepath": "train", "filename": "x.png", "sentences": [{"raw": ...}]}]}``.
    """
    converted = []
    for index, item in enumerate(_records(data["images"], path)):
        where = _where(path, index, item.get("filename") if isinstance(item, dict) else None)
        if not isinstance(item, dict):
            raise UserError(f"{where}: expected a JSON object, found a {type(item).__name__}")
        name = _text_field(item, "filename", where)
        folder = str(item.get("filepath") or "").strip()
        sentences = item.get("sentences")
        if not isinstance(sentences, list) or not all(isinstance(s, dict) and isinstance(s.get("raw"), str)
                                                      for s in sentences):
            raise UserError(f"{where}: 'sentences' must be a list of {{\"raw\": str}}")
        record = {"image_A": str(Path(folder, "A", name)), "image_B": str(Path(folder, "B", name)),
                  "captions": [s["raw"] for s in sentences], "id": Path(name).stem}
        for key in ("changeflag", "split"):
            if key in item:
                record[key] = item[key]
        converted.append(record)
    return converted


def load_changechat(path: str | Path, image_root: str | Path | None = None, *, require_answer: bool = True,
                    check_images: bool = True, limit: int | None = None, split: str | None = None
                    ) -> list[ChangeChatSample]:
    """ChangeChat records: instruction records, the caption split, or LEVIR-CC's own caption file.

    * instruction records: ``{"id", "image": ["A/x.png", "B/x.png"], "changeflag"?, "conversations": [...]}``
      (multi-turn conversations become several turns);
    * caption split: ``{"image_A": "A/x.png", "image_B": "B/x.png", "captions": [...], "changeflag"?}``;
    * LEVIR-CC: ``{"images": [{"filepath": "train", "filename": "x.png", "sentences": [{"raw": ...}]}]}``.

    Image paths are resolved against ``image_root`` (default: the JSON file's folder); ``id`` defaults to the
    before image's name stem. ``split``: only the entries of that split when they carry ``"split"`` (LEVIR-CC's
    file holds train, val and test; see ``select_split``).
    """
    path = Path(path)
    _check_limit(limit)
    data = read_annotation_json(path)
    if isinstance(data, dict) and "images" in data:
        data = {"images": select_split(_records(data["images"], path), split, path)}
        records = _levir_cc_records(data, path)
    else:
        records = select_split(_records(data, path), split, path)
    root = Path(image_root) if image_root is not None else path.parent
    samples = []
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise UserError(f"{_where(path, index)}: expected a JSON object, found a {type(record).__name__}")
        where = _where(path, index, record.get("id"))
        if "captions" in record:
            samples.append(_caption_sample(record, where, root))
        elif "conversations" in record:
            samples.append(_instruction_sample(record, where, root, require_answer))
        else:
            raise UserError(f"{where}: neither 'conversations' (instruction record) nor 'captions' (caption split)")
    _check_unique([s.id for s in samples], path)
    if limit is not None:
        samples = samples[:limit]
    if check_images:
        missing = [f"record {i} (id {s.id!r}): {_shown(image, root)}" for i, s in enumerate(samples)
                   for image in (s.image_a, s.image_b) if not image.is_file()]
        _report_missing(path, missing, 2 * len(samples), "image(s)", root)
    return samples
