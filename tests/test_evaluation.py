"""Evaluation scripts, resume, batching, rescoring and Results.ipynb on the tiny pipeline."""
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

import geochange.video_llm.evaluation as evaluation
from geochange.annotations import load_annotations
from geochange.errors import UserError
from geochange.locks import lock_for_writing
from geochange.video_llm.modeling import load_processor
from geochange.overrides import make_settings, settings_of
from geochange.results import read_jsonl
from geochange.sample.data import SAMPLE_VAL, SAMPLE_VIDEO_DIR, ensure_sample_media
from geochange.video import read_video_frames

REPO = Path(__file__).resolve().parent.parent
# One thread: CPU reductions then add up in the same order on every run, so the tiny pipeline is reproducible.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
VAL_LIMIT = 24


def eval_settings(**overrides):
    """The settings ``videollava_test.py NAME=VALUE...`` builds, for the tiny model."""
    scope = runpy.run_path(str(REPO / "videollava_test.py"), run_name="constants_only")
    return make_settings(settings_of({**scope, "MODEL_ID": "tiny", **overrides}))


def run_script(*args, cwd=REPO, timeout=600):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=ENV, timeout=timeout)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The README's main job at test size: tiny LoRA fine-tune, evaluation after training, and the base model."""
    ensure_sample_media()
    root = tmp_path_factory.mktemp("pipeline")
    results = root / "results"
    val = root / "val.json"
    val.write_text(json.dumps(json.loads(Path(SAMPLE_VAL).read_text())[:VAL_LIMIT]))
    train = run_script("videollava_finetune.py", "MODEL_ID=tiny", f"OUTPUT_DIR={root / 'runs'}", f"RESULTS_DIR={results}",
                       f"VAL_ANNOTATIONS={val}", "MAX_STEPS=150", "EVAL_STEPS=0", "SAVE_STEPS=1000",
                       "GRADIENT_CHECKPOINTING=False", "MAX_NEW_TOKENS=40")
    assert train.returncode == 0, train.stderr[-3000:]
    base = run_script("videollava_test.py", "MODEL_ID=tiny", "MODEL_PATH=base", f"RESULTS_DIR={results}",
                      f"VAL_ANNOTATIONS={val}", "MAX_NEW_TOKENS=40")
    assert base.returncode == 0, base.stderr[-3000:]
    (run_dir,) = [p for p in (root / "runs").iterdir() if p.is_dir()]  # beside it: its .lock
    return {"root": root, "results": results, "run_dir": run_dir, "val": val, "train_stdout": train.stdout}


def test_pipeline_writes_results_and_the_tuned_model_beats_base(pipeline):
    results, run = pipeline["results"], pipeline["run_dir"].name
    for name in (f"{run}.jsonl", f"{run}.metrics.json", f"{run}.csv", "videollava-tiny_base.jsonl",
                 "videollava-tiny_base.metrics.json", "videollava-tiny_base.csv"):
        assert (results / name).exists(), name
    tuned = json.loads((results / f"{run}.metrics.json").read_text())
    base = json.loads((results / "videollava-tiny_base.metrics.json").read_text())
    assert tuned["num_samples"] == base["num_samples"] == VAL_LIMIT
    records = read_jsonl(results / f"{run}.jsonl")
    assert sorted(r["id"] for r in records) == sorted(s.id for s in load_annotations(pipeline["val"], SAMPLE_VIDEO_DIR))
    assert set(records[0]) >= {"id", "video", "question", "true", "generated"}
    assert not any("ASSISTANT" in r["generated"] or "<video>" in r["generated"] for r in records)
    # base emits random tokens (ROUGE 0.000); 150 tuned steps gave 0.047-0.074 over repeated runs
    # (CPU float order varies), the README's full 225-step main job 0.128
    for metric in ("rouge1", "rougeL"):
        assert tuned["metrics"][metric] > base["metrics"][metric] + 0.02, (metric, tuned["metrics"], base["metrics"])
    for metric in ("sbert", "bertscore_f1"):
        assert tuned["metrics"][metric] > base["metrics"][metric], (metric, tuned["metrics"], base["metrics"])
    assert "ROUGE" in pipeline["train_stdout"] or "rouge1" in pipeline["train_stdout"]


