"""The transformers Trainer as both training recipes use it (the video LLMs' and DeltaVLM's): its arguments from the
scripts' constants, with one builder for both, and the checks of the settings every recipe shares."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError

# The optimisation constants every training script has, and what they mean to the Trainer.
OPTIMISATION_SETTINGS = ("LR_SCHEDULER", "WEIGHT_DECAY", "OPTIM", "MAX_GRAD_NORM")


def check_training_settings(cfg) -> None:
    """The shared settings, checked before any model loads: one line naming the setting and what it may be."""
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    schedulers = [s.value for s in SchedulerType]
    optimizers = [o.value for o in OptimizerNames]
    checks = [
        (cfg.LR_SCHEDULER in schedulers, f"LR_SCHEDULER={cfg.LR_SCHEDULER!r} is not one of {', '.join(schedulers)}"),
        (cfg.OPTIM in optimizers, f"OPTIM={cfg.OPTIM!r} is not a Trainer optimizer (e.g. adamw_torch_fused, "
                                  f"adamw_torch, adafactor, adamw_bnb_8bit; all: {', '.join(optimizers)})"),
        (cfg.WEIGHT_DECAY >= 0, f"WEIGHT_DECAY must be >= 0, not {cfg.WEIGHT_DECAY}"),
        (cfg.MAX_GRAD_NORM >= 0, f"MAX_GRAD_NORM must be >= 0 (0 = no clipping), not {cfg.MAX_GRAD_NORM}"),
        (cfg.BATCH_SIZE >= 1, f"BATCH_SIZE must be >= 1, not {cfg.BATCH_SIZE}"),
        (cfg.GRAD_ACCUM >= 1, f"GRAD_ACCUM must be >= 1, not {cfg.GRAD_ACCUM}"),
        (cfg.SAVE_STEPS >= 1, f"SAVE_STEPS must be >= 1, not {cfg.SAVE_STEPS}"),
        (cfg.LOGGING_STEPS >= 1, f"LOGGING_STEPS must be >= 1, not {cfg.LOGGING_STEPS}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


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


def trainer_arguments(cfg, run_dir: Path, *, learning_rate: float, compute: str, gradient_checkpointing: bool,
                      **recipe):
    """``TrainingArguments`` from a training script's constants: batch, accumulation, length (EPOCHS, MAX_STEPS),
    ``learning_rate``, WARMUP_STEPS, LR_SCHEDULER, WEIGHT_DECAY, OPTIM, MAX_GRAD_NORM, logging, checkpoints,
    workers, SEED, DEEPSPEED; ``compute`` = "bf16", "fp16" (autocast with loss scaling) or "fp32". ``recipe``:
    what one recipe sets beyond these (its validation, for instance)."""
    import torch
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()
    # transformers 5 takes the TensorBoard folder from the environment only.
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")
    arguments = dict(
        output_dir=str(run_dir),
        per_device_train_batch_size=cfg.BATCH_SIZE,
        gradient_accumulation_steps=cfg.GRAD_ACCUM,
        num_train_epochs=cfg.EPOCHS,
        max_steps=cfg.MAX_STEPS,
        learning_rate=learning_rate,
        warmup_steps=cfg.WARMUP_STEPS,
        lr_scheduler_type=cfg.LR_SCHEDULER,
        weight_decay=cfg.WEIGHT_DECAY,
        optim=cfg.OPTIM,
        max_grad_norm=cfg.MAX_GRAD_NORM,
        bf16=compute == "bf16",
        fp16=compute == "fp16",
        gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if gradient_checkpointing else None,
        logging_steps=cfg.LOGGING_STEPS,
        report_to=["tensorboard"],
        save_strategy="steps",
        save_steps=cfg.SAVE_STEPS,
        save_total_limit=cfg.SAVE_TOTAL_LIMIT,
        remove_unused_columns=False,
        label_names=["labels"],
        dataloader_num_workers=data_loader_workers(cfg.NUM_WORKERS, cuda),
        # Every trainable parameter gets a gradient (the recipes freeze what the forward pass never reaches).
        ddp_find_unused_parameters=False,
        seed=cfg.SEED,
        deepspeed=cfg.DEEPSPEED,
        # On a CPU-only machine the Trainer only sets up (gloo) DDP under torchrun through use_cpu.
        use_cpu=not cuda,
        disable_tqdm=False,
    )
    arguments.update(recipe)
    return TrainingArguments(**arguments)
