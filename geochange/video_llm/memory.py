"""How much memory a fine-tuning run needs per device, estimated from the model's config before any weight loads,
and compared with what the device has free (``MEMORY_CHECK``).

Parameters are counted on the meta device from ``config.json`` (no weights). Bytes per parameter, by mode:

* full fine-tuning: fp32 weights (the master copy) 4 + fp32 gradients 4 + AdamW's two moments 8 = 16 for what
  trains; frozen parts (the towers with ``FREEZE_VISION``) 4. Under DeepSpeed with bf16 the model is 2, its
  gradients 2 and the optimizer's fp32 master copy and moments 12; ZeRO-1 divides the 12 by the world size, ZeRO-2
  the gradients too, ZeRO-3 everything (plus the layers being computed, gathered whole: up to 1e9 parameters); an
  offloaded optimizer (and ZeRO-3 parameters) leave the GPU.
* LoRA: the frozen model in the compute dtype (2 on GPUs, 4 on the CPU), LoRA's own weights 16.
* QLoRA: the language model's Linears at 0.5 (4-bit nf4, double quantisation: ~0.51) or 1 (8-bit) byte, the rest in
  the compute dtype, LoRA 16.
* PyTorch's multi-tensor (foreach) AdamW holds one extra fp32 copy of what it updates; the fused one none.
* Activations, a stated allowance for the language model (Korthikanti et al. 2022, 16-bit, attention scores fused
  away by SDPA) at T = MAX_LENGTH tokens: 34·B·T·h bytes per layer without gradient checkpointing; with it, each
  layer's input 2·B·T·h plus one layer's working set 34·B·T·h; doubled in fp32 on a CPU; plus the fp32 logits and
  their gradient 8·B·T·V; and, for a vision tower that trains, 34 bytes per value of its layers over
  B·NUM_FRAMES·patches tokens (a frozen tower keeps none).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import UserError, first_line
from ..paths import local_or_hub
from .families import FAMILIES, VISION_MODULE_NAMES, get_family

GB = 1e9
# 4-bit nf4 with double quantisation: half a byte a value, plus one absmax per 64 values (8-bit, itself quantised).
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)


@dataclass
class ParameterCounts:
    total: int
    language_linears: int      # the Linears QLoRA quantises
    vision: int                # towers and projector
    towers: int                # the vision towers alone (FREEZE_VISION)
    lora: int                  # LoRA's A and B at this rank, on every Linear of the language model
    hidden: int
    layers: int
    vocab: int
    vision_hidden: int
    vision_layers: int
    patches: int               # vision tokens per frame


def parameter_counts(config, family: str, lora_r: int) -> ParameterCounts:
    """The model's parameters counted on the meta device (its config only: no weight is read)."""
    import torch

    with torch.device("meta"):
        model = get_family(family).model_class(config)
    counts = {"total": 0, "language_linears": 0, "vision": 0, "towers": 0, "lora": 0}
    for name, module in model.named_modules():
        parts = name.split(".")
        if isinstance(module, torch.nn.Linear) and "language_model" in parts and parts[-1] != "lm_head":
            counts["language_linears"] += module.weight.numel()
            counts["lora"] += lora_r * (module.in_features + module.out_features)
    for name, parameter in model.named_parameters():
        parts = name.split(".")
        counts["total"] += parameter.numel()
        if any(part in VISION_MODULE_NAMES for part in parts):
            counts["vision"] += parameter.numel()
        if any(part.endswith("_tower") for part in parts):
            counts["towers"] += parameter.numel()
    text, vision = config.text_config, config.vision_config
    return ParameterCounts(**counts, hidden=text.hidden_size, layers=text.num_hidden_layers, vocab=text.vocab_size,
                           vision_hidden=vision.hidden_size, vision_layers=vision.num_hidden_layers,
                           patches=(vision.image_size // vision.patch_size) ** 2 + 1)


@dataclass
class MemoryEstimate:
    """Bytes per device, by what holds them."""
    weights: float
    gradients: float
    optimizer: float
    temporaries: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.temporaries + self.activations

    def line(self) -> str:
        return (f"about {self.total / GB:.1f} GB per device (weights {self.weights / GB:.1f}, gradients "
                f"{self.gradients / GB:.1f}, optimizer {self.optimizer / GB:.1f}, temporaries "
                f"{self.temporaries / GB:.1f}, activations {self.activations / GB:.1f})")


@dataclass(frozen=True)
class Setup:
    """What decides the memory besides the model: mode, engine, processes, batch and precision."""
    mode: str                   # "FULL", "LORA", "QLORA"
    bits: int | None = None     # QLoRA's 4 or 8
    freeze_vision: bool = True
    zero_stage: int | None = None
    offload_optimizer: bool = False
    offload_params: bool = False
    world_size: int = 1
    fused_optimizer: bool = True
    batch_size: int = 4
    max_length: int = 1024
    num_frames: int = 2
    checkpointing: bool = True
    gpu: bool = True            # 16-bit compute (bf16 / fp16) on a GPU, fp32 on a CPU


def estimate(counts: ParameterCounts, setup: Setup) -> MemoryEstimate:
    """The bytes per device ``setup`` needs for a model of ``counts`` (see the module's docstring)."""
    compute = 2 if setup.gpu else 4
    world = max(1, setup.world_size)
    frozen_dtype = compute
    if setup.mode == "FULL":
        trainable = counts.total - (counts.towers if setup.freeze_vision else 0)
        if setup.zero_stage is None:  # fp32 master weights and AdamW, as the Trainer runs full fine-tuning
            weights, gradients, optimizer = 4 * counts.total, 4 * trainable, 8 * trainable
        else:  # DeepSpeed: 16-bit model and gradients on a GPU, fp32 master copy and moments in the optimizer
            model_bytes, state_bytes = (2, 12) if setup.gpu else (4, 8)
            weights = model_bytes * counts.total
            gradients = model_bytes * trainable
            optimizer = state_bytes * trainable
            stage = setup.zero_stage
            optimizer /= world if stage >= 1 else 1
            gradients /= world if stage >= 2 else 1
            weights /= world if stage >= 3 else 1
            if setup.offload_optimizer:
                optimizer, gradients = 0.0, gradients if stage < 2 else 0.0
            if setup.offload_params and stage == 3:
                weights = 0.0
            if stage == 3:  # the layers being computed are gathered whole (stage3_max_live_parameters: 1e9)
                weights += model_bytes * min(counts.total, 1e9)
        temporaries = 0.0 if setup.fused_optimizer or setup.zero_stage is not None else 4 * trainable
    else:
        lora = counts.lora
        if setup.mode == "QLORA":
            per_value = NF4_BYTES if setup.bits == 4 else 1.0
            weights = per_value * counts.language_linears + frozen_dtype * (counts.total - counts.language_linears)
        else:
            weights = frozen_dtype * counts.total
        weights += 4 * lora
        gradients, optimizer = 4 * lora, 8 * lora
        temporaries = 0.0 if setup.fused_optimizer else 4 * lora
        if setup.zero_stage is not None:
            optimizer /= world if setup.zero_stage >= 1 else 1
            gradients /= world if setup.zero_stage >= 2 else 1
    tokens = setup.batch_size * setup.max_length
    layer_bytes = 34 * tokens * counts.hidden * (1 if setup.gpu else 2)
    per_layer_inputs = 2 * tokens * counts.hidden * (1 if setup.gpu else 2)
    activations = (counts.layers * per_layer_inputs + layer_bytes if setup.checkpointing
                   else counts.layers * layer_bytes) + 8 * tokens * counts.vocab
    if setup.mode == "FULL" and not setup.freeze_vision:  # a training tower keeps its activations for the backward
        frames = setup.batch_size * setup.num_frames * counts.patches
        activations += counts.vision_layers * 34 * frames * counts.vision_hidden * (1 if setup.gpu else 2)
    return MemoryEstimate(weights, gradients, optimizer, temporaries, activations)


def free_memory(device) -> tuple[float, str]:
    """(bytes free, what was measured) on ``device``: the GPU's free memory, or the machine's available RAM shared
    by the processes of this node."""
    if device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return float(free), f"free on {device} ({torch.cuda.get_device_name(device)})"
    available = None
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    available = float(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        available = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return available / processes, "of RAM available" + (f" per process ({processes} on this node)"
                                                         if processes > 1 else "")


def model_config(model_path: str):
    """The model's config.json (no weights), or one line saying why it cannot be read."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(local_or_hub(model_path))
    except Exception as exc:  # no config.json, not a transformers model, not reachable
        raise UserError(f"cannot read the config of {model_path!r} for the memory check: {first_line(exc, 200)} "
                        "(MEMORY_CHECK=False skips the check)") from None


def ways_out(counts: ParameterCounts, setup: Setup, available: float) -> str:
    """What would fit instead, each with its own estimate."""
    options = []
    if setup.mode == "FULL":
        for gpus in (2, 4, 8):
            zero3 = estimate(counts, Setup(**{**setup.__dict__, "zero_stage": 3, "world_size": gpus}))
            if zero3.total <= available or gpus == 8:
                options.append(f"DEEPSPEED=configs/deepspeed/zero3.json on {gpus} GPUs "
                               f"({zero3.total / GB:.1f} GB each)")
                break
        lora = estimate(counts, Setup(**{**setup.__dict__, "mode": "LORA"}))
        options.append(f"LoRA (USE_LORA=True, {lora.total / GB:.1f} GB)")
    if setup.mode != "QLORA":
        qlora = estimate(counts, Setup(**{**setup.__dict__, "mode": "QLORA", "bits": 4, "zero_stage": None}))
        options.append(f"QLoRA (USE_QLORA=True, {qlora.total / GB:.1f} GB)")
    if setup.batch_size > 1:
        smaller = estimate(counts, Setup(**{**setup.__dict__, "batch_size": 1}))
        options.append(f"BATCH_SIZE=1 with GRAD_ACCUM={setup.batch_size} ({smaller.total / GB:.1f} GB)")
    if not setup.checkpointing:
        options.append("GRADIENT_CHECKPOINTING=True")
    options.append("fewer frames (NUM_FRAMES) or a smaller MAX_LENGTH")
    return "; ".join(options)


# The table docs/gpu.md shows: each family's 7B model, each mode, on GPUs (bf16), batch 4, MAX_LENGTH 1024.
TABLE_SETUPS = (("full fine-tuning, 1 GPU", Setup("FULL")),
                ("full, ZeRO-2 over 8 GPUs", Setup("FULL", zero_stage=2, world_size=8)),
                ("full, ZeRO-3 over 8 GPUs", Setup("FULL", zero_stage=3, world_size=8)),
                ("full, ZeRO-3 + CPU offload, 1 GPU", Setup("FULL", zero_stage=3, offload_optimizer=True,
                                                           offload_params=True)),
                ("LoRA r=8", Setup("LORA")),
                ("QLoRA 8-bit", Setup("QLORA", bits=8)),
                ("QLoRA 4-bit nf4", Setup("QLORA", bits=4)))


def memory_table() -> str:
    """Markdown: estimated GB per device for every family's 7B model in every mode of TABLE_SETUPS."""
    counts = {family.id: parameter_counts(family.real_size_config(), family.id, 8) for family in FAMILIES.values()}
    lines = ["| mode | " + " | ".join(f"{f.display_name} ({counts[f.id].total / 1e9:.2f} B)"
                                     for f in FAMILIES.values()) + " |",
             "| --- |" + " --- |" * len(FAMILIES)]
    for label, setup in TABLE_SETUPS:
        lines.append(f"| {label} | " + " | ".join(f"{estimate(counts[f.id], setup).total / GB:.1f} GB"
                                                 for f in FAMILIES.values()) + " |")
    return "\n".join(lines)


def memory_table_main(argv: list[str]) -> int:
    """``python common.py memory-table``: the estimates the memory check makes, for the 7B models."""
    if argv:
        raise UserError("usage: python common.py memory-table")
    print(memory_table())
    return 0
