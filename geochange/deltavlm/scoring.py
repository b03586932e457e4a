"""ChangeChat sub-task scores.

* ``cls_from_captions``: DeltaVLM's released change classification (``scripts/test-cls.ipynb``),
  which scores *captions*: a caption that equals one of the five no-change sentences is
  "no change", any other caption "changed", and the truth is the record's ``changeflag``.
  Reported as released: accuracy, precision / recall / F1 (and F0.5) of "changed", and
  precision / recall of each class.
* ``yesno`` (ours, no released counterpart): the yes/no question's answers parsed to
  yes/no; accuracy, and precision / recall / F1 of "changed" (yes).
* counting (as ``test-count.ipynb``): roads and buildings parsed separately, MAE and RMSE
  of each; plus exact accuracy (both counts right) and MAE / RMSE over both categories;
* localization (as ``test-loc.ipynb``): per category, the 9 cells as binary labels with
  scikit-learn's conventions: micro precision / recall / F1, sample-averaged Jaccard
  (a pair with no true and no predicted cell scores 0), subset accuracy and Hamming
  loss; plus the cell-set F1 over both categories (micro over 18 labels) and exact match
  (both sets right).

Precision, recall, F1, Jaccard and Hamming loss are scikit-learn's, with a 0 where a
ratio has nothing to divide by. An answer that cannot be parsed counts as wrong (yes/no),
as zero (a count), or as no cells (localization), and the share of such answers is
reported as ``unparsed``. Captions and open answers also go to
``geochange.metrics.compute_metrics_report``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .. import changechat_format as cc
from ..metrics import compute_metrics_report

NO_CHANGE_SENTENCES = cc.NO_CHANGE_SENTENCES  # DeltaVLM's released test-cls.ipynb's (LEVIR-CC's)


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def _binary_scores(truths: list[int], predictions: list[int]) -> dict[str, float]:
    """Accuracy and precision / recall / F1 of class 1 (scikit-learn, 0 where undefined)."""
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

    return {"accuracy": float(accuracy_score(truths, predictions)),
            "precision": float(precision_score(truths, predictions, zero_division=0)),
            "recall": float(recall_score(truths, predictions, zero_division=0)),
            "f1": float(f1_score(truths, predictions, zero_division=0))}


def score_released_classification(changeflags: list[int], captions: list[str]) -> dict[str, float]:
    """DeltaVLM's test-cls.ipynb: a caption in NO_CHANGE_SENTENCES (exactly) = 0, else 1; truth = changeflag."""
    from sklearn.metrics import fbeta_score, precision_score, recall_score

    truths = [int(bool(flag)) for flag in changeflags]
    predictions = [0 if caption in NO_CHANGE_SENTENCES else 1 for caption in captions]
    per_class_precision = precision_score(truths, predictions, labels=[0, 1], average=None, zero_division=0)
    per_class_recall = recall_score(truths, predictions, labels=[0, 1], average=None, zero_division=0)
    return {**_binary_scores(truths, predictions),
            "f0_5": float(fbeta_score(truths, predictions, beta=0.5, zero_division=0)),
            "nochange_precision": float(per_class_precision[0]), "nochange_recall": float(per_class_recall[0]),
            "change_precision": float(per_class_precision[1]), "change_recall": float(per_class_recall[1])}


def score_yesno(truths: list[bool], answers: list[str]) -> dict[str, float]:
    """``truths``: True = changed. An answer without yes/no is wrong whatever the truth."""
    parsed = [cc.parse_yesno_answer(a) for a in answers]
    # An unparsed answer is scored as the wrong class.
    predictions = [int(p) if p is not None else int(not t) for p, t in zip(parsed, truths)]
    return {**_binary_scores([int(t) for t in truths], predictions),
            "unparsed": _ratio(sum(p is None for p in parsed), len(truths))}


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


def _set_scores(truths: list[frozenset], predictions: list[frozenset], labels: list) -> dict[str, float]:
    """Multi-label scores of cell sets over ``labels`` (scikit-learn, 0 where undefined)."""
    from sklearn.metrics import (accuracy_score, f1_score, hamming_loss, jaccard_score, precision_score,
                                 recall_score)
    from sklearn.preprocessing import MultiLabelBinarizer

    binarizer = MultiLabelBinarizer(classes=labels)
    true, predicted = binarizer.fit_transform(truths), binarizer.transform(predictions)
    return {"precision": float(precision_score(true, predicted, average="micro", zero_division=0)),
            "recall": float(recall_score(true, predicted, average="micro", zero_division=0)),
            "f1": float(f1_score(true, predicted, average="micro", zero_division=0)),
            "jaccard": float(jaccard_score(true, predicted, average="samples", zero_division=0)),
            "subset_accuracy": float(accuracy_score(true, predicted)),
            "hamming_loss": float(hamming_loss(true, predicted))}


def score_localization(truths: list[tuple[frozenset[str], frozenset[str]]], answers: list[str]) -> dict[str, float]:
    """``truths``: (road cells, building cells) per answer, as released labels ('top-left', ...)."""
    parsed = [cc.parse_localization_answer(a) for a in answers]
    predictions = [(r or frozenset(), b or frozenset()) for r, b in parsed]
    scores: dict[str, float] = {}
    for index, category in enumerate(cc.CATEGORIES):
        for key, value in _set_scores([t[index] for t in truths], [p[index] for p in predictions],
                                      list(cc.GRID_LABELS)).items():
            scores[f"{category}_{key}"] = value
    # Both categories together: each (category, cell) is one of 18 labels.
    tagged = [frozenset({f"r:{c}" for c in t[0]} | {f"b:{c}" for c in t[1]}) for t in truths]
    guessed = [frozenset({f"r:{c}" for c in p[0]} | {f"b:{c}" for c in p[1]}) for p in predictions]
    both = _set_scores(tagged, guessed, [f"{k}:{c}" for k in ("r", "b") for c in cc.GRID_LABELS])
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
    fallbacks: dict[str, str] = field(default_factory=dict)  # caption metrics: as MetricsReport's
    coco_tokenizer: str = ""
    device: str = ""


def _reference(record: dict) -> str:
    true = record["true"]
    return true[0] if isinstance(true, list) else true


def score_records(records: list[dict], device: str = "auto") -> dict[str, TaskScores]:
    """Scores per task for results records (``task``, ``true``, ``generated``, ``changeflag``); the caption task
    also gives ``cls_from_captions`` (the released classification) over its records that carry a changeflag.
    ``device``: where the embedding metrics run (``auto`` = the GPU when there is one)."""
    by_task: dict[str, list[dict]] = {}
    for record in records:
        by_task.setdefault(record.get("task") or cc.task_of(record.get("question", "")), []).append(record)
    out: dict[str, TaskScores] = {}
    for task in [t for t in cc.TASKS if t in by_task]:
        group = by_task[task]
        if task in ("caption", "open"):
            report = compute_metrics_report([r["true"] for r in group], [r["generated"] for r in group],
                                            device=device)
            out[task] = TaskScores(len(group), report.metrics, report.missing, report.models,
                                   fallbacks=report.fallbacks, coco_tokenizer=report.coco_tokenizer,
                                   device=report.device)
            flagged = [r for r in group if r.get("changeflag") is not None]
            if task == "caption" and flagged:
                out["cls_from_captions"] = TaskScores(len(flagged), score_released_classification(
                    [r["changeflag"] for r in flagged], [r["generated"] for r in flagged]),
                    skipped=len(group) - len(flagged))
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