def test_batched_and_unbatched_generation_agree(pipeline):
    from geochange.video_llm.weights import load_run_model

    model = load_run_model(pipeline["run_dir"], "videollava")
    processor = load_processor(str(pipeline["run_dir"]))
    samples = load_annotations(pipeline["val"], SAMPLE_VIDEO_DIR)[:6]
    frames = [read_video_frames(s.video, 2) for s in samples]
    # different question phrasings give prompts of different lengths, so the batch really is padded
    questions = [s.question for s in samples]
    assert len({len(processor.tokenizer(q)["input_ids"]) for q in questions}) > 1
    batched, counts = evaluation.generate_answers(model, processor, frames, questions, 24)
    single = [evaluation.generate_answers(model, processor, [f], [q], 24) for f, q in zip(frames, questions)]
    assert batched == [answers[0] for answers, _ in single] and counts == [n[0] for _, n in single]
    assert all(batched)
    assert all(1 <= count <= 24 for count in counts)  # tokens generated before EOS


def test_interrupted_evaluation_resumes_without_duplicates(pipeline, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = evaluation.generate_answers

    def crash_after_first_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    settings = eval_settings(MODEL_PATH=str(pipeline["run_dir"]), VAL_ANNOTATIONS=str(pipeline["val"]), BATCH_SIZE=5,
                             MAX_NEW_TOKENS=8, RESULTS_DIR=str(tmp_path), RUN_NAME="resume")
    monkeypatch.setattr(evaluation, "generate_answers", crash_after_first_batch)
    with pytest.raises(KeyboardInterrupt):
        evaluation.evaluate(settings, "videollava")
    assert len(read_jsonl(tmp_path / "resume.jsonl")) == 5
    monkeypatch.setattr(evaluation, "generate_answers", real)
    # while another process writes this results file, a second evaluation stops in one line
    with lock_for_writing(tmp_path / "resume.jsonl", "held by the test"):
        with pytest.raises(UserError, match=rf"^the results file {tmp_path / 'resume.jsonl'} is being written by "
                                            rf"another process \(pid {os.getpid()}"):
            evaluation.evaluate(settings, "videollava")
    assert len(read_jsonl(tmp_path / "resume.jsonl")) == 5
    evaluation.evaluate(settings, "videollava")
    records = read_jsonl(tmp_path / "resume.jsonl")
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) == VAL_LIMIT
    # the metrics file counts the answers that generation cut at MAX_NEW_TOKENS
    metrics = json.loads((tmp_path / "resume.metrics.json").read_text())
    assert all(1 <= r["new_tokens"] <= 8 for r in records)
    assert metrics["answers_at_max_new_tokens"] == sum(r["new_tokens"] == 8 for r in records)
    assert metrics["max_new_tokens"] == 8 and metrics["answers_with_token_count"] == VAL_LIMIT
    # a third run finds everything done and only rescores
    before = (tmp_path / "resume.jsonl").read_text()
    evaluation.evaluate(settings, "videollava")
    assert (tmp_path / "resume.jsonl").read_text() == before


def test_rescoring_a_geollava_results_file(tmp_path):
    original = [{"true": "two new buildings appeared in the upper left.",
                 "generated": "USER: <video>\nWhat changed? ASSISTANT: Answer: two new buildings appeared in the upper left."},
                {"true": "a road now crosses the center.", "generated": "Answer: a new road crosses the middle."}]
    path = tmp_path / "geollava_results.json"
    path.write_text("".join(json.dumps(r) for r in original))  # back-to-back objects, as GeoLLaVA wrote them
    run = run_script("common.py", "score", str(path))
    assert run.returncode == 0, run.stderr
    metrics = json.loads((tmp_path / "geollava_results.metrics.json").read_text())
    assert metrics["num_samples"] == 2 and 0 < metrics["metrics"]["rouge1"] < 1
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    expected = (1.0 + scorer.score(original[1]["true"], "a new road crosses the middle.")["rouge1"].fmeasure) / 2
    assert metrics["metrics"]["rouge1"] == pytest.approx(expected)
    assert (tmp_path / "geollava_results.csv").exists()


