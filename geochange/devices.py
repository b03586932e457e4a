"""Which torch device a setting such as ``DEVICE="auto"`` names."""
from __future__ import annotations

from .errors import UserError


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
