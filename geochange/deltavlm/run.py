"""The steps of ``deltavlm_predict.py``: load, then answer one pair, chat, or score a ChangeChat file."""
from __future__ import annotations

import csv
import time
from pathlib import Path

import torch

from ..annotations import describe_test_set, load_changechat
from ..devices import is_distributed_launch
from ..errors import UserError
from ..locks import lock_for_writing
from ..metrics import MetricsReport
from ..overrides import load_settings
from ..paths import ANNOTATIONS_DIR
from ..results import format_metrics_table, read_jsonl, write_metrics
from ..runs import RUN_FILE, read_run_file
from ..sample.data import SAMPLE_CHANGECHAT_ROOT, ensure_sample_media
from ..sharding import Shard, decided_by_main, shard_device, start_shards
from .loading import load_deltavlm
from .predictor import Decoding, Predictor, Prompting, answer_items, generation_settings, items_of
from .scoring import score_records
from .tiny import ensure_tiny_deltavlm

PAPER_RESULTS = ANNOTATIONS_DIR / "deltavlm_paper_results.csv"
PAPER_COLUMNS = ("bleu1", "bleu4", "meteor", "rouge_l", "cider")


def sources(cfg) -> dict[str, str]:
    """Where the four parts come from; CHECKPOINT='tiny' builds and points at the tiny twin."""
    if cfg.CHECKPOINT == "tiny":
        tiny = ensure_tiny_deltavlm()
        return {"checkpoint": str(tiny.checkpoint), "base": str(tiny.base), "llm": str(tiny.llm),
                "bert": str(tiny.bert)}
    record = training_run_record(cfg.CHECKPOINT)
    if record is not None:
        trained = {key: record["sources"][key] for key in ("base", "llm", "bert")}
        print(f"CHECKPOINT is a deltavlm_finetune.py run's: its base, LLM and tokenizer are the run's "
              f"({trained['base']}, {trained['llm']}, {trained['bert']})")
        differing = [f"{name}={record['settings'][name]}" for name in ("USE_CSRM", "TRAINING_TURN_FORMAT")
                     if name in record["settings"] and record["settings"][name] != getattr(cfg, name)]
        if differing:
            print(f"note: the run trained with {', '.join(differing)}; set the same here for answers as in training")
        return {"checkpoint": cfg.CHECKPOINT, **trained}
    return {"checkpoint": cfg.CHECKPOINT, "base": cfg.VISION_QFORMER_BASE, "llm": cfg.LLM_MODEL,
            "bert": cfg.BERT_MODEL}


def training_run_record(checkpoint: str) -> dict | None:
    """The run.json of the deltavlm_finetune.py run that wrote ``checkpoint`` (beside it), if any."""
    path = Path(checkpoint).expanduser()
    folder = path if path.is_dir() else path.parent
    record = read_run_file(folder) if (folder / RUN_FILE).is_file() else None
    return record if record and "sources" in record else None


def load_predictor(cfg, shard: Shard = Shard()) -> Predictor:
    """The model and its settings from the script's settings ``cfg``, on ``DEVICE`` (under torchrun with ``auto``,
    this process's own GPU); prints the load report (rank 0)."""
    decoding = Decoding(cfg.NUM_BEAMS, cfg.MAX_NEW_TOKENS, cfg.MIN_NEW_TOKENS, cfg.REPETITION_PENALTY,
                        cfg.LENGTH_PENALTY)
    decoding.check()  # before minutes of loading
    device = shard_device(shard, cfg.DEVICE)
    if cfg.CHECKPOINT == "tiny" and device.type == "cpu":
        torch.set_num_threads(1)  # the tiny twin gains nothing from threads, and loses a lot on a busy CPU
    where = sources(cfg)
    started = time.time()
    model, tokenizers, report = load_deltavlm(where["checkpoint"], base=where["base"], llm_model=where["llm"],
                                              bert_model=where["bert"], device=device,
                                              load_in_8bit=cfg.LOAD_IN_8BIT, use_csrm=cfg.USE_CSRM)
    if shard.main:
        for line in report.lines():
            print(line)
        print(f"image tokens: {'CSRM (released generate)' if cfg.USE_CSRM else 'plain concat (released training)'}; "
              f"loaded on {device} in {time.time() - started:.1f} s")
    elif shard.world_size > 1:
        print(f"process {shard.rank} of {shard.world_size}: loaded on {device}")
    return Predictor(model, tokenizers, device, decoding,
                     Prompting(cfg.NORMALISE_PROMPT, cfg.TRAINING_TURN_FORMAT))


