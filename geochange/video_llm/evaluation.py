"""Batched evaluation of a base or fine-tuned video model, with resume: the steps of ``videollava_test.py`` and
``llavanext_eval.py`` (``check_settings``, ``load_test_samples``, ``open_results``, ``answer_samples``,
``score_results``; ``evaluate`` runs them in one call, for the evaluation after training).

Greedy generation over left-padded batches (prompts sorted by length so little
padding is wasted); only the newly generated tokens are decoded, so no
"Answer:" string surgery is needed. Each finished batch is appended to
``results/<run>.jsonl`` and flushed; a rerun skips the ids already there.

Under ``torchrun`` every process answers its share of the samples on its own device (``geochange.sharding``: the
longest prompts dealt out evenly); rank 0 alone reads and checks the test set, holds the results file, writes every
batch of every process and scores once. A plain ``python`` run is the one shard of one: the same code.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..annotations import Sample, describe_test_set, load_annotations
from ..devices import pick_device
from ..errors import UserError
from ..fileio import file_sha256
from ..locks import WriterLock, lock_for_writing
from ..metrics import compute_metrics_report
from ..results import (ResultsWriter, answers_at_token_limit, check_run_settings, format_metrics_table, read_jsonl,
                       remove_results, write_metrics)
from ..runs import RUN_FILE
from ..sample.data import SAMPLE_VIDEO_DIR, ensure_sample_media
from ..sharding import Shard, answer_in_shards, decided_by_main, shard_device, start_shards, stop_shards
from ..video import read_video_frames
from .families import get_family
from .modeling import (format_linear_counts, linear_counts, load_model, load_processor, model_label,
                       resolve_model_path, video_prompt)
from .weights import load_run_model, weights_fingerprint


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


def model_inputs(model, processor, prompts: list[str], frames_batch: list) -> dict:
    """The processor's tensors for ``prompts`` about the clips of ``frames_batch`` (padded on the left), on the
    model's device, the clips in its compute dtype."""
    inputs = processor(text=prompts, videos=frames_batch, padding=True, return_tensors="pt")
    device = next(model.parameters()).device
    inputs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in inputs.items()}
    if "pixel_values_videos" in inputs:
        # model.dtype is the compute dtype, also for 4-bit models whose packed weights are uint8
        inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(model.dtype)
    return inputs


@torch.inference_mode()
def generate_answers(model, processor, frames_batch: list, questions: list[str],
                     max_new_tokens: int, *, synced_gpus: bool = False) -> tuple[list[str], list[int]]:
    """Greedy answers for one batch, and how many tokens each one generated before EOS (``max_new_tokens`` = it
    was cut at the limit); decodes only the tokens after each prompt. ``synced_gpus``: every process keeps
    stepping until all are done (a model partitioned by ZeRO-3 gathers its weights in every forward pass)."""
    inputs = model_inputs(model, processor, [video_prompt(processor, q) for q in questions], frames_batch)
    tokenizer = processor.tokenizer
    output = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                            synced_gpus=synced_gpus)
    # Left padding puts every prompt's end at the same column, so new tokens start there.
    new_tokens = output[:, inputs["input_ids"].shape[1]:]
    # A row stops at its first EOS (later columns are padding) or runs to the limit.
    is_eos = new_tokens == tokenizer.eos_token_id
    counts = torch.where(is_eos.any(1), is_eos.int().argmax(1), new_tokens.shape[1]).tolist()
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)], counts


def load_eval_model(family: str, model_path: str, model_id: str, load_in_4bit: bool,
                    device: str | torch.device = "auto"):
    """(model, processor) for ``model_path`` = 'base' (the untuned MODEL_ID) or a run directory, placed on
    ``device`` (a ``DEVICE`` name; ``auto`` = the GPU when there is one) in its compute dtype."""
    device = pick_device(str(device))
    if model_path == "base":
        path = resolve_model_path(model_id, family)
        return load_model(path, family, bits=4 if load_in_4bit else None, device=device), load_processor(path)
    model = load_run_model(model_path, family, load_in_4bit=load_in_4bit, device=device)
    return model, load_processor(model_path)


def check_settings(cfg, shard: Shard = Shard()) -> torch.device:
    """Step 1: the settings, and the device to generate on: ``DEVICE``, or under torchrun with ``auto`` this
    process's own GPU (a GPU that is not there stops here, before minutes of loading)."""
    if cfg.BATCH_SIZE < 1 or cfg.MAX_NEW_TOKENS < 1 or cfg.NUM_FRAMES < 2:
        raise UserError("BATCH_SIZE and MAX_NEW_TOKENS must be >= 1 and NUM_FRAMES >= 2")
    if cfg.MODEL_PATH != "base" and not Path(cfg.MODEL_PATH).is_dir():
        raise UserError(f"MODEL_PATH {cfg.MODEL_PATH} does not exist (give a fine-tuning run directory or 'base')")
    return shard_device(shard, cfg.DEVICE)


