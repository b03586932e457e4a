"""Batched evaluation of a base or fine-tuned video model, with resume.

Greedy generation over left-padded batches (prompts sorted by length so little
padding is wasted); only the newly generated tokens are decoded, so no
"Answer:" string surgery is needed. Each finished batch is appended to
``results/<run>.jsonl`` and flushed; a rerun skips the ids already there.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .annotations import describe_test_set
from .errors import UserError
from .fileio import file_sha256
from .modeling import (format_linear_counts, linear_counts, load_model, load_processor, model_label, pick_device,
                       resolve_model_path, video_prompt)
from .results import check_run_settings, remove_results
from .runs import RUN_FILE, load_run_model, weights_fingerprint


def results_run_name(family: str, model_path: str, model_id: str) -> str:
    """``<model>_base``, a run directory's name, or for a folder inside a run (``runs/A/merged``) ``A_merged``."""
    if model_path == "base":
        return f"{model_label(model_id, family)}_base"
    folder = Path(model_path).resolve()
    return folder.name if (folder / RUN_FILE).exists() else f"{folder.parent.name}_{folder.name}"


def results_identity(*, family: str, model_path: str, model_id: str, val_annotations: str, num_frames: int,
                     max_new_tokens: int, load_in_4bit: bool, split: str | None = None) -> dict[str, Any]:
    """What produced a results file: the model and a fingerprint of its weights, the generation
    settings and the test set. Answers resume only under the same identity."""
    weights = resolve_model_path(model_id, family) if model_path == "base" else model_path
    return {
        "family": family, "model_id": model_id,
        "model_path": model_path if model_path == "base" else str(Path(model_path).resolve()),
        "weights": weights_fingerprint(weights),
        "generation": {"decoding": "greedy", "max_new_tokens": max_new_tokens, "num_frames": num_frames,
                       "load_in_4bit": load_in_4bit},
        "test_set": {"file": Path(val_annotations).name, "sha256": file_sha256(val_annotations),
                     # the split actually used: None for a file that names no splits, whatever SPLIT says
                     "split": describe_test_set(val_annotations, split)["split"]},
    }


@torch.inference_mode()
def generate_answers(model, processor, frames_batch: list, questions: list[str],
                     max_new_tokens: int) -> tuple[list[str], list[int]]:
    """Greedy answers for one batch, and how many tokens each one generated before EOS (``max_new_tokens`` = it
    was cut at the limit); decodes only the tokens after each prompt."""
    prompts = [video_prompt(processor, q) for q in questions]
    inputs = processor(text=prompts, videos=frames_batch, padding=True, return_tensors="pt")
    device = next(model.parameters()).device
    inputs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in inputs.items()}
    if "pixel_values_videos" in inputs:
        # model.dtype is the compute dtype, also for 4-bit models whose packed weights are uint8
        inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(model.dtype)
    tokenizer = processor.tokenizer
    output = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    # Left padding puts every prompt's end at the same column, so new tokens start there.
    new_tokens = output[:, inputs["input_ids"].shape[1]:]
    # A row stops at its first EOS (later columns are padding) or runs to the limit.
    is_eos = new_tokens == tokenizer.eos_token_id
    counts = torch.where(is_eos.any(1), is_eos.int().argmax(1), new_tokens.shape[1]).tolist()
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)], counts


def load_eval_model(family: str, model_path: str, model_id: str, load_in_4bit: bool,
                    device: torch.device | None = None):
    """(model, processor) for ``model_path`` = 'base' (the untuned MODEL_ID) or a run directory, placed on
    ``device`` (default: the GPU when there is one) in its compute dtype."""
    device = device or pick_device("auto")
    if model_path == "base":
        path = resolve_model_path(model_id, family)
        return load_model(path, family, bits=4 if load_in_4bit else None, device=device), load_processor(path)
    model = load_run_model(model_path, family, load_in_4bit=load_in_4bit, device=device)
    return model, load_processor(model_path)


