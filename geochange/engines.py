"""How training spreads over devices, on engines that exist: one process per GPU under torchrun / accelerate (never
``nn.DataParallel``), DeepSpeed ZeRO-2/3 from a config file (``configs/deepspeed/``), and the ZeRO-3 switch that
post-training loads (evaluation, merging, a first-time prune) must step outside of; how long a process waits for the
others (``DIST_TIMEOUT_MINUTES``, one setting for every engine); and, for run.json, the engine a run actually trained
on.

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
from datetime import timedelta
from pathlib import Path
from typing import ContextManager, Iterable, Iterator

from .devices import is_distributed_launch, peak_memory_gib
from .errors import UserError, first_line

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs" / "deepspeed"


def dist_timeout(minutes: float) -> timedelta:
    """``DIST_TIMEOUT_MINUTES`` as the timeout every process group of a run gets (DeepSpeed's, the Trainer's DDP one,
    sharded inference's): how long a process waits in a collective for the others before it gives up."""
    if not minutes > 0:
        raise UserError(f"DIST_TIMEOUT_MINUTES must be > 0 (how long a process waits for the others), not {minutes}")
    return timedelta(minutes=minutes)


def group_timeout_minutes() -> float | None:
    """The timeout of this process's default process group, read back from the group itself (None without one)."""
    import torch

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    group = torch.distributed.distributed_c10d._get_default_group()
    device = torch.device("cuda") if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
    try:
        timeout = group._get_backend(device).options._timeout
    except (AttributeError, RuntimeError):  # a backend that does not expose its options
        return None
    return round(timeout.total_seconds() / 60, 4)


@dataclass(frozen=True)
class DeepSpeedPlan:
    """What a DEEPSPEED config file asks for."""
    path: str
    stage: int                # ZeRO stage 0..3
    offload_optimizer: bool   # optimizer states (and the update) on the CPU
    offload_params: bool      # ZeRO-3 parameters on the CPU
    optimizer: str | None     # what the file's own "optimizer" block makes DeepSpeed run, in words (None: OPTIM)

    @property
    def has_optimizer(self) -> bool:
        """The file names its own optimizer (DeepSpeed's, which runs instead of OPTIM; needed with offload)."""
        return self.optimizer is not None


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

    block = config.get("optimizer")
    plan = DeepSpeedPlan(str(path), stage, offloaded("offload_optimizer"), offloaded("offload_param"),
                         deepspeed_optimizer(block, offloaded("offload_optimizer")) if block is not None else None)
    if (plan.offload_optimizer or plan.offload_params) and not plan.has_optimizer:
        raise UserError(f"DEEPSPEED: {path} offloads to the CPU but names no optimizer: an offloaded update needs "
                        "DeepSpeed's CPU Adam (an \"optimizer\" section, as in configs/deepspeed/zero3_offload.json)")
    return plan


def deepspeed_optimizer(block: dict, offload: bool) -> str:
    """What a DeepSpeed config's ``"optimizer"`` block runs (DeepSpeed's engine picks it by type and settings), in
    words: its Adam / AdamW is its own fused kernel (its CPU Adam when the optimizer is offloaded), compiled on first
    use, unless ``"torch_adam": true`` asks for PyTorch's."""
    kind = str(block.get("type", "?"))
    if kind.lower() not in ("adam", "adamw"):
        return f"{kind} (DeepSpeed's)"
    if (block.get("params") or {}).get("torch_adam"):
        return f"{kind} as torch.optim.{'AdamW' if kind.lower() == 'adamw' else 'Adam'} (torch_adam)"
    kernel = "DeepSpeedCPUAdam" if offload else "FusedAdam"
    return (f"{kind} as DeepSpeed's {kernel}, compiled on first use (a C++ compiler; on a GPU the CUDA toolkit too; "
            "\"torch_adam\": true in its params runs PyTorch's instead)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_process_group(plan: DeepSpeedPlan | None, timeout_minutes: float) -> None:
    """Make the run's process group before the Trainer's arguments exist, waiting ``timeout_minutes`` for a late
    process (DIST_TIMEOUT_MINUTES): the Trainer passes its ``ddp_timeout`` on for a GPU run only, never to a group
    that already exists, and DeepSpeed's own default is 10 minutes. Under DeepSpeed (``plan``) DeepSpeed's group: a
    plain ``python script.py`` becomes a one-process world (ZeRO-3 with offload on one GPU is a real use), and on a
    CPU the group uses gloo (DeepSpeed's CPU accelerator would ask for oneCCL). Otherwise, under torchrun /
    accelerate, the group the Trainer's DDP then uses (NCCL, each process on its own GPU; gloo on a CPU)."""
    import torch

    if torch.distributed.is_initialized():
        return
    cuda = torch.cuda.is_available()
    if plan is not None:
        import deepspeed

        if not is_distributed_launch() and "RANK" not in os.environ:
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                              MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                              MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=dist_timeout(timeout_minutes))
    elif is_distributed_launch():
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=dist_timeout(timeout_minutes))