def load_test_samples(cfg, shard: Shard = Shard()) -> list[Sample]:
    """Step 2: the test pairs, every clip checked (the bundled sample clips drawn on first use). SPLIT: only
    that split of a file that names splits; a record with ``references`` is scored against all of them
    (LEVIR-CC's five captions, converted by ``changechat-to-videos``). Under torchrun rank 0 reads and checks them
    once and hands them to the others."""
    def read() -> list[Sample]:
        if cfg.VIDEO_DIR is None:
            ensure_sample_media()
        return load_annotations(cfg.VAL_ANNOTATIONS, SAMPLE_VIDEO_DIR if cfg.VIDEO_DIR is None else cfg.VIDEO_DIR,
                                limit=cfg.LIMIT, split=cfg.SPLIT, num_frames=cfg.NUM_FRAMES,
                                skip_bad_clips=cfg.SKIP_BAD_CLIPS)

    return decided_by_main(shard, read)


@dataclass
class ResultsFile:
    """The results file being written: its name, what produced it, and its writer; a ``with`` block holds
    its writer lock. Under torchrun only rank 0 holds the lock and the writer (None on the others)."""
    cfg: Any
    family: str
    run: str
    path: Path
    identity: dict[str, Any] | None
    writer: ResultsWriter | None
    lock: WriterLock | None
    shard: Shard = field(default_factory=Shard)
    started: float = field(default_factory=time.time)

    def __enter__(self) -> "ResultsFile":
        return self

    def __exit__(self, *exc) -> None:
        if self.lock is not None:
            self.lock.release()


def results_name(cfg, family: str) -> str:
    """The results file's name: RUN_NAME, or the run directory's (``results_run_name``)."""
    return cfg.RUN_NAME or results_run_name(family, cfg.MODEL_PATH, cfg.MODEL_ID)


def open_results(cfg, family: str, shard: Shard = Shard()) -> ResultsFile:
    """Step 3: ``<RESULTS_DIR>/<run>.jsonl``, written by this process only (a second one stops with one line; under
    torchrun rank 0 is the one writer). Old answers resume only if the same model, weights, generation settings and
    test set wrote them (``results_identity``); OVERWRITE discards them first."""
    run = results_name(cfg, family)
    path = Path(cfg.RESULTS_DIR) / f"{run}.jsonl"
    opened = ResultsFile(cfg, family, run, path, None, None, None, shard)

    def open_on_main() -> None:
        opened.lock = lock_for_writing(path, f"the results file {path}")
        try:
            if cfg.OVERWRITE and remove_results(cfg.RESULTS_DIR, run):
                print(f"OVERWRITE: removed the earlier results of {run} in {cfg.RESULTS_DIR}")
            opened.identity = results_identity(family=family, model_path=cfg.MODEL_PATH, model_id=cfg.MODEL_ID,
                                               val_annotations=cfg.VAL_ANNOTATIONS, num_frames=cfg.NUM_FRAMES,
                                               max_new_tokens=cfg.MAX_NEW_TOKENS, load_in_4bit=cfg.LOAD_IN_4BIT,
                                               split=cfg.SPLIT)
            check_run_settings(Path(cfg.RESULTS_DIR) / f"{run}.settings.json", opened.identity, path,
                               redo="set OVERWRITE=True")
            opened.writer = ResultsWriter(path)
        except BaseException:
            opened.lock.release()
            raise

    decided_by_main(shard, open_on_main)  # a file held by another process, or other settings: every process stops
    return opened


def answer_samples(results: ResultsFile, samples: list[Sample], device: torch.device) -> None:
    """Step 4: greedy answers for the samples not yet in the results file, in left-padded batches of similar
    prompt lengths, each batch appended as it finishes (the model is loaded only if some are missing). Under
    torchrun each process answers its share (the longest prompts dealt out evenly) and rank 0 writes them all."""
    cfg, shard = results.cfg, results.shard
    # what is left to answer, as the one writer read it
    missing = set(decided_by_main(shard, lambda: [s.id for s in samples if s.id not in results.writer.done_ids]))
    todo = [s for s in samples if s.id in missing]
    if not todo:
        if shard.main:
            print(f"{results.run}: all {len(samples)} samples already in {results.path}; scoring only")
        return
    model, processor = load_eval_model(results.family, cfg.MODEL_PATH, cfg.MODEL_ID, cfg.LOAD_IN_4BIT, device)
    model.eval()
    if cfg.LOAD_IN_4BIT and shard.main:
        print(format_linear_counts(linear_counts(model, get_family(results.family).parts), 4))
    where = f"{next(model.parameters()).device} in {str(model.dtype).removeprefix('torch.')}"
    print(f"process {shard.rank} of {shard.world_size}: generating on {where}" if shard.world_size > 1
          else f"generating on {where}")
    if shard.main:
        processes = f" on {shard.world_size} processes" if shard.world_size > 1 else ""
        print(f"evaluating {results.run}: {len(todo)} of {len(samples)} samples to go{processes} -> {results.path}")
    answer_in_batches(shard, todo, model, processor, batch_size=cfg.BATCH_SIZE, num_frames=cfg.NUM_FRAMES,
                      max_new_tokens=cfg.MAX_NEW_TOKENS, write=results.writer.append if shard.main else None,
                      desc=f"eval {results.run}")


