"""The transformers Trainer as both training recipes use it (the video LLMs' and DeltaVLM's): its arguments from the
scripts' constants, with one builder for both, the checks of the settings every recipe shares, and the checkpoint
a rerun resumes from (the newest complete one: a run killed while saving leaves a torn one)."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import time
import zipfile
from pathlib import Path

import torch
from accelerate.utils import DeepSpeedSchedulerWrapper
from peft import PeftModel
from safetensors import safe_open
from transformers import Trainer, TrainerCallback, TrainingArguments, get_scheduler
from transformers.integrations import get_available_reporting_integrations
from transformers.integrations.deepspeed import deepspeed_load_checkpoint
from transformers.trainer_utils import SchedulerType
from transformers.training_args import OptimizerNames

from .devices import precision_support
from .engines import deepspeed_plan, dist_timeout, parameter_values, restore_fp32_masters
from .errors import UserError, first_line

# The constants every training script has that the Trainer reads (checked here, built by ``trainer_arguments``).
TRAINER_SETTINGS = ("PRECISION", "LR_SCHEDULER", "LR_SCHEDULER_KWARGS", "WEIGHT_DECAY", "OPTIM", "MAX_GRAD_NORM",
                    "REPORT_TO", "DIST_TIMEOUT_MINUTES")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# Where the Trainer logs: any of these the machine has installed, or none.
REPORTERS = ("tensorboard", "wandb", "mlflow", "none")


def compute_precision(precision: str, *, cuda: bool, cuda_bf16: bool) -> str:
    """What ``PRECISION`` computes in on this machine: "auto" is bf16 on GPUs that have it, fp16 (autocast with loss
    scaling) on older GPUs, fp32 on the CPU; a precision the machine cannot compute in stops in one line."""
    if precision == "auto":
        return ("bf16" if cuda_bf16 else "fp16") if cuda else "fp32"
    if precision == "fp16" and not cuda:
        raise UserError("PRECISION='fp16' needs a CUDA GPU (fp16 autocast with loss scaling); use bf16 or fp32")
    if precision == "bf16" and cuda and not cuda_bf16:
        raise UserError("PRECISION='bf16' but this GPU has no bf16 support; use fp16 or auto")
    return precision


def precision_dtype(compute: str):
    """The torch dtype of a compute precision ("bf16", "fp16", "fp32")."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[compute]


def device_compute_precision(precision: str) -> str:
    """``compute_precision`` on this process's machine."""
    return compute_precision(precision, **precision_support())


def check_report_to(report_to: str) -> None:
    """REPORT_TO names a logger the Trainer has and this machine has installed, or none."""
    if report_to not in REPORTERS:
        raise UserError(f"REPORT_TO={report_to!r} is not one of {', '.join(REPORTERS)}")
    installed = get_available_reporting_integrations()
    if report_to != "none" and report_to not in installed:
        raise UserError(f"REPORT_TO={report_to!r} but {report_to} is not installed (pip install {report_to}); "
                        f"installed: {', '.join(installed) or 'none'}; or REPORT_TO=none")


def check_scheduler_arguments(scheduler: str, arguments: dict) -> None:
    """LR_SCHEDULER_KWARGS fit LR_SCHEDULER: transformers builds the schedule over a stand-in optimizer, as the
    Trainer will (``cosine_with_min_lr`` needs ``min_lr`` or ``min_lr_rate``; an argument it does not take stops)."""
    if not isinstance(arguments, dict):
        raise UserError(f"LR_SCHEDULER_KWARGS must be a dict (e.g. {{'min_lr': 1e-6}}), not {arguments!r}")
    stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    try:
        get_scheduler(scheduler, stand_in, num_warmup_steps=1, num_training_steps=10,
                      scheduler_specific_kwargs=arguments)
    except (TypeError, ValueError) as exc:
        raise UserError(f"LR_SCHEDULER_KWARGS={arguments!r} do not fit LR_SCHEDULER={scheduler!r}: "
                        f"{first_line(exc, 200)}") from None


def check_training_settings(cfg) -> None:
    """The shared settings, checked before any model loads: one line naming the setting and what it may be."""
    schedulers = [s.value for s in SchedulerType]
    optimizers = [o.value for o in OptimizerNames]
    checks = [
        (cfg.PRECISION in PRECISIONS, f"PRECISION must be one of {', '.join(PRECISIONS)}, not {cfg.PRECISION!r}"),
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
    dist_timeout(cfg.DIST_TIMEOUT_MINUTES)  # > 0
    check_report_to(cfg.REPORT_TO)
    check_scheduler_arguments(cfg.LR_SCHEDULER, cfg.LR_SCHEDULER_KWARGS)
    device_compute_precision(cfg.PRECISION)  # one this machine computes in


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


def checkpointing_arguments(arguments_class, enabled: bool) -> dict:
    """Activation checkpointing under the name this transformers knows: ``activation_checkpointing`` (5.x renamed
    it; the old name still works but warns on every run) or ``gradient_checkpointing``."""
    names = {f.name for f in dataclasses.fields(arguments_class)}
    name = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False} if enabled else None}


