"""Results.ipynb's tables and figures (geochange/report.py) on the shared tiny results, and the notebook itself."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TEST_TIMEOUT, TINY_VAL_RECORDS

from geochange import report
from geochange.metrics import METRIC_NAMES
from geochange.paths import ANNOTATIONS_DIR
from geochange.report import OURS, PUBLISHED, leaderboards, read_training_runs, settings_label, training_curves

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.xdist_group("tiny_repo")  # the shared tiny results are made once per worker


def test_leaderboard_puts_the_video_model_and_deltavlm_side_by_side(tiny_repo):
    boards = leaderboards(tiny_repo / "results", tiny_repo, ANNOTATIONS_DIR / "paper_test_sets.csv")
    assert [b.test_set["file"] for b in boards] == ["sample_changechat_captions.json", "val.json"]
    captions, val = boards
    # the converted captions count as their source: DeltaVLM and the video model on one board
    assert captions.test_set["split"] is None
    assert list(captions.table.family) == ["DeltaVLM", "Video-LLaVA"]  # metrics files in name order
    assert list(captions.table.samples) == [TINY_VAL_RECORDS, TINY_VAL_RECORDS]
    files = {path.name: json.loads(path.read_text()) for path in (tiny_repo / "results").glob("*.metrics.json")}
    video = files["videollava-tiny_captions.metrics.json"]
    delta = next(f for f in files.values() if f["model"].startswith("DeltaVLM"))
    for metric in ("bleu1", "bleu4", "rouge_l", "cider", "sbert", "rouge1"):
        assert captions.table[metric].tolist() == pytest.approx([delta["metrics"][f"caption/{metric}"],
                                                                 video["metrics"][metric]])
        column = captions.table[metric]
        if (column == column.max()).sum() == 1:
            assert captions.best[metric] == column.idxmax()
        else:  # a tie (0.0 against 0.0, up to float noise) has no best
            assert metric not in captions.best
    assert set(captions.table.source) == {OURS}  # the sample is no paper's test set
    # the fine-tuned run and the base model on the val records; every metric of the one list is a column
    assert sorted(val.table.model) == sorted(["base", "LoRA r8, 8 pairs, lr 0.01, 4 steps"])
    assert val.metrics == [m for m in METRIC_NAMES if m in val.table]
    assert set(val.metrics) >= {"sacrebleu", "bleu2", "bleu3", "bertscore_f1"}


def test_published_numbers_sit_beside_the_papers_test_set(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    levir = {"file": "LevirCCcaptions.json", "sha256": "ab" * 32, "split": "test"}
    for name, bleu4, test_set in (("deltavlm_a", 0.40, levir), ("deltavlm_b", 0.45, levir),
                                  ("deltavlm_val", 0.5, {**levir, "split": "val"})):
        (results / f"{name}.metrics.json").write_text(json.dumps({
            "run": name, "model": "DeltaVLM (x)", "settings": {"CHECKPOINT": "x"}, "metrics": {"caption/bleu4": bleu4, "caption/cider": 1.0},
            "tasks": {"caption": {"samples": 1929}}, "test_set": test_set}))
    (results / "old.metrics.json").write_text(json.dumps({"run": "old", "model": "m", "family": "videollava",
                                                          "model_path": "base", "metrics": {"rouge1": 0.2}}))
    boards = leaderboards(results, tmp_path, ANNOTATIONS_DIR / "paper_test_sets.csv")
    assert [b.title.split(" (")[0] for b in boards] == ["LevirCCcaptions.json, split test",
                                                       "LevirCCcaptions.json, split val",
                                                       "test set not recorded"]
    test = boards[0]
    published = test.table[test.table.source == PUBLISHED]
    assert published.bleu4.tolist() == [0.438] and published.cider.tolist() == [1.461]
    assert test.best["bleu4"] == "DeltaVLM x [deltavlm_b]"  # our best, not the published row
    assert (boards[1].table.source == OURS).all()  # the val split is not the paper's


def test_training_curves_one_figure_per_family_labelled_by_settings(tiny_repo):
    (run,) = read_training_runs(tiny_repo / "runs")
    assert [p["step"] for p in run["loss_curve"]] == [1, 2, 3, 4]
    assert [p["step"] for p in run["eval_loss_curve"]] == [2, 4]
    figures = training_curves(tiny_repo / "runs")
    assert list(figures) == ["Video-LLaVA"]
    ax = figures["Video-LLaVA"].axes[0]
    label = settings_label(run)
    assert label == "LoRA r8, 8 pairs, lr 0.01, 4 steps"
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {f"{label}: loss", f"{label}: validation loss"}
    assert list(lines[f"{label}: loss"].get_ydata()) == [p["loss"] for p in run["loss_curve"]]
    assert list(lines[f"{label}: validation loss"].get_ydata()) == [p["eval_loss"] for p in run["eval_loss_curve"]]


def test_figures_draw_every_text_without_missing_glyph_warnings(tiny_repo, recwarn):
    import matplotlib

    matplotlib.use("Agg")
    cjk, bengali = "道路", "রাস্তা"  # 2 and 6 code points (Bengali vowel signs and virama are their own)
    text, replaced = report.drawable(f"a road {cjk} {bengali} costs $5")
    assert replaced == len(cjk) + len(bengali) == 8
    assert text == f"a road {report.UNDRAWABLE * 2} {report.UNDRAWABLE * 6} costs \\$5"
    runs = report.our_runs(tiny_repo / "results", tiny_repo)
    (run,) = [r for r in runs.table.run if r.startswith("videollava-tiny_sample")]
    records = [json.loads(line) for line in (tiny_repo / "results" / f"{run}.jsonl").read_text().splitlines()]
    figure = report.example_figure(tiny_repo / "results", run, tiny_repo, count=2)
    figure.canvas.draw()
    before, after = figure.axes[0], figure.axes[1]
    # before and after side by side, the same height, nearly touching, and large
    b, a = before.get_position(), after.get_position()
    assert b.y0 == pytest.approx(a.y0) and 0 <= a.x0 - b.x1 < 0.05 and b.width > 0.4
    shown = figure.axes[2].texts[0].get_text()
    assert shown.startswith("reference: ") and drawable_words(records[0]["generated"]) <= set(shown.split())
    board = leaderboards(tiny_repo / "results", tiny_repo)[0]
    report.leaderboard_chart(board).canvas.draw()
    report.paper_chart(runs).canvas.draw()
    assert not [w for w in recwarn.list if "Glyph" in str(w.message)]


def drawable_words(text: str) -> set[str]:
    return set(report.drawable(text)[0].split())


@pytest.mark.slow
def test_results_notebook_runs_in_place_with_no_stderr(tiny_repo, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    # In place, from a folder below the repository's root (the notebook walks up to it), reading the tiny results.
    monkeypatch.setenv("GEOLLAVA_RESULTS_DIR", str(tiny_repo / "results"))
    monkeypatch.setenv("GEOLLAVA_RUNS_DIR", str(tiny_repo / "runs"))
    notebook = nbformat.read(REPO / "Results.ipynb", as_version=4)
    NotebookClient(notebook, timeout=TEST_TIMEOUT, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO / "tests")}}).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    stderr = [o.get("text", "") for o in outputs if o.get("name") == "stderr" or o.get("output_type") == "error"]
    assert stderr == []
    first = next(c for c in notebook.cells if c.cell_type == "code")
    assert not first.outputs  # no error, nothing printed
    leaderboard_cell = next(c for c in notebook.cells if c.cell_type == "code" and "leaderboards(" in c.source)
    html = "".join(o.get("data", {}).get("text/html", "") for o in leaderboard_cell.outputs)
    assert "sample_changechat_captions.json" in html and "Video-LLaVA base" in html and "DeltaVLM tiny" in html
    assert "font-weight: bold" in html
    assert sum("image/png" in o.get("data", {}) for o in leaderboard_cell.outputs) == 2  # a chart per board
    curves_cell = next(c for c in notebook.cells if c.cell_type == "code" and "training_curves(" in c.source)
    assert sum("image/png" in o.get("data", {}) for o in curves_cell.outputs) == 1
    examples_cell = next(c for c in notebook.cells if c.cell_type == "code" and "example_figure(" in c.source)
    assert sum("image/png" in o.get("data", {}) for o in examples_cell.outputs) == 2
    text = "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert "No results yet" not in text and "No DeltaVLM results yet" not in text


def test_results_notebook_markdown_renders():
    """Markdown cells hold real line breaks, not a literal backslash-n (which Jupyter shows as text)."""
    import nbformat

    notebook = nbformat.read(REPO / "Results.ipynb", as_version=4)
    markdown = [c.source for c in notebook.cells if c.cell_type == "markdown"]
    assert len(markdown) == 8 and all(source.startswith("#") for source in markdown)
    assert not [source[:40] for source in markdown if "\\n" in source]
    # Every heading is a short line of its own, its text below it (not run together with it).
    assert all(len(source.split("\n", 1)[0]) < 80 for source in markdown)