def load_checked_settings(scope: dict):
    """Step 1: the script's settings (``overrides.load_settings`` over the constants in ``scope``), with what it is
    asked to do checked before anything loads: under torchrun a batch (TEST_ANNOTATIONS), which the processes share;
    one pair needs both images or neither (a bundled sample pair)."""
    cfg = load_settings(scope)
    if is_distributed_launch() and not cfg.TEST_ANNOTATIONS:
        raise UserError("under torchrun deltavlm_predict.py shares a batch (TEST_ANNOTATIONS) among the processes; "
                        "one pair or a chat runs as one process: python deltavlm_predict.py ...")
    if not cfg.TEST_ANNOTATIONS and (cfg.IMAGE_A is None) != (cfg.IMAGE_B is None):
        raise UserError("set both IMAGE_A and IMAGE_B (or neither, for a bundled sample pair)")
    return cfg


def pair_paths(image_a: str | None, image_b: str | None) -> tuple[Path, Path]:
    """IMAGE_A / IMAGE_B (both set, or neither: ``load_checked_settings``), or a bundled sample pair (drawn on first
    use) when neither is set."""
    if image_a is not None:
        return Path(image_a), Path(image_b)
    ensure_sample_media()
    # val_00002 has a change (a new building), a better demo than the unchanged first pairs.
    names = sorted(p.name for p in (SAMPLE_CHANGECHAT_ROOT / "A").glob("*.png"))
    chosen = "val_00002.png" if "val_00002.png" in names else (names[0] if names else None)
    if chosen is None:
        raise UserError(f"no sample images in {SAMPLE_CHANGECHAT_ROOT}; run: python common.py sample-data")
    return SAMPLE_CHANGECHAT_ROOT / "A" / chosen, SAMPLE_CHANGECHAT_ROOT / "B" / chosen


def batch_items(annotations: str, image_root: str | None, limit: int | None, split: str | None = None,
                shard: Shard = Shard()) -> list:
    """Every turn of a ChangeChat file (its images checked); the bundled sample's images are drawn if needed.

    ``split``: only that split's entries of a file that names splits (LEVIR-CC's ``LevirCCcaptions.json``). Under
    torchrun rank 0 reads and checks the file once and hands the items to the others."""
    def read() -> list:
        root = image_root
        if root is None and Path(annotations).resolve().parent == ANNOTATIONS_DIR.resolve():
            ensure_sample_media()
            root = SAMPLE_CHANGECHAT_ROOT
        items = items_of(load_changechat(annotations, root, limit=limit, split=split))
        if not items:
            raise UserError(f"{annotations}: no records to answer")
        return items

    return decided_by_main(shard, read)


def join_shards(cfg) -> Shard:
    """Under torchrun, this process's place among those sharing a batch (a collective waits at most
    DIST_TIMEOUT_MINUTES for the slowest); one shard of one otherwise. One pair or a chat is one process's job."""
    return start_shards(cfg.DIST_TIMEOUT_MINUTES)


def run_name(cfg) -> str:
    if cfg.RUN_NAME:
        return cfg.RUN_NAME
    label = "deltavlm-tiny" if cfg.CHECKPOINT == "tiny" else "deltavlm"
    # One file may hold several splits (LevirCCcaptions.json): each split's answers get their own results file.
    split = describe_test_set(cfg.TEST_ANNOTATIONS, cfg.SPLIT)["split"]
    suffix = f"_{split}" if split else ""
    return f"{label}{'' if cfg.USE_CSRM else '-nocsrm'}_{Path(cfg.TEST_ANNOTATIONS).stem}{suffix}"


