"""Training DeltaVLM: the steps of ``deltavlm_finetune.py``.

The released training (hanlinwu/DeltaVLM ``scripts/train.py``) is kept where it is right: InstructBLIP-Vicuna-7B
plus a fresh CSRM; the last two EVA ViT blocks, ln_vision, the Q-Former, its queries, the LLM projection and the
CSRM train, the rest stays frozen; next-token cross-entropy on the answer tokens only, with the query outputs in
front of the prompt; AdamW (weight decay 0.05), linear warm-up then cosine; validation each epoch, the best
checkpoint by BLEU-4, early stop. It is fixed where it was not: the CSRM is in the training pass (``USE_CSRM``),
and under ``torchrun`` the Trainer's DDP really synchronises the processes (checked at the end).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, TrainerCallback, set_seed

from ..annotations import load_changechat
from ..devices import is_main_process, launched_processes, process_device
from ..engines import (check_shared_directory, deepspeed_plan, engine_of, gathered, outside_zero3, parameter_values,
                       size_buckets, start_process_group, zero3_enabled)
from ..errors import UserError
from ..fileio import atomic_path
from ..locks import WriterLock, lock_for_writing, lock_path, released_on_error
from ..metrics import SM, MetricsReport, meteor_available, with_sm
from ..overrides import load_settings, script_constants
from ..paths import ANNOTATIONS_DIR, local_or_hub
from ..results import write_jsonl, write_metrics
from ..runs import (RESUME_MAY_CHANGE, VALIDATION_DIR, check_resume_processes, data_files, default_run_name,
                    distinct_settings, library_versions, resume_state, settings_record, write_run_file)
from ..sample.data import SAMPLE_CHANGECHAT_ROOT, ensure_sample_media
from ..sharding import answer_in_shards, from_main, start_shards
from ..trainer import (SuiteTrainer, check_training_settings, device_compute_precision, precision_dtype,
                       train_from_newest_checkpoint, trainer_arguments)
from . import FAMILY_ID
from .checkpoint import released_extras, released_layout_state
from .inputs import (Prompting, build_prompt, encode_training_batch, normalise_answer, preprocess_image)
from .loading import (CHECKPOINT_FILE, LLM_ADAPTER_DIR, base_configs, llm_adapter_beside, load_deltavlm,
                      load_lavis_state, resolve_checkpoint)
from .model import DeltaVLM, trained_parameter_names
from .predictor import Decoding, Item, Predictor, answer_batch, items_of, read_pair
from .scoring import score_records
from .tiny import ensure_tiny_deltavlm

BEST_METRICS = ("bleu4", "cider", SM)  # sm: the mean of BLEU-4, METEOR, ROUGE-L, CIDEr (metrics.SM_PARTS)
TRAINABLE_WEIGHTS = "trainable.safetensors"           # what a Trainer checkpoint holds of the model
# The released recipe, and the tiny twin's (its random weights need bigger steps to learn in minutes).
PAPER_RECIPE = {"LR": 1e-5, "WARMUP_STEPS": 1000, "EPOCHS": 50}
TINY_RECIPE = {"LR": 2e-3, "WARMUP_STEPS": 5, "EPOCHS": 4}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --------------------------------------------------------------------------- 1. settings

@dataclass(frozen=True)
class Sources:
    """Where the weights come from: ``init`` a DeltaVLM checkpoint to continue from (None: the InstructBLIP base
    with a fresh CSRM), the base, the LLM and the Q-Former's tokenizer."""
    init: str | None
    base: str
    llm: str
    bert: str


def resolve_recipe(cfg):
    """``cfg`` with LR / WARMUP_STEPS / EPOCHS that are None set to the paper's values (the tiny twin's for
    INIT=tiny)."""
    recipe = TINY_RECIPE if cfg.INIT == "tiny" else PAPER_RECIPE
    return dataclasses.replace(cfg, **{k: v for k, v in recipe.items() if getattr(cfg, k) is None})


