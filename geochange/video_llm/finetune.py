"""The steps of ``video_finetune.py`` (every video family's fine-tuning), in the order the script calls them.

``check_settings`` (no model yet), ``open_run`` (the run directory: named from the settings, one writer,
resumed only under the same settings), ``load_samples``, ``encode_samples`` (prompts from the processor's
chat template, loss on the answer only), ``prune_base``, ``build_model`` (quantise for QLoRA, then LoRA),
``train`` (resuming from the newest checkpoint), ``save_run``, ``evaluate_run``. A ``FinetuneRun`` carries
the settings, the run directory, the Trainer's arguments and the growing ``run.json`` between them.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import TrainerCallback, set_seed

from ..annotations import Sample, Samples, load_annotations
from ..devices import is_main_process, launched_processes, precision_support, process_device
from ..engines import (DeepSpeedPlan, check_shared_directory, deepspeed_plan, engine_of, one_process_per_gpu,
                       outside_zero3, start_process_group, zero3_enabled)
from ..errors import UserError
from ..locks import LockedOutput, WriterLock, lock_for_writing, lock_path, released_on_error
from ..overrides import script_constants
from ..metrics import METRIC_KEYS, SM, SM_PARTS, compute_metrics_report, meteor_available, with_sm
from ..results import remove_results, write_jsonl, write_metrics
from ..runs import (RESUME_MAY_CHANGE, VALIDATION_DIR, check_resume_processes, data_files, default_run_name,
                    distinct_settings, library_versions, resume_state, settings_record, write_run_file)
from ..sample.data import SAMPLE_VIDEO_DIR, ensure_sample_media
from ..sharding import from_main, start_shards
from ..trainer import (SuiteTrainer, check_training_settings, compute_precision, precision_dtype,
                       train_from_newest_checkpoint, trainer_arguments)
from ..video import clip_size, read_video_frames
from .evaluation import answer_in_batches, evaluate
from .families import ModelParts, get_family
from .memory import GB, Setup, check_fits, estimate, free_memory, host_memory, model_config, parameter_counts
from .modeling import (VideoQACollator, count_parameters, encode_training_example, format_linear_counts,
                       language_model_linear_names, linear_counts, load_model, lora_target_regex, model_label,
                       plan_lengths, resolve_model_path, video_token_count, video_unused_parameter_names)
from .pruning import apply_pruning_masks, measure_sparsity, pruning_masks, validate_prune_settings
from .weights import MERGED_DIR, merge_and_save, pruned_base


# ---------------------------------------------------------------- settings

def training_mode(cfg) -> str:
    """GeoLLaVA's semantics: QLoRA wins over LoRA; neither means full fine-tuning."""
    if cfg.USE_QLORA:
        return "QLORA"
    if cfg.USE_LORA:
        return "LORA"
    return "FULL"


def quant_bits(cfg) -> int | None:
    return (8 if cfg.USE_8BIT else 4) if training_mode(cfg) == "QLORA" else None


def learning_rate(cfg) -> float:
    """LR, or with LR=None the usual rate for the mode: 2e-4 (LoRA/QLoRA) or 2e-5 (full); the tiny
    model's random weights need a larger step to learn anything in a few hundred steps."""
    if cfg.LR is not None:
        return float(cfg.LR)
    if cfg.MODEL_ID == "tiny":
        return 5e-3 if training_mode(cfg) != "FULL" else 1e-3
    return 2e-4 if training_mode(cfg) != "FULL" else 2e-5


@dataclass(frozen=True)
class TrainingPrecision:
    compute: str            # autocast: "bf16", "fp16" (with loss scaling) or "fp32" (none)
    weights: torch.dtype    # the dtype the model's weights are loaded and updated in


def training_precision(cfg, *, cuda: bool, cuda_bf16: bool) -> TrainingPrecision:
    """What ``PRECISION`` means on this machine, per training mode.

    It computes as ``trainer.compute_precision`` says. Full fine-tuning always keeps fp32 weights (the master copy
    the optimiser updates): AdamW's steps at lr 2e-5 are below bf16's resolution for most weights and would round
    away. LoRA trains fp32 adapters beside a frozen base, which is stored in the compute dtype to save memory.
    """
    compute = compute_precision(cfg.PRECISION, cuda=cuda, cuda_bf16=cuda_bf16)
    weights = torch.float32 if training_mode(cfg) == "FULL" else precision_dtype(compute)
    return TrainingPrecision(compute, weights)


def device_precision(cfg) -> TrainingPrecision:
    return training_precision(cfg, **precision_support())


