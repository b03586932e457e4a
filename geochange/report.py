"""Results.ipynb's tables and figures; the notebook's cells only call these.

Our runs: every ``results/*.metrics.json`` as a row (model family, variant, run), the metrics of ``METRICS``, and
which columns are computed as the papers computed theirs (``paper_comparison``). Beside the GeoLLaVA paper's
published numbers: a bar chart per paper column. Examples: before and after side by side with the reference and
the answer under them. DeltaVLM: its caption scores beside the published ones and its sub-task scores.

Leaderboard: every metrics file grouped by the test set it names (``test_set``: the annotation file's name, hash
and split), one row per model (each video family's runs, base or fine-tuned, and DeltaVLM runs), the
caption metrics all computed by ``geochange.metrics`` against every reference; the best of our runs per column
marked; the published numbers beside them where the test set is a paper's (``annotations/paper_test_sets.csv``).
DeltaVLM's batch mode scores captions under ``caption/<metric>``: on a file of captions that is every record, as for
the video models; on a mixed instruction file it is the caption questions only (the ``samples`` column says how many).

Training curves: the loss and validation loss of every ``runs/*/run.json``, one figure per model family.
"""
from __future__ import annotations

import csv
import json
import textwrap
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from .deltavlm import DISPLAY_NAME as DELTAVLM_NAME
from .deltavlm import FAMILY_ID as DELTAVLM_ID
from .metrics import METRIC_NAMES
from .paper_comparison import DELTAVLM_COLUMNS, GEOLLAVA_COLUMNS, comparability_rows, not_comparable
from .paths import ANNOTATIONS_DIR
from .results import read_jsonl
from .video import read_video_frames
from .video_llm.families import FAMILIES

FAMILY_NAMES = {**{family.id: family.display_name for family in FAMILIES.values()}, DELTAVLM_ID: DELTAVLM_NAME}
PAPER_TEST_SETS = ANNOTATIONS_DIR / "paper_test_sets.csv"
GEOLLAVA_PAPER = ANNOTATIONS_DIR / "geollava_paper_results.csv"
DELTAVLM_PAPER = ANNOTATIONS_DIR / "deltavlm_paper_results.csv"
NOT_RECORDED = "test set not recorded (older or rescored results)"
OURS, PUBLISHED = "ours", "published"
NO_RESULTS = ("No results yet: {folder} holds no *.metrics.json. Run for example\n"
              "    python videollava_finetune.py MODEL_ID=tiny\n"
              "    python videollava_test.py MODEL_ID=tiny MODEL_PATH=base\n"
              "then run this notebook again.")
# What a figure cannot draw (a base model's random tokens in scripts the font lacks) is shown as this.
UNDRAWABLE = "\u25a1"
# Scores are shown to this many decimals, and compared at them: two runs that both show 0.000 tie, and a tie marks
# no one best (sacreBLEU 3.9e-05 against 0.0 is no win).
SHOWN_DECIMALS = 3


# ----------------------------------------------------------------------------------------------- rows of ours

def read_metrics_files(results_dir: str | Path) -> list[dict[str, Any]]:
    """Every ``*.metrics.json`` in ``results_dir``, in name order."""
    return [json.loads(path.read_text(encoding="utf-8")) for path in sorted(Path(results_dir).glob("*.metrics.json"))]


def is_deltavlm(record: dict[str, Any]) -> bool:
    return (any(key.startswith("caption/") for key in record.get("metrics", {}))
            or str(record.get("model", "")).startswith(DELTAVLM_NAME))


# What the label's words already say of a run's distinct settings.
LABEL_SAYS = ("LR", "TRAIN_LIMIT")


def settings_label(run: dict[str, Any]) -> str:
    """A fine-tuning run (its run.json) in a few words: mode, rank, pruning, data, learning rate, length, then every
    other setting that made it train differently from the script's defaults, as its run name ends (run.json's
    ``distinct_settings``: ``numframes4``, ``optimadamw-torch``)."""
    settings = run.get("settings", {})
    mode = {"LORA": "LoRA", "QLORA": f"QLoRA {run.get('quant_bits')}bit", "FULL": "full"}.get(run.get("mode"),
                                                                                             str(run.get("mode")))
    if run.get("mode") in ("LORA", "QLORA"):
        mode += f" r{settings.get('LORA_R')}"
    if settings.get("PRUNE"):
        mode = f"{settings.get('PRUNE_METHOD')} {settings.get('PRUNE_AMOUNT', 0):.0%} pruned + {mode}"
    length = (f"{settings['MAX_STEPS']} steps" if (settings.get("MAX_STEPS") or -1) > 0
              else f"{settings.get('EPOCHS', 0):g} epochs")
    distinct = [token for name, token in run.get("distinct_settings", {}).items() if name not in LABEL_SAYS]
    return ", ".join([mode, f"{run.get('num_train')} pairs", f"lr {run.get('learning_rate', 0):g}", length, *distinct])