def trainer_arguments(cfg, run_dir: Path, *, learning_rate: float, compute: str, gradient_checkpointing: bool,
                      **recipe):
    """``TrainingArguments`` from a training script's constants: batch, accumulation, length (EPOCHS, MAX_STEPS),
    ``learning_rate``, WARMUP_STEPS, LR_SCHEDULER (and its LR_SCHEDULER_KWARGS), WEIGHT_DECAY, OPTIM, MAX_GRAD_NORM,
    logging (REPORT_TO), checkpoints, workers, SEED, DEEPSPEED, DIST_TIMEOUT_MINUTES; ``compute`` = "bf16", "fp16"
    (autocast with loss scaling) or "fp32". ``recipe``: what one recipe sets beyond these (its validation, for
    instance)."""
    cuda = torch.cuda.is_available()
    if cfg.REPORT_TO == "tensorboard":  # transformers 5 takes the TensorBoard folder from the environment only
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
        lr_scheduler_kwargs=dict(cfg.LR_SCHEDULER_KWARGS),
        weight_decay=cfg.WEIGHT_DECAY,
        optim=cfg.OPTIM,
        max_grad_norm=cfg.MAX_GRAD_NORM,
        bf16=compute == "bf16",
        fp16=compute == "fp16",
        **checkpointing_arguments(TrainingArguments, gradient_checkpointing),
        logging_steps=cfg.LOGGING_STEPS,
        report_to=[] if cfg.REPORT_TO == "none" else [cfg.REPORT_TO],
        save_strategy="steps",
        save_steps=cfg.SAVE_STEPS,
        save_total_limit=cfg.SAVE_TOTAL_LIMIT,
        remove_unused_columns=False,
        label_names=["labels"],
        dataloader_num_workers=data_loader_workers(cfg.NUM_WORKERS, cuda),
        # Every trainable parameter gets a gradient (the recipes freeze what the forward pass never reaches).
        ddp_find_unused_parameters=False,
        # a group the Trainer makes waits DIST_TIMEOUT_MINUTES too (the scripts make theirs first:
        # engines.start_process_group, for the Trainer passes this on to GPU runs only)
        ddp_timeout=round(dist_timeout(cfg.DIST_TIMEOUT_MINUTES).total_seconds()),
        seed=cfg.SEED,
        deepspeed=cfg.DEEPSPEED,
        # On a CPU-only machine the Trainer only sets up (gloo) DDP under torchrun through use_cpu.
        use_cpu=not cuda,
        disable_tqdm=False,
    )
    arguments.update(recipe)
    return TrainingArguments(**arguments)


# ---------------------------------------------------------------- the Trainer both recipes run

