"""Results files: JSON Lines written as they come (resumable), metrics files, rescoring.

``results/<run>.jsonl``        one record per answer: id, video, question, true, generated
``results/<run>.metrics.json`` metrics, what is missing and why, models, settings, counts, time
``results/<run>.csv``          per sample: the record and its per-sample scores
"""
from __future__ import annotations

import csv
import io
import json
import os
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import UserError


class ResultsWriter:
    """Append-only JSONL that resumes: ``done_ids`` holds what a previous run already wrote."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done_ids: set[str] = set()
        if not self.path.exists():
            return
        raw = self.path.read_bytes()
        if raw and not raw.endswith(b"\n"):
            # A crash mid-write leaves a partial last line: drop it, that sample is simply redone.
            keep = raw[: raw.rfind(b"\n") + 1]
            self.path.write_bytes(keep)
            print(f"warning: {self.path}: dropped an incomplete last line left by an interrupted run", file=sys.stderr)
        for record in read_jsonl(self.path):
            self.done_ids.add(str(record["id"]))

    def append(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            if str(record["id"]) in self.done_ids:
                raise UserError(f"{self.path}: record id {record['id']!r} is already there; refusing to duplicate it")
        with open(self.path, "a", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.done_ids.update(str(r["id"]) for r in records)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such results file")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
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


def _json_values(text: str, path: Path) -> list[Any]:
    """One JSON value, or several written back to back / one per line (GeoLLaVA appended objects)."""
    decoder = json.JSONDecoder()
    values, position = [], 0
    while True:
        while position < len(text) and text[position].isspace():
            position += 1
        if position >= len(text):
            return values
        try:
            value, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as exc:
            line = text.count("\n", 0, exc.pos) + 1
            raise UserError(f"{path}: not valid JSON at line {line} ({exc.msg})") from None
        values.append(value)


def strip_prompt(generated: str) -> str:
    """GeoLLaVA stored the whole decoded sequence; the answer is what follows the last 'Answer:'."""
    return generated.rsplit("Answer:", 1)[-1].strip() if "Answer:" in generated else generated.strip()


def read_results_file(path: str | Path) -> list[dict[str, Any]]:
    """Our JSONL or GeoLLaVA's results (JSON list or back-to-back objects), as records with id/true/generated."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such results file")
    values = _json_values(path.read_text(encoding="utf-8"), path)
    if len(values) == 1 and isinstance(values[0], list):
        values = values[0]
    records = []
    for index, value in enumerate(values):
        where = f"{path}: record {index}" + (f" (id {value.get('id')!r})" if isinstance(value, dict) and "id" in value else "")
        if not isinstance(value, dict):
            raise UserError(f"{where} is not a JSON object")
        for key in ("true", "generated"):
            if key not in value:
                raise UserError(f"{where} has no {key!r} field")
        if not isinstance(value["generated"], str):
            raise UserError(f"{where}: 'generated' is not a string")
        record = dict(value)
        record["id"] = str(value.get("id", index))
        record["generated"] = strip_prompt(value["generated"])
        records.append(record)
    return records


def _atomic_write(path: Path, text: str) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w", encoding="utf-8", newline="") as out:
        out.write(text)
    os.replace(temporary, path)


def write_metrics(stem: str | Path, records: list[dict[str, Any]], report, *, model: str, settings: dict[str, Any],
                  seconds: float, extra: dict[str, Any] | None = None) -> Path:
    """Write ``<stem>.metrics.json`` and the per-sample ``<stem>.csv``; returns the metrics path."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    summary = {"run": stem.name, "model": model, "metrics": report.metrics, "missing": report.missing,
               "metric_models": report.models, "settings": settings, "num_samples": len(records), "seconds": seconds,
               "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **(extra or {})}
    metrics_path = stem.parent / f"{stem.name}.metrics.json"
    _atomic_write(metrics_path, json.dumps(summary, indent=2, default=str) + "\n")
    columns = [c for c in ("id", "video", "question") if any(c in r for r in records)] + ["true", "generated"]
    scores = [k for k, values in report.per_sample.items() if len(values) == len(records)]
    rows = []
    for i, record in enumerate(records):
        row = {c: record.get(c, "") for c in columns}
        if isinstance(row["true"], list):
            row["true"] = " | ".join(row["true"])
        row.update({k: round(float(report.per_sample[k][i]), 6) for k in scores})
        rows.append(row)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns + scores)
    writer.writeheader()
    writer.writerows(rows)
    _atomic_write(stem.parent / f"{stem.name}.csv", buffer.getvalue())
    return metrics_path


def format_metrics_table(metrics: dict[str, float], missing: dict[str, str] | None = None) -> str:
    width = max(map(len, list(metrics) + list(missing or {})), default=6)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    lines += [f"{key:<{width}}  {value:.4f}" for key, value in metrics.items()]
    lines += [f"{key:<{width}}  missing: {reason}" for key, reason in (missing or {}).items()]
    return "\n".join(lines)


def score_files(paths: list[str | Path]) -> list[Path]:
    """Rescore results files (ours or GeoLLaVA's); writes <file>.metrics.json and <file>.csv beside each."""
    from .metrics import compute_metrics_report

    written = []
    for path in map(Path, paths):
        records = read_results_file(path)
        if not records:
            raise UserError(f"{path}: holds no records")
        report = compute_metrics_report([r["true"] for r in records], [r["generated"] for r in records])
        stem = path.with_suffix("")
        written.append(write_metrics(stem, records, report, model="(rescored)", settings={"source": str(path)},
                                     seconds=0.0))
        print(f"{path} ({len(records)} samples)\n{format_metrics_table(report.metrics, report.missing)}")
    return written


def main(argv: list[str]) -> int:
    """``score FILE...``"""
    if not argv:
        raise UserError("usage: python common.py score FILE...")
    for path in score_files(argv):
        print(f"metrics: {path}")
    return 0
