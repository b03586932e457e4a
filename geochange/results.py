"""Results files: JSON Lines written as they come (resumable), metrics files, rescoring.

``results/<run>.jsonl``        one record per answer: id, video, question, true, generated
``results/<run>.metrics.json`` metrics, what is missing and why, models, settings, counts, time
``results/<run>.csv``          per sample: the record and its per-sample scores
``results/<run>.settings.json`` what produced the answers (model, weights fingerprint, generation settings,
                               test set); a rerun resumes only when it matches
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import UserError
from .fileio import atomic_write_text
from .metrics import MetricsReport, compute_metrics_report
from .runs import differing_settings

USAGE = ("usage: python common.py score FILE... [--pred KEY] [--refs KEY[,KEY...]] [--id KEY]   (results files: JSON, "
         "JSON Lines or CSV; ours, GeoLLaVA's, or any tool's: the flags name its fields, common names need none)")


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise UserError(f"{path}: no such results file")
    return _decode(path.read_bytes(), path)


def _decode(raw: bytes, path: Path) -> str:
    try:
        # utf-8-sig: files saved by some Windows editors start with a byte-order mark.
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start})") from None


def _lines(text: str) -> list[str]:
    # Only "\n" ends a JSON Lines record: str.splitlines() would also split inside answers holding
    # U+2028, U+0085... which json.dumps(ensure_ascii=False) writes unescaped.
    lines = text.split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


class ResultsWriter:
    """Append-only JSON Lines that resumes: ``done_ids`` holds the ids a previous run already wrote."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done_ids: set[str] = set()
        if self.path.exists():
            self.done_ids = {str(record["id"]) for record in self._read_existing()}

    def _read_existing(self) -> list[dict[str, Any]]:
        """The records already written; a last line cut off by a crash is dropped from the file."""
        raw = self.path.read_bytes()
        cut = raw.rfind(b"\n") + 1  # byte 0x0A never occurs inside a multi-byte UTF-8 character
        # Everything before the last newline must be sound (else UserError) before the file is touched.
        records = _parse_jsonl(_decode(raw[:cut], self.path), self.path)
        tail = raw[cut:]
        if not tail.strip():
            return records
        try:
            complete = isinstance(json.loads(tail.decode("utf-8")), dict)
        except (UnicodeDecodeError, json.JSONDecodeError):
            complete = False  # a cut record is never valid JSON
        with open(self.path, "r+b") as handle:
            if complete:
                handle.seek(0, os.SEEK_END)
                handle.write(b"\n")  # a whole record that only lost its newline: kept
            else:
                # A crash mid-write left part of a record: drop it; that sample is simply answered again.
                handle.truncate(cut)
            handle.flush()
            os.fsync(handle.fileno())
        if complete:
            return _parse_jsonl(_decode(raw + b"\n", self.path), self.path)
        print(f"warning: {self.path}: dropped an incomplete last line ({len(tail)} bytes) left by an "
              f"interrupted run", file=sys.stderr)
        return records

    def append(self, records: list[dict[str, Any]]) -> None:
        """Write one line per record, flushed and synced; a record whose id is already written is refused."""
        seen: set[str] = set()
        for number, record in enumerate(records):
            if not isinstance(record, dict) or "id" not in record:
                raise UserError(f"{self.path}: record {number} of the batch has no 'id'")
            key = str(record["id"])
            if key in self.done_ids or key in seen:
                raise UserError(f"{self.path}: record id {key!r} is already there; refusing to duplicate it")
            seen.add(key)
        lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        with open(self.path, "a", encoding="utf-8", newline="") as handle:
            handle.write(lines)
            handle.flush()
            os.fsync(handle.fileno())
        self.done_ids |= seen