def _run_file(model_path: str, repo: Path) -> Path:
    folder = Path(model_path)
    return (folder if folder.is_absolute() else repo / folder) / "run.json"


def result_row(record: dict[str, Any], repo: Path) -> dict[str, Any]:
    """One metrics file as a row: label, family, model (variant), run, samples and the caption metrics."""
    metrics = record.get("metrics", {})
    run = record.get("run", "?")
    if is_deltavlm(record):
        scores = {key.split("/", 1)[1]: value for key, value in metrics.items() if key.startswith("caption/")}
        samples = record.get("tasks", {}).get("caption", {}).get("samples", record.get("num_samples"))
        checkpoint = str(record.get("model", "")).removeprefix(f"{DELTAVLM_NAME} (").removesuffix(")")
        family, variant = DELTAVLM_NAME, record.get("settings", {}).get("CHECKPOINT") or checkpoint
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
    return {"label": f"{family} {variant} [{run}]", "source": OURS, "family": family, "model": variant, "run": run,
            "samples": samples, **{key: scores[key] for key in METRIC_NAMES if key in scores}}


@dataclass
class OurRuns:
    """Every metrics file of a results folder: ``table`` a row each (``result_row`` and what is missing, in name
    order), ``records`` the files themselves by run name."""
    table: Any  # pandas.DataFrame
    records: dict[str, dict[str, Any]]

    @property
    def empty(self) -> bool:
        return self.table.empty

    def of(self, deltavlm: bool):
        """The rows of DeltaVLM's runs (True) or of the video models' (False)."""
        if self.table.empty:
            return self.table
        return self.table[(self.table.family == DELTAVLM_NAME) == deltavlm]


def our_runs(results_dir: str | Path, repo: str | Path) -> OurRuns:
    """Every metrics file as a row (``result_row``), with what is missing and why."""
    import pandas as pd

    rows, records = [], {}
    for record in read_metrics_files(results_dir):
        row = result_row(record, Path(repo))
        row["missing"] = ", ".join(f"{k} ({v})" for k, v in record.get("missing", {}).items())
        rows.append(row)
        records[row["run"]] = record
    return OurRuns(pd.DataFrame(rows), records)


def video_runs_table(runs: OurRuns):
    """The video models' runs in the GeoLLaVA paper's layout, a row per run (family, settings, results file): its
    columns first (by its names), then the others."""
    video = runs.of(deltavlm=False).set_index(["family", "model", "run"])
    columns = [c for c in [*GEOLLAVA_COLUMNS, *METRIC_NAMES] if c in video]
    return video[list(dict.fromkeys(columns)) + ["samples"]].rename(columns={**METRIC_NAMES, **GEOLLAVA_COLUMNS})


def comparability_tables(results_dir: str | Path):
    """(every paper column of every run: computed as the paper did, "yes" or "no"; and why not, where not)."""
    import pandas as pd

    marks = pd.DataFrame(comparability_rows(read_metrics_files(results_dir)))
    if marks.empty:
        return marks, marks
    return (marks.pivot(index=["paper", "run"], columns="column", values="as_paper").fillna(""),
            marks[marks.why != ""].set_index(["run", "column"])[["as_paper", "why"]])


def published_geollava():
    """The GeoLLaVA paper's published table (fMoW val), its "bert" column shown as "BERT"."""
    import pandas as pd

    paper = pd.read_csv(GEOLLAVA_PAPER)
    return paper.set_index(["model_family", "variant"]).rename(columns={"bert": "BERT", **GEOLLAVA_COLUMNS})


# ----------------------------------------------------------------------------------------------- figures

@lru_cache(maxsize=1)
def _drawable_codepoints() -> frozenset[int]:
    """The characters matplotlib's default font can draw."""
    from matplotlib import font_manager, rcParams
    from matplotlib.ft2font import FT2Font

    path = font_manager.findfont(font_manager.FontProperties(family=rcParams["font.family"]))
    return frozenset(FT2Font(path).get_charmap())


def drawable(text: str) -> tuple[str, int]:
    """``text`` with every character the font cannot draw replaced by UNDRAWABLE, and how many were: no wall of
    "Glyph missing from font" warnings for a base model's random tokens. ``$`` is escaped (no mathtext)."""
    known = _drawable_codepoints()
    kept = [c if (ord(c) in known or c in "\n ") else UNDRAWABLE for c in text]
    return "".join(kept).replace("$", r"\$"), sum(c == UNDRAWABLE for c in kept) - text.count(UNDRAWABLE)