def training_sources(cfg) -> Sources:
    if cfg.INIT == "tiny":
        tiny = ensure_tiny_deltavlm()
        return Sources(None, str(tiny.base), str(tiny.llm), str(tiny.bert))
    if cfg.INIT == "instructblip":
        return Sources(None, cfg.VISION_QFORMER_BASE, cfg.LLM_MODEL, cfg.BERT_MODEL)
    checkpoint = resolve_checkpoint(cfg.INIT)
    if llm_adapter_beside(checkpoint) is not None:
        raise UserError(f"INIT {checkpoint}: an LLM adapter ({LLM_ADAPTER_DIR}/) lies beside it; continuing a "
                        "LoRA run is not supported (start from its base, or from a run without LLM_LORA_R)")
    return Sources(str(checkpoint), cfg.VISION_QFORMER_BASE, cfg.LLM_MODEL, cfg.BERT_MODEL)


def check_settings(cfg) -> Sources:
    """Every check that needs no model (bad settings stop here, in one line); returns the weights' sources."""
    checks = [
        (cfg.BEST_METRIC in BEST_METRICS, f"BEST_METRIC={cfg.BEST_METRIC!r} is not one of {', '.join(BEST_METRICS)}"),
        (not (cfg.LOAD_LLM_IN_8BIT and cfg.LOAD_LLM_IN_4BIT), "LOAD_LLM_IN_8BIT and LOAD_LLM_IN_4BIT are both True; "
                                                              "choose one"),
        (cfg.TRAIN_VIT_BLOCKS >= 0, f"TRAIN_VIT_BLOCKS must be >= 0, not {cfg.TRAIN_VIT_BLOCKS}"),
        (cfg.LLM_LORA_R >= 0, f"LLM_LORA_R must be >= 0 (0 = Vicuna frozen), not {cfg.LLM_LORA_R}"),
        (cfg.EPOCHS >= 1, f"EPOCHS must be >= 1, not {cfg.EPOCHS}"),
        (cfg.LR > 0, f"LR must be > 0, not {cfg.LR}"),
        (cfg.WARMUP_STEPS >= 0, f"WARMUP_STEPS must be >= 0, not {cfg.WARMUP_STEPS}"),
        (cfg.EARLY_STOP_EPOCHS >= 1, f"EARLY_STOP_EPOCHS must be >= 1, not {cfg.EARLY_STOP_EPOCHS}"),
        (cfg.VAL_BATCH_SIZE >= 1, f"VAL_BATCH_SIZE must be >= 1, not {cfg.VAL_BATCH_SIZE}"),
        (cfg.BEST_METRIC != "sm" or meteor_available(), "BEST_METRIC='sm' needs METEOR, which needs Java (not found); "
                                                      "install Java or use bleu4 / cider"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    check_training_settings(cfg)
    Decoding(cfg.VAL_NUM_BEAMS, cfg.VAL_MAX_NEW_TOKENS).check()
    for name in ("TRAIN_ANNOTATIONS", "VAL_ANNOTATIONS"):
        if not Path(getattr(cfg, name)).is_file():
            raise UserError(f"{name}: annotation file {getattr(cfg, name)} does not exist")
    plan = deepspeed_plan(cfg.DEEPSPEED)
    if plan is not None and plan.stage == 3 and (cfg.LOAD_LLM_IN_8BIT or cfg.LOAD_LLM_IN_4BIT):
        raise UserError(f"DEEPSPEED={cfg.DEEPSPEED} with a quantised Vicuna (LOAD_LLM_IN_8BIT / LOAD_LLM_IN_4BIT): "
                        "ZeRO-3 cannot partition quantised weights; use configs/deepspeed/zero2.json, or ZeRO-3 with "
                        "Vicuna in 16 bits (it is partitioned across the GPUs)")
    sources = training_sources(cfg)
    depth = base_configs(sources.base)[0].num_hidden_layers  # config.json only: no weights yet
    if cfg.TRAIN_VIT_BLOCKS > depth:
        raise UserError(f"TRAIN_VIT_BLOCKS={cfg.TRAIN_VIT_BLOCKS} but the ViT of {sources.base} has {depth} blocks")
    return sources


# --------------------------------------------------------------------------- 2. data

@dataclass(frozen=True)
class Example:
    """One training target: an answer turn, its prompt (the dialog before it laid out as the predictor does)."""
    image_a: Path
    image_b: Path
    prompt: str
    answer: str


def prompting_of(cfg) -> Prompting:
    return Prompting(normalise=True, training_format=cfg.TRAINING_TURN_FORMAT)


def image_root(cfg, annotations: str) -> Path | None:
    """IMAGE_ROOT, or the bundled sample's images (drawn on first use) for the bundled annotation files."""
    if cfg.IMAGE_ROOT is not None:
        return Path(cfg.IMAGE_ROOT)
    if Path(annotations).resolve().parent == ANNOTATIONS_DIR.resolve():
        ensure_sample_media()
        return SAMPLE_CHANGECHAT_ROOT
    return None


def training_examples(items: list[Item], prompting: Prompting) -> list[Example]:
    """Every answer turn of every record (a caption-split record: one example per reference caption)."""
    examples = []
    for item in items:
        prompt = build_prompt(item.question, item.history, prompting)
        answers = item.true if isinstance(item.true, list) else [item.true]
        examples += [Example(item.image_a, item.image_b, prompt, normalise_answer(a, prompting)) for a in answers]
    return examples


def load_data(cfg) -> tuple[list[Example], list[Item]]:
    """(training examples, validation caption items); every image is checked before any model is loaded."""
    train = load_changechat(cfg.TRAIN_ANNOTATIONS, image_root(cfg, cfg.TRAIN_ANNOTATIONS), limit=cfg.TRAIN_LIMIT,
                            split=cfg.TRAIN_SPLIT)
    val = load_changechat(cfg.VAL_ANNOTATIONS, image_root(cfg, cfg.VAL_ANNOTATIONS), limit=cfg.VAL_LIMIT,
                          split=cfg.VAL_SPLIT)
    examples = training_examples(items_of(train), prompting_of(cfg))
    captions = [item for item in items_of(val) if item.task == "caption"]
    if not examples:
        raise UserError(f"TRAIN_ANNOTATIONS {cfg.TRAIN_ANNOTATIONS}: no answer turns to train on")
    if not captions:
        raise UserError(f"VAL_ANNOTATIONS {cfg.VAL_ANNOTATIONS}: no caption records (the validation scores "
                        "captions, as DeltaVLM's did)")
    return examples, captions


class PairDataset(torch.utils.data.Dataset):
    """Examples with their two images read and preprocessed lazily."""

    def __init__(self, examples: list[Example], image_size: int):
        self.examples, self.image_size = examples, image_size

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.examples[index]
        before, after = read_pair(example.image_a, example.image_b)
        return {"pixels_before": preprocess_image(before, self.image_size),
                "pixels_after": preprocess_image(after, self.image_size),
                "prompt": example.prompt, "answer": example.answer}


class PairCollator:
    """Stacked pixels plus ``encode_training_batch``'s tokens and labels."""

    def __init__(self, tokenizers):
        self.tokenizers = tokenizers

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {"pixels_before": torch.stack([r["pixels_before"] for r in rows]),
                "pixels_after": torch.stack([r["pixels_after"] for r in rows]),
                **encode_training_batch([r["prompt"] for r in rows], [r["answer"] for r in rows], self.tokenizers)}


# --------------------------------------------------------------------------- 3. the run directory

SCRIPT = "deltavlm_finetune.py"
# What a default run name leaves out of its distinct settings: what its fixed part names (start, CSRM, LoRA rank,
# data) and the weights it starts from (run.json's "sources"), and what cannot change the trained weights (where
# things go, speed, logging).
NAME_LEAVES_OUT = ("INIT", "USE_CSRM", "LLM_LORA_R", "TRAIN_ANNOTATIONS", "VISION_QFORMER_BASE", "LLM_MODEL",
                   "BERT_MODEL", *RESUME_MAY_CHANGE, "IMAGE_ROOT", "SAVE_STEPS",
                   "VAL_BATCH_SIZE", "GRADIENT_CHECKPOINTING", "DEEPSPEED")


def load_recipe_settings(scope: dict):
    """The script's settings (``overrides.load_settings``: an experiment file, then NAME=VALUE, over the constants in
    ``scope``), the recipe's defaults filled in for its INIT (``resolve_recipe``)."""
    return resolve_recipe(load_settings(scope))


def run_settings(cfg) -> dict[str, Any]:
    """The settings that make this run train differently from the script's defaults (resolved for the same INIT),
    beyond what the name's fixed part says (``runs.distinct_settings``)."""
    defaults = resolve_recipe(script_constants(SCRIPT, INIT=cfg.INIT)).as_dict()
    ignored = () if cfg.LLM_LORA_R else ("LLM_LORA_ALPHA",)
    return distinct_settings(cfg.as_dict(), defaults, NAME_LEAVES_OUT + ignored)


def run_dir_of(cfg) -> Path:
    """``OUTPUT_DIR/RUN_NAME``, by default ``deltavlm[-tiny][-nocsrm][-loraR]_<train file>``, then a token for each
    of ``run_settings`` (``_lr0.0001_bestmetriccider``)."""
    fixed = (f"deltavlm{'-tiny' if cfg.INIT == 'tiny' else ''}{'' if cfg.USE_CSRM else '-nocsrm'}"
             f"{f'-lora{cfg.LLM_LORA_R}' if cfg.LLM_LORA_R else ''}_{Path(cfg.TRAIN_ANNOTATIONS).stem}")
    return Path(cfg.OUTPUT_DIR) / (cfg.RUN_NAME or default_run_name(fixed, run_settings(cfg)))


def prepare_run_dir(cfg) -> tuple[Path, WriterLock | None]:
    """The run directory and the lock that makes this process (rank 0 of a torchrun) its one writer; a finished
    run, or one written under other settings, stops with one line unless OVERWRITE (rank 0 then deletes it), and so
    does a run being written by another process. Whether the run resumes is decided by its checkpoints, in
    ``train`` (the other ranks may look at the directory after rank 0 has begun writing it)."""
    run_dir = run_dir_of(cfg)
    lock = lock_for_writing(run_dir, f"the run directory {run_dir}") if is_main_process() else None
    with released_on_error(lock):
        check_resume_processes(run_dir, cfg.as_dict(), launched_processes())
        state = resume_state(run_dir, cfg.as_dict(), overwrite=cfg.OVERWRITE)
        if state == "replace" and is_main_process():
            shutil.rmtree(run_dir)
            print(f"OVERWRITE: removed the earlier run {run_dir}")
    return run_dir, lock


@contextmanager
def open_run_dir(cfg) -> Iterator[Path]:
    """``prepare_run_dir``'s directory, its writer lock held to the end of the block (rank 0's; the others hold
    none)."""
    run_dir, lock = prepare_run_dir(cfg)
    with lock if lock is not None else nullcontext():
        yield run_dir


# --------------------------------------------------------------------------- 4. the model

def build_model(cfg, sources: Sources, device: torch.device | None = None):
    """The model to train (base + fresh CSRM, or a DeltaVLM checkpoint), its tokenizers and the load report; on
    ``device``, by default this process's own (its local GPU under torchrun, else the CPU)."""
    device = device or process_device()
    set_seed(cfg.SEED)  # the fresh CSRM (and LoRA) initialisation is reproducible
    model, tokenizers, report = load_deltavlm(sources.init, base=sources.base, llm_model=sources.llm,
                                              bert_model=sources.bert, device=device,
                                              load_in_8bit=cfg.LOAD_LLM_IN_8BIT, load_in_4bit=cfg.LOAD_LLM_IN_4BIT,
                                              use_csrm=cfg.USE_CSRM,
                                              compute=precision_dtype(device_compute_precision(cfg.PRECISION)))
    adapt_llm(model, cfg)
    return model, tokenizers, report


def adapt_llm(model: DeltaVLM, cfg) -> None:
    """LoRA on the LLM (LLM_LORA_R > 0) and gradient checkpointing, as the settings ask."""
    if cfg.LLM_LORA_R:
        if cfg.LOAD_LLM_IN_8BIT or cfg.LOAD_LLM_IN_4BIT:
            model.language_model = prepare_model_for_kbit_training(model.language_model,
                                                                   use_gradient_checkpointing=False)
        model.language_model = get_peft_model(model.language_model, LoraConfig(
            r=cfg.LLM_LORA_R, lora_alpha=cfg.LLM_LORA_ALPHA, lora_dropout=0.05, bias="none",
            target_modules=LORA_TARGETS))
    if cfg.GRADIENT_CHECKPOINTING:
        for part in (model.vision_model, model.language_model):
            part.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model.language_model, "enable_input_require_grads"):
            model.language_model.enable_input_require_grads()


def _zero_key_bias_gradient(bias: torch.nn.Parameter) -> None:
    # EVA's qkv has q and v biases only: the key third of the fused bias must stay 0 (AdamW would move it
    # even on a gradient of 1e-12), so its gradient is zeroed.
    keep = torch.ones_like(bias)
    third = bias.shape[0] // 3
    keep[third:2 * third] = 0
    # in the gradient's own dtype: a bf16 gradient (DeepSpeed, bf16 autocast) times an fp32 mask would change its
    # type, which autograd refuses ("hook has changed the type of value")
    bias.register_hook(lambda grad: grad * keep.to(device=grad.device, dtype=grad.dtype))


def choose_trainable(model: DeltaVLM, cfg) -> dict[str, int]:
    """Freeze all, then unfreeze the trained parts; returns the trainable parameter count per part."""
    model.requires_grad_(False)
    names = set(trained_parameter_names(model, cfg.TRAIN_VIT_BLOCKS))
    if not cfg.USE_CSRM:  # outside the forward: it must not train (nor count, nor stall DDP)
        names = {n for n in names if not n.startswith("csrm.")}
    counts: dict[str, int] = {}
    for name, parameter in model.named_parameters():
        is_lora = name.startswith("language_model.") and "lora_" in name
        if name in names or is_lora:
            parameter.requires_grad_(True)
            part = "llm_lora" if is_lora else ("vit_blocks" if name.startswith("vision_model.encoder.")
                                                else name.split(".")[0])
            counts[part] = counts.get(part, 0) + parameter.numel()
            if name.endswith("self_attn.qkv.bias"):
                _zero_key_bias_gradient(parameter)
    return counts


# --------------------------------------------------------------------------- 5. the released-layout checkpoint

def checkpoint_names(model: DeltaVLM, cfg) -> list[str]:
    """The parameters ``checkpoint_best.pth`` holds: the released key set, and any ViT block trained beyond it."""
    return sorted(set(trained_parameter_names(model)) | set(trained_parameter_names(model, cfg.TRAIN_VIT_BLOCKS)))


def llm_lora_names(model: DeltaVLM) -> list[str]:
    """The LoRA parameters on the LLM (its adapter, ``llm_lora/``): none with LLM_LORA_R = 0."""
    return [n for n, p in model.named_parameters() if n.startswith("language_model.") and "lora_" in n]


def save_best_checkpoint(model: DeltaVLM, values: dict[str, torch.Tensor], cfg, run_dir: Path,
                         extras: dict[str, torch.Tensor], epoch: int, scores: dict[str, float]) -> Path:
    """``<run>/checkpoint_best.pth`` in DeltaVLM's LAVIS layout: the released key set (trained parameters and
    the unused extras), plus any ViT block trained beyond the released two; the LoRA adapter beside it. ``values``:
    those parameters' values as ``engines.parameter_values`` gives them (under DeepSpeed the fp32 masters)."""
    state = released_layout_state({name: values[name] for name in checkpoint_names(model, cfg)}, extras)
    target = run_dir / CHECKPOINT_FILE
    with atomic_path(target) as temporary:
        torch.save({"model": state, "epoch": epoch, "scores": scores, "config": {"settings": cfg.as_dict()}},
                   temporary)
    if cfg.LLM_LORA_R:
        # The adapter alone: PEFT would add the embeddings and lm_head of a resized vocabulary (Vicuna's 32000 + the
        # [PAD] row): ~0.5 GB of frozen weights, and under ZeRO-3 empty placeholders that cannot be loaded. The
        # predictor resizes Vicuna the same way before it puts the adapter on.
        adapter = {name.removeprefix("language_model."): values[name] for name in llm_lora_names(model)}
        model.language_model.save_pretrained(str(run_dir / LLM_ADAPTER_DIR), state_dict=adapter,
                                             save_embedding_layers=False)
    return target


def starting_extras(model: DeltaVLM, sources: Sources) -> dict[str, torch.Tensor]:
    carried = load_lavis_state(Path(sources.init)) if sources.init is not None else None
    return released_extras(model.qformer.config, AutoConfig.from_pretrained(local_or_hub(sources.llm)), carried)


# --------------------------------------------------------------------------- 6. validation each epoch

def caption_score(metrics: dict[str, float], best_metric: str) -> float:
    return with_sm(metrics)[best_metric]


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def validate(predictor: Predictor, items: list[Item], batch_size: int, run_dir: Path, epoch: int, settings: dict,
             best_metric: str, args) -> tuple[float, dict[str, float]]:
    """Caption the val pairs with the predictor's own code (each process a share), score them with the suite's
    caption metrics on process 0, write the results like the predictor's batch mode; (score, metrics) everywhere.
    ``args``: the run's TrainingArguments (process 0 loads its text-embedding models outside ZeRO-3)."""
    started = time.time()
    shard = start_shards()  # the training's process group
    records: list = []
    with gathered([predictor.model.query_tokens]):  # read outside the model's forward (it generates)
        # each process a share, gathered at process 0 after every batch; under ZeRO-3 every process takes part in
        # every forward pass (one with nothing left answers a spare pair, unrecorded)
        answer_in_shards(shard, items, batch_size, lambda batch: answer_batch(predictor, batch), records.extend,
                         desc="validation", in_step=zero3_enabled())
    outcome = None
    if shard.main:
        order = {item.id: k for k, item in enumerate(items)}
        records.sort(key=lambda r: order[r["id"]])
        with outside_zero3(args):
            result = score_records(records)["caption"]
        metrics = result.metrics
        score = caption_score(metrics, best_metric)
        stem = run_dir / VALIDATION_DIR / f"epoch{epoch:03d}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(stem.parent / f"{stem.name}.jsonl", records)
        write_metrics(stem, records, MetricsReport(metrics, result.missing, result.models),
                      model=f"DeltaVLM run {run_dir.name}, epoch {epoch}", settings=settings,
                      seconds=round(time.time() - started, 2),
                      extra={"epoch": epoch, "best_metric": best_metric, "score": score})
        outcome = (score, metrics)
    return from_main(shard, outcome)


class EpochValidation(TrainerCallback):
    """Validation at each epoch's end: the captions scored and logged, the best checkpoint kept, an early stop once
    the score has not risen for EARLY_STOP_EPOCHS, and a Trainer checkpoint saved (so a resume knows the history,
    which lives in the Trainer state's log)."""

    def __init__(self, trainer, predictor: Predictor, items: list[Item], cfg, run_dir: Path, extras: dict):
        self.trainer, self.predictor, self.items, self.cfg = trainer, predictor, items, cfg
        self.run_dir, self.extras = run_dir, extras

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        epoch = max(1, math.ceil(state.epoch - 1e-6))  # the epoch just run (MAX_STEPS may end one early)
        best = max((h for h in state.log_history if "val_score" in h), key=lambda h: h["val_score"], default=None)
        score, metrics = self.score_epoch(model, epoch, args)
        self.trainer.log({"val_score": score, "val_epoch": epoch, **{f"val_{k}": v for k, v in metrics.items()}})
        if best is None or score > best["val_score"]:
            self.save_best(model, epoch, metrics, args)
            outcome = f"(best so far) -> {self.run_dir / CHECKPOINT_FILE}"
        else:
            if epoch - best["val_epoch"] >= self.cfg.EARLY_STOP_EPOCHS:
                control.should_training_stop = True
            outcome = (f"(best {best['val_score']:.4f} at epoch {best['val_epoch']})"
                       f"{'; early stop' if control.should_training_stop else ''}")
        if args.process_index == 0:
            print(f"epoch {epoch}: validation {self.cfg.BEST_METRIC} {score:.4f} {outcome}")
        control.should_save = True
        return control

    def score_epoch(self, model, epoch: int, args) -> tuple[float, dict[str, float]]:
        """This epoch's validation: its BEST_METRIC score and every caption metric (the model back in training mode
        after)."""
        model.eval()
        try:
            return validate(self.predictor, self.items, self.cfg.VAL_BATCH_SIZE, self.run_dir, epoch,
                            self.cfg.as_dict(), self.cfg.BEST_METRIC, args)
        finally:
            model.train()

    def save_best(self, model, epoch: int, metrics: dict[str, float], args) -> None:
        """``checkpoint_best.pth`` from this epoch's weights: every process takes part in reading them (under
        ZeRO-3 each holds a shard), process 0 writes them."""
        main = args.process_index == 0
        values = parameter_values(model, checkpoint_names(model, self.cfg) + llm_lora_names(model), keep=main)
        if main:
            save_best_checkpoint(model, values, self.cfg, self.run_dir, self.extras, epoch, metrics)


# --------------------------------------------------------------------------- 7. the Trainer

class DeltaVLMTrainer(SuiteTrainer):
    """Checkpoints hold the trainable parameters only (not the frozen 7B LLM)."""

    trainable_only = True

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        if state_dict is None:
            state_dict = dict(model.named_parameters())
        # (under DeepSpeed the suite's Trainer hands over the trained parameters' fp32 masters, gathered whole)
        save_file({n: state_dict[n].detach().cpu().contiguous() for n in trainable},
                  os.path.join(output_dir, TRAINABLE_WEIGHTS))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = model or self.model
        path = Path(resume_from_checkpoint) / TRAINABLE_WEIGHTS
        if not path.is_file():
            raise UserError(f"{resume_from_checkpoint}: no {TRAINABLE_WEIGHTS}; delete that checkpoint folder")
        state = load_file(str(path))
        wanted = {n for n, p in model.named_parameters() if p.requires_grad}
        if set(state) != wanted:
            raise UserError(f"{path} does not hold this run's trainable parameters "
                            f"({len(set(state) ^ wanted)} names differ)")
        model.load_state_dict(state, strict=False)


def training_arguments(cfg, run_dir: Path):
    """The shared builder's arguments; the trained parameters stay fp32 while AMP runs the model under the autocast
    PRECISION names (auto: bf16 / fp16 on a GPU, as released); validation is this recipe's own, at each epoch's
    end."""
    return trainer_arguments(cfg, run_dir, learning_rate=cfg.LR, compute=device_compute_precision(cfg.PRECISION),
                             gradient_checkpointing=False,
                             eval_strategy="no", save_only_model=False)


def make_trainer(cfg, model: DeltaVLM, tokenizers, examples: list[Example], val_items: list[Item], run_dir: Path,
                 sources: Sources, callbacks: list | None = None):
    """The Trainer with the epoch-end validation attached."""
    start_process_group(deepspeed_plan(cfg.DEEPSPEED), cfg.DIST_TIMEOUT_MINUTES)
    args = training_arguments(cfg, run_dir)
    check_shared_directory(lock_path(run_dir), f"the run directory {run_dir}")  # the first collective of the run
    size_buckets(args, model.language_model.config.hidden_size)
    trainer = DeltaVLMTrainer(model=model, args=args, train_dataset=PairDataset(examples, model.image_size),
                              data_collator=PairCollator(tokenizers), callbacks=list(callbacks or []))
    predictor = Predictor(model, tokenizers, args.device, Decoding(cfg.VAL_NUM_BEAMS, cfg.VAL_MAX_NEW_TOKENS),
                          prompting_of(cfg), synced_gpus=zero3_enabled())
    trainer.add_callback(EpochValidation(trainer, predictor, val_items, cfg, run_dir, starting_extras(model, sources)))
    return trainer


# --------------------------------------------------------------------------- 8. run.json and training

def start_record(cfg, sources: Sources, run_dir: Path, counts: dict[str, int], examples: list[Example],
                 val_items: list[Item], report) -> dict[str, Any]:
    record = {"completed": False, "family": FAMILY_ID, **settings_record(cfg, run_settings(cfg)),
              "sources": dataclasses.asdict(sources),
              "versions": library_versions(),
              "data": data_files(cfg, ("TRAIN_ANNOTATIONS", "VAL_ANNOTATIONS")),
              "num_train_examples": len(examples), "num_val_captions": len(val_items),
              "world_size": launched_processes(),
              "trainable_parameters": counts, "trainable_total": sum(counts.values()), "load_report": report.lines()}
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_file(run_dir, record)
    return record


def replica_checksum(model: DeltaVLM) -> str:
    """A hash of every trainable parameter: equal on all processes when DDP kept them in sync."""
    digest = hashlib.sha256()
    trainable = [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]
    with gathered(parameter for _, parameter in trainable):  # under ZeRO-3: the whole values, not this shard
        for name, parameter in trainable:
            digest.update(name.encode())
            digest.update(parameter.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def train(trainer, run_dir: Path) -> str | None:
    """Train (an existing run resumes from its newest complete checkpoint; torn ones are set aside); returns the
    checkpoint resumed from."""
    return train_from_newest_checkpoint(trainer, run_dir)


def finish(trainer, record: dict[str, Any], run_dir: Path, started: float, resumed_from: str | None) -> dict:
    """run.json completed: curves, best epoch, replica checksums (which must agree under DDP)."""
    rank, world = _world()
    checksum = replica_checksum(trainer.accelerator.unwrap_model(trainer.model))
    checksums = [checksum]
    if world > 1:
        checksums = [None] * world
        torch.distributed.all_gather_object(checksums, checksum)
    history = trainer.state.log_history
    validation = [{k.removeprefix("val_"): v for k, v in h.items() if k.startswith("val_")} | {"step": h["step"]}
                  for h in history if "val_score" in h]
    best = max(validation, key=lambda v: v["score"]) if validation else None
    record.update({"completed": True, "seconds": round(time.time() - started, 1),
                   "global_step": trainer.state.global_step, "world_size": world, "resumed_from": resumed_from,
                   "loss_curve": [{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h],
                   "validation_curve": validation, "best_epoch": best and best["epoch"], "engine": engine_of(trainer),
                   "best_score": best and best["score"], "replica_checksums": checksums})
    if rank == 0:
        write_run_file(run_dir, record)
        curve = record["loss_curve"]
        if curve:
            print(f"loss {curve[0]['loss']:.3f} -> {curve[-1]['loss']:.3f} over {trainer.state.global_step} steps")
        if best:
            print(f"best {record['settings']['BEST_METRIC']} {best['score']:.4f} at epoch {best['epoch']}: "
                  f"{run_dir / CHECKPOINT_FILE}")
        if len(set(checksums)) > 1:
            raise UserError(f"the {world} processes ended with different weights (DDP out of sync): {checksums}")
    return record