def write_jsonl(path: str | Path, records: list[dict[str, Any]]) -> None:
    """A whole results file at once (a validation's answers), written atomically: one JSON object per line."""
    atomic_write_text(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


RESULTS_SUFFIXES = (".jsonl", ".settings.json", ".metrics.json", ".csv")


def remove_results(results_dir: str | Path, run: str) -> list[Path]:
    """Delete ``<results_dir>/<run>.jsonl`` and its companion files; returns those that existed."""
    removed = []
    for suffix in RESULTS_SUFFIXES:
        path = Path(results_dir) / f"{run}{suffix}"
        if path.exists():
            path.unlink()
            removed.append(path)
    return removed


def check_run_settings(path: Path, settings: dict, results: Path, *, redo: str = "delete it") -> None:
    """Answers in ``results`` resume only under the settings that wrote them (else they would mix).

    ``path`` records the settings beside the results; answers without such a record came from an
    unknown model and are refused too. ``redo`` says how the user discards the old answers.
    """
    if results.exists():
        if not path.exists():
            raise UserError(f"{results} holds answers with no record of what produced them ({path.name} is missing); "
                            f"set RUN_NAME to start a new run, or {redo} to redo this one")
        written = json.loads(path.read_text(encoding="utf-8"))
        changed = differing_settings(written, settings)
        if changed:
            raise UserError(f"{results} was written with other settings ({', '.join(changed)}); set RUN_NAME "
                            f"to start a new run, or {redo} to redo this one")
        return
    atomic_write_text(path, json.dumps(settings, indent=2, sort_keys=True) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Our results file: one JSON object with an ``id`` per line (blank lines are skipped)."""
    path = Path(path)
    return _parse_jsonl(_read_text(path), path)


def _parse_jsonl(text: str, path: Path) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(_lines(text), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: line {number} is not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or "id" not in record:
            raise UserError(f"{path}: line {number} is not a results record with an id")
        records.append(record)
    return records


def _json_records(text: str, path: Path) -> list[Any]:
    """The records of a JSON list, or of objects written back to back / one per line / comma-separated.

    GeoLLaVA's scripts wrote all of these: appended ``json.dumps`` lines, or a
    ``[`` then comma-separated objects with the closing ``]`` missing when a run
    was stopped early.
    """
    decoder = json.JSONDecoder()
    records: list[Any] = []
    position, in_list, closed = 0, False, False

    def skip(position: int, chars: str) -> int:
        while position < len(text) and (text[position].isspace() or text[position] in chars):
            position += 1
        return position

    position = skip(0, "")
    if text.startswith("[", position):
        try:
            value, end = decoder.raw_decode(text, position)
            if skip(end, "") == len(text):
                return value
        except json.JSONDecodeError:
            pass  # an unclosed or comma-less list: read it object by object below
        position, in_list = position + 1, True
    while True:
        position = skip(position, ",")
        if position >= len(text):
            return records
        line = text.count("\n", 0, position) + 1
        if in_list and not closed and text[position] == "]":
            position, closed = position + 1, True
            continue
        if closed:
            raise UserError(f"{path}: unexpected text after the closing ']' at line {line}")
        try:
            value, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: record {len(records)} (line {line}) is not valid JSON ({exc.msg})") from None
        records.append(value)


def strip_prompt(generated: str) -> str:
    """GeoLLaVA stored the whole decoded sequence: the answer is what follows the last 'Answer:'."""
    return generated.rsplit("Answer:", 1)[-1].strip()


# The field names other tools' results files use, most specific first (``score`` recognises them without flags).
# Names that mean a prediction in one tool and a reference in another ("answer", "caption") are left out: such a
# file names its fields with --pred / --refs.
PRED_FIELDS = ("generated", "pred", "prediction", "predicted", "predicted_caption", "pred_caption", "hypothesis",
               "hyp", "generated_text", "output", "res")
REFS_FIELDS = ("true", "refs", "references", "reference", "ref", "gts", "gt", "ground_truth", "gold", "target",
               "targets")
ID_FIELDS = ("id", "uid", "sample_id", "image_id", "question_id", "qid", "image", "name", "filename", "file_name")
# GeoLLaVA's scripts stored the whole decoded sequence in this field (prompt included)
GEOLLAVA_PRED_FIELD = "generated"


@dataclass(frozen=True)
class ResultFields:
    """Which fields of a results file hold the prediction, the references (one field or several, each a string or a
    list of strings) and the sample id (None: the file has none; records are numbered)."""
    pred: str
    refs: tuple[str, ...]
    id: str | None

    def as_dict(self) -> dict[str, Any]:
        return {"pred": self.pred, "refs": list(self.refs), "id": self.id}


@dataclass
class LoadedResults:
    """A results file read for scoring: its records (``id``, ``true``, ``generated`` set), the fields they came
    from, and how many records were dropped for repeating an earlier id."""
    path: Path
    records: list[dict[str, Any]]
    fields: ResultFields
    duplicates_dropped: int = 0


def _csv_records(text: str, path: Path) -> list[dict[str, Any]]:
    """The rows of a CSV (or, for ``.tsv``, tab-separated) file as records; a cell holding a JSON list of strings
    (references written by a script) is read as that list."""
    rows = list(csv.DictReader(io.StringIO(text), delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
    for row in rows:
        for key, value in row.items():
            if isinstance(value, str) and value.lstrip().startswith("["):
                try:
                    parsed = json.loads(value)
                except json.JSONDecodeError:
                    continue
                if isinstance(parsed, list) and parsed and all(isinstance(v, str) for v in parsed):
                    row[key] = parsed
    return rows


def _file_records(path: Path) -> list[Any]:
    """A results file's records: CSV / TSV by suffix, else JSON (a list, an object of id -> record, an object with one
    list of records), JSON Lines, or objects back to back."""
    text = _read_text(path)
    if path.suffix.lower() in (".csv", ".tsv"):
        return _csv_records(text, path)
    values = _json_records(text, path)
    if len(values) == 1 and isinstance(values[0], dict) and not _has_any(values[0], PRED_FIELDS):
        (top,) = values
        lists = [v for v in top.values() if isinstance(v, list)]
        if len(lists) == 1 and all(isinstance(v, dict) for v in lists[0]):
            return lists[0]  # {"results": [...]}, {"predictions": [...]}...
        if top and all(isinstance(v, dict) for v in top.values()):
            return [{"id": key, **value} for key, value in top.items()]  # {id: record, ...}
    return values


def _has_any(record: dict, names: tuple[str, ...]) -> bool:
    return any(name in record for name in names)


def detect_fields(records: list[dict[str, Any]], path: Path, *, pred: str | None = None, refs: str | None = None,
                  id: str | None = None) -> ResultFields:
    """The fields to score: those given (``refs`` may name several, comma-separated), else the first common name
    that the first record holds (the id: that any record holds); one line naming what is missing and how to name it
    otherwise. No id field is no error: the records are numbered."""
    first = records[0]

    def pick(given: str | None, names: tuple[str, ...], what: str, flag: str) -> str:
        found = given or next((name for name in names if name in first), None)
        if found is None:
            raise UserError(f"{path}: record 0 has no {what} field (looked for {', '.join(map(repr, names))}; its "
                            f"fields: {', '.join(map(repr, first)) or 'none'}); name it with {flag} KEY")
        return found

    keys = {key for record in records if isinstance(record, dict) for key in record}
    return ResultFields(pick(pred, PRED_FIELDS, "prediction", "--pred"),
                        tuple(k.strip() for k in pick(refs, REFS_FIELDS, "references", "--refs").split(",") if k.strip()),
                        id or next((name for name in ID_FIELDS if name in keys), None))


def load_results(path: str | Path, *, pred: str | None = None, refs: str | None = None,
                 id: str | None = None) -> LoadedResults:
    """Any tool's results file as records to score: JSON, JSON Lines, objects back to back, or CSV; ``pred``,
    ``refs`` and ``id`` name the fields (else common names are recognised, see ``detect_fields``).

    Each record keeps its fields, with ``generated`` the prediction (GeoLLaVA's stripped of its prompt up to the last
    "Answer:"), ``true`` the references (one string, or a list when there are several) and ``id`` a string (the
    record's index in a file without ids). A record repeating an earlier id is dropped, the first kept (DDP
    evaluations pad their last batch with repeats); one line says how many. Without ids nothing is dropped.
    """
    path = Path(path)
    values = _file_records(path)
    if not values:
        return LoadedResults(path, [], ResultFields(pred or GEOLLAVA_PRED_FIELD, (refs or "true",), id))
    if not isinstance(values[0], dict):
        raise UserError(f"{path}: record 0 is not a JSON object")
    fields = detect_fields(values, path, pred=pred, refs=refs, id=id)
    records, seen, dropped = [], set(), []
    for index, value in enumerate(values):
        where = f"{path}: record {index}"
        if not isinstance(value, dict):
            raise UserError(f"{where} is not a JSON object")
        has_id = fields.id is not None and value.get(fields.id) not in (None, "")
        if has_id:
            where += f" ({fields.id} {value[fields.id]!r})"
        for key in (fields.pred, *fields.refs):
            if key not in value:
                raise UserError(f"{where} has no {key!r} field")
        generated = value[fields.pred]
        if not isinstance(generated, str):
            raise UserError(f"{where}: {fields.pred!r} is {type(generated).__name__}, not a string")
        true: list[str] = []
        for key in fields.refs:
            reference = value[key]
            if not (isinstance(reference, str) or (isinstance(reference, list) and reference
                                                   and all(isinstance(t, str) for t in reference))):
                raise UserError(f"{where}: {key!r} must be a string or a non-empty list of strings")
            true += [reference] if isinstance(reference, str) else reference
        record = dict(value)
        record["id"] = str(value[fields.id]) if has_id else str(index)
        record["true"] = value[fields.refs[0]] if len(fields.refs) == 1 else true
        record["generated"] = strip_prompt(generated) if fields.pred == GEOLLAVA_PRED_FIELD else generated
        if has_id and record["id"] in seen:
            dropped.append(record["id"])
            continue
        if has_id:
            seen.add(record["id"])
        records.append(record)
    if dropped:
        print(f"{path}: dropped {len(dropped)} records repeating an earlier {fields.id} (e.g. {dropped[0]!r}), "
              f"keeping the first of each")
    return LoadedResults(path, records, fields, len(dropped))


def read_results_file(path: str | Path, **fields: str | None) -> list[dict[str, Any]]:
    """The records of ``load_results`` (ours, GeoLLaVA's or another tool's results file)."""
    return load_results(path, **fields).records


def write_metrics(stem: str | Path, records: list[dict[str, Any]], report: MetricsReport, *, model: str,
                  settings: dict[str, Any], seconds: float, extra: dict[str, Any] | None = None) -> Path:
    """Write ``<stem>.metrics.json`` and the per-sample ``<stem>.csv``; returns the metrics path."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    summary = {"run": stem.name, "model": model, "metrics": report.metrics, "missing": report.missing,
               "metric_models": report.models, "metric_model_fallbacks": report.fallbacks,
               "coco_tokenizer": report.coco_tokenizer, "metric_device": report.device,
               "metric_seconds": report.seconds,
               "settings": settings, "num_samples": len(records),
               "seconds": seconds, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               **(extra or {})}
    # Names built by hand: with_suffix() would cut a run name holding a dot ("lr_0.5").
    metrics_path = stem.parent / f"{stem.name}.metrics.json"
    atomic_write_text(metrics_path, json.dumps(summary, indent=2, ensure_ascii=False, default=str) + "\n")
    atomic_write_text(stem.parent / f"{stem.name}.csv", _per_sample_csv(records, report))
    return metrics_path


