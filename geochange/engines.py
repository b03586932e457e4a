"""How training spreads over devices, on engines that exist: one process per GPU under torchrun / accelerate (never
``nn.DataParallel``), DeepSpeed ZeRO-2/3 from a config file (``configs/deepspeed/``), and the ZeRO-3 switch that
post-training loads (evaluation, merging, a first-time prune) must step outside of; and, for run.json, the engine a
run actually trained on.

DeepSpeed keeps its config alive in transformers once a run's ``TrainingArguments`` exist: every
``from_pretrained`` then enters ``zero.Init`` and partitions the weights across the processes, which must all take
part. A model loaded by one process only (rank 0 evaluating or merging) would wait forever for the others, so such
loads run ``outside_zero3``.
"""
from __future__ import annotations

import json
import os
import socket
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager, Iterable, Iterator

from .devices import is_distributed_launch, peak_memory_gib
from .errors import UserError, first_line

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs" / "deepspeed"


@dataclass(frozen=True)
class DeepSpeedPlan:
    """What a DEEPSPEED config file asks for."""
    path: str
    stage: int                # ZeRO stage 0..3
    offload_optimizer: bool   # optimizer states (and the update) on the CPU
    offload_params: bool      # ZeRO-3 parameters on the CPU
    has_optimizer: bool       # the file names its own optimizer (DeepSpeed's; needed with offload)


def deepspeed_plan(path: str | None) -> DeepSpeedPlan | None:
    """The DEEPSPEED config file read and checked (None without one); one-line errors for what cannot run."""
    if path is None:
        return None
    config_path = Path(path)
    if not config_path.is_file():
        shipped = ", ".join(str(p.relative_to(CONFIGS_DIR.parent.parent)) for p in sorted(CONFIGS_DIR.glob("*.json")))
        raise UserError(f"DEEPSPEED: no config file {path} (shipped: {shipped})")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"DEEPSPEED: {path} is not a JSON config ({first_line(exc, 160)})") from None
    zero = config.get("zero_optimization", {}) if isinstance(config, dict) else {}
    stage = zero.get("stage", 0)
    if not isinstance(stage, int) or stage not in (0, 1, 2, 3):
        raise UserError(f"DEEPSPEED: {path} asks for ZeRO stage {stage!r}; DeepSpeed has stages 0-3")
    try:
        import deepspeed  # noqa: F401
    except ImportError as exc:
        raise UserError(f"DEEPSPEED={path} but DeepSpeed cannot be imported ({first_line(exc, 160)}); "
                        "pip install -r requirements.txt") from None

    def offloaded(key: str) -> bool:
        return str(zero.get(key, {}).get("device", "none")).lower() in ("cpu", "nvme")

    plan = DeepSpeedPlan(str(path), stage, offloaded("offload_optimizer"), offloaded("offload_param"),
                         "optimizer" in config)
    if (plan.offload_optimizer or plan.offload_params) and not plan.has_optimizer:
        raise UserError(f"DEEPSPEED: {path} offloads to the CPU but names no optimizer: an offloaded update needs "
                        "DeepSpeed's CPU Adam (an \"optimizer\" section, as in configs/deepspeed/zero3_offload.json)")
    return plan


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_deepspeed(plan: DeepSpeedPlan | None) -> None:
    """Make DeepSpeed's process group before the Trainer's arguments exist: a plain ``python script.py`` becomes a
    one-process world (ZeRO-3 with offload on one GPU is a real use), and on a CPU the group uses gloo (DeepSpeed's
    CPU accelerator would ask for oneCCL)."""
    if plan is None:
        return
    import deepspeed
    import torch

    if not is_distributed_launch() and "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


@contextmanager
def outside_zero3(args) -> Iterator[None]:
    """Loads inside this block are plain loads of the whole model in this process, even while the run's ZeRO-3
    config is alive (``args``: the run's TrainingArguments)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    config = getattr(args, "hf_deepspeed_config", None)
    if config is None or not hf_deepspeed.is_deepspeed_zero3_enabled():
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(config)


def size_buckets(args, hidden_size: int) -> None:
    """Fill a DeepSpeed config's ``auto`` bucket sizes from ``hidden_size``, as transformers fills them from a model's
    ``config.hidden_size`` (a model without a transformers config, like DeltaVLM, gets them from its LLM's width)."""
    config = getattr(args, "hf_deepspeed_config", None)
    if config is None:
        return
    config.fill_only("zero_optimization.reduce_bucket_size", hidden_size * hidden_size)
    config.fill_only("zero_optimization.stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size))
    config.fill_only("zero_optimization.stage3_param_persistence_threshold", 10 * hidden_size)


def zero3_enabled() -> bool:
    """Whether this run's weights are partitioned across the processes (a ZeRO-3 config is alive)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    return hf_deepspeed.is_deepspeed_zero3_enabled()


def gathered(parameters: Iterable) -> ContextManager:
    """Inside this block ``parameters`` hold their whole values on every process (under ZeRO-3 each holds a shard
    between forward passes): to read them outside a forward pass, e.g. to save or hash them. Every process must
    enter it (a collective gather); without ZeRO-3 it does nothing."""
    if not zero3_enabled():
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(parameters), modifier_rank=None)


def one_process_per_gpu(args) -> str | None:
    """Never ``nn.DataParallel``: a plain ``python script.py`` on a machine with several GPUs trains on the first
    (the Trainer would wrap all of them in DataParallel, multiplying the batch while run.json says world size 1).
    Returns the line that says so and how to use them all, or None."""
    if args.world_size > 1 or args.n_gpu <= 1:
        return None
    gpus = args.n_gpu
    args._n_gpu = 1  # what the Trainer reads to decide on DataParallel
    return (f"note: {gpus} GPUs visible but one process: training on one GPU. To train on all {gpus}: "
            f"torchrun --nproc_per_node {gpus} <script> ... (or accelerate launch --num_processes {gpus} ...)")


def engine_of(trainer) -> dict:
    """How the run actually trained, for run.json: processes, DDP or DeepSpeed (stage), the optimizer (fused?), and
    this process's peak GPU memory (GiB, allocated and reserved)."""
    args = trainer.args
    wrapped = trainer.model_wrapped
    engine = {"world_size": args.world_size, "wrapper": type(wrapped).__name__}
    if type(wrapped).__name__ == "DistributedDataParallel":
        engine["gradient_as_bucket_view"] = bool(wrapped.gradient_as_bucket_view)
    if args.deepspeed:
        engine["deepspeed"] = {"config": str(args.deepspeed),
                               "zero_stage": int(args.hf_deepspeed_config.config["zero_optimization"].get("stage", 0))}
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    engine["optimizer"] = type(optimizer).__name__
    defaults = getattr(optimizer, "defaults", {})
    if "fused" in defaults:
        engine["fused"] = bool(defaults["fused"])
    if args.device.type == "cuda":
        engine["peak_memory_gib"] = peak_memory_gib(args.device)
    return engine