def test_bad_input_gives_one_line_and_keeps_results(pipeline, tmp_path):
    run = run_script("videollava_test.py", "MODEL_ID=tiny", "MODEL_PATH=runs/no_such_run", f"RESULTS_DIR={tmp_path}")
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        "error: MODEL_PATH runs/no_such_run does not exist (give a fine-tuning run directory or 'base')"]
    not_json = tmp_path / "broken.json"
    not_json.write_text("this is not json")
    run = run_script("common.py", "score", str(not_json))
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1 and str(not_json) in run.stderr
    no_answer = tmp_path / "val.json"
    records = json.loads(pipeline["val"].read_text())[:2]
    records[1]["conversations"] = records[1]["conversations"][:1]
    no_answer.write_text(json.dumps(records))
    results = pipeline["results"] / "videollava-tiny_base.jsonl"
    kept = results.read_text()
    run = run_script("videollava_test.py", "MODEL_ID=tiny", "MODEL_PATH=base", f"VAL_ANNOTATIONS={no_answer}",
                     f"RESULTS_DIR={pipeline['results']}")
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1
    assert str(no_answer) in run.stderr and records[1]["id"] in run.stderr
    assert results.read_text() == kept


def test_results_notebook_runs_on_the_tiny_pipeline(pipeline, tmp_path):
    import shutil

    import nbformat
    from nbclient import NotebookClient

    # the notebook reads results/ beside common.py: give it a repo-shaped folder
    (tmp_path / "annotations").mkdir()
    shutil.copy(REPO / "common.py", tmp_path)
    shutil.copy(REPO / "annotations" / "geollava_paper_results.csv", tmp_path / "annotations")
    shutil.copytree(pipeline["results"], tmp_path / "results")
    os.symlink(REPO / "geochange", tmp_path / "geochange")
    notebook = nbformat.read(REPO / "Results.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
                     + str(o.get("data", {}).get("text/html", ""))
                     for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    assert "Video-LLaVA" in text and pipeline["run_dir"].name in text and "videollava-tiny_base" in text
    assert "No results yet" not in text.split("DeltaVLM")[0]
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
               for c in notebook.cells if c.cell_type == "code" for o in c.outputs)


def test_llavanext_eval_script_on_the_base_tiny_model(tmp_path):
    run = run_script("llavanext_eval.py", "MODEL_ID=tiny", "MODEL_PATH=base", "LIMIT=4", "BATCH_SIZE=3",
                     "MAX_NEW_TOKENS=6", f"RESULTS_DIR={tmp_path}")
    assert run.returncode == 0, run.stderr[-2000:]
    records = read_jsonl(tmp_path / "llavanext-tiny_base.jsonl")
    assert len(records) == 4 and all(r["generated"] for r in records)
    metrics = json.loads((tmp_path / "llavanext-tiny_base.metrics.json").read_text())
    assert metrics["num_samples"] == 4 and metrics["family"] == "llavanext" and "rouge1" in metrics["metrics"]
    assert metrics["settings"]["MODEL_PATH"] == "base" and metrics["settings"]["BATCH_SIZE"] == 3


def evaluate_base(results_dir, **overrides):
    settings = {"MODEL_PATH": "base", "VAL_ANNOTATIONS": str(SAMPLE_VAL), "BATCH_SIZE": 2, "MAX_NEW_TOKENS": 4,
                "RESULTS_DIR": str(results_dir), "LIMIT": 2, "RUN_NAME": "tied", **overrides}
    return evaluation.evaluate(eval_settings(**settings), "videollava")