def answers_at_token_limit(records: list[dict[str, Any]], max_new_tokens: int) -> dict[str, Any]:
    """How many answers generation cut at ``max_new_tokens`` (records hold ``new_tokens``; older files may not)."""
    counted = [r["new_tokens"] for r in records if isinstance(r.get("new_tokens"), int)]
    return {"max_new_tokens": max_new_tokens, "answers_at_max_new_tokens": sum(n >= max_new_tokens for n in counted),
            "answers_with_token_count": len(counted)}


def _per_sample_csv(records: list[dict[str, Any]], report: MetricsReport) -> str:
    columns = [c for c in ("id", "video", "question") if any(c in r for r in records)] + ["true", "generated"]
    # A per-sample list that does not match the records (a report of a subset) has no place in this table.
    scores = [key for key, values in report.per_sample.items() if len(values) == len(records)]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns + scores, lineterminator="\n")
    writer.writeheader()
    for i, record in enumerate(records):
        row = {c: record.get(c, "") for c in columns}
        if isinstance(row["true"], list):
            row["true"] = " | ".join(map(str, row["true"]))
        row.update({key: round(float(report.per_sample[key][i]), 6) for key in scores})
        writer.writerow(row)
    return buffer.getvalue()


def format_metrics_table(metrics: dict[str, float], missing: dict[str, str] | None = None) -> str:
    """Two aligned columns: metric, value (or why it is missing)."""
    missing = missing or {}
    width = max(map(len, [*metrics, *missing, "metric"]))
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    lines += [f"{key:<{width}}  {value:.4f}" for key, value in metrics.items()]
    lines += [f"{key:<{width}}  missing: {reason}" for key, reason in missing.items()]
    return "\n".join(lines)