PUBLISHED_BARS, OUR_BARS, OTHERWISE_BARS = ("GeoLLaVA paper (published)", "our runs",
                                            "our runs, computed otherwise than the paper (see the tables)")
PAPER_CHART_COLOURS = {PUBLISHED_BARS: "tab:gray", OUR_BARS: "tab:blue", OTHERWISE_BARS: "tab:orange"}


def paper_chart(runs: OurRuns):
    """One horizontal bar chart per GeoLLaVA paper column: the published numbers (grey), our runs (blue; orange
    where computed otherwise than the paper), the colours' key above them."""
    import matplotlib.pyplot as plt
    import pandas as pd

    paper = pd.read_csv(GEOLLAVA_PAPER).rename(columns={"bert": "sbert"})
    rows = [(f"{r.model_family} | {r.variant} (published)", "paper", None, r) for r in paper.itertuples()]
    for row in runs.of(deltavlm=False).itertuples():
        rows.append((f"{row.family} | {row.model} [{row.run}]", "ours", row.run, row))
    columns = list(GEOLLAVA_COLUMNS)
    fig, axes = plt.subplots(1, len(columns), figsize=(3.4 * len(columns), 0.42 * len(rows) + 1.6), squeeze=False)
    for ax, metric in zip(axes[0], columns):
        labels, values, colours = [], [], []
        for label, source, run, row in rows:
            value = getattr(row, metric, None)
            if value is None or value != value:  # absent or NaN
                continue
            labels.append(label)
            values.append(value)
            colours.append(PAPER_CHART_COLOURS[PUBLISHED_BARS] if source == "paper" else
                           PAPER_CHART_COLOURS[OTHERWISE_BARS] if not_comparable(runs.records[run], metric) else
                           PAPER_CHART_COLOURS[OUR_BARS])
        ax.barh(range(len(values)), values, color=colours)
        ax.set_yticks(range(len(values)), labels if ax is axes[0][0] else [""] * len(values), fontsize=9)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_title(GEOLLAVA_COLUMNS[metric], fontsize=11)
    key = [plt.Rectangle((0, 0), 1, 1, color=colour) for colour in PAPER_CHART_COLOURS.values()]
    fig.legend(key, list(PAPER_CHART_COLOURS), loc="upper center", ncol=len(key), fontsize=10, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))  # room for the key above the charts
    return fig


def example_runs(runs: OurRuns, count: int = 2) -> list[str]:
    """The first video runs, whose answers are shown."""
    video = runs.of(deltavlm=False)
    return list(video.run[:count]) if not video.empty else []


def bounded_lines(label: str, text: str, width: int, max_lines: int) -> list[str]:
    """``label: text`` wrapped to ``width`` characters in at most ``max_lines`` lines; a text cut short ends in " ..."
    and its label says how much of it is shown."""
    words = text.split()
    lines = textwrap.wrap(f"{label}: {text}", width) or [f"{label}:"]
    if len(lines) <= max_lines:
        return lines
    for shown in range(len(words), 0, -1):  # the most words that fit, with the label saying how many
        lines = textwrap.wrap(f"{label} ({shown} of {len(words)} words): {' '.join(words[:shown])} ...", width)
        if len(lines) <= max_lines:
            return lines
    return textwrap.wrap(f"{label} ({len(words)} words, none fits)", width)[:max_lines]


# The examples' layout, in inches and points: two square images across the page, the texts under them.
EXAMPLE_WIDTH, EXAMPLE_MARGIN, EXAMPLE_GAP, EXAMPLE_SPACING, EXAMPLE_HEADING = 10.0, 0.1, 0.08, 0.45, 0.45
CAPTION_POINTS, CAPTION_LINE_SPACING = 10, 1.25
# At most this many lines of each text: a base model's 350-token answer would run over the next pair.
REFERENCE_LINES, ANSWER_LINES = 3, 6


