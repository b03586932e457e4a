"""The fine-tuning recipe shared by ``videollava_finetune.py`` and ``llavanext_finetune.py``.

``run_finetune`` reads like the method section: check settings and data, name
the run directory, load the processor and data, build the model (prune the
full-precision weights, then quantise for QLoRA, then LoRA), train with the
transformers Trainer (resuming from the newest checkpoint), save, evaluate.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from .errors import UserError
from .evaluation import evaluate
from .fileio import file_sha256
from .modeling import (VideoQACollator, count_parameters, encode_training_example, format_linear_counts, get_family,
                       language_model_linear_names, linear_counts, load_model, load_processor, lora_target_regex,
                       model_label, plan_lengths, resolve_model_path, video_token_count, video_unused_parameter_names)
from .pruning import apply_pruning_masks, measure_sparsity, pruning_masks, validate_prune_settings
from .results import remove_results
from .runs import MERGED_DIR, library_versions, merge_and_save, pruned_base, read_run_file, write_run_file

# Extra transformers TrainerCallbacks for every run (monitoring; the tests use one to simulate a crash).
EXTRA_CALLBACKS: list = []


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


PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class TrainingPrecision:
    compute: str            # autocast: "bf16", "fp16" (with loss scaling) or "fp32" (none)
    weights: torch.dtype    # the dtype the model's weights are loaded and updated in


def training_precision(cfg, *, cuda: bool, cuda_bf16: bool) -> TrainingPrecision:
    """What ``PRECISION`` means on this machine, per training mode.

    "auto" computes in bf16 on GPUs that have it, fp16 on older GPUs, fp32 on the CPU. Full
    fine-tuning always keeps fp32 weights (the master copy the optimiser updates): AdamW's steps at
    lr 2e-5 are below bf16's resolution for most weights and would round away. LoRA trains fp32
    adapters beside a frozen base, which is stored in the compute dtype to save memory.
    """
    if cfg.PRECISION == "auto":
        compute = ("bf16" if cuda_bf16 else "fp16") if cuda else "fp32"
    else:
        compute = cfg.PRECISION
    if compute == "fp16" and not cuda:
        raise UserError("PRECISION='fp16' needs a CUDA GPU (fp16 autocast with loss scaling); use bf16 or fp32")
    if compute == "bf16" and cuda and not cuda_bf16:
        raise UserError("PRECISION='bf16' but this GPU has no bf16 support; use fp16 or auto")
    weights = torch.float32 if training_mode(cfg) == "FULL" else _DTYPES[compute]
    return TrainingPrecision(compute, weights)


def device_precision(cfg) -> TrainingPrecision:
    cuda = torch.cuda.is_available()
    return training_precision(cfg, cuda=cuda, cuda_bf16=cuda and torch.cuda.is_bf16_supported())


def deepspeed_stage(cfg) -> int | None:
    """The ZeRO stage of the DEEPSPEED config file (None without one)."""
    if cfg.DEEPSPEED is None:
        return None
    try:
        config = json.loads(Path(cfg.DEEPSPEED).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"DEEPSPEED: cannot read the config {cfg.DEEPSPEED} ({exc})") from None
    return int(config.get("zero_optimization", {}).get("stage", 0))


def validate_settings(cfg) -> None:
    """Every check that needs no model: bad settings stop here, before anything is loaded."""
    if cfg.PRUNE:
        validate_prune_settings(cfg.PRUNE_METHOD, cfg.PRUNE_AMOUNT)
        if training_mode(cfg) == "FULL" and deepspeed_stage(cfg) == 3:
            raise UserError("PRUNE with full fine-tuning cannot keep its pruning masks under ZeRO stage 3 "
                            "(the weights are sharded); use stage 2 or LoRA")
    if cfg.PRECISION not in PRECISIONS:
        raise UserError(f"PRECISION must be one of {', '.join(PRECISIONS)}, not {cfg.PRECISION!r}")
    checks = [
        (cfg.LORA_R >= 1, f"LORA_R must be >= 1, not {cfg.LORA_R}"),
        (cfg.LORA_ALPHA > 0, f"LORA_ALPHA must be > 0, not {cfg.LORA_ALPHA}"),
        (0 <= cfg.LORA_DROPOUT < 1, f"LORA_DROPOUT must be in [0, 1), not {cfg.LORA_DROPOUT}"),
        (cfg.BATCH_SIZE >= 1, f"BATCH_SIZE must be >= 1, not {cfg.BATCH_SIZE}"),
        (cfg.GRAD_ACCUM >= 1, f"GRAD_ACCUM must be >= 1, not {cfg.GRAD_ACCUM}"),
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


def run_name(cfg, family: str) -> str:
    """``{prune}{pct}{model}_{data}_{LORA|QLORA|FULL}[_{4bit|8bit}][_r{r}_alpha{a}]_{epochs}epochs`` (GeoLLaVA's scheme)."""
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
    parts.append(f"{cfg.EPOCHS:g}epochs")
    return "_".join(parts)


def prepare_run_dir(cfg, family: str, *, main: bool = True) -> tuple[Path, bool]:
    """The run directory and whether this is a resume. A finished run is never overwritten unless OVERWRITE.

    With OVERWRITE the main process (``main``) deletes the finished run and its evaluation results
    (``RESULTS_DIR/<run>.*`` and ``<run>_merged.*``); under torchrun the others call this after it,
    inside ``main_process_first``, and find the directory gone.
    """
    run_dir = Path(cfg.OUTPUT_DIR) / run_name(cfg, family)
    finished = (read_run_file(run_dir) or {}).get("completed")
    if finished and not cfg.OVERWRITE:
        raise UserError(f"{run_dir} already holds a finished run; set OVERWRITE=True to train it again "
                        f"or change a setting (the directory name follows the settings)")
    if finished and cfg.OVERWRITE and main:
        shutil.rmtree(run_dir)
        removed = remove_results(cfg.RESULTS_DIR, run_dir.name) + remove_results(cfg.RESULTS_DIR, f"{run_dir.name}_{MERGED_DIR}")
        print(f"OVERWRITE: removed the finished run {run_dir}" + (f" and {len(removed)} results files" if removed else ""))
    resuming = run_dir.exists() and any(run_dir.glob("checkpoint-*"))
    return run_dir, resuming


# ---------------------------------------------------------------- data

class VideoQADataset(torch.utils.data.Dataset):
    """Encoded (video, question, answer) examples; lengths are planned up front, videos read lazily."""

    def __init__(self, samples, processor, num_frames: int, max_length: int, *, shorten_answers: bool, name: str):
        from .video import read_video_frames  # noqa: F401  (fail early if video IO is unavailable)

        self.samples, self.processor, self.num_frames = samples, processor, num_frames
        num_video_tokens = video_token_count(processor, num_frames)
        self.plans = [plan_lengths(processor, s.question, s.answer, num_video_tokens, max_length) for s in samples]
        worst = max(range(len(samples)), key=lambda i: self.plans[i].prompt_tokens)
        if self.plans[worst].prompt_tokens + 1 > max_length:
            raise UserError(
                f"MAX_LENGTH={max_length} cannot hold the prompt of {name} record {samples[worst].id!r}: "
                f"{self.plans[worst].prompt_tokens} tokens, {num_video_tokens} of them video tokens "
                f"({num_frames} frames); cutting inside them would break the video merge. "
                f"Raise MAX_LENGTH to at least {self.plans[worst].prompt_tokens + 32}")
        self.shortened = [s.id for s, p in zip(samples, self.plans) if p.answer_budget < p.answer_tokens]
        if self.shortened and not shorten_answers:
            raise UserError(f"{len(self.shortened)} {name} answers do not fit in MAX_LENGTH={max_length} "
                            f"(e.g. {self.shortened[0]!r}); raise MAX_LENGTH or set SHORTEN_ANSWERS=True")
        self.num_video_tokens = num_video_tokens

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        from .video import read_video_frames

        sample = self.samples[index]
        frames = read_video_frames(sample.video, self.num_frames)
        return encode_training_example(self.processor, frames, sample.question, sample.answer,
                                       self.plans[index].answer_budget)


# ---------------------------------------------------------------- model

def build_training_model(cfg, base_path: str, family: str):
    """Load the (pruned) base, quantise for QLoRA, wrap LoRA; returns (model, lora_targets).

    Seeds the RNG first, so one SEED gives one LoRA initialisation.
    """
    from transformers import set_seed

    set_seed(cfg.SEED)
    mode = training_mode(cfg)
    model = load_model(base_path, family, bits=quant_bits(cfg), dtype=device_precision(cfg).weights)
    if mode == "FULL":
        for name, param in model.named_parameters():
            tower = any(part.endswith("_tower") for part in name.split("."))
            if cfg.FREEZE_VISION and tower:  # as in LLaVA's own fine-tuning: the projector still trains
                param.requires_grad_(False)
        # What the video path never reaches gets no gradient, and DDP (find_unused_parameters=False)
        # stops at the second step over a trainable parameter without one.
        for name in video_unused_parameter_names(model):
            model.get_parameter(name).requires_grad_(False)
        return model, []
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if mode == "QLORA":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.GRADIENT_CHECKPOINTING,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    targets = language_model_linear_names(model)
    lora = LoraConfig(r=cfg.LORA_R, lora_alpha=cfg.LORA_ALPHA, lora_dropout=cfg.LORA_DROPOUT, bias="none",
                      target_modules=lora_target_regex(model))
    return get_peft_model(model, lora), targets


def pruning_mask_callback(model, masks: dict[str, torch.Tensor]):
    """A TrainerCallback that zeroes the pruned weights again after every optimiser step (full fine-tuning)."""
    from transformers import TrainerCallback

    class KeepPruned(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            apply_pruning_masks(model, masks)

    return KeepPruned()


# ---------------------------------------------------------------- trainer

def data_loader_workers(num_workers: int | None, cuda: bool) -> int:
    """NUM_WORKERS, or when None: 0 on a CPU (the loader would compete with training for the same cores), else the
    cores this process may use, shared among the processes of this node, one left for the training loop, at most 8.
    Decoding a clip takes tens of ms even at 512 px, and a GPU step at batch 4 eats clips faster than one core reads."""
    if num_workers is not None:
        if num_workers < 0:
            raise UserError(f"NUM_WORKERS must be >= 0 or None (the machine's cores on a GPU), not {num_workers}")
        return num_workers
    if not cuda:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(8, per_process - 1))


def training_arguments(cfg, run_dir: Path):
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()
    precision = device_precision(cfg)
    has_val = cfg.VAL_ANNOTATIONS is not None and cfg.EVAL_STEPS > 0
    # transformers 5 takes the TensorBoard folder from the environment only.
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")
    return TrainingArguments(
        output_dir=str(run_dir),
        per_device_train_batch_size=cfg.BATCH_SIZE,
        per_device_eval_batch_size=cfg.BATCH_SIZE,
        gradient_accumulation_steps=cfg.GRAD_ACCUM,
        num_train_epochs=cfg.EPOCHS,
        max_steps=cfg.MAX_STEPS,
        learning_rate=learning_rate(cfg),
        warmup_steps=cfg.WARMUP_STEPS,
        lr_scheduler_type="cosine",
        optim="adamw_torch",
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=precision.compute == "bf16",
        fp16=precision.compute == "fp16",
        gradient_checkpointing=cfg.GRADIENT_CHECKPOINTING,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=cfg.LOGGING_STEPS,
        report_to=["tensorboard"],
        save_strategy="steps",
        save_steps=cfg.SAVE_STEPS,
        save_total_limit=cfg.SAVE_TOTAL_LIMIT,
        eval_strategy="steps" if has_val else "no",
        eval_steps=cfg.EVAL_STEPS if has_val else None,
        remove_unused_columns=False,
        label_names=["labels"],
        dataloader_num_workers=data_loader_workers(cfg.NUM_WORKERS, cuda),
        ddp_find_unused_parameters=False,
        seed=cfg.SEED,
        deepspeed=cfg.DEEPSPEED,
        # On a CPU-only machine the Trainer only sets up (gloo) DDP under torchrun through use_cpu.
        use_cpu=not cuda,
        disable_tqdm=False,
    )


# ---------------------------------------------------------------- the recipe

def run_finetune(scope: dict[str, Any], family: str) -> Path:
    """Fine-tune one model family with the constants in ``scope`` (a script's globals()); returns the run directory."""
    from transformers import Trainer
    from transformers.trainer_utils import get_last_checkpoint

    from .annotations import load_annotations
    from .overrides import settings_of

    settings = settings_of(scope)
    cfg = SimpleNamespace(**settings)
    get_family(family)

    # 1. Settings and data are checked before any model is loaded.
    validate_settings(cfg)
    if cfg.USE_8BIT and training_mode(cfg) != "QLORA":
        print("note: USE_8BIT only applies to QLoRA (USE_QLORA=True); ignored")
    args = training_arguments(cfg, Path(cfg.OUTPUT_DIR) / run_name(cfg, family))
    with args.main_process_first(desc="run directory"):  # only the main process clears it (OVERWRITE)
        run_dir, resuming = prepare_run_dir(cfg, family, main=args.process_index == 0)
    with args.main_process_first(desc="sample data and tiny model"):
        if cfg.VIDEO_DIR is None:
            from .sample_data import ensure_sample_media, SAMPLE_VIDEO_DIR

            ensure_sample_media()
            video_dir = SAMPLE_VIDEO_DIR
        else:
            video_dir = Path(cfg.VIDEO_DIR)
        train_samples = load_annotations(cfg.TRAIN_ANNOTATIONS, video_dir, limit=cfg.TRAIN_LIMIT,
                                         split=cfg.TRAIN_SPLIT)
        val_samples = (load_annotations(cfg.VAL_ANNOTATIONS, video_dir, split=cfg.VAL_SPLIT)
                       if cfg.VAL_ANNOTATIONS else [])
        model_path = resolve_model_path(cfg.MODEL_ID, family)
    main = args.process_index == 0
    mode = training_mode(cfg)
    if main:
        what = {"QLORA": f"QLoRA ({quant_bits(cfg)}-bit{' nf4' if quant_bits(cfg) == 4 else ''} base, LoRA r={cfg.LORA_R} alpha={cfg.LORA_ALPHA:g})",
                "LORA": f"LoRA r={cfg.LORA_R} alpha={cfg.LORA_ALPHA:g} on the language model",
                "FULL": "every weight (full fine-tuning" + (", vision tower frozen)" if cfg.FREEZE_VISION else ")")}[mode]
        pruning = f" after {cfg.PRUNE_METHOD} pruning of {cfg.PRUNE_AMOUNT:.1%}" if cfg.PRUNE else ""
        print(f"training {what}{pruning} of {cfg.MODEL_ID} on {len(train_samples)} pairs "
              f"for {cfg.EPOCHS:g} epochs at LR {learning_rate(cfg):g} -> {run_dir}{' (resuming)' if resuming else ''}")

    # 2. Processor and data: the prompt comes from the processor's chat template.
    processor = load_processor(model_path)
    train_set = VideoQADataset(train_samples, processor, cfg.NUM_FRAMES, cfg.MAX_LENGTH,
                               shorten_answers=cfg.SHORTEN_ANSWERS, name="train")
    val_set = (VideoQADataset(val_samples, processor, cfg.NUM_FRAMES, cfg.MAX_LENGTH,
                              shorten_answers=cfg.SHORTEN_ANSWERS, name="val") if val_samples else None)
    if main and train_set.shortened:
        print(f"note: {len(train_set.shortened)} of {len(train_set)} training answers shortened to fit MAX_LENGTH={cfg.MAX_LENGTH}")

    # 3. Model: prune the full-precision weights, then quantise (QLoRA), then LoRA.
    sparsity: dict[str, float] = {}
    base_path = model_path
    if cfg.PRUNE:
        with args.main_process_first(desc="pruning"):
            base_path, sparsity = pruned_base(model_path, family, cfg)
        if main:
            print("measured sparsity: " + ", ".join(f"{k} {v:.2%}" for k, v in sparsity.items()))
    model, lora_targets = build_training_model(cfg, base_path, family)
    trainable, total = count_parameters(model)
    quantised = linear_counts(model) if quant_bits(cfg) else {}
    callbacks = list(EXTRA_CALLBACKS)
    if cfg.PRUNE and mode == "FULL":  # keep the pruned weights at zero through training
        callbacks.append(pruning_mask_callback(model, pruning_masks(model, include_vision=cfg.PRUNE_VISION)))
    if main:
        print(f"precision: {device_precision(cfg).compute} compute, {str(device_precision(cfg).weights).removeprefix('torch.')} weights")
        if quantised:
            print(format_linear_counts(quantised, quant_bits(cfg)))
        if lora_targets:
            kinds = sorted({name.rsplit('.', 1)[-1] for name in lora_targets})
            print(f"LoRA targets: {len(lora_targets)} Linear layers of the language model ({', '.join(kinds)})")
        print(f"trainable parameters: {trainable:,} of {total:,} ({trainable / total:.2%})")

    # 4. Train; an existing run directory resumes from its newest checkpoint.
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    record: dict[str, Any] = {
        "completed": False, "family": family, "mode": mode, "quant_bits": quant_bits(cfg), "base_model": cfg.MODEL_ID,
        "base_path": model_path, "learning_rate": learning_rate(cfg), "settings": settings, "versions": library_versions(),
        "data": {name: {"path": str(getattr(cfg, name)), "sha256": file_sha256(getattr(cfg, name))}
                 for name in ("TRAIN_ANNOTATIONS", "VAL_ANNOTATIONS") if getattr(cfg, name)},
        "world_size": args.world_size, "num_train": len(train_set), "num_val": len(val_samples), "answers_shortened": len(train_set.shortened),
        "video_tokens_per_clip": train_set.num_video_tokens, "sparsity": sparsity, "lora_targets": lora_targets,
        "trainable_parameters": trainable, "total_parameters": total, "quantised_linears": quantised,
        "precision": {"compute": device_precision(cfg).compute, "weights": str(device_precision(cfg).weights)},
    }
    if main:
        write_run_file(run_dir, record)
    trainer = Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=val_set,
                      data_collator=VideoQACollator(processor.tokenizer.pad_token_id), callbacks=callbacks)
    last = get_last_checkpoint(str(run_dir)) if run_dir.exists() else None
    trainer.train(resume_from_checkpoint=last)

    # 5. Save the adapter (or full weights), the processor and run.json.
    trainer.save_model(str(run_dir))
    if main:
        processor.save_pretrained(run_dir)
        history = trainer.state.log_history
        record.update({
            "completed": True, "seconds": round(time.time() - started, 1), "global_step": trainer.state.global_step,
            "loss_curve": [{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h],
            "eval_loss_curve": [{"step": h["step"], "eval_loss": h["eval_loss"]} for h in history if "eval_loss" in h],
            "resumed_from": last,
            # Full fine-tuning: the trained weights; LoRA leaves the base untouched (see sparsity_after_merging).
            "sparsity_after_training": measure_sparsity(model, cfg.PRUNE_VISION) if cfg.PRUNE and mode == "FULL" else None,
        })
        write_run_file(run_dir, record)
        curve = record["loss_curve"]
        if curve:
            print(f"loss {curve[0]['loss']:.3f} -> {curve[-1]['loss']:.3f} over {trainer.state.global_step} steps")
        if cfg.MERGE_AND_SAVE and mode != "FULL":
            merge_and_save(run_dir, family)
    if args.world_size > 1:
        torch.distributed.barrier()

    # 6. Evaluate on the validation set.
    if cfg.EVAL_AFTER_TRAIN and main and cfg.VAL_ANNOTATIONS:
        device = args.device  # the accelerator this process trained on (the CPU without one)
        del trainer, model
        evaluate(family=family, model_path=str(run_dir), model_id=cfg.MODEL_ID, val_annotations=cfg.VAL_ANNOTATIONS,
                 video_dir=str(video_dir), num_frames=cfg.NUM_FRAMES, batch_size=cfg.EVAL_BATCH_SIZE,
                 max_new_tokens=cfg.MAX_NEW_TOKENS, load_in_4bit=False, results_dir=cfg.RESULTS_DIR,
                 settings=settings, split=cfg.VAL_SPLIT, device=device)
    return run_dir


