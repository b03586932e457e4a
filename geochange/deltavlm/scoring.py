"""ChangeChat sub-task scores, computed as DeltaVLM's released notebooks computed them.

* yes/no (``test-cls.ipynb``): accuracy, and precision / recall / F1 of "changed" (yes);
* counting (``test-count.ipynb``): roads and buildings parsed separately, MAE and RMSE of
  each; plus exact accuracy (both counts right) and MAE / RMSE over both categories;
* localization (``test-loc.ipynb``): per category, the 9 cells as binary labels with
  scikit-learn's conventions: micro precision / recall / F1, sample-averaged Jaccard
  (a pair with no true and no predicted cell scores 0, sklearn's zero_division default),
  subset accuracy and Hamming loss; plus the cell-set F1 over both categories (micro over
  18 labels) and exact match (both sets right).

An answer that cannot be parsed counts as wrong (yes/no), as zero (a count), or as no
cells (localization), and the share of such answers is reported as ``unparsed``.
Captions and open answers go to ``geochange.metrics.compute_metrics_report``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .. import changechat_format as cc


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def _f1(precision: float, recall: float) -> float:
    return _ratio(2 * precision * recall, precision + recall)


def score_yesno(truths: list[bool], answers: list[str]) -> dict[str, float]:
    """``truths``: True = changed. An answer without yes/no is wrong whatever the truth."""
    predictions = [cc.parse_yesno_answer(a) for a in answers]
    tp = sum(p is True and t for p, t in zip(predictions, truths))
    fp = sum((p is True and not t) or (p is None and not t) for p, t in zip(predictions, truths))
    fn = sum((p is False and t) or (p is None and t) for p, t in zip(predictions, truths))
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {"accuracy": _ratio(sum(p == t for p, t in zip(predictions, truths)), len(truths)),
            "precision": precision, "recall": recall, "f1": _f1(precision, recall),
            "unparsed": _ratio(sum(p is None for p in predictions), len(truths))}


def _errors(pairs: list[tuple[int, int]]) -> tuple[float, float]:
    errors = [abs(t - p) for t, p in pairs]
    return sum(errors) / len(errors), math.sqrt(sum(e * e for e in errors) / len(errors))


def score_count(truths: list[tuple[int, int]], answers: list[str]) -> dict[str, float]:
    """``truths``: (roads, buildings) per answer."""
    parsed = [cc.parse_count_answer(a) for a in answers]
    predictions = [(r or 0, b or 0) for r, b in parsed]
    roads_mae, roads_rmse = _errors([(t[0], p[0]) for t, p in zip(truths, predictions)])
    buildings_mae, buildings_rmse = _errors([(t[1], p[1]) for t, p in zip(truths, predictions)])
    mae, rmse = _errors([(t[i], p[i]) for t, p in zip(truths, predictions) for i in (0, 1)])
    return {"exact_accuracy": _ratio(sum(t == p for t, p in zip(truths, predictions)), len(truths)),
            "roads_mae": roads_mae, "roads_rmse": roads_rmse, "buildings_mae": buildings_mae,
            "buildings_rmse": buildings_rmse, "mae": mae, "rmse": rmse,
            "unparsed": _ratio(sum(r is None and b is None for r, b in parsed), len(truths))}


def _set_scores(truths: list[frozenset[str]], predictions: list[frozenset[str]], labels: int) -> dict[str, float]:
    tp = sum(len(t & p) for t, p in zip(truths, predictions))
    predicted, actual = sum(map(len, predictions)), sum(map(len, truths))
    precision, recall = _ratio(tp, predicted), _ratio(tp, actual)
    return {"precision": precision, "recall": recall, "f1": _f1(precision, recall),
            "jaccard": sum(_ratio(len(t & p), len(t | p)) for t, p in zip(truths, predictions)) / len(truths),
            "subset_accuracy": _ratio(sum(t == p for t, p in zip(truths, predictions)), len(truths)),
            "hamming_loss": sum(len(t ^ p) for t, p in zip(truths, predictions)) / (len(truths) * labels)}


def score_localization(truths: list[tuple[frozenset[str], frozenset[str]]], answers: list[str]) -> dict[str, float]:
    """``truths``: (road cells, building cells) per answer, as released labels ('top-left', ...)."""
    parsed = [cc.parse_localization_answer(a) for a in answers]
    predictions = [(r or frozenset(), b or frozenset()) for r, b in parsed]
    scores: dict[str, float] = {}
    for index, category in enumerate(cc.CATEGORIES):
        for key, value in _set_scores([t[index] for t in truths], [p[index] for p in predictions],
                                      len(cc.GRID_LABELS)).items():
            scores[f"{category}_{key}"] = value
    # Both categories together: each (category, cell) is one of 18 labels.
    tagged = [frozenset({("r", c) for c in t[0]} | {("b", c) for c in t[1]}) for t in truths]
    guessed = [frozenset({("r", c) for c in p[0]} | {("b", c) for c in p[1]}) for p in predictions]
    both = _set_scores(tagged, guessed, 2 * len(cc.GRID_LABELS))
    scores.update({"precision": both["precision"], "recall": both["recall"], "f1": both["f1"],
                   "exact_match": both["subset_accuracy"],
                   "unparsed": _ratio(sum(r is None and b is None for r, b in parsed), len(truths))})
    return scores


# --------------------------------------------------------------------------- a results file, per task

@dataclass
class TaskScores:
    samples: int
    metrics: dict[str, float]
    missing: dict[str, str] = field(default_factory=dict)
    models: dict[str, str] = field(default_factory=dict)
    skipped: int = 0  # references that could not be parsed (so the answer cannot be scored)


def _reference(record: dict) -> str:
    true = record["true"]
    return true[0] if isinstance(true, list) else true


def score_records(records: list[dict]) -> dict[str, TaskScores]:
    """Scores per task for results records (``task``, ``true``, ``generated``, ``changeflag``)."""
    from ..metrics import compute_metrics_report

    by_task: dict[str, list[dict]] = {}
    for record in records:
        by_task.setdefault(record.get("task") or cc.task_of(record.get("question", "")), []).append(record)
    out: dict[str, TaskScores] = {}
    for task in [t for t in cc.TASKS if t in by_task]:
        group = by_task[task]
        if task in ("caption", "open"):
            report = compute_metrics_report([r["true"] for r in group], [r["generated"] for r in group])
            out[task] = TaskScores(len(group), report.metrics, report.missing, report.models)
            continue
        if task == "yesno":
            truths = [cc.parse_yesno_answer(_reference(r)) for r in group]
            truths = [bool(r["changeflag"]) if t is None and r.get("changeflag") is not None else t
                      for t, r in zip(truths, group)]
        elif task == "count":
            truths = [cc.parse_count_answer(_reference(r)) for r in group]
            truths = [None if t == (None, None) else (t[0] or 0, t[1] or 0) for t in truths]
        else:
            truths = [cc.parse_localization_answer(_reference(r)) for r in group]
            truths = [None if t == (None, None) else (t[0] or frozenset(), t[1] or frozenset()) for t in truths]
        kept = [(t, r["generated"]) for t, r in zip(truths, group) if t is not None]
        if not kept:
            out[task] = TaskScores(0, {}, skipped=len(group))
            continue
        scorer = {"yesno": score_yesno, "count": score_count, "localization": score_localization}[task]
        out[task] = TaskScores(len(kept), scorer([t for t, _ in kept], [a for _, a in kept]),
                               skipped=len(group) - len(kept))
    return out
