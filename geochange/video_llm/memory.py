"""How much memory a fine-tuning run needs per device and per node, estimated from the model's config before any
weight loads, and compared with what the device and the machine have free (``MEMORY_CHECK``).

Parameters are counted on the meta device from ``config.json`` (no weights). Bytes per parameter, by mode, without
DeepSpeed (one process, or DDP: each process loads straight onto its GPU, so host memory is not the limit):

* full fine-tuning: fp32 weights (the master copy) 4 + fp32 gradients 4 + AdamW's two moments 8 = 16 for what
  trains; frozen parts (the towers with ``FREEZE_VISION``) 4.
* LoRA: the frozen model in the compute dtype (2 on GPUs, 4 on the CPU), LoRA's own weights 16.
* QLoRA: the language model's Linears at 0.5 (4-bit nf4, double quantisation: ~0.51) or 1 (8-bit) byte, every other
  weight 4 (``prepare_model_for_kbit_training`` upcasts what is not quantised to fp32: 0.89 B values at 7B), LoRA 16.
* PyTorch's multi-tensor (foreach) AdamW holds one extra fp32 copy of what it updates; the fused one none.

Under DeepSpeed, as DeepSpeed's own estimators count (``estimate_zero2_model_states_mem_needs``,
``estimate_zero3_model_states_mem_needs``, tested against them) for what trains, plus the frozen weights:

* on the GPU: 16-bit weights 2 for every parameter (DeepSpeed casts the module; under ZeRO-3 divided by the world
  size, plus the largest layer gathered whole, 4 bytes a value), and for each trained parameter 18 more divided by
  the world size (16-bit and fp32 gradients 6, the fp32 master and AdamW's moments 12; ZeRO-3's 18 includes its 16-bit
  weight); an offloaded optimizer takes the 18 to the CPU (its 16 there), offloaded ZeRO-3 weights their 2.
* on the host, per node: each process loads the whole model on the CPU first (4 bytes a value; under ZeRO-3 only the
  largest layer at a time, ``zero.Init``), or the offloaded states (divided among the nodes), whichever is more, times
  DeepSpeed's 1.5 for buffers. ZeRO-3 + CPU offload of a 7B full fine-tuning: about 200 GB.

Activations, a stated allowance for the language model (Korthikanti et al. 2022, 16-bit, attention scores fused away
by SDPA) at T = MAX_LENGTH tokens: 34·B·T·h bytes per layer without gradient checkpointing; with it, each layer's
input 2·B·T·h plus one layer's working set 34·B·T·h; doubled in fp32 on a CPU; plus the fp32 logits and their
gradient 8·B·T·V; and, for a vision tower that trains, 34 bytes per value of its layers over B·NUM_FRAMES·patches
tokens (a frozen tower keeps none).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import UserError, first_line
from ..paths import local_or_hub
from .families import FAMILIES, get_family

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
    largest_layer: int         # the most values one module holds itself (ZeRO-3 gathers a layer whole to compute)
    hidden: int
    layers: int
    vocab: int
    vision_hidden: int
    vision_layers: int
    patches: int               # vision tokens per frame


# The clip size the tower's tokens are counted at where the clips are not known yet (CLIP towers crop every clip to
# their input; Qwen2.5-VL's reads it at its size): the sample data's and scene tiles' 256 x 256.
ESTIMATE_CLIP_SIZE = (256, 256)


def parameter_counts(config, family: str, lora_r: int,
                     clip_size: tuple[int, int] = ESTIMATE_CLIP_SIZE) -> ParameterCounts:
    """The model's parameters counted on the meta device (its config only: no weight is read), and the tokens its
    vision tower computes over a frame of ``clip_size`` (width, height)."""
    import torch

    entry = get_family(family)
    with torch.device("meta"):
        model = entry.model_class(config)
    parts = entry.parts
    counts = {"total": 0, "language_linears": 0, "vision": 0, "towers": 0, "lora": 0, "largest_layer": 0}
    for name, module in model.named_modules():
        counts["largest_layer"] = max(counts["largest_layer"],
                                      sum(p.numel() for p in module.parameters(recurse=False)))
        if isinstance(module, torch.nn.Linear) and parts.in_language_model(name):
            counts["language_linears"] += module.weight.numel()
            counts["lora"] += lora_r * (module.in_features + module.out_features)
    for name, parameter in model.named_parameters():
        counts["total"] += parameter.numel()
        if parts.part_of(name) in parts.vision:
            counts["vision"] += parameter.numel()
        if parts.in_tower(name):
            counts["towers"] += parameter.numel()
    text, vision = config.text_config, config.vision_config
    return ParameterCounts(**counts, hidden=text.hidden_size, layers=text.num_hidden_layers, vocab=text.vocab_size,
                           vision_hidden=vision.hidden_size, vision_layers=vision.num_hidden_layers,
                           # per frame of a pair (Qwen's tower reads two frames as one temporal patch)
                           patches=entry.tower_tokens(config, 2, clip_size[1], clip_size[0]) // 2)


@dataclass
class MemoryEstimate:
    """Bytes per device, by what holds them; and ``host``: bytes of host memory per node (DeepSpeed)."""
    weights: float
    gradients: float
    optimizer: float
    temporaries: float
    activations: float
    host: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.temporaries + self.activations

    @property
    def model_states(self) -> float:
        """What DeepSpeed's estimators count on a device: weights, gradients and optimizer states."""
        return self.weights + self.gradients + self.optimizer

    def line(self) -> str:
        host = f"; host memory about {self.host / GB:.1f} GB per node" if self.host else ""
        return (f"about {self.total / GB:.1f} GB per device (weights {self.weights / GB:.1f}, gradients "
                f"{self.gradients / GB:.1f}, optimizer {self.optimizer / GB:.1f}, temporaries "
                f"{self.temporaries / GB:.1f}, activations {self.activations / GB:.1f}){host}")


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
    local_processes: int = 1    # processes per node (GPUs per node)
    fused_optimizer: bool = True
    batch_size: int = 4
    max_length: int = 1024
    num_frames: int = 2
    checkpointing: bool = True
    gpu: bool = True            # 16-bit compute (bf16 / fp16) on a GPU, fp32 on a CPU