def scored_stem(path: Path) -> Path:
    """Where a rescored file's ``.metrics.json`` and per-sample ``.csv`` go: beside it, named after it (``x.jsonl`` ->
    ``x.metrics.json``, ``x.csv``); a CSV input gets ``x.scored.*`` so that its per-sample table never replaces it."""
    stem = path.with_suffix("")
    return stem.parent / f"{stem.name}.scored" if path.suffix.lower() in (".csv", ".tsv") else stem


def score_files(paths: list[str | Path], *, pred: str | None = None, refs: str | None = None,
                id: str | None = None) -> list[Path]:
    """Rescore results files (ours, GeoLLaVA's, or any tool's: see ``load_results``): a ``.metrics.json`` and a
    per-sample ``.csv`` beside each (``scored_stem``). ``pred`` / ``refs`` / ``id`` name the fields in every file.

    Every file is read first, so a mistake in the last one stops before any scoring.
    """
    loaded = []
    for path in map(Path, paths):
        results = load_results(path, pred=pred, refs=refs, id=id)
        if not results.records:
            raise UserError(f"{path}: holds no results records")
        loaded.append(results)
    written = []
    for results in loaded:
        path, records = results.path, results.records
        started = time.perf_counter()
        report = compute_metrics_report([r["true"] for r in records], [r["generated"] for r in records])
        metrics_path = write_metrics(scored_stem(path), records, report, model="(rescored)",
                                     settings={"source": str(path), "fields": results.fields.as_dict()},
                                     seconds=round(time.perf_counter() - started, 1),
                                     extra={"duplicates_dropped": results.duplicates_dropped})
        fields = results.fields
        print(f"{path} ({len(records)} samples; prediction {fields.pred!r}, references "
              f"{', '.join(map(repr, fields.refs))}, id {fields.id!r})\n"
              f"{format_metrics_table(report.metrics, report.missing)}\nmetrics: {metrics_path}")
        written.append(metrics_path)
    return written


class _Arguments(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one "error: ..." line and exit status 2, as every mistake here
        raise UserError(f"{message}; {USAGE}")


def main(argv: list[str]) -> int:
    """``score FILE... [--pred KEY] [--refs KEY[,KEY...]] [--id KEY]``: the arguments after ``score`` (a leading
    ``score`` is accepted too)."""
    if argv and argv[0] == "score" and not Path("score").exists():
        argv = argv[1:]
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    parser = _Arguments(prog="python common.py score", add_help=False)
    parser.add_argument("files", nargs="*")
    parser.add_argument("--pred")
    parser.add_argument("--refs")
    parser.add_argument("--id")
    arguments = parser.parse_args(argv)
    if not arguments.files:
        raise UserError(USAGE)
    score_files(arguments.files, pred=arguments.pred, refs=arguments.refs, id=arguments.id)
    return 0
