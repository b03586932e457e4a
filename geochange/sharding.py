"""Answering many items (test samples, scene tiles) with several processes under ``torchrun``: each process answers
its share on its own device, and after every batch the answers of all processes reach rank 0, the one writer of the
output. A plain ``python script.py`` is one shard of one: the same code, no process group.

Why gather after every batch instead of each process writing a file of its own: the output stays one file written
by one process, as it comes (a killed run resumes from it, with the same rules as a one-process run), and nothing is
left to merge at the end. The processes take the same number of steps (one with fewer items takes part with
nothing), so every gather finds all of them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

from tqdm.auto import tqdm

from .devices import is_distributed_launch, pick_device, process_device
from .engines import dist_timeout
from .errors import UserError, print_error

Item = TypeVar("Item")


@dataclass(frozen=True)
class Shard:
    """This process's place among the processes answering: ``rank`` of ``world_size`` (0 of 1 without torchrun)."""
    rank: int = 0
    world_size: int = 1
    owns_group: bool = False  # started the process group (and leaves it in stop_shards); else the Trainer's, say

    @property
    def main(self) -> bool:
        """The one process that writes (rank 0)."""
        return self.rank == 0

    def __enter__(self) -> "Shard":
        return self

    def __exit__(self, error_type, *exc) -> None:
        # A block that ends well leaves as stop_shards does; after an error nobody waits for the others (who may be
        # gone: the launcher ends them).
        if error_type is None:
            stop_shards(self)


def start_shards(timeout_minutes: float | None = None) -> Shard:
    """Under torchrun, join the process group (NCCL between GPUs, each process on its local GPU; gloo on the CPU;
    one that already exists, e.g. a training run's, is used as it is) and return this process's shard; otherwise
    the one shard. ``timeout_minutes``: how long a collective waits for the slowest process (a script's
    DIST_TIMEOUT_MINUTES, as every engine of the suite takes it: ``engines.dist_timeout``; torch's default when
    None)."""
    if not is_distributed_launch():
        return Shard()
    import torch
    import torch.distributed as dist

    owns_group = not dist.is_initialized()
    if owns_group:
        device = process_device()
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL's object collectives use the current device
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                **({"timeout": dist_timeout(timeout_minutes)} if timeout_minutes is not None else {}))
    return Shard(dist.get_rank(), dist.get_world_size(), owns_group)


def share_of(items: Sequence[Item], shard: Shard, cost: Callable[[Item], float] = lambda item: 0.0) -> list[Item]:
    """This process's share of ``items``: sorted by ``cost`` (the most expensive first, ties in their order) and dealt
    out in turn, so every process gets as many of the long ones and at most one item more than another."""
    order = sorted(range(len(items)), key=lambda index: -cost(items[index]))
    return [items[index] for position, index in enumerate(order) if position % shard.world_size == shard.rank]


def steps_needed(total: int, batch_size: int, shard: Shard) -> int:
    """Batches every process takes part in: those of the largest share (rank 0's, by ``share_of``'s dealing)."""
    return math.ceil(math.ceil(total / shard.world_size) / batch_size)


def shard_device(shard: Shard, setting: str):
    """The device this process answers on: under torchrun with ``setting`` ``auto``, its local GPU (the CPU without
    CUDA), so that every process has one of its own; otherwise what ``setting`` names (``devices.pick_device``)."""
    return process_device() if shard.world_size > 1 and setting == "auto" else pick_device(setting)


def from_main(shard: Shard, value: Any) -> Any:
    """Rank 0's ``value`` on every process (a collective every process enters), e.g. what is left to answer once the
    one writer has read its output."""
    if shard.world_size == 1:
        return value
    import torch.distributed as dist

    box = [value if shard.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def decided_by_main(shard: Shard, decide: Callable[[], Any]) -> Any:
    """``decide()`` run by rank 0 alone (what only the one writer reads: the test set, its results file), its value on
    every process (a collective every process enters). A ``UserError`` there stops every process at once, with
    status 2, instead of leaving the others waiting at a collective: rank 0 prints its one line first (once the
    others exit, torchrun stops whatever is left), then every process exits. One process: ``decide()`` as it is."""
    if shard.world_size == 1:
        return decide()
    outcome = None
    if shard.main:
        try:
            outcome = ("value", decide())
        except UserError as exc:
            print_error(exc)
            outcome = ("error", str(exc))
    kind, value = from_main(shard, outcome)
    if kind == "error":
        raise SystemExit(2)
    return value


def gather_at_main(shard: Shard, records: list) -> list | None:
    """Every process's ``records`` joined at rank 0 (in rank order), None on the others; a collective."""
    if shard.world_size == 1:
        return list(records)
    import torch.distributed as dist

    parts: list | None = [None] * shard.world_size if shard.main else None
    dist.gather_object(list(records), parts, dst=0)
    return [record for part in parts for record in part] if shard.main else None


def answer_in_shards(shard: Shard, items: Sequence[Item], batch_size: int, answer: Callable[[list[Item]], list],
                     write: Callable[[list], None], *, cost: Callable[[Item], float] = lambda item: 0.0,
                     desc: str = "answering", unit: str = "batch", in_step: bool = False) -> None:
    """Answer ``items`` (the same list on every process) in batches of ``batch_size``: each process answers its share
    (``answer(batch) -> records``), and after every batch rank 0 ``write``s what all of them answered. A progress bar
    on rank 0 counts the steps.

    ``in_step``: every process takes part in every step's ``answer`` (a model partitioned by DeepSpeed ZeRO-3 gathers
    its weights from all processes in every forward pass): one whose share is done answers a spare item (the first),
    whose records are dropped."""
    share = share_of(items, shard, cost)
    steps = steps_needed(len(items), batch_size, shard)
    for step in tqdm(range(steps), desc=desc, unit=unit, disable=not shard.main or steps == 0):
        batch = share[step * batch_size:(step + 1) * batch_size]
        if batch:
            records = answer(batch)
        else:
            if in_step:
                answer(list(items[:1]))
            records = []
        gathered = gather_at_main(shard, records)
        if shard.main and gathered:
            write(gathered)


def stop_shards(shard: Shard) -> None:
    """Wait until every process is done (the writer's last write included), then leave the process group if
    ``start_shards`` started it."""
    if shard.world_size == 1:
        return
    import torch.distributed as dist

    dist.barrier()
    if shard.owns_group:
        dist.destroy_process_group()