# DeepSpeed's estimators multiply the host memory by this for buffers (their additional_buffer_factor).
HOST_BUFFER_FACTOR = 1.5


def estimate(counts: ParameterCounts, setup: Setup) -> MemoryEstimate:
    """The bytes per device (and host bytes per node) ``setup`` needs for a model of ``counts`` (see the module's
    docstring)."""
    compute = 2 if setup.gpu else 4
    world = max(1, setup.world_size)
    per_node = max(1, min(setup.local_processes, world))
    nodes = max(1, world // per_node)
    if setup.mode == "FULL":
        trained = counts.total - (counts.towers if setup.freeze_vision else 0)
        model = counts.total
    else:
        trained = counts.lora
        model = counts.total + counts.lora
    frozen = model - trained
    quantised = counts.language_linears if setup.mode == "QLORA" else 0
    per_quantised = (NF4_BYTES if setup.bits == 4 else 1.0) if quantised else 0.0
    stage = setup.zero_stage
    if stage is None:
        if setup.mode == "FULL":  # fp32 master weights and AdamW, as the Trainer runs full fine-tuning
            frozen_bytes = 4 * frozen
        else:  # QLoRA: what is not quantised is upcast to fp32 (prepare_model_for_kbit_training)
            frozen_bytes = per_quantised * quantised + (4 if quantised else compute) * (frozen - quantised)
        weights, gradients, optimizer = frozen_bytes + 4 * trained, 4 * trained, 8 * trained
        temporaries = 0.0 if setup.fused_optimizer else 4 * trained
        host = 0.0  # each process loads straight onto its device
    else:
        # DeepSpeed: the module in 16 bits (fp32 on a CPU), gradients (16-bit and fp32), fp32 master and moments
        model_bytes, gradient_bytes, state_bytes = (2, 6, 12) if setup.gpu else (4, 4, 8)
        frozen_bytes = per_quantised * quantised + model_bytes * (frozen - quantised)
        weights = frozen_bytes + model_bytes * trained
        # (ZeRO-3 reduces the 16-bit gradients straight into their fp32 partitions: its 18 bytes include the weight)
        gradients = (gradient_bytes - (model_bytes if stage == 3 else 0)) * trained / (world if stage >= 2 else 1)
        optimizer = state_bytes * trained / (world if stage >= 1 else 1)
        offloaded = 0.0
        if setup.offload_optimizer:
            offloaded += (gradient_bytes - model_bytes + state_bytes) * trained  # fp32 gradients, master, moments
            gradients = optimizer = 0.0
        if stage == 3:
            weights /= world
            if setup.offload_params:
                offloaded += weights * world
                weights = 0.0
            weights += 4 * counts.largest_layer  # the layer being computed, gathered whole
        loading = 4 * (counts.largest_layer if stage == 3 else model) * per_node  # zero.Init loads a layer at a time
        host = HOST_BUFFER_FACTOR * max(loading, offloaded / nodes)
        temporaries = 0.0
    tokens = setup.batch_size * setup.max_length
    layer_bytes = 34 * tokens * counts.hidden * (1 if setup.gpu else 2)
    per_layer_inputs = 2 * tokens * counts.hidden * (1 if setup.gpu else 2)
    activations = (counts.layers * per_layer_inputs + layer_bytes if setup.checkpointing
                   else counts.layers * layer_bytes) + 8 * tokens * counts.vocab
    if setup.mode == "FULL" and not setup.freeze_vision:  # a training tower keeps its activations for the backward
        frames = setup.batch_size * setup.num_frames * counts.patches
        activations += counts.vision_layers * 34 * frames * counts.vision_hidden * (1 if setup.gpu else 2)
    return MemoryEstimate(weights, gradients, optimizer, temporaries, activations, host)


def host_memory() -> float:
    """Bytes of host memory this machine has available now (MemAvailable), for all its processes together."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def free_memory(device) -> tuple[float, str]:
    """(bytes free, what was measured) on ``device``: the GPU's free memory, or the machine's available RAM shared
    by the processes of this node."""
    if device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return float(free), f"free on {device} ({torch.cuda.get_device_name(device)})"
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return host_memory() / processes, "of RAM available" + (f" per process ({processes} on this node)"
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
            zero3 = estimate(counts, Setup(**{**setup.__dict__, "zero_stage": 3, "world_size": gpus,
                                              "local_processes": gpus}))
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


def host_ways_out(counts: ParameterCounts, setup: Setup) -> str:
    """What needs less host memory per node, each with its own estimate."""
    options = []
    gpus = max(8, setup.world_size)
    if setup.zero_stage != 3 or setup.offload_optimizer or setup.offload_params:
        zero3 = estimate(counts, Setup(**{**setup.__dict__, "zero_stage": 3, "offload_optimizer": False,
                                          "offload_params": False, "world_size": gpus,
                                          "local_processes": min(gpus, 8)}))
        options.append(f"DEEPSPEED=configs/deepspeed/zero3.json on {gpus} GPUs (no offload: the model loads a layer at "
                       f"a time; host {zero3.host / GB:.0f} GB, {zero3.total / GB:.1f} GB per GPU)")
    if setup.offload_optimizer or setup.offload_params:
        options.append("more nodes (the offloaded states are divided among them)")
    if setup.local_processes > 1:
        options.append("fewer processes per node")
    if setup.mode == "FULL":
        lora = estimate(counts, Setup(**{**setup.__dict__, "mode": "LORA"}))
        options.append(f"LoRA (USE_LORA=True, host {lora.host / GB:.0f} GB)")
    return "; ".join(options)


def check_fits(counts: ParameterCounts, setup: Setup, what: str, device: tuple[float, str],
               host_available: float) -> None:
    """Stop in one line, with the ways out, when the run needs more than the device has free (``device``: bytes free
    and where, from ``free_memory``) or, under DeepSpeed, more host memory per node than the machine has available.
    ``what`` names the run in the line ("FULL, ZeRO-3 over 8 processes, 7.37 B")."""
    need = estimate(counts, setup)
    available, where = device
    if need.total > available:
        raise UserError(f"memory check: {what} parameters needs about {need.total / GB:.1f} GB per device but "
                        f"{available / GB:.1f} GB are {where}; ways out: {ways_out(counts, setup, available)}; or "
                        "MEMORY_CHECK=False to try anyway")
    if need.host > host_available:
        why = ("the optimizer states" + (" and the weights" if setup.offload_params else "") + " offloaded to the CPU"
               if setup.offload_optimizer or setup.offload_params else
               f"each of its {setup.local_processes} processes on a node loads the model on the CPU first")
        raise UserError(f"memory check: {what} parameters needs about {need.host / GB:.0f} GB of host memory per node "
                        f"under DeepSpeed ({why}) but {host_available / GB:.1f} GB are available on this machine; "
                        f"ways out: {host_ways_out(counts, setup)}; or MEMORY_CHECK=False to try anyway")


# The table docs/gpu.md shows: each family's 7B model, each mode, on GPUs (bf16), batch 4, MAX_LENGTH 1024.
TABLE_SETUPS = (("full fine-tuning, 1 GPU", Setup("FULL")),
                ("full, ZeRO-2 over 8 GPUs", Setup("FULL", zero_stage=2, world_size=8, local_processes=8)),
                ("full, ZeRO-3 over 8 GPUs", Setup("FULL", zero_stage=3, world_size=8, local_processes=8)),
                ("full, ZeRO-3 + CPU offload, 1 GPU", Setup("FULL", zero_stage=3, offload_optimizer=True,
                                                           offload_params=True)),
                ("LoRA r=8", Setup("LORA")),
                ("QLoRA 8-bit", Setup("QLORA", bits=8)),
                ("QLoRA 4-bit nf4", Setup("QLORA", bits=4)))


def memory_table() -> str:
    """Markdown: estimated GB per device for every family's 7B model in every mode of TABLE_SETUPS."""
    counts = {family.id: parameter_counts(family.real_size_config(None), family.id, 8) for family in FAMILIES.values()}
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
