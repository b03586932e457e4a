"""Where tensors live and in what form: the device a setting names, this process's rank and device, the compute
dtype of a device, bitsandbytes quantisation, and how many values a (quantised or sharded) parameter holds."""
from __future__ import annotations

import math
import os

from .errors import UserError

# bitsandbytes' quantised Linear classes (peft's LoRA wrappers of them share the names, not the module).
QUANTISED_LINEARS = {"Linear4bit", "Linear8bitLt"}


def is_main_process() -> bool:
    """Rank 0 of a torchrun / accelerate launch (or a plain single process): the one that writes and prints."""
    return int(os.environ.get("RANK", "0")) == 0


def launched_processes() -> int:
    """How many processes torchrun / accelerate / deepspeed started for this run (WORLD_SIZE; 1 for a plain run)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed_launch() -> bool:
    """Whether torchrun / accelerate / deepspeed started this process as one of several (WORLD_SIZE > 1)."""
    return launched_processes() > 1


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


def compute_dtype(device):
    """bf16 on GPUs that have it, fp16 on older GPUs, fp32 on the CPU (slow and inexact in half precision)."""
    import torch

    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def precision_support() -> dict[str, bool]:
    """What this machine computes in: ``cuda`` (a GPU) and ``cuda_bf16`` (one with bf16), as the precision rules
    (``trainer.compute_precision``) take them."""
    import torch

    cuda = torch.cuda.is_available()
    return {"cuda": cuda, "cuda_bf16": cuda and torch.cuda.is_bf16_supported()}


def quantization_config(bits: int | None, skip_modules: list[str] | None = None, compute=None):
    """bitsandbytes settings: 4-bit nf4 (double quantisation, computing in ``compute``, default the compute dtype
    of this machine's accelerator) or 8-bit; None = full precision. ``skip_modules`` stay in full precision."""
    if bits is None:
        return None
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute or compute_dtype(pick_device("auto")),
                                  llm_int8_skip_modules=skip_modules)
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    raise UserError(f"quantisation bits must be 4 or 8, not {bits}")


def is_quantised_linear(module) -> bool:
    return type(module).__name__ in QUANTISED_LINEARS and type(module).__module__.startswith("bitsandbytes")


def parameter_numel(param) -> int:
    """The parameter's true number of values: a 4-bit ``Params4bit`` holds two per packed byte, and a parameter
    that DeepSpeed ZeRO-3 has partitioned holds an empty placeholder here and its size in ``ds_numel``."""
    quant_state = getattr(param, "quant_state", None)
    if quant_state is not None:
        return math.prod(quant_state.shape)
    return int(getattr(param, "ds_numel", 0)) or param.numel()


def peak_memory_gib(device) -> dict | None:
    """The peak GPU memory of this process on ``device`` since the last reset, allocated by tensors and reserved by
    the caching allocator (GiB); None off the GPU."""
    if device.type != "cuda":
        return None
    import torch

    return {"allocated": round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2),
            "reserved": round(torch.cuda.max_memory_reserved(device) / 2 ** 30, 2)}