def evaluate(*, family: str, model_path: str, model_id: str, val_annotations: str, video_dir: str | None,
             num_frames: int, batch_size: int, max_new_tokens: int, load_in_4bit: bool, results_dir: str,
             settings: dict[str, Any], limit: int | None = None, run: str | None = None,
             split: str | None = None, device: torch.device | None = None, overwrite: bool = False,
             sbert_model: str | None = None) -> Path:
    """Evaluate and score on ``device`` (default: the GPU when there is one); returns the path of
    ``<results_dir>/<run>.metrics.json``. Old answers resume only if the same model, weights, generation
    settings and test set wrote them (``results_identity``); ``overwrite`` discards them first.

    ``split``: only that split of a file that names splits. A record with ``references`` is scored against all
    of them (LEVIR-CC's five captions, converted by ``changechat-to-videos``)."""
    from .annotations import describe_test_set, load_annotations
    from .metrics import compute_metrics_report
    from .results import ResultsWriter, answers_at_token_limit, format_metrics_table, read_jsonl, write_metrics
    from .video import read_video_frames

    if batch_size < 1 or max_new_tokens < 1 or num_frames < 2:
        raise UserError("BATCH_SIZE and MAX_NEW_TOKENS must be >= 1 and NUM_FRAMES >= 2")
    if model_path != "base" and not Path(model_path).is_dir():
        raise UserError(f"MODEL_PATH {model_path} does not exist (give a fine-tuning run directory or 'base')")
    if video_dir is None:
        from .sample_data import SAMPLE_VIDEO_DIR, ensure_sample_media

        ensure_sample_media()
        video_dir = str(SAMPLE_VIDEO_DIR)
    samples = load_annotations(val_annotations, video_dir, limit=limit, split=split)
    run = run or results_run_name(family, model_path, model_id)
    results_path = Path(results_dir) / f"{run}.jsonl"
    if overwrite and remove_results(results_dir, run):
        print(f"OVERWRITE: removed the earlier results of {run} in {results_dir}")
    identity = results_identity(family=family, model_path=model_path, model_id=model_id, val_annotations=val_annotations,
                                num_frames=num_frames, max_new_tokens=max_new_tokens, load_in_4bit=load_in_4bit,
                                split=split)
    check_run_settings(Path(results_dir) / f"{run}.settings.json", identity, results_path, redo="set OVERWRITE=True")
    writer = ResultsWriter(results_path)
    todo = [s for s in samples if s.id not in writer.done_ids]
    started = time.time()
    if todo:
        model, processor = load_eval_model(family, model_path, model_id, load_in_4bit, device)
        model.eval()
        if load_in_4bit:
            print(format_linear_counts(linear_counts(model), 4))
        where = next(model.parameters())
        print(f"generating on {where.device} in {str(model.dtype).removeprefix('torch.')}")
        tokenizer = processor.tokenizer
        # Similar prompt lengths side by side waste little left padding.
        todo.sort(key=lambda s: len(tokenizer(s.question)["input_ids"]))
        print(f"evaluating {run}: {len(todo)} of {len(samples)} samples to go -> {results_path}")
        for start in tqdm(range(0, len(todo), batch_size), desc=f"eval {run}", unit="batch"):
            batch = todo[start:start + batch_size]
            frames = [read_video_frames(s.video, num_frames) for s in batch]
            answers, counts = generate_answers(model, processor, frames, [s.question for s in batch], max_new_tokens)
            writer.append([{"id": s.id, "video": s.video.name, "question": s.question, "true": s.scoring_references(),
                            "generated": a, "new_tokens": n} for s, a, n in zip(batch, answers, counts)])
    else:
        print(f"{run}: all {len(samples)} samples already in {results_path}; scoring only")
    wanted = {s.id for s in samples}
    records = [r for r in read_jsonl(results_path) if r["id"] in wanted]
    report = compute_metrics_report([r["true"] for r in records], [r["generated"] for r in records],
                                    sbert_model=sbert_model)
    metrics_path = write_metrics(results_path.with_suffix(""), records, report, model=f"{model_id} ({model_path})",
                                 settings=settings, seconds=round(time.time() - started, 1),
                                 extra={"family": family, "model_path": model_path, "identity": identity,
                                        "test_set": describe_test_set(val_annotations, split),
                                        **answers_at_token_limit(records, max_new_tokens)})
    print(format_metrics_table(report.metrics, report.missing))
    print(f"metrics: {metrics_path}")
    return metrics_path


def run_evaluation(scope: dict[str, Any], family: str) -> Path:
    """The evaluation scripts' flow, with the constants in ``scope`` (a script's globals())."""
    from .overrides import settings_of

    device = pick_device(scope["DEVICE"])  # before minutes of loading
    return evaluate(family=family, model_path=scope["MODEL_PATH"], model_id=scope["MODEL_ID"],
                    val_annotations=scope["VAL_ANNOTATIONS"], video_dir=scope["VIDEO_DIR"],
                    num_frames=scope["NUM_FRAMES"], batch_size=scope["BATCH_SIZE"],
                    max_new_tokens=scope["MAX_NEW_TOKENS"], load_in_4bit=scope["LOAD_IN_4BIT"],
                    results_dir=scope["RESULTS_DIR"], settings=settings_of(scope), limit=scope["LIMIT"],
                    run=scope["RUN_NAME"], split=scope["SPLIT"], device=device, overwrite=scope["OVERWRITE"],
                    sbert_model=scope["SBERT_MODEL"])
