"""The leaderboard and training curves of Results.ipynb (geochange/report.py) on tiny runs."""
from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

from geochange.convert import changechat_to_videos
from geochange.video_llm.evaluation import evaluate
from geochange.overrides import make_settings, settings_of
from geochange.paths import ANNOTATIONS_DIR
from geochange.report import OURS, PUBLISHED, leaderboards, read_training_runs, settings_label, training_curves
from geochange.sample.data import SAMPLE_CHANGECHAT_CAPTIONS, SAMPLE_CHANGECHAT_ROOT, SAMPLE_VAL

REPO = Path(__file__).resolve().parent.parent
LIMIT = 4


def script_constants(name: str, **overrides) -> dict:
    scope = {k: v for k, v in runpy.run_path(str(REPO / name), run_name="constants_only").items() if k.isupper()}
    return {**scope, **overrides}


def script_settings(name: str, **overrides):
    """The settings value ``python <name> NAME=VALUE...`` builds."""
    return make_settings(settings_of(script_constants(name, **overrides)))


def train_script(name: str, **overrides) -> None:
    """The fine-tuning script as a user runs it (in this process)."""
    argv = [name] + [f"{k}={v}" for k, v in overrides.items()]
    saved, sys.argv = sys.argv, argv
    try:
        runpy.run_path(str(REPO / name), run_name="__main__")
    finally:
        sys.argv = saved


@pytest.fixture(scope="module")
def tiny_repo(sample_dir, tmp_path_factory):
    """A repo-shaped folder: a tiny Video-LLaVA and a tiny DeltaVLM on the sample captions (the video model on
    their conversion to videos), and a short tiny fine-tune with a validation loss."""
    from geochange.deltavlm import run

    root = tmp_path_factory.mktemp("repo")
    results = root / "results"
    converted = changechat_to_videos(SAMPLE_CHANGECHAT_CAPTIONS, SAMPLE_CHANGECHAT_ROOT, root / "converted")
    evaluate(script_settings("videollava_test.py", MODEL_ID="tiny", VAL_ANNOTATIONS=str(converted),
                             VIDEO_DIR=str(root / "converted" / "videos"), BATCH_SIZE=4, MAX_NEW_TOKENS=8,
                             RESULTS_DIR=str(results), LIMIT=LIMIT, SPLIT="test", SBERT_MODEL=None), "videollava")
    cfg = script_settings("deltavlm_predict.py", CHECKPOINT="tiny", TEST_ANNOTATIONS=str(SAMPLE_CHANGECHAT_CAPTIONS),
                          LIMIT=LIMIT, NUM_BEAMS=1, MAX_NEW_TOKENS=8, RESULTS_DIR=str(results))
    run.run_batch(run.load_predictor(cfg), run.batch_items(cfg.TEST_ANNOTATIONS, None, LIMIT, cfg.SPLIT), cfg)
    val = root / "val.json"
    val.write_text(json.dumps(json.loads(SAMPLE_VAL.read_text())[:4]))
    train_script("videollava_finetune.py", MODEL_ID="tiny", OUTPUT_DIR=root / "runs", TRAIN_LIMIT=8, MAX_STEPS=4,
                 BATCH_SIZE=4, LR=1e-2, WARMUP_STEPS=0, LOGGING_STEPS=1, SAVE_STEPS=100, EVAL_STEPS=2,
                 GRADIENT_CHECKPOINTING=False, EVAL_AFTER_TRAIN=False, VAL_ANNOTATIONS=val,
                 NUM_WORKERS=2)  # as on a GPU
    return root


def test_leaderboard_puts_the_video_model_and_deltavlm_side_by_side(tiny_repo):
    boards = leaderboards(tiny_repo / "results", tiny_repo, ANNOTATIONS_DIR / "paper_test_sets.csv")
    assert len(boards) == 1  # the converted captions count as their source
    board = boards[0]
    assert board.test_set["file"] == "sample_changechat_captions.json" and board.test_set["split"] is None
    assert list(board.table.family) == ["DeltaVLM", "Video-LLaVA"]  # metrics files in name order
    assert list(board.table.samples) == [LIMIT, LIMIT]
    # The same metrics, read back from each metrics file (DeltaVLM's under caption/).
    files = {path.name: json.loads(path.read_text()) for path in (tiny_repo / "results").glob("*.metrics.json")}
    video = next(f for f in files.values() if f.get("family") == "videollava")
    delta = next(f for f in files.values() if f["model"].startswith("DeltaVLM"))
    for metric in ("bleu1", "bleu4", "rouge_l", "cider", "sbert", "rouge1"):
        assert board.table[metric].tolist() == pytest.approx([delta["metrics"][f"caption/{metric}"],
                                                              video["metrics"][metric]])
        assert board.best[metric] == board.table[metric].idxmax()
    assert set(board.table.source) == {OURS}  # the sample is no paper's test set


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


def test_results_notebook_shows_leaderboard_and_training_curves(tiny_repo, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    # In place, from a folder below the repository's root (the notebook walks up to it), reading the tiny results.
    monkeypatch.setenv("GEOLLAVA_RESULTS_DIR", str(tiny_repo / "results"))
    monkeypatch.setenv("GEOLLAVA_RUNS_DIR", str(tiny_repo / "runs"))
    notebook = nbformat.read(REPO / "Results.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO / "tests")}}).execute()
    first = next(c for c in notebook.cells if c.cell_type == "code")
    assert not first.outputs  # no error, nothing printed
    leaderboard_cell = next(c for c in notebook.cells if c.cell_type == "code" and "leaderboards(" in c.source)
    html = "".join(o.get("data", {}).get("text/html", "") for o in leaderboard_cell.outputs)
    assert "sample_changechat_captions.json" in html and "Video-LLaVA base" in html and "DeltaVLM tiny" in html
    assert "font-weight: bold" in html
    assert any("image/png" in o.get("data", {}) for o in leaderboard_cell.outputs)
    curves_cell = next(c for c in notebook.cells if c.cell_type == "code" and "training_curves(" in c.source)
    assert sum("image/png" in o.get("data", {}) for o in curves_cell.outputs) == 1


def test_results_notebook_markdown_renders():
    """Markdown cells hold real line breaks, not a literal backslash-n (which Jupyter shows as text)."""
    import nbformat

    notebook = nbformat.read(REPO / "Results.ipynb", as_version=4)
    markdown = [c.source for c in notebook.cells if c.cell_type == "markdown"]
    assert len(markdown) == 8 and all(source.startswith("#") for source in markdown)
    assert not [source[:40] for source in markdown if "\\n" in source]
    # Every heading is a short line of its own, its text below it (not run together with it).
    assert all(len(source.split("\n", 1)[0]) < 80 for source in markdown)