def test_results_are_tied_to_the_model_weights_generation_and_test_set(tmp_path, monkeypatch):
    import hashlib
    import shutil

    from geochange.video_llm.modeling import resolve_model_path

    ensure_sample_media()
    metrics = json.loads(evaluate_base(tmp_path).read_text())
    identity = json.loads((tmp_path / "tied.settings.json").read_text())
    assert metrics["identity"] == identity
    assert identity["test_set"] == {"file": "sample_val.json",
                                    "sha256": hashlib.sha256(Path(SAMPLE_VAL).read_bytes()).hexdigest(), "split": None}
    assert identity["generation"]["max_new_tokens"] == 4 and identity["model_path"] == "base"
    answers = (tmp_path / "tied.jsonl").read_text()
    # the same model and settings resume (nothing left to generate) ...
    monkeypatch.setattr(evaluation, "generate_answers", lambda *a, **k: pytest.fail("generated again"))
    evaluate_base(tmp_path)
    # ... other generation settings or another test set refuse to mix, in one line
    with pytest.raises(UserError, match=r"tied.jsonl was written with other settings \(generation\); set RUN_NAME"):
        evaluate_base(tmp_path, MAX_NEW_TOKENS=5)
    other_val = tmp_path / "val.json"
    other_val.write_text(json.dumps(json.loads(Path(SAMPLE_VAL).read_text())[:3]))
    with pytest.raises(UserError, match=r"other settings \(test_set\)"):
        evaluate_base(tmp_path, VAL_ANNOTATIONS=str(other_val))
    assert (tmp_path / "tied.jsonl").read_text() == answers

    # A retrained model in the same folder (what OVERWRITE=True of a run does) is new weights: refused.
    model_dir = tmp_path / "runs" / "A" / "merged"
    shutil.copytree(resolve_model_path("tiny", "videollava"), model_dir)
    monkeypatch.undo()
    evaluate_base(tmp_path, MODEL_PATH=str(model_dir), RUN_NAME=None)
    assert (tmp_path / "A_merged.jsonl").exists()  # runs/A/merged and runs/B/merged no longer share a file
    from safetensors.torch import load_file, save_file

    weights = load_file(str(model_dir / "model.safetensors"))
    name = next(k for k in weights if k.endswith("lm_head.weight"))
    weights[name] = weights[name] + 1
    save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"A_merged.jsonl was written with other settings \(weights\).*OVERWRITE=True"):
        evaluate_base(tmp_path, MODEL_PATH=str(model_dir), RUN_NAME=None)
    # OVERWRITE discards the old answers and scores the new weights
    evaluate_base(tmp_path, MODEL_PATH=str(model_dir), RUN_NAME=None, OVERWRITE=True)
    assert json.loads((tmp_path / "A_merged.settings.json").read_text())["weights"] != identity["weights"]
    assert len(read_jsonl(tmp_path / "A_merged.jsonl")) == 2
    # answers from before results carried their identity are refused too
    (tmp_path / "A_merged.settings.json").unlink()
    with pytest.raises(UserError, match="no record of what produced them"):
        evaluate_base(tmp_path, MODEL_PATH=str(model_dir), RUN_NAME=None)


def test_evaluation_device_setting(tmp_path):
    import torch

    model, _ = evaluation.load_eval_model("videollava", "base", "tiny", False, torch.device("cpu"))
    assert {p.device.type for p in model.parameters()} == {"cpu"} and model.dtype == torch.float32
    if not torch.cuda.is_available():
        run = run_script("videollava_test.py", "MODEL_ID=tiny", "DEVICE=cuda", f"RESULTS_DIR={tmp_path}")
        assert run.returncode == 2 and run.stderr.strip().splitlines() == [
            "error: DEVICE='cuda' but no CUDA GPU is available"]
        assert not any(tmp_path.iterdir())  # stopped before loading or writing anything
    run = run_script("llavanext_eval.py", "MODEL_ID=tiny", "DEVICE=cpu", "LIMIT=2", "MAX_NEW_TOKENS=3",
                     f"RESULTS_DIR={tmp_path}")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "generating on cpu in float32" in run.stdout