def paper_results() -> list[dict[str, str]]:
    if not PAPER_RESULTS.exists():
        return []
    with open(PAPER_RESULTS, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def print_scores(scores: dict) -> None:
    for task, result in scores.items():
        print(f"\n{task}: {result.samples} answers" + (f" ({result.skipped} references unparsable, skipped)"
                                                    if result.skipped else ""))
        if result.metrics or result.missing:
            print(format_metrics_table(result.metrics, result.missing))
    if "caption" in scores:
        ours = scores["caption"].metrics
        print("\ncaptions beside the published DeltaVLM numbers (LEVIR-CC / ChangeChat test, 5 references):")
        width = 48
        print(f"{'':<{width}}" + "".join(f"{c:>9}" for c in PAPER_COLUMNS))
        for row in paper_results():
            label = f"{row['model']} {row['variant']}"[:width]
            print(f"{label:<{width}}" + "".join(f"{float(row[c]):>9.3f}" for c in PAPER_COLUMNS))
        print(f"{'this run':<{width}}" + "".join(f"{ours[c]:>9.3f}" if c in ours else f"{'-':>9}"
                                                  for c in PAPER_COLUMNS))


def run_batch(predictor: Predictor, items: list, cfg, shard: Shard = Shard()) -> Path | None:
    """Answer ``items`` (resuming), score per task, write the metrics; returns their path (None but on rank 0).
    Only this process writes the results file (a second one stops with one line); under torchrun every process
    answers its share and rank 0 writes them all, then scores once."""
    stem = Path(cfg.RESULTS_DIR) / run_name(cfg)
    results_path = stem.parent / f"{stem.name}.jsonl"
    held: list = []  # the writer lock, on rank 0; held by another process, it stops every process
    decided_by_main(shard, lambda: held.append(lock_for_writing(results_path, f"the results file {results_path}")))
    try:
        started = time.time()
        answer_items(predictor, items, results_path, cfg.BATCH_SIZE,
                     generation_settings(predictor.decoding, predictor.prompting, checkpoint=cfg.CHECKPOINT,
                                         use_csrm=cfg.USE_CSRM, load_in_8bit=cfg.LOAD_IN_8BIT), shard)
        if not shard.main:
            return None
        wanted = {item.id for item in items}
        records = [r for r in read_jsonl(results_path) if r["id"] in wanted]
        scores = score_records(records, device=cfg.DEVICE)
        # One metrics file for the run: "<task>/<metric>" keys.
        report = MetricsReport(metrics={f"{task}/{k}": v for task, r in scores.items() for k, v in r.metrics.items()},
                               missing={f"{task}/{k}": v for task, r in scores.items() for k, v in r.missing.items()},
                               models={k: v for r in scores.values() for k, v in r.models.items()},
                               fallbacks={k: v for r in scores.values() for k, v in r.fallbacks.items()},
                               coco_tokenizer=next((r.coco_tokenizer for r in scores.values() if r.coco_tokenizer), ""),
                               device=next((r.device for r in scores.values() if r.device), ""))
        extra = {"tasks": {task: {"samples": r.samples, "skipped": r.skipped} for task, r in scores.items()},
                 "paper_results": paper_results(), "test_set": describe_test_set(cfg.TEST_ANNOTATIONS, cfg.SPLIT),
                 "processes": shard.world_size}
        path = write_metrics(stem, records, report, model=f"DeltaVLM ({cfg.CHECKPOINT})", settings=cfg.as_dict(),
                             seconds=round(time.time() - started, 2), extra=extra)
    finally:
        for lock in held:
            lock.release()
    print_scores(scores)
    print(f"\nanswers: {results_path}\nmetrics: {path}")
    return path