def answer_in_batches(shard: Shard, samples: list[Sample], model, processor, *, batch_size: int, num_frames: int,
                      max_new_tokens: int, write: Callable[[list[dict[str, Any]]], None] | None,
                      in_step: bool = False, desc: str = "answering") -> None:
    """Greedy answers to ``samples`` (the same list on every process) as results records (id, video, question,
    true, generated, new_tokens): each process answers its share, long prompts first and dealt out in turn
    (similar lengths side by side waste little left padding, and every process gets as many of the long ones), and
    rank 0 ``write``s every batch of every process. ``in_step``: every process takes part in every generation
    (ZeRO-3), stepping until all are done."""
    tokenizer = processor.tokenizer
    prompt_tokens = {s.id: len(tokenizer(s.question)["input_ids"]) for s in samples}

    def answer(batch: list[Sample]) -> list[dict[str, Any]]:
        frames = [read_video_frames(s.video, num_frames) for s in batch]
        answers, counts = generate_answers(model, processor, frames, [s.question for s in batch], max_new_tokens,
                                           synced_gpus=in_step)
        return [{"id": s.id, "video": s.video.name, "question": s.question, "true": s.scoring_references(),
                 "generated": a, "new_tokens": n} for s, a, n in zip(batch, answers, counts)]

    answer_in_shards(shard, samples, batch_size, answer, write, cost=lambda s: prompt_tokens[s.id], desc=desc,
                     in_step=in_step)


def score_results(results: ResultsFile, samples: list[Sample]) -> Path | None:
    """Step 5: every metric over the samples' answers: ``<run>.metrics.json`` (with the settings and the
    identity) and the per-sample ``<run>.csv``; returns the metrics path (rank 0 scores, once; None elsewhere)."""
    cfg = results.cfg
    if not results.shard.main:
        return None
    wanted = {s.id for s in samples}
    records = [r for r in read_jsonl(results.path) if r["id"] in wanted]
    report = compute_metrics_report([r["true"] for r in records], [r["generated"] for r in records],
                                    sbert_model=cfg.SBERT_MODEL, device=cfg.DEVICE)
    metrics_path = write_metrics(results.path.with_suffix(""), records, report,
                                 model=f"{cfg.MODEL_ID} ({cfg.MODEL_PATH})", settings=cfg.as_dict(),
                                 seconds=round(time.time() - results.started, 1),
                                 extra={"family": results.family, "model_path": cfg.MODEL_PATH,
                                        "identity": results.identity,
                                        "test_set": describe_test_set(cfg.VAL_ANNOTATIONS, cfg.SPLIT),
                                        "bad_clips_skipped": len(getattr(samples, "skipped", [])),
                                        "processes": results.shard.world_size,
                                        **answers_at_token_limit(records, cfg.MAX_NEW_TOKENS)})
    print(format_metrics_table(report.metrics, report.missing))
    print(f"metrics: {metrics_path}")
    return metrics_path


def join_shards(cfg) -> Shard:
    """Under torchrun, this process's place among those sharing the evaluation (a collective waits at most
    DIST_TIMEOUT_MINUTES for the slowest); one shard of one otherwise."""
    return start_shards(cfg.DIST_TIMEOUT_MINUTES)


def evaluate(cfg, family: str) -> Path | None:
    """The evaluation scripts' steps in one call, for the fine-tuning scripts' evaluation after training (under
    torchrun every process answers its share, in the training's process group); returns the path of
    ``<RESULTS_DIR>/<run>.metrics.json`` (on rank 0; None on the others)."""
    shard = join_shards(cfg)
    device = check_settings(cfg, shard)
    samples = load_test_samples(cfg, shard)
    with open_results(cfg, family, shard) as results:
        answer_samples(results, samples, device)
        metrics_path = score_results(results, samples)
    stop_shards(shard)
    return metrics_path
