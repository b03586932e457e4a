"""Results.ipynb's leaderboard and training curves; the notebook's cells only call these.

Leaderboard: every ``results/*.metrics.json`` grouped by the test set it names (``test_set``: the annotation
file's name, hash and split), one row per model (Video-LLaVA and LLaVA-NeXT-Video runs, base or fine-tuned, and
DeltaVLM runs), the caption metrics all computed by ``geochange.metrics`` against every reference; the best of our
runs per column marked; the published numbers beside them where the test set is a paper's
(``annotations/paper_test_sets.csv``). DeltaVLM's batch mode scores captions under ``caption/<metric>``: on a
file of captions that is every record, as for the video models; on a mixed instruction file it is the caption
questions only (the ``samples`` column says how many).

Training curves: the loss and validation loss of every ``runs/*/run.json``, one figure per model family, each run
labelled by its settings.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .paths import ANNOTATIONS_DIR

# Caption metrics in the order shown; the GeoLLaVA paper's "BERT" is our sentence-embedding ``sbert``.
METRIC_NAMES = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "bleu": "BLEU", "sbert": "BERT (sbert)",
                "bertscore_f1": "BERTScore F1", "bleu1": "BLEU-1", "bleu4": "BLEU-4", "meteor": "METEOR",
                "rouge_l": "ROUGE-L (coco)", "cider": "CIDEr"}
FAMILY_NAMES = {"videollava": "Video-LLaVA", "llavanext": "LLaVA-NeXT-Video", "deltavlm": "DeltaVLM"}
PAPER_TEST_SETS = ANNOTATIONS_DIR / "paper_test_sets.csv"
NOT_RECORDED = "test set not recorded (older or rescored results)"
OURS, PUBLISHED = "ours", "published"


@dataclass
class Leaderboard:
    """One test set's table: index = row label; columns source, model, samples, then the metrics."""
    test_set: dict[str, Any] | None
    title: str
    table: Any  # pandas.DataFrame
    best: dict[str, str]  # metric -> the label of our best row

    @property
    def metrics(self) -> list[str]:
        return [m for m in METRIC_NAMES if m in self.table and self.table[m].notna().any()]


# ----------------------------------------------------------------------------------------------- leaderboard

def test_set_title(test_set: dict[str, Any] | None) -> str:
    if not test_set:
        return NOT_RECORDED
    split = f", split {test_set['split']}" if test_set.get("split") else ""
    return f"{test_set['file']}{split} (sha256 {test_set['sha256'][:10]})"


def settings_label(run: dict[str, Any]) -> str:
    """A fine-tuning run (its run.json) in a few words: mode, rank, pruning, data, learning rate, length."""
    settings = run.get("settings", {})
    mode = {"LORA": "LoRA", "QLORA": f"QLoRA {run.get('quant_bits')}bit", "FULL": "full"}.get(run.get("mode"),
                                                                                             str(run.get("mode")))
    if run.get("mode") in ("LORA", "QLORA"):
        mode += f" r{settings.get('LORA_R')}"
    if settings.get("PRUNE"):
        mode = f"{settings.get('PRUNE_METHOD')} {settings.get('PRUNE_AMOUNT', 0):.0%} pruned + {mode}"
    length = (f"{settings['MAX_STEPS']} steps" if (settings.get("MAX_STEPS") or -1) > 0
              else f"{settings.get('EPOCHS', 0):g} epochs")
    return f"{mode}, {run.get('num_train')} pairs, lr {run.get('learning_rate', 0):g}, {length}"


def _run_file(model_path: str, repo: Path) -> Path:
    folder = Path(model_path)
    return (folder if folder.is_absolute() else repo / folder) / "run.json"


def result_row(record: dict[str, Any], repo: Path) -> dict[str, Any]:
    """One metrics file as a leaderboard row: label, family, model, samples and the caption metrics."""
    metrics = record.get("metrics", {})
    run = record.get("run", "?")
    if any(key.startswith("caption/") for key in metrics) or str(record.get("model", "")).startswith("DeltaVLM"):
        scores = {key.split("/", 1)[1]: value for key, value in metrics.items() if key.startswith("caption/")}
        samples = record.get("tasks", {}).get("caption", {}).get("samples", record.get("num_samples"))
        checkpoint = str(record.get("model", "")).removeprefix("DeltaVLM (").removesuffix(")")
        family, variant = "DeltaVLM", record.get("settings", {}).get("CHECKPOINT") or checkpoint
    else:
        scores, samples = dict(metrics), record.get("num_samples")
        family = FAMILY_NAMES.get(record.get("family"), record.get("family") or "rescored")
        model_path = record.get("model_path") or record.get("settings", {}).get("MODEL_PATH")
        run_file = _run_file(model_path, repo) if model_path not in (None, "base") else None
        if model_path == "base":
            variant = "base"
        elif run_file is not None and run_file.is_file():
            variant = settings_label(json.loads(run_file.read_text(encoding="utf-8")))
        else:
            variant = Path(model_path).name if model_path else str(record.get("model", ""))
    return {"label": f"{family} {variant} [{run}]", "source": OURS, "family": family, "model": variant,
            "samples": samples, **{key: scores[key] for key in METRIC_NAMES if key in scores}}


def read_metrics_files(results_dir: str | Path) -> list[dict[str, Any]]:
    """Every ``*.metrics.json`` in ``results_dir``, in name order."""
    return [json.loads(path.read_text(encoding="utf-8")) for path in sorted(Path(results_dir).glob("*.metrics.json"))]