def check_engine(cfg) -> None:
    """The combinations of DEEPSPEED, training mode and pruning that cannot work stop here, in one line, before any
    model loads: QLoRA under ZeRO-3 (its 4/8-bit weights cannot be partitioned), and pruning masks under any ZeRO
    stage with full fine-tuning (the masks would zero the model's weights while DeepSpeed's fp32 master copies,
    which its optimizer updates, keep the pruned values: they come back after the first step)."""
    plan = deepspeed_plan(cfg.DEEPSPEED)
    if plan is None:
        return
    mode = training_mode(cfg)
    if mode == "QLORA" and plan.stage == 3:
        raise UserError(f"USE_QLORA with ZeRO-3 ({cfg.DEEPSPEED}) cannot work: quantised weights are not partitioned; "
                        "use configs/deepspeed/zero2.json, or LoRA (USE_QLORA=False) with ZeRO-3")
    if cfg.PRUNE and mode == "FULL":
        raise UserError(f"PRUNE with full fine-tuning under DeepSpeed ({cfg.DEEPSPEED}, ZeRO-{plan.stage}) cannot keep "
                        "the pruned weights at zero (DeepSpeed's fp32 master weights bring them back after the first "
                        "step); train LoRA on the pruned base (USE_LORA=True), or without DEEPSPEED")