class StepTimer(TrainerCallback):
    """How long each optimiser step takes: forward, backward and update, the GPU's work included (not the data
    loading before it, nor logging or saving after it)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.began = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if args.device.type == "cuda":
            torch.cuda.synchronize(args.device)
        self.began = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if args.device.type == "cuda":
            torch.cuda.synchronize(args.device)
        self.seconds.append(time.perf_counter() - self.began)

    def summary(self) -> dict:
        """The first step (allocations, kernel choices: a warm-up) and the mean of the steps after it."""
        later = self.seconds[1:]
        return {"steps": len(self.seconds), "first_s": round(self.seconds[0], 4) if self.seconds else None,
                "mean_after_first_s": round(sum(later) / len(later), 4) if later else None}


class SuiteTrainer(Trainer):
    """transformers' Trainer, with DDP sharing its gradient buckets with the gradients (``gradient_as_bucket_view``:
    one copy of the gradients per process instead of two; the Trainer exposes no setting for it), and under DeepSpeed:

    * a DeepSpeed config's own ``"optimizer"`` block keeps the Trainer's parameter groups (no weight decay on biases
      and norms; DeepSpeed's would decay every parameter), and one line says which optimizer runs and why;
    * trained parameters that start in fp32 start DeepSpeed's fp32 masters at that exact value, not its bf16 cast;
    * saved weights are the fp32 masters (the module DeepSpeed computes with is bf16 / fp16), gathered by every
      process with one host copy, on the process that writes; a PEFT model's (and, in ``trainable_only``,
      any model's) frozen weights are never gathered or saved;
    * DeepSpeed's own checkpoint (optimizer shards) leaves frozen weights out for every model (the Trainer does so
      for PEFT models only), and resuming loads it without them.
    """
    trainable_only = False  # checkpoints hold only the trained parameters (always so for a PEFT model)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_timer = StepTimer()
        self.add_callback(self.step_timer)

    def _build_accelerator_args(self, **kwargs):
        args = super()._build_accelerator_args(**kwargs)
        for handler in args.get("kwargs_handlers", []):
            if type(handler).__name__ == "DistributedDataParallelKwargs":
                handler.gradient_as_bucket_view = True
        return args

    # ---- the optimizer

    def create_optimizer(self, model=None):
        from_config = self.optimizer if type(self.optimizer).__name__ == "DummyOptim" else None
        if self.optimizer is not None and from_config is None:
            return self.optimizer  # built already (under DeepSpeed the Trainer asks twice)
        if from_config is not None:  # DeepSpeed builds it from its config, from the parameters handed over here
            self.optimizer = None
        optimizer = super().create_optimizer(model)
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
        if from_config is not None:
            # the Trainer's own groups (built above, its optimizer dropped) instead of every parameter in one
            from_config.params = [group for group in groups if group["params"]]
            self.optimizer = optimizer = from_config
        if self.args.process_index == 0:
            decayed = [g for g in groups if g["weight_decay"]]
            decay = (f"weight decay {decayed[0]['weight_decay']:g} on {len(decayed[0]['params'])} tensors, none "
                     f"on {sum(len(g['params']) for g in groups) - len(decayed[0]['params'])} (biases, norms)"
                     if decayed else "no weight decay")
            if from_config is not None:
                print(f"optimizer: {deepspeed_plan(self.args.deepspeed).optimizer} from the \"optimizer\" block of "
                      f"{self.args.deepspeed}, which DeepSpeed runs instead of OPTIM={self.args.optim.value}; "
                      f"{decay}")
            else:
                print(f"optimizer: {type(optimizer).__name__} (OPTIM={self.args.optim.value}); {decay}")
        return optimizer

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        if not self.is_deepspeed_enabled:
            return super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        model = self.accelerator.unwrap_model(self.model)
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        starts = {}
        # Full fine-tuning's start would be a second copy of the model in host memory: its masters start from
        # DeepSpeed's cast (a model loaded in 16 bits loses nothing there).
        if sum(p.numel() for _, p in trainable) * 2 < sum(p.numel() for p in model.parameters()):
            starts = {n: p.detach().float().clone() for n, p in trainable
                      if p.dtype == torch.float32 and not hasattr(p, "ds_id")}
        wrapped, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, None)
        restore_fp32_masters(starts, model)
        del starts  # freed before training
        if resume_from_checkpoint is not None:  # as the Trainer resumes, but without the frozen weights
            self._load_trained_weights(resume_from_checkpoint)
            self._load_optimizer_and_scheduler(resume_from_checkpoint)
            self._load_scaler(resume_from_checkpoint)
        return wrapped, train_dataloader

    def _load_trained_weights(self, checkpoint: str) -> None:
        # A DeepSpeed checkpoint here holds the trained weights only (``exclude_frozen_parameters``): the frozen
        # ones stay as loaded, so the load is not strict.
        deepspeed_load_checkpoint(self.model_wrapped, checkpoint, load_module_strict=False)

    def _load_best_model(self) -> None:
        if not self.is_deepspeed_enabled:
            return super()._load_best_model()
        if self.args.should_save:
            print(f"loading the best checkpoint, {self.state.best_model_checkpoint} "
                  f"({self.args.metric_for_best_model} {self.state.best_metric:.4f})")
        self._load_trained_weights(self.state.best_model_checkpoint)

    # ---- saving

    def saved_parameter_names(self, model) -> list[str]:
        trainable_only = self.trainable_only or isinstance(model, PeftModel)
        return [n for n, p in model.named_parameters() if p.requires_grad or not trainable_only]

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not self.is_deepspeed_enabled:
            return super().save_model(output_dir, _internal_call)
        model = self.accelerator.unwrap_model(self.model)
        names = self.saved_parameter_names(model)
        state = parameter_values(model, names, keep=self.args.should_save)
        if self.args.should_save:
            if len(names) == len(list(model.named_parameters())):  # a whole model: its buffers too
                known = {id(p) for p in model.parameters()}
                state.update({k: v.detach().cpu() for k, v in model.state_dict(keep_vars=True).items()
                              if id(v) not in known and k not in state})
            self._save(output_dir or self.args.output_dir, state_dict=state)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.is_deepspeed_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)
        if self.args.should_save and not isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper):
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, "scheduler.pt"))


# ---------------------------------------------------------------- resuming from the newest complete checkpoint

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
TORN_PREFIX = "torn-"
_MODEL_WEIGHTS = re.compile(r"\.(safetensors|bin)$")


def _zip_problem(path: Path) -> str | None:
    """torch.save writes a zip archive whose directory sits at its end: a file cut short has none."""
    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except (OSError, zipfile.BadZipFile) as exc:
        return f"{path.name} is cut short or damaged ({first_line(exc, 120)})"
    return None


def _safetensors_problem(path: Path) -> str | None:

    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()  # the header, checked against the file's length
    except Exception as exc:  # safetensors' own error type: incomplete metadata, header too large...
        return f"{path.name} is cut short or damaged ({first_line(exc, 120)})"
    return None


def checkpoint_problem(folder: Path) -> str | None:
    """Why a Trainer checkpoint cannot be resumed from, or None when it is complete: its state, weights, optimizer,
    scheduler and random states are there and readable (DeepSpeed's: the ``global_step*`` folder ``latest`` names)."""
    state = folder / "trainer_state.json"
    if not state.is_file():
        return "it has no trainer_state.json"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"trainer_state.json is cut short or damaged ({first_line(exc, 120)})"
    files = [p for p in folder.iterdir() if p.is_file()]
    weights = [p for p in files if _MODEL_WEIGHTS.search(p.name) and p.name != "training_args.bin"]
    deepspeed = folder / "latest"
    if deepspeed.is_file():
        engine = folder / deepspeed.read_text(encoding="utf-8").strip()
        if not engine.is_dir():
            return f"latest names {engine.name}, which is missing"
        states = sorted(engine.glob("*.pt"))
        if not states:
            return f"{engine.name} holds no DeepSpeed states"
        problems = [_zip_problem(p) for p in states]
    else:
        if not weights:
            return "it holds no weights"
        needed = [folder / "optimizer.pt", folder / "scheduler.pt"]
        missing = [p.name for p in needed if not p.is_file()]
        rng = [p for p in files if p.name.startswith("rng_state")]
        if missing or not rng:
            return f"it lacks {', '.join(missing + ([] if rng else ['rng_state*.pth']))}"
        problems = [_zip_problem(p) for p in needed + rng]
    problems += [_safetensors_problem(p) if p.suffix == ".safetensors" else _zip_problem(p) for p in weights]
    return next((problem for problem in problems if problem), None)


def newest_complete_checkpoint(run_dir: Path, *, main: bool) -> Path | None:
    """The newest checkpoint of ``run_dir`` a rerun can resume from. A torn one (killed while saving) is skipped with
    one line saying why and, by the main process, kept aside as ``torn-checkpoint-N`` (nothing is deleted); when every
    checkpoint is torn the run starts over, and one line says so. Other processes call this after the main one."""
    found = sorted((p for p in run_dir.glob("checkpoint-*") if p.is_dir() and CHECKPOINT.match(p.name)),
                   key=lambda p: int(CHECKPOINT.match(p.name).group(1)), reverse=True)
    for folder in found:
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        if main:
            aside = folder.with_name(TORN_PREFIX + folder.name)
            number = 1
            while aside.exists():
                number += 1
                aside = folder.with_name(f"{TORN_PREFIX}{number}-{folder.name}")
            folder.rename(aside)
            print(f"skipping {folder.name}: {problem}; kept aside as {aside.name}")
    if found and main:
        print(f"every checkpoint in {run_dir} is torn (kept aside as {TORN_PREFIX}checkpoint-*); starting over")
    return None


def train_from_newest_checkpoint(trainer, run_dir: Path) -> str | None:
    """``trainer.train()``, resuming from the newest complete checkpoint of ``run_dir`` (torn ones set aside);
    returns the checkpoint resumed from, or None for a fresh start."""
    main = trainer.args.process_index == 0
    # Every process enters (the block holds a barrier): rank 0 sets torn checkpoints aside, then all pick the same
    # one. local=False: the first process of every other node would otherwise scan beside rank 0's renames.
    with trainer.args.main_process_first(local=False, desc="checkpoints"):
        last = newest_complete_checkpoint(run_dir, main=main)
    resumed_from = str(last) if last else None
    if resumed_from and main:
        print(f"resuming from {resumed_from}")
    trainer.train(resume_from_checkpoint=resumed_from)
    return resumed_from