def paper_test_sets(path: str | Path = PAPER_TEST_SETS) -> list[dict[str, str]]:
    """Which test set each paper's numbers were measured on: rows of ``paper_results, file, split``."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def published_rows(test_set: dict[str, Any] | None, papers: list[dict[str, str]], folder: Path) -> list[dict]:
    """The published numbers measured on ``test_set`` (matched by file name and split)."""
    if not test_set:
        return []
    rows = []
    for paper in papers:
        if paper["file"] != test_set["file"] or (paper.get("split") or None) != test_set.get("split"):
            continue
        with open(folder / paper["paper_results"], newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                family = row.get("model_family") or row.get("model", "")
                scores = {("sbert" if key == "bert" else key): float(value) for key, value in row.items()
                          if (key == "bert" or key in METRIC_NAMES) and value not in (None, "")}
                rows.append({"label": f"{family} {row.get('variant', '')} (published)", "source": PUBLISHED,
                             "family": family, "model": row.get("variant", ""), "samples": None, **scores})
    return rows


def leaderboards(results_dir: str | Path, repo: str | Path | None = None,
                 papers_file: str | Path = PAPER_TEST_SETS) -> list[Leaderboard]:
    """One Leaderboard per test set that has results (recorded test sets first, by file name)."""
    import pandas as pd

    results_dir = Path(results_dir)
    repo = Path(repo) if repo is not None else results_dir.parent
    papers_file = Path(papers_file)
    groups: dict[tuple, tuple[dict | None, list[dict]]] = {}
    for record in read_metrics_files(results_dir):
        test_set = record.get("test_set")
        key = (test_set["file"], test_set["sha256"], test_set.get("split")) if test_set else ("",)
        groups.setdefault(key, (test_set, []))[1].append(result_row(record, repo))
    boards = []
    for key in sorted(groups, key=lambda k: (k == ("",), k)):
        test_set, rows = groups[key]
        published = published_rows(test_set, paper_test_sets(papers_file), papers_file.parent)
        table = pd.DataFrame(rows + published).set_index("label")
        metrics = [m for m in METRIC_NAMES if m in table and table[m].notna().any()]
        table = table[["source", "family", "model", "samples", *metrics]]
        ours = table[table.source == OURS]
        best = {m: ours[m].idxmax() for m in metrics if ours[m].notna().any()}
        boards.append(Leaderboard(test_set, test_set_title(test_set), table, best))
    return boards


def styled(board: Leaderboard):
    """The table for display: metric columns by their paper names, our best per column in bold on green."""
    def mark(column):
        best = board.best.get(column.name)
        return ["font-weight: bold; background-color: #d4f4d4" if label == best else "" for label in column.index]

    return (board.table.style.apply(mark, subset=board.metrics).format(precision=3, na_rep="-")
            .relabel_index([METRIC_NAMES.get(c, c) for c in board.table.columns], axis=1)
            .set_caption(f"{board.title}: bold = our best per column"))


def leaderboard_chart(board: Leaderboard):
    """One horizontal bar chart per metric; published numbers grey, our runs blue, our best per metric green."""
    import matplotlib.pyplot as plt

    metrics = board.metrics
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 0.5 * len(board.table) + 1.8),
                             squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        data = board.table[metric].dropna()
        colours = ["tab:gray" if board.table.source[label] == PUBLISHED else
                   "tab:green" if board.best.get(metric) == label else "tab:blue" for label in data.index]
        ax.barh(list(data.index), data.values, color=colours)
        ax.set_title(METRIC_NAMES[metric])
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
        if ax is not axes[0][0]:
            ax.set_yticklabels([])
    fig.suptitle(f"{board.title}  (grey: published, blue: our runs, green: our best)")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------- training curves

def read_training_runs(runs_dir: str | Path) -> list[dict[str, Any]]:
    """Every ``runs/*/run.json`` that logged a loss, each with ``run_dir``, in name order."""
    runs = []
    for path in sorted(Path(runs_dir).glob("*/run.json")):
        run = json.loads(path.read_text(encoding="utf-8"))
        if run.get("loss_curve") or run.get("eval_loss_curve"):
            runs.append({**run, "run_dir": path.parent.name})
    return runs


def training_curves(runs_dir: str | Path) -> dict[str, Any]:
    """{family name: Figure}: each run's training loss (solid) and validation loss (dashed, dots), one colour per
    run, labelled by its settings (and its folder when two runs share settings)."""
    import matplotlib.pyplot as plt

    by_family: dict[str, list[dict]] = {}
    for run in read_training_runs(runs_dir):
        by_family.setdefault(FAMILY_NAMES.get(run.get("family"), str(run.get("family"))), []).append(run)
    figures = {}
    for family, runs in by_family.items():
        fig, ax = plt.subplots(figsize=(9, 4.5))
        labels = [settings_label(run) for run in runs]
        for number, (run, label) in enumerate(zip(runs, labels)):
            if labels.count(label) > 1:
                label = f"{label} [{run['run_dir']}]"
            colour = f"C{number % 10}"
            if run.get("loss_curve"):
                ax.plot([p["step"] for p in run["loss_curve"]], [p["loss"] for p in run["loss_curve"]],
                        color=colour, label=f"{label}: loss")
            if run.get("eval_loss_curve"):
                ax.plot([p["step"] for p in run["eval_loss_curve"]], [p["eval_loss"] for p in run["eval_loss_curve"]],
                        color=colour, linestyle="--", marker="o", label=f"{label}: validation loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(f"{family}: training loss (solid) and validation loss (dashed)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        figures[family] = fig
    return figures