def check_settings(cfg) -> None:
    """Step 1: every check that needs no model; bad settings stop here, before anything is loaded."""
    if cfg.PRUNE:
        validate_prune_settings(cfg.PRUNE_METHOD, cfg.PRUNE_AMOUNT)
    check_engine(cfg)
    check_training_settings(cfg)
    checks = [
        (cfg.LORA_R >= 1, f"LORA_R must be >= 1, not {cfg.LORA_R}"),
        (cfg.LORA_ALPHA > 0, f"LORA_ALPHA must be > 0, not {cfg.LORA_ALPHA}"),
        (0 <= cfg.LORA_DROPOUT < 1, f"LORA_DROPOUT must be in [0, 1), not {cfg.LORA_DROPOUT}"),
        (cfg.EPOCHS > 0, f"EPOCHS must be > 0, not {cfg.EPOCHS}"),
        (cfg.LR is None or cfg.LR > 0, f"LR must be > 0 (or None for the mode's default), not {cfg.LR}"),
        (cfg.NUM_FRAMES >= 2, f"NUM_FRAMES must be >= 2 (a before and an after frame), not {cfg.NUM_FRAMES}"),
        (cfg.MAX_LENGTH >= 16, f"MAX_LENGTH must be >= 16, not {cfg.MAX_LENGTH}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    for name in ("TRAIN_ANNOTATIONS", "VAL_ANNOTATIONS"):
        path = getattr(cfg, name)
        if path is not None and not Path(path).exists():
            raise UserError(f"{name}: annotation file {path} does not exist")
    check_caption_validation(cfg)
    if cfg.USE_8BIT and training_mode(cfg) != "QLORA" and is_main_process():
        print("note: USE_8BIT only applies to QLoRA (USE_QLORA=True); ignored")


BEST_METRICS = (*METRIC_KEYS, SM)


def check_caption_validation(cfg) -> None:
    """BEST_METRIC and VAL_GENERATE_LIMIT: what picking the best checkpoint by captions needs, in one line each."""
    limit, best = cfg.VAL_GENERATE_LIMIT, cfg.BEST_METRIC
    if limit is not None and limit < 1:
        raise UserError(f"VAL_GENERATE_LIMIT must be >= 1 (the first N val pairs captioned at each validation) or "
                        f"None (all of them), not {limit}")
    if best is None:
        return
    if best not in BEST_METRICS:
        raise UserError(f"BEST_METRIC={best!r} is not a caption metric; one of {', '.join(BEST_METRICS)} (sm = the "
                        f"mean of {', '.join(SM_PARTS)}), or None to keep the last checkpoint")
    if not cfg.VAL_ANNOTATIONS or cfg.EVAL_STEPS <= 0:
        raise UserError(f"BEST_METRIC={best} picks the checkpoint by its validation: set VAL_ANNOTATIONS and "
                        f"EVAL_STEPS > 0 (now {cfg.EVAL_STEPS})")
    if cfg.SAVE_STEPS % cfg.EVAL_STEPS:
        raise UserError(f"BEST_METRIC={best} picks among the checkpoints saved at validations: SAVE_STEPS "
                        f"({cfg.SAVE_STEPS}) must be a multiple of EVAL_STEPS ({cfg.EVAL_STEPS})")
    if best in ("meteor", SM) and not meteor_available():
        raise UserError(f"BEST_METRIC={best} needs METEOR, which needs Java (not found); install Java or rank by "
                        "another metric (bleu4, cider, rouge_l...)")


# The scripts whose steps these are (every family's), whose constants are the defaults a run name compares with and
# the evaluation after training reads.
FINETUNE_SCRIPT = "video_finetune.py"
EVALUATION_SCRIPT = "video_evaluate.py"
# What a default run name leaves out of its distinct settings: what GeoLLaVA's scheme already names (model, data,
# mode, rank, length, pruning), and what cannot change the trained weights (where things go, speed, what else runs).
NAME_LEAVES_OUT = ("MODEL", "MODEL_ID", "TRAIN_ANNOTATIONS", "USE_LORA", "USE_QLORA", "USE_8BIT", "LORA_R",
                   "LORA_ALPHA", "EPOCHS", "MAX_STEPS", "PRUNE", "PRUNE_METHOD", "PRUNE_AMOUNT", *RESUME_MAY_CHANGE,
                   "RESULTS_DIR", "VIDEO_DIR", "VAL_ANNOTATIONS", "VAL_SPLIT", "EVAL_STEPS", "SAVE_STEPS",
                   "MERGE_AND_SAVE", "EVAL_AFTER_TRAIN", "MAX_NEW_TOKENS", "MEMORY_CHECK", "GRADIENT_CHECKPOINTING",
                   "DEEPSPEED", "SKIP_BAD_CLIPS")


def run_settings(cfg, family: str) -> dict[str, Any]:
    """The settings that make this run differ from the fine-tuning script's defaults in what it trains, beyond what
    GeoLLaVA's scheme names (``runs.distinct_settings``); what the mode ignores is left out (LoRA's dropout in full
    fine-tuning, FREEZE_VISION under LoRA, PRUNE_VISION without PRUNE, VAL_GENERATE_LIMIT without BEST_METRIC)."""
    ignored = ("LORA_DROPOUT",) if training_mode(cfg) == "FULL" else ("FREEZE_VISION",)
    ignored += () if cfg.PRUNE else ("PRUNE_VISION",)
    ignored += () if cfg.BEST_METRIC else ("VAL_GENERATE_LIMIT",)
    defaults = script_constants(FINETUNE_SCRIPT, MODEL=family).as_dict()
    return distinct_settings(cfg.as_dict(), defaults, NAME_LEAVES_OUT + ignored)


def run_name(cfg, family: str) -> str:
    """RUN_NAME, or by default ``{prune}{pct}{model}_{data}_{LORA|QLORA|FULL}[_{4bit|8bit}][_r{r}_alpha{a}]_{E}epochs``
    (GeoLLaVA's scheme), ending ``_{N}steps`` instead when MAX_STEPS decides the length, then a token for each of
    ``run_settings`` (``_numframes4_lrschedulerlinear``; ``runs.default_run_name``): the script's defaults add
    none."""
    if cfg.RUN_NAME:
        return cfg.RUN_NAME
    mode = training_mode(cfg)
    parts = []
    prefix = f"{cfg.PRUNE_METHOD}{round(cfg.PRUNE_AMOUNT * 100):g}pct-" if cfg.PRUNE else ""
    parts.append(prefix + model_label(cfg.MODEL_ID, family))
    parts.append(Path(cfg.TRAIN_ANNOTATIONS).stem)
    parts.append(mode)
    if mode == "QLORA":
        parts.append(f"{quant_bits(cfg)}bit")
    if mode != "FULL":
        parts.append(f"r{cfg.LORA_R}_alpha{cfg.LORA_ALPHA:g}")
    parts.append(f"{cfg.MAX_STEPS}steps" if cfg.MAX_STEPS > 0 else f"{cfg.EPOCHS:g}epochs")
    return default_run_name("_".join(parts), run_settings(cfg, family))


def prepare_run_dir(cfg, run_dir: Path, *, main: bool = True) -> bool:
    """Whether this is a resume. A finished run, or one written under other settings, is never overwritten
    or mixed with this one: it stops with one line naming the ways out (``runs.resume_state``), unless OVERWRITE.

    With OVERWRITE the main process (``main``) deletes that run and its evaluation results
    (``RESULTS_DIR/<run>.*`` and ``<run>_merged.*``); under torchrun the others call this after it,
    inside ``main_process_first``, and find the directory gone.
    """
    state = resume_state(run_dir, cfg.as_dict(), overwrite=cfg.OVERWRITE)
    if state == "replace" and main and run_dir.exists():
        shutil.rmtree(run_dir)
        removed = remove_results(cfg.RESULTS_DIR, run_dir.name) + remove_results(cfg.RESULTS_DIR, f"{run_dir.name}_{MERGED_DIR}")
        print(f"OVERWRITE: removed the earlier run {run_dir}" + (f" and {len(removed)} results files" if removed else ""))
    return state == "resume"


def check_memory(run: "FinetuneRun") -> None:
    """Step 3: the memory this run needs per device, and under DeepSpeed of host memory per node, estimated from the
    model's config alone (no weight loads), printed, and compared with what the device and the machine have free: too
    much stops here in one line that names the ways out (MEMORY_CHECK=False trains anyway). Recorded in run.json."""
    cfg = run.cfg
    with outside_zero3(run.args):  # a model built on the meta device, not partitioned
        counts = parameter_counts(model_config(run.model_path), run.family, cfg.LORA_R)
    plan = run.plan
    setup = Setup(mode=training_mode(cfg), bits=quant_bits(cfg), freeze_vision=cfg.FREEZE_VISION,
                  zero_stage=plan.stage if plan else None, offload_optimizer=bool(plan and plan.offload_optimizer),
                  offload_params=bool(plan and plan.offload_params), world_size=run.args.world_size,
                  local_processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
                  fused_optimizer="fused" in cfg.OPTIM, batch_size=cfg.BATCH_SIZE, max_length=cfg.MAX_LENGTH,
                  num_frames=cfg.NUM_FRAMES, checkpointing=cfg.GRADIENT_CHECKPOINTING,
                  gpu=run.args.device.type == "cuda")
    need = estimate(counts, setup)
    available, where = free_memory(run.args.device)
    host_available = host_memory()
    engine = f", ZeRO-{plan.stage} over {setup.world_size} processes" if plan else ""
    size = f"{counts.total / 1e9:.2f} B" if counts.total >= 1e8 else f"{counts.total / 1e6:.1f} M"  # tiny: 4.2 M
    what = f"{training_mode(cfg)}{f' {setup.bits}-bit' if setup.bits else ''}{engine}, {size}"
    run.record["memory_estimate"] = {"setup": what, "needed_gb": round(need.total / GB, 2),
                                     "available_gb": round(available / GB, 2), "parts_gb": {
                                         k: round(getattr(need, k) / GB, 2) for k in
                                         ("weights", "gradients", "optimizer", "temporaries", "activations")},
                                     "host_needed_gb_per_node": round(need.host / GB, 2),
                                     "host_available_gb": round(host_available / GB, 2)}
    if run.main:
        host = f"; {host_available / GB:.1f} GB of host memory available" if need.host else ""
        print(f"memory check ({what} parameters): {need.line()}; {available / GB:.1f} GB {where}{host}")
    if cfg.MEMORY_CHECK:
        check_fits(counts, setup, what, (available, where), host_available)


# ---------------------------------------------------------------- data

class VideoQADataset(torch.utils.data.Dataset):
    """Encoded (video, question, answer) examples; lengths are planned up front, videos read lazily."""

    def __init__(self, samples, processor, num_frames: int, max_length: int, *, shorten_answers: bool, name: str):
        self.samples, self.processor, self.num_frames = samples, processor, num_frames
        # a clip's video tokens, asked of the processor at its size (from the clip's header: no frame decoded)
        video_tokens = [video_token_count(processor, num_frames, clip_size(s.video)) for s in samples]
        self.plans = [plan_lengths(processor, s.question, s.answer, n, max_length)
                      for s, n in zip(samples, video_tokens)]
        worst = max(range(len(samples)), key=lambda i: self.plans[i].prompt_tokens)
        if self.plans[worst].prompt_tokens + 1 > max_length:
            raise UserError(
                f"MAX_LENGTH={max_length} cannot hold the prompt of {name} record {samples[worst].id!r}: "
                f"{self.plans[worst].prompt_tokens} tokens, {video_tokens[worst]} of them video tokens "
                f"({num_frames} frames of {'x'.join(map(str, clip_size(samples[worst].video)))}); cutting inside "
                "them would break the video merge. "
                f"Raise MAX_LENGTH to at least {self.plans[worst].prompt_tokens + 32}")
        self.shortened = [s.id for s, p in zip(samples, self.plans) if p.answer_budget < p.answer_tokens]
        if self.shortened and not shorten_answers:
            raise UserError(f"{len(self.shortened)} {name} answers do not fit in MAX_LENGTH={max_length} "
                            f"(e.g. {self.shortened[0]!r}); raise MAX_LENGTH or set SHORTEN_ANSWERS=True")
        self.num_video_tokens = max(video_tokens)  # the most a clip becomes (they differ with its size)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.samples[index]
        frames = read_video_frames(sample.video, self.num_frames)
        return encode_training_example(self.processor, frames, sample.question, sample.answer,
                                       self.plans[index].answer_budget)


# ---------------------------------------------------------------- model

def build_training_model(cfg, base_path: str, family: str):
    """Load the (pruned) base, quantise for QLoRA, wrap LoRA; returns (model, lora_targets).

    Seeds the RNG first, so one SEED gives one LoRA initialisation.
    """
    set_seed(cfg.SEED)
    mode = training_mode(cfg)
    # Each process loads straight onto its own GPU (not all onto the CPU, then moved); under DeepSpeed the engine
    # places (and ZeRO-3 partitions) the weights.
    device = process_device() if torch.cuda.is_available() and cfg.DEEPSPEED is None else None
    model = load_model(base_path, family, bits=quant_bits(cfg), dtype=device_precision(cfg).weights, device=device)
    parts = get_family(family).parts
    if mode == "FULL":
        for name, param in model.named_parameters():
            if cfg.FREEZE_VISION and parts.in_tower(name):  # as in LLaVA's own fine-tuning: the projector trains
                param.requires_grad_(False)
        # What the video path never reaches gets no gradient, and DDP (find_unused_parameters=False)
        # stops at the second step over a trainable parameter without one.
        for name in video_unused_parameter_names(model, family):
            model.get_parameter(name).requires_grad_(False)
        return model, []
    if mode == "QLORA":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.GRADIENT_CHECKPOINTING,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    targets = language_model_linear_names(model, parts)
    lora = LoraConfig(r=cfg.LORA_R, lora_alpha=cfg.LORA_ALPHA, lora_dropout=cfg.LORA_DROPOUT, bias="none",
                      target_modules=lora_target_regex(model, parts))
    return get_peft_model(model, lora), targets


class KeepPruned(TrainerCallback):
    """Zeroes the pruned weights of ``model`` again after every optimiser step (full fine-tuning), by their
    ``masks``."""

    def __init__(self, model, masks: dict[str, torch.Tensor]):
        self.model, self.masks = model, masks

    def on_train_begin(self, args, state, control, **kwargs):
        # Each mask moves to its weight's device once, not every step (6.5 GB host->device per step at 7B).
        params = dict(self.model.named_parameters())
        for name in self.masks:
            self.masks[name] = self.masks[name].to(params[name].device)

    def on_step_end(self, args, state, control, **kwargs):
        apply_pruning_masks(self.model, self.masks)


# ---------------------------------------------------------------- trainer

def training_arguments(cfg, run_dir: Path):
    """The shared builder's arguments, plus this recipe's validation every EVAL_STEPS; with BEST_METRIC the
    Trainer's own best-model mechanism keeps the checkpoint whose captions score best and ends the run with it."""
    has_val = cfg.VAL_ANNOTATIONS is not None and cfg.EVAL_STEPS > 0
    best = {"load_best_model_at_end": True, "metric_for_best_model": cfg.BEST_METRIC,
            "greater_is_better": True} if cfg.BEST_METRIC else {}
    return trainer_arguments(cfg, run_dir, learning_rate=learning_rate(cfg), compute=device_precision(cfg).compute,
                             gradient_checkpointing=cfg.GRADIENT_CHECKPOINTING,
                             per_device_eval_batch_size=cfg.BATCH_SIZE,
                             eval_strategy="steps" if has_val else "no", eval_steps=cfg.EVAL_STEPS if has_val else None,
                             **best)


# ---------------------------------------------------------------- validation by captions

@dataclass
class CaptionValidation:
    """At each validation (with BEST_METRIC), greedy captions for a fixed subset of the val pairs (the first
    VAL_GENERATE_LIMIT; None: all), as the evaluation generates them, scored by every caption metric (plus ``sm``): the Trainer logs them as ``eval_<metric>``
    beside ``eval_loss``, and BEST_METRIC reads them. Each process captions its share (under ZeRO-3 in step), rank 0
    scores and writes ``validation/step<N>.{jsonl,metrics.json,csv}``, every process gets the scores."""
    samples: list[Sample]
    processor: Any
    batch_size: int
    max_new_tokens: int
    num_frames: int
    folder: Path

    def __call__(self, trainer) -> dict[str, float]:
        shard = start_shards()  # the training's process group
        model = trainer.accelerator.unwrap_model(trainer.model)
        was_training = model.training
        model.eval()
        records: list[dict[str, Any]] = []
        try:
            with trainer.accelerator.autocast():  # as training computes (bf16 / fp16 autocast, or none)
                answer_in_batches(shard, self.samples, model, self.processor, batch_size=self.batch_size,
                                  num_frames=self.num_frames, max_new_tokens=self.max_new_tokens,
                                  write=records.extend, in_step=zero3_enabled(), desc="validation captions")
        finally:
            model.train(was_training)
        scores = None
        if shard.main:
            started = time.time()
            with outside_zero3(trainer.args):  # rank 0 alone loads the text-embedding models
                report = compute_metrics_report([r["true"] for r in records], [r["generated"] for r in records],
                                                device=str(trainer.args.device))
            scores = with_sm(report.metrics)
            stem = self.folder / f"step{trainer.state.global_step:06d}"
            stem.parent.mkdir(parents=True, exist_ok=True)
            write_jsonl(stem.parent / f"{stem.name}.jsonl", records)
            write_metrics(stem, records, report, model=f"validation at step {trainer.state.global_step}",
                          settings={"VAL_GENERATE_LIMIT": len(self.samples), "MAX_NEW_TOKENS": self.max_new_tokens},
                          seconds=round(time.time() - started, 2), extra={"step": trainer.state.global_step,
                                                                          "sm": scores.get(SM)})
        return from_main(shard, scores)


def caption_validation(cfg, run_dir: Path, processor, val_set: "VideoQADataset | None") -> CaptionValidation | None:
    """The captioning part of the validation (with BEST_METRIC), or None."""
    if val_set is None or cfg.EVAL_STEPS <= 0 or cfg.BEST_METRIC is None:
        return None
    samples = list(val_set.samples)[:cfg.VAL_GENERATE_LIMIT]  # the same pairs at every validation
    return CaptionValidation(samples, processor, cfg.EVAL_BATCH_SIZE, cfg.MAX_NEW_TOKENS, cfg.NUM_FRAMES,
                             run_dir / VALIDATION_DIR)


class ValidatingTrainer(SuiteTrainer):
    """The suite's Trainer whose validation also captions and scores (``captions``, a ``CaptionValidation``): its
    scores join ``eval_loss`` in the one metrics dict the Trainer logs, hands its callbacks and ranks checkpoints by
    (``metric_for_best_model``)."""

    captions: CaptionValidation | None = None

    def evaluation_loop(self, *args, **kwargs):
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", "eval")
        if self.captions is not None and prefix == "eval":
            output.metrics.update({f"{prefix}_{key}": value for key, value in self.captions(self).items()})
        return output


# ---------------------------------------------------------------- the steps

@dataclass
class FinetuneRun(LockedOutput):
    """What the steps hand on: the settings, the run directory and the Trainer's arguments, and ``record``,
    the ``run.json`` each step adds to. A ``with`` block holds the run directory's writer lock."""
    cfg: Any
    family: str
    run_dir: Path
    args: Any                  # transformers.TrainingArguments
    resuming: bool
    model_path: str            # the base weights (MODEL_ID resolved; the tiny model built on first use)
    video_dir: Path
    lock: WriterLock | None    # held by the main process only: torchrun's ranks of one run are one writer
    plan: DeepSpeedPlan | None = None  # the DEEPSPEED config as read once (None: DDP or one process)
    record: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    @property
    def main(self) -> bool:
        return self.args.process_index == 0

    @property
    def parts(self) -> ModelParts:
        return get_family(self.family).parts


def start_processes(cfg, run_dir: Path) -> tuple[DeepSpeedPlan | None, Any]:
    """This run's processes: the process count checked against a run being resumed, the process group started
    (DDP or DeepSpeed, DIST_TIMEOUT_MINUTES), and the Trainer's arguments; returns the DeepSpeed plan and them."""
    plan = deepspeed_plan(cfg.DEEPSPEED)
    check_resume_processes(run_dir, cfg.as_dict(), launched_processes())
    start_process_group(plan, cfg.DIST_TIMEOUT_MINUTES)
    args = training_arguments(cfg, run_dir)
    note = one_process_per_gpu(args)
    if note and args.process_index == 0:
        print(note)
    return plan, args


def claim_run_dir(cfg, run_dir: Path, args) -> bool:
    """With this process's writer lock taken (rank 0's): every node sees the same directory, and it resumes,
    starts afresh, or is refused (``prepare_run_dir``, on rank 0 first: only it clears a run for OVERWRITE). True:
    it resumes."""
    check_shared_directory(lock_path(run_dir), f"the run directory {run_dir}")
    # local=False: the first process of every other node waits too
    with args.main_process_first(local=False, desc="run directory"):
        return prepare_run_dir(cfg, run_dir, main=args.process_index == 0)


def first_use_inputs(cfg, family: str, args) -> str:
    """The sample clips (VIDEO_DIR=None) and the tiny model (MODEL_ID="tiny"), made on first use by the main
    process while the others wait; returns the base weights' path (MODEL_ID resolved)."""
    # outside ZeRO-3: building the tiny model on the main process alone must not start zero.Init's collectives
    # (the others wait at the barrier: a hang on a fresh clone)
    with args.main_process_first(desc="sample data and tiny model"), outside_zero3(args):
        if cfg.VIDEO_DIR is None:
            ensure_sample_media()
        return resolve_model_path(cfg.MODEL_ID, family)


def open_run(cfg, family: str) -> FinetuneRun:
    """Step 2: the run directory, named from the settings. Only this process writes it (a second one stops
    with one line), a run written under other settings is refused, and an unfinished one resumes. Starts the
    processes first, and makes the sample clips and the tiny model on first use."""
    get_family(family)  # an unknown family stops here
    run_dir = Path(cfg.OUTPUT_DIR) / run_name(cfg, family)
    plan, args = start_processes(cfg, run_dir)
    lock = lock_for_writing(run_dir, f"the run directory {run_dir}") if args.process_index == 0 else None
    with released_on_error(lock):
        resuming = claim_run_dir(cfg, run_dir, args)
        model_path = first_use_inputs(cfg, family, args)
    video_dir = SAMPLE_VIDEO_DIR if cfg.VIDEO_DIR is None else Path(cfg.VIDEO_DIR)
    run = FinetuneRun(cfg, family, run_dir, args, resuming, model_path, video_dir, lock, plan)
    run.record = {
        "completed": False, "family": family, "mode": training_mode(cfg), "quant_bits": quant_bits(cfg),
        "base_model": cfg.MODEL_ID, "base_path": model_path, "learning_rate": learning_rate(cfg),
        **settings_record(cfg, run_settings(cfg, family)), "versions": library_versions(),
        "data": data_files(cfg, ("TRAIN_ANNOTATIONS", "VAL_ANNOTATIONS")),
        "world_size": args.world_size,
    }
    return run


def load_samples(run: FinetuneRun) -> tuple[list[Sample], list[Sample]]:
    """Step 3: the training and validation pairs (every clip checked), and what is about to be trained."""
    cfg = run.cfg
    clips = {"num_frames": cfg.NUM_FRAMES, "skip_bad_clips": cfg.SKIP_BAD_CLIPS}
    train_samples = load_annotations(cfg.TRAIN_ANNOTATIONS, run.video_dir, limit=cfg.TRAIN_LIMIT, split=cfg.TRAIN_SPLIT,
                                     **clips)
    val_samples = (load_annotations(cfg.VAL_ANNOTATIONS, run.video_dir, split=cfg.VAL_SPLIT, **clips)
                   if cfg.VAL_ANNOTATIONS else Samples())
    run.record["bad_clips_skipped"] = {"train": len(train_samples.skipped), "val": len(val_samples.skipped)}
    if run.main:
        bits = quant_bits(cfg)
        what = {"QLORA": f"QLoRA ({bits}-bit{' nf4' if bits == 4 else ''} base, LoRA r={cfg.LORA_R} alpha={cfg.LORA_ALPHA:g})",
                "LORA": f"LoRA r={cfg.LORA_R} alpha={cfg.LORA_ALPHA:g} on the language model",
                "FULL": "every weight (full fine-tuning" + (", vision tower frozen)" if cfg.FREEZE_VISION else ")")}
        pruning = f" after {cfg.PRUNE_METHOD} pruning of {cfg.PRUNE_AMOUNT:.1%}" if cfg.PRUNE else ""
        length = f"{cfg.MAX_STEPS} steps" if cfg.MAX_STEPS > 0 else f"{cfg.EPOCHS:g} epochs"
        print(f"training {what[training_mode(cfg)]}{pruning} of {cfg.MODEL_ID} on {len(train_samples)} pairs "
              f"for {length} at LR {learning_rate(cfg):g} -> {run.run_dir}{' (resuming)' if run.resuming else ''}")
    return train_samples, val_samples


def encode_samples(run: FinetuneRun, processor, train_samples: list[Sample],
                   val_samples: list[Sample]) -> tuple[VideoQADataset, VideoQADataset | None]:
    """Step 4: the examples as the model sees them: lengths planned up front (never cut inside the video
    tokens; answers that do not fit shortened and counted), clips read lazily."""
    cfg = run.cfg
    train_set = VideoQADataset(train_samples, processor, cfg.NUM_FRAMES, cfg.MAX_LENGTH,
                               shorten_answers=cfg.SHORTEN_ANSWERS, name="train")
    val_set = (VideoQADataset(val_samples, processor, cfg.NUM_FRAMES, cfg.MAX_LENGTH,
                              shorten_answers=cfg.SHORTEN_ANSWERS, name="val") if val_samples else None)
    if run.main and train_set.shortened:
        print(f"note: {len(train_set.shortened)} of {len(train_set)} training answers shortened to fit "
              f"MAX_LENGTH={cfg.MAX_LENGTH}")
    run.record.update({"num_train": len(train_set), "num_val": len(val_samples),
                       "answers_shortened": len(train_set.shortened),
                       "video_tokens_per_clip": train_set.num_video_tokens})
    return train_set, val_set


def prune_base(run: FinetuneRun) -> str:
    """Step 5: with PRUNE, the full-precision weights pruned and saved once (before any quantisation);
    returns the weights to train on."""
    sparsity: dict[str, float] = {}
    base_path = run.model_path
    if run.cfg.PRUNE:
        # Every process asks for it: the first on each filesystem prunes (one load of the whole model, outside
        # ZeRO-3), the others wait on its lock rather than at a barrier, so a first prune of a 7B model on the CPU
        # cannot time the process group out; a node whose checkpoints/ is its own prunes its own copy.
        with outside_zero3(run.args):
            base_path, sparsity = pruned_base(run.model_path, run.family, run.cfg)
        if run.main:
            print("measured sparsity: " + ", ".join(f"{k} {v:.2%}" for k, v in sparsity.items()))
    run.record["sparsity"] = sparsity
    return base_path


def build_model(run: FinetuneRun, base_path: str):
    """Step 6: the model to train (quantised for QLoRA, LoRA on every Linear of the language model, or all
    of it for full fine-tuning); prints and records what trains in which precision."""
    cfg = run.cfg
    model, lora_targets = build_training_model(cfg, base_path, run.family)
    trainable, total = count_parameters(model)
    quantised = linear_counts(model, run.parts) if quant_bits(cfg) else {}
    precision = device_precision(cfg)
    if run.main:
        print(f"precision: {precision.compute} compute, {str(precision.weights).removeprefix('torch.')} weights")
        if quantised:
            print(format_linear_counts(quantised, quant_bits(cfg)))
        if lora_targets:
            kinds = sorted({name.rsplit('.', 1)[-1] for name in lora_targets})
            print(f"LoRA targets: {len(lora_targets)} Linear layers of the language model ({', '.join(kinds)})")
        print(f"trainable parameters: {trainable:,} of {total:,} ({trainable / total:.2%})")
    run.record.update({"lora_targets": lora_targets, "trainable_parameters": trainable, "total_parameters": total,
                       "quantised_linears": quantised,
                       "precision": {"compute": precision.compute, "weights": str(precision.weights)}})
    return model


def train(run: FinetuneRun, model, processor, train_set: VideoQADataset, val_set: VideoQADataset | None):
    """Step 7: run.json written (not yet completed), then the transformers Trainer, resuming from the run
    directory's newest checkpoint; returns the Trainer."""
    cfg = run.cfg
    callbacks = []
    if cfg.PRUNE and training_mode(cfg) == "FULL":  # keep the pruned weights at zero through training
        callbacks.append(KeepPruned(model, pruning_masks(model, run.parts, include_vision=cfg.PRUNE_VISION)))
    run.run_dir.mkdir(parents=True, exist_ok=True)
    if run.main:
        write_run_file(run.run_dir, run.record)
    trainer = ValidatingTrainer(model=model, args=run.args, train_dataset=train_set, eval_dataset=val_set,
                                data_collator=VideoQACollator(processor.tokenizer.pad_token_id), callbacks=callbacks)
    trainer.captions = caption_validation(cfg, run.run_dir, processor, val_set)
    run.record["resumed_from"] = train_from_newest_checkpoint(trainer, run.run_dir)
    return trainer


def save_run(run: FinetuneRun, trainer, processor) -> None:
    """Step 8: the adapter (or full weights), the processor and the completed run.json (curves, time,
    sparsity after training, the engine); with MERGE_AND_SAVE merged weights in ``<run>/merged``, by rank 0 after the
    other processes have left (they do not wait for it in a collective)."""
    cfg = run.cfg
    trainer.save_model(str(run.run_dir))
    engine = engine_of(trainer)  # every process: it gathers their peak host memory
    if run.main:
        processor.save_pretrained(run.run_dir)
        history = trainer.state.log_history
        full_pruned = cfg.PRUNE and training_mode(cfg) == "FULL"
        run.record.update({
            "completed": True, "seconds": round(time.time() - run.started, 1), "global_step": trainer.state.global_step,
            "loss_curve": [{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h],
            "eval_loss_curve": [{"step": h["step"], "eval_loss": h["eval_loss"]} for h in history if "eval_loss" in h],
            "caption_curve": caption_curve(history),
            "best_checkpoint": best_checkpoint(cfg, trainer.state),
            # Full fine-tuning: the trained weights; LoRA leaves the base untouched (see sparsity_after_merging).
            "sparsity_after_training": measure_sparsity(trainer.model, run.parts, cfg.PRUNE_VISION) if full_pruned else None,
            "engine": engine,
        })
        write_run_file(run.run_dir, run.record)
        curve = run.record["loss_curve"]
        if curve:
            print(f"loss {curve[0]['loss']:.3f} -> {curve[-1]['loss']:.3f} over {trainer.state.global_step} steps")
        best = run.record["best_checkpoint"]
        if best:
            print(f"best {best['metric']} {best['value']:.4f} at step {best['step']} ({best['checkpoint']}): the run "
                  f"ends with its weights")
    if run.args.world_size > 1:
        torch.distributed.barrier()  # the run is saved whole before any process goes on (or leaves)
    if run.main and cfg.MERGE_AND_SAVE and training_mode(cfg) != "FULL":
        with outside_zero3(run.args):  # rank 0 alone loads the base and the adapter
            merge_and_save(run.run_dir, run.family)


def caption_curve(history: list[dict]) -> list[dict[str, float]]:
    """Every validation's caption scores (``eval_<metric>`` in the Trainer's log), by step."""
    keys = [key for key in BEST_METRICS]
    return [{"step": h["step"], **{key: h[f"eval_{key}"] for key in keys if f"eval_{key}" in h}}
            for h in history if any(f"eval_{key}" in h for key in keys)]


def best_checkpoint(cfg, state) -> dict[str, Any] | None:
    """The checkpoint BEST_METRIC chose (the Trainer's record of it), for run.json; None without BEST_METRIC."""
    if not cfg.BEST_METRIC or state.best_model_checkpoint is None:
        return None
    return {"metric": cfg.BEST_METRIC, "value": state.best_metric, "step": state.best_global_step,
            "checkpoint": Path(state.best_model_checkpoint).name}


def evaluation_settings(run: FinetuneRun):
    """The evaluation script's own constants (as ``python video_evaluate.py MODEL=<family> MODEL_PATH=<run>`` reads
    them), with this run's model, validation set and clips, on the device it trained on."""
    cfg = run.cfg
    return script_constants(EVALUATION_SCRIPT, MODEL=run.family, MODEL_ID=cfg.MODEL_ID, MODEL_PATH=str(run.run_dir),
                            VAL_ANNOTATIONS=cfg.VAL_ANNOTATIONS, SPLIT=cfg.VAL_SPLIT, VIDEO_DIR=cfg.VIDEO_DIR,
                            NUM_FRAMES=cfg.NUM_FRAMES, SKIP_BAD_CLIPS=cfg.SKIP_BAD_CLIPS,
                            BATCH_SIZE=cfg.EVAL_BATCH_SIZE,
                            MAX_NEW_TOKENS=cfg.MAX_NEW_TOKENS, DEVICE=str(run.args.device),
                            RESULTS_DIR=cfg.RESULTS_DIR)


def evaluate_run(run: FinetuneRun) -> Path | None:
    """Step 9: with EVAL_AFTER_TRAIN, the run evaluated on VAL_ANNOTATIONS as the evaluation script would with
    MODEL_PATH=<run>: under torchrun every process answers its share on the accelerator it trained on, rank 0 writes
    and scores; the metrics path (on rank 0)."""
    cfg = run.cfg
    if not (cfg.EVAL_AFTER_TRAIN and cfg.VAL_ANNOTATIONS):
        return None
    with outside_zero3(run.args):  # each process loads the whole trained model, not a ZeRO-3 partition of it
        return evaluate(evaluation_settings(run), run.family)