def check_shared_directory(lock_file: Path, what: str) -> None:
    """Every node of a run sees the run directory rank 0 writes: rank 0's lock file beside it (which it holds, with a
    token no other lock shares) is read back by the first process of every other node. Where one does not find it,
    the nodes write different directories: one node would resume while another starts afresh, and their collectives
    would wait on each other until the timeout. Then the run stops here, in one line from rank 0 naming the nodes
    (the other processes leave quietly with status 2). Every process calls this; one process: nothing."""
    import sys

    import torch

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    if world == 1:
        return

    def read() -> str | None:
        try:
            return lock_file.read_text(encoding="utf-8")
        except OSError:
            return None

    written = [read() if rank == 0 else None]
    torch.distributed.broadcast_object_list(written, src=0)
    blind = None
    if rank != 0 and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        if read() != written[0]:
            blind = f"{socket.gethostname()} (rank {rank})"
    found: list = [None] * world
    torch.distributed.all_gather_object(found, blind)
    blind_nodes = [node for node in found if node]
    if not blind_nodes:
        return
    if rank == 0:
        raise UserError(f"{what} is not shared between the nodes: {', '.join(blind_nodes)} cannot see {lock_file}, "
                        f"which rank 0 wrote on {socket.gethostname()}; put OUTPUT_DIR on a filesystem every node "
                        "mounts (checkpoints, run.json and resuming need one run directory)")
    sys.exit(2)  # rank 0 says why


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


def parameter_values(module, names: Iterable[str], *, keep: bool) -> dict:
    """The whole value of each named parameter of ``module`` as a checkpoint should hold it, copied to the CPU in the
    process that ``keep``s them (the others only take part in the collectives: every process calls this, in step,
    and only one holds a host copy). Under DeepSpeed a trained parameter's value is its fp32 master copy in the
    optimizer: DeepSpeed casts the module it computes with to bf16 / fp16, and saving that would store rounded
    weights. A frozen parameter's is the module's own (gathered whole under ZeRO-3). Without DeepSpeed: the
    parameters as they are."""
    parameters = dict(module.named_parameters())
    values = {}
    for name in names:
        parameter = parameters[name]
        master = None
        if hasattr(parameter, "ds_id") or hasattr(parameter, "_hp_mapping"):  # DeepSpeed's (ZeRO-3; ZeRO-1/2)
            from deepspeed.utils import safe_get_full_fp32_param

            master = safe_get_full_fp32_param(parameter)  # a collective; None for a frozen parameter
        if master is not None:
            if keep:
                values[name] = master.detach().cpu().clone()
            continue
        with gathered([parameter]):
            if keep:
                values[name] = parameter.detach().cpu().clone()
    return values


def restore_fp32_masters(values: dict, module) -> None:
    """Set DeepSpeed's fp32 master copies of the named parameters to ``values``. DeepSpeed casts the module to bf16 /
    fp16 before it makes its masters from it, so a parameter that starts in fp32 (a fresh LoRA, DeltaVLM's trained
    parts) would start training from its rounded value: the same run under DDP starts from the exact one."""
    from deepspeed.utils import safe_set_full_fp32_param

    parameters = dict(module.named_parameters())
    for name, value in values.items():
        safe_set_full_fp32_param(parameters[name], value)


def base_optimizer(optimizer):
    """The optimizer that updates the weights, under its wrappers (accelerate's, DeepSpeed's ZeRO optimizer)."""
    while getattr(optimizer, "optimizer", None) is not None and optimizer.optimizer is not optimizer:
        optimizer = optimizer.optimizer
    return optimizer


def peak_host_memory_per_process() -> list[float]:
    """Every process's peak resident host memory so far (GiB, rank order): one collective, every process calls it."""
    import resource

    import torch

    peak = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2 ** 30, 2)  # Linux: KiB
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [peak]
    peaks: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(peaks, peak)
    return peaks


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
    """How the run actually trained, for run.json: processes, DDP or DeepSpeed (stage), how long a process waited for
    the others (read back from the process group), the optimizer that updated the weights (fused?, whose, its weight
    decay per group), the time of an optimiser step (the suite's Trainer times them), this process's peak GPU memory
    (GiB, allocated and reserved) and every process's peak host memory. A collective: every process calls it."""
    args = trainer.args
    wrapped = trainer.model_wrapped
    engine = {"world_size": args.world_size, "wrapper": type(wrapped).__name__,
              "dist_timeout_minutes": group_timeout_minutes()}
    if type(wrapped).__name__ == "DistributedDataParallel":
        engine["gradient_as_bucket_view"] = bool(wrapped.gradient_as_bucket_view)
    config = getattr(args, "hf_deepspeed_config", None)
    if args.deepspeed:
        engine["deepspeed"] = {"config": str(args.deepspeed),
                               "zero_stage": int(config.config["zero_optimization"].get("stage", 0))}
    zero = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # under accelerate's wrapper
    optimizer = base_optimizer(trainer.optimizer)
    engine["optimizer"] = type(optimizer).__name__
    engine["optimizer_from"] = ("the \"optimizer\" block of " + str(args.deepspeed)
                                if config is not None and "optimizer" in config.config else f"OPTIM={args.optim.value}")
    if zero is not optimizer:
        engine["zero_optimizer"] = type(zero).__name__
    engine["weight_decay_per_group"] = [group.get("weight_decay") for group in optimizer.param_groups]
    defaults = getattr(optimizer, "defaults", {})
    if "fused" in defaults:
        engine["fused"] = bool(defaults["fused"])
    timer = getattr(trainer, "step_timer", None)
    if timer is not None:
        engine["step_seconds"] = timer.summary()
    if args.device.type == "cuda":
        engine["peak_memory_gib"] = peak_memory_gib(args.device)
    engine["peak_host_memory_gib"] = peak_host_memory_per_process()
    return engine