def example_figure(results_dir: str | Path, run: str, repo: str | Path, count: int = 3):
    """Before and after side by side and large, the reference and the answer wrapped under them (each bounded to a
    few lines, so that the text stays inside its own panel, above the next pair), for the first ``count`` answers of
    ``run``; None when the run has no answers file."""
    import matplotlib.pyplot as plt

    results_dir = Path(results_dir)
    answers = results_dir / f"{run}.jsonl"
    if not answers.is_file():
        return None
    metrics = json.loads((results_dir / f"{run}.metrics.json").read_text(encoding="utf-8"))
    video_dir = Path(metrics.get("settings", {}).get("VIDEO_DIR") or Path(repo) / "data" / "sample" / "videos")
    records = read_jsonl(answers)[:count]
    width, margin, gap = EXAMPLE_WIDTH, EXAMPLE_MARGIN, EXAMPLE_GAP
    side = (width - 2 * margin - gap) / 2
    # Characters per line: the panel's width over a generous average glyph width (0.62 em of the font size).
    columns = int((width - 2 * margin) * 72 / (0.62 * CAPTION_POINTS))
    line = CAPTION_POINTS * CAPTION_LINE_SPACING / 72
    captions, replaced = [], 0
    for record in records:
        true = record["true"] if isinstance(record["true"], str) else " | ".join(record["true"])
        (reference, bad_reference), (answer, bad_answer) = drawable(true), drawable(record["generated"] or "(empty)")
        replaced += bad_reference + bad_answer
        captions.append("\n".join(bounded_lines("reference", reference, columns, REFERENCE_LINES)
                                   + bounded_lines("answer", answer, columns, ANSWER_LINES)))
    panels = [(caption.count("\n") + 1) * line + 0.15 for caption in captions]
    height = EXAMPLE_HEADING + sum(EXAMPLE_SPACING + side + panel for panel in panels)
    fig = plt.figure(figsize=(width, height))
    top = height - EXAMPLE_HEADING
    for record, caption, panel in zip(records, captions, panels):
        top -= EXAMPLE_SPACING
        video = video_dir / record["video"]
        frames = read_video_frames(video, 2) if video.is_file() else (None, None)
        for column, (frame, title) in enumerate(zip(frames, ("before", "after"))):
            left = margin + column * (side + gap)
            ax = fig.add_axes((left / width, (top - side) / height, side / width, side / height))
            if frame is not None:
                ax.imshow(frame)
            ax.set_title(f"{title}: {record['video']}" if column == 0 else title, fontsize=11)
            ax.axis("off")
        top -= side
        caption_ax = fig.add_axes((margin / width, (top - panel) / height, (width - 2 * margin) / width,
                                   panel / height))
        caption_ax.axis("off")
        caption_ax.text(0, 1 - 0.05 / panel, caption, va="top", ha="left", fontsize=CAPTION_POINTS,
                        linespacing=CAPTION_LINE_SPACING, transform=caption_ax.transAxes)
        top -= panel
    note = (f" ({replaced} character{'s' if replaced > 1 else ''} the font cannot draw shown as {UNDRAWABLE})"
            if replaced else "")
    fig.suptitle(f"{run}{note}", fontsize=12, y=1 - 0.1 / height, va="top")
    return fig


def deltavlm_tables(runs: OurRuns) -> list:
    """DeltaVLM's caption scores beside the published ones, and its sub-task scores (the published row alone
    without runs)."""
    import pandas as pd

    paper = pd.read_csv(DELTAVLM_PAPER) if DELTAVLM_PAPER.exists() else pd.DataFrame()
    delta = runs.of(deltavlm=True)
    if delta.empty:
        return [paper.set_index(["model", "variant"]) if not paper.empty else paper]
    published = paper.assign(run=paper.model + " " + paper.variant + " (published)").set_index("run")
    captions = pd.concat([published[[c for c in DELTAVLM_COLUMNS if c in published]],
                          delta.set_index("run")[[c for c in DELTAVLM_COLUMNS if c in delta]]])
    tables = [captions.rename(columns=DELTAVLM_COLUMNS)]
    subtasks = {}
    for record in runs.records.values():
        if is_deltavlm(record):
            subtasks[record.get("run", "?")] = {tuple(k.split("/", 1)): v for k, v in record.get("metrics", {}).items()
                                                if "/" in k and not k.startswith("caption/")}
    if any(subtasks.values()):
        table = pd.DataFrame(subtasks)
        table.index = table.index.set_names(["task", "score"])
        tables.append(table.dropna(how="all"))
    return tables


# ----------------------------------------------------------------------------------------------- leaderboard

@dataclass
class Leaderboard:
    """One test set's table: index = row label; columns source, family, model, samples, then the metrics."""
    test_set: dict[str, Any] | None
    title: str
    table: Any  # pandas.DataFrame
    best: dict[str, str]  # metric -> the label of our best row

    @property
    def metrics(self) -> list[str]:
        return [m for m in METRIC_NAMES if m in self.table and self.table[m].notna().any()]


