"""Which torch device a setting such as ``DEVICE="auto"`` names."""
from __future__ import annotations

import os

from .errors import UserError


def is_main_process() -> bool:
    """Rank 0 of a torchrun / accelerate launch (or a plain single process): the one that writes and prints."""
    return int(os.environ.get("RANK", "0")) == 0


def process_device():
    """This process's device under torchrun: its local GPU (LOCAL_RANK), or the CPU without CUDA."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def pick_device(device: str):
    """``auto`` = ``cuda`` when a CUDA GPU is available, else ``cpu``; ``cpu``, ``cuda``, ``cuda:1``... as given.

    Returns a ``torch.device``; a name torch does not know, or CUDA without a GPU, is a UserError.
    """
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"DEVICE={device!r} is not a torch device (auto, cpu, cuda, cuda:1, ...)") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"DEVICE={device!r} but no CUDA GPU is available")
    return chosen
