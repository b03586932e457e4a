"""Evaluation scripts, resume, batching and rescoring on the tiny pipeline."""
import io
import json
import os
from contextlib import redirect_stdout
from pathlib import Path

import pytest
from conftest import TINY_VAL_RECORDS, run_script, script_args

import common
import geochange.video_llm.evaluation as evaluation
from geochange.annotations import load_annotations
from geochange.errors import UserError
from geochange.locks import lock_for_writing
from geochange.overrides import script_constants
from geochange.results import read_jsonl
from geochange.sample.data import SAMPLE_VAL, SAMPLE_VIDEO_DIR, ensure_sample_media
from geochange.video import read_video_frames
from geochange.video_llm.families import FAMILIES
from geochange.video_llm.modeling import load_processor

REPO = Path(__file__).resolve().parent.parent
VAL_LIMIT = 24


def eval_settings(**overrides):
    """The settings ``videollava_test.py NAME=VALUE...`` builds, for the tiny model."""
    return script_constants("videollava_test.py", MODEL_ID="tiny", **overrides)


def run_dir_of(tiny_repo: Path) -> Path:
    (run_dir,) = [p for p in (tiny_repo / "runs").iterdir() if p.is_dir()]  # beside it: its .lock
    return run_dir


@pytest.fixture(scope="module")
def pipeline(sample_dir, tmp_path_factory):
    """The README's main job at test size: a tiny LoRA fine-tune long enough to learn (60 steps at lr 1e-2), evaluation after
    training, and the base model (one torch thread: CPU reductions then add up in the same order every run)."""
    import torch

    root = tmp_path_factory.mktemp("pipeline")
    results = root / "results"
    val = root / "val.json"
    val.write_text(json.dumps(json.loads(Path(SAMPLE_VAL).read_text())[:VAL_LIMIT]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    printed = io.StringIO()
    try:
        with redirect_stdout(printed):
            run_script("videollava_finetune.py", *script_args(
                MODEL_ID="tiny", OUTPUT_DIR=root / "runs", RESULTS_DIR=results, VAL_ANNOTATIONS=val, MAX_STEPS=60,
                EVAL_STEPS=0, SAVE_STEPS=1000, GRADIENT_CHECKPOINTING=False, MAX_NEW_TOKENS=40, LR=1e-2))
        run_script("videollava_test.py", *script_args(MODEL_ID="tiny", MODEL_PATH="base", RESULTS_DIR=results,
                                                       VAL_ANNOTATIONS=val, MAX_NEW_TOKENS=40))
    finally:
        torch.set_num_threads(threads)
    (run_dir,) = [p for p in (root / "runs").iterdir() if p.is_dir()]
    return {"root": root, "results": results, "run_dir": run_dir, "val": val, "train_stdout": printed.getvalue()}


@pytest.mark.slow
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
    # base emits random tokens (ROUGE 0.003); 60 tuned steps at lr 1e-2 gave 0.069 on one thread
    # (CPU float order varies), the README's full 225-step main job 0.128
    for metric in ("rouge1", "rougeL"):
        assert tuned["metrics"][metric] > base["metrics"][metric] + 0.02, (metric, tuned["metrics"], base["metrics"])
    for metric in ("sbert", "bertscore_f1"):
        assert tuned["metrics"][metric] > base["metrics"][metric], (metric, tuned["metrics"], base["metrics"])
    assert "ROUGE" in pipeline["train_stdout"] or "rouge1" in pipeline["train_stdout"]


@pytest.mark.xdist_group("tiny_repo")
def test_batched_and_unbatched_generation_agree(tiny_repo):
    from geochange.video_llm.weights import load_run_model

    run_dir = run_dir_of(tiny_repo)
    model = load_run_model(run_dir, "videollava")
    processor = load_processor(str(run_dir))
    samples = load_annotations(SAMPLE_VAL, SAMPLE_VIDEO_DIR)[:6]
    frames = [read_video_frames(s.video, 2) for s in samples]
    # different question phrasings give prompts of different lengths, so the batch really is padded
    questions = [s.question for s in samples]
    assert len({len(processor.tokenizer(q)["input_ids"]) for q in questions}) > 1
    batched, counts = evaluation.generate_answers(model, processor, frames, questions, 24)
    single = [evaluation.generate_answers(model, processor, [f], [q], 24) for f, q in zip(frames, questions)]
    assert batched == [answers[0] for answers, _ in single] and counts == [n[0] for _, n in single]
    assert all(batched)
    assert all(1 <= count <= 24 for count in counts)  # tokens generated before EOS


@pytest.mark.xdist_group("tiny_repo")
def test_interrupted_evaluation_resumes_without_duplicates(tiny_repo, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = evaluation.generate_answers

    def crash_after_first_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    val = tmp_path / "val.json"
    val.write_text(json.dumps(json.loads(SAMPLE_VAL.read_text())[:VAL_LIMIT]))
    settings = eval_settings(MODEL_PATH=str(run_dir_of(tiny_repo)), VAL_ANNOTATIONS=str(val), BATCH_SIZE=5,
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
    assert common.main(["score", str(path)]) == 0
    metrics = json.loads((tmp_path / "geollava_results.metrics.json").read_text())
    assert metrics["num_samples"] == 2 and 0 < metrics["metrics"]["rouge1"] < 1
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    expected = (1.0 + scorer.score(original[1]["true"], "a new road crosses the middle.")["rouge1"].fmeasure) / 2
    assert metrics["metrics"]["rouge1"] == pytest.approx(expected)
    assert (tmp_path / "geollava_results.csv").exists()


@pytest.mark.xdist_group("tiny_repo")
def test_bad_input_gives_one_line_and_keeps_results(tiny_repo, tmp_path, user_error):
    user_error(lambda: run_script("videollava_test.py", "MODEL_ID=tiny", "MODEL_PATH=runs/no_such_run",
                                  f"RESULTS_DIR={tmp_path}"),
               "MODEL_PATH runs/no_such_run does not exist (give a fine-tuning run directory or 'base')")
    not_json = tmp_path / "broken.json"
    not_json.write_text("this is not json")
    user_error(lambda: common.main(["score", str(not_json)]), str(not_json))
    no_answer = tmp_path / "val.json"
    records = json.loads((tiny_repo / "val.json").read_text())[:2]
    records[1]["conversations"] = records[1]["conversations"][:1]
    no_answer.write_text(json.dumps(records))
    results = tiny_repo / "results" / "videollava-tiny_base.jsonl"
    kept = results.read_text()
    user_error(lambda: run_script("videollava_test.py", "MODEL_ID=tiny", "MODEL_PATH=base",
                                  f"VAL_ANNOTATIONS={no_answer}", f"RESULTS_DIR={tiny_repo / 'results'}"),
               str(no_answer), records[1]["id"], "no answer")
    assert results.read_text() == kept


@pytest.mark.parametrize("family", list(FAMILIES.values())[1:], ids=list(FAMILIES)[1:])
def test_each_family_evaluates_with_model_on_the_base_tiny_model(tmp_path, capsys, family):
    """video_evaluate.py with MODEL= each other family (the first family is tested throughout this file)."""
    run_script("video_evaluate.py", f"MODEL={family.id}", "MODEL_ID=tiny", "MODEL_PATH=base", "LIMIT=4", "BATCH_SIZE=3",
               "MAX_NEW_TOKENS=6", "DEVICE=cpu", f"RESULTS_DIR={tmp_path}")
    assert "generating on cpu in float32" in capsys.readouterr().out
    records = read_jsonl(tmp_path / f"{family.id}-tiny_base.jsonl")
    assert len(records) == 4 and all(r["generated"] for r in records)
    metrics = json.loads((tmp_path / f"{family.id}-tiny_base.metrics.json").read_text())
    assert metrics["num_samples"] == 4 and metrics["family"] == family.id and "rouge1" in metrics["metrics"]
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


def test_evaluation_device_setting(tmp_path, user_error):
    import torch

    model, _ = evaluation.load_eval_model("videollava", "base", "tiny", False, torch.device("cpu"))
    assert {p.device.type for p in model.parameters()} == {"cpu"} and model.dtype == torch.float32
    if not torch.cuda.is_available():
        user_error(lambda: run_script("videollava_test.py", "MODEL_ID=tiny", "DEVICE=cuda", f"RESULTS_DIR={tmp_path}"),
                   "DEVICE='cuda' but no CUDA GPU is available")
        assert not any(tmp_path.iterdir())  # stopped before loading or writing anything


@pytest.mark.xdist_group("tiny_repo")
def test_video_evaluation_scores_converted_captions_against_all_references(tiny_repo):
    import numpy as np
    from pycocoevalcap.bleu.bleu import Bleu
    from sentence_transformers import SentenceTransformer

    from geochange.annotations import load_changechat
    from geochange.coco_metrics import coco_normalise
    from geochange.paths import minilm_dir
    from geochange.sample.data import SAMPLE_CHANGECHAT_CAPTIONS, SAMPLE_CHANGECHAT_ROOT

    # the shared tiny results hold the tiny Video-LLaVA on the sample captions converted to videos
    records = read_jsonl(tiny_repo / "results" / "videollava-tiny_captions.jsonl")
    references = {s.id: s.references for s in load_changechat(SAMPLE_CHANGECHAT_CAPTIONS, SAMPLE_CHANGECHAT_ROOT)}
    assert len(records) == TINY_VAL_RECORDS
    assert all(r["true"] == references[r["id"]] and len(r["true"]) == 5 for r in records)
    summary = json.loads((tiny_repo / "results" / "videollava-tiny_captions.metrics.json").read_text())
    tokens = {i: [coco_normalise(t) for t in r["true"]] for i, r in enumerate(records)}
    if summary["coco_tokenizer"].startswith("PTB"):
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tokens = PTBTokenizer().tokenize({i: [{"caption": t} for t in r["true"]] for i, r in enumerate(records)})
        generated = PTBTokenizer().tokenize({i: [{"caption": r["generated"]}] for i, r in enumerate(records)})
    else:
        generated = {i: [coco_normalise(r["generated"])] for i, r in enumerate(records)}
    bleu, _ = Bleu(4).compute_score(tokens, {i: generated.get(i, [""]) for i in range(len(records))}, verbose=0)
    assert summary["metrics"]["bleu1"] == pytest.approx(bleu[0], abs=1e-9)
    # The sentence-embedding score, recomputed: best of the five references, above the first reference's alone.
    encoder = SentenceTransformer(str(minilm_dir()), device="cpu")

    def cosines(record) -> np.ndarray:
        vectors = encoder.encode([record["generated"], *record["true"]], normalize_embeddings=True)
        return vectors[1:] @ vectors[0]

    best = np.mean([cosines(r).max() for r in records])
    first_only = np.mean([cosines(r)[0] for r in records])
    assert summary["metrics"]["sbert"] == pytest.approx(best, abs=1e-5) and best > first_only
    assert summary["test_set"]["file"] == "sample_changechat_captions.json"
    assert summary["test_set"]["split"] is None  # the sample names no splits: every record was used


def test_bad_clips_are_listed_before_the_model_loads_or_left_out_and_counted_in_the_metrics(
        tmp_path, clips_with_two_bad_ones, monkeypatch, user_error):
    annotations, videos, _ = clips_with_two_bad_ones
    settings = dict(VAL_ANNOTATIONS=str(annotations), VIDEO_DIR=str(videos), MAX_NEW_TOKENS=2, BATCH_SIZE=4,
                    RESULTS_DIR=str(tmp_path / "results"), SBERT_MODEL=None)
    real_load = evaluation.load_eval_model
    monkeypatch.setattr(evaluation, "load_eval_model", lambda *a, **k: pytest.fail("a model was loaded"))
    user_error(lambda: evaluation.evaluate(eval_settings(**settings), "videollava"), "2 of 6 clips cannot be used")
    monkeypatch.setattr(evaluation, "load_eval_model", real_load)
    metrics = json.loads(evaluation.evaluate(eval_settings(SKIP_BAD_CLIPS=True, **settings), "videollava").read_text())
    assert metrics["num_samples"] == 4 and metrics["bad_clips_skipped"] == 2