def test_set_title(test_set: dict[str, Any] | None) -> str:
    if not test_set:
        return NOT_RECORDED
    split = f", split {test_set['split']}" if test_set.get("split") else ""
    return f"{test_set['file']}{split} (sha256 {test_set['sha256'][:10]})"


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
        table[metrics] = table[metrics].astype(float)
        ours = table[table.source == OURS][metrics].round(SHOWN_DECIMALS)  # as shown: equal there is a tie
        best = {m: ours[m].idxmax() for m in metrics
                if ours[m].notna().any() and (ours[m] == ours[m].max()).sum() == 1}
        boards.append(Leaderboard(test_set, test_set_title(test_set), table, best))
    return boards


def readable(table):
    """A table's Styler whose labels and headers keep to one line (a browser squeezes the label columns of a table
    wider than the page to one word each; the notebook scrolls it sideways instead), numbers to ``SHOWN_DECIMALS``
    decimals."""
    return (table.style.format(precision=SHOWN_DECIMALS, na_rep="-")
            .set_table_styles([{"selector": "th", "props": "white-space: nowrap"},
                               {"selector": "caption", "props": "text-align: left"}]))


def styled(board: Leaderboard):
    """The table for display: our runs and the published ones, a row each (the row's label names family, model and
    run), metric columns by their names, our best per column in bold on green."""
    def mark(column):
        best = board.best.get(column.name)
        return ["font-weight: bold; background-color: #d4f4d4" if label == best else "" for label in column.index]

    shown = board.table.drop(columns=["family", "model"])  # both are in the row's label
    # the label (family, model and run) is long: it wraps, but never narrower than a phrase, run names anywhere
    label = {"selector": "th.row_heading", "props": "white-space: normal; min-width: 18em; overflow-wrap: anywhere"}
    return (readable(shown).set_table_styles([label], overwrite=False).apply(mark, subset=board.metrics)
            .relabel_index([METRIC_NAMES.get(c, c) for c in shown.columns], axis=1)
            .set_caption(f"{board.title}: bold on green = our best per column (runs that show the same score tie: "
                         f"no one is marked)"))


def leaderboard_chart(board: Leaderboard):
    """The leaderboard as a heat map readable at a glance: a column per model (published ones in italics), a row
    per metric, each cell its value; the colour runs along each row from its lowest value (light) to its highest
    (dark), our best per metric boxed. Metrics down the side keep the figure narrow however many there are."""
    import matplotlib.pyplot as plt
    import numpy as np

    metrics = board.metrics
    values = board.table[metrics].astype(float).round(SHOWN_DECIMALS).to_numpy().T  # [metric, model], as shown
    low, high = np.nanmin(values, axis=1, keepdims=True), np.nanmax(values, axis=1, keepdims=True)
    shade = np.where(high > low, (values - low) / np.where(high > low, high - low, 1.0), 0.0)  # a tie: all light
    labels = [textwrap.fill(drawable(label)[0], 24) for label in board.table.index]
    fig, ax = plt.subplots(figsize=(1.8 + 1.75 * len(labels), 1.3 + 0.42 * len(metrics)))
    ax.imshow(np.ma.masked_invalid(shade), cmap="Greens", vmin=-0.15, vmax=1.25, aspect="auto")
    for i, metric in enumerate(metrics):
        for j, value in enumerate(values[i]):
            if value != value:  # NaN: not reported for this model
                continue
            ours_best = board.best.get(metric) == board.table.index[j]
            ax.text(j, i, f"{value:.{SHOWN_DECIMALS}f}", ha="center", va="center", fontsize=11,
                    fontweight="bold" if ours_best else "normal", color="white" if shade[i, j] > 0.6 else "black")
            if ours_best:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", lw=2))
    ax.set_yticks(range(len(metrics)), [METRIC_NAMES[m] for m in metrics], fontsize=11)
    ax.set_xticks(range(len(labels)), labels, fontsize=9)
    ax.xaxis.tick_top()
    for tick, source in zip(ax.get_xticklabels(), board.table.source):
        tick.set_fontstyle("italic" if source == PUBLISHED else "normal")
    ax.set_xlabel(f"{board.title}\nper row: light = lowest, dark = highest (a tie: all light); boxed = our best "
                  f"(italics: published)", fontsize=10)
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
        family = run.get("family") or (DELTAVLM_ID if "sources" in run else None)
        by_family.setdefault(FAMILY_NAMES.get(family, str(family)), []).append(run)
    figures = {}
    for family, runs in by_family.items():
        fig, ax = plt.subplots(figsize=(10, 5))
        labels = [settings_label(run) if run.get("mode") else run["run_dir"] for run in runs]
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
        ax.legend(fontsize=9)
        fig.tight_layout()
        figures[family] = fig
    return figures
