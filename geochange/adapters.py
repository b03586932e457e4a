"""Loading LoRA adapters so that they really load (the video LLMs' and DeltaVLM's Vicuna adapter alike).

An adapter saved against other module names loads as "missing keys" and silently does nothing (since
transformers 5 the language model of the LLaVA VLMs lives under ``model.language_model.*``).
``load_adapter_verified`` checks that every tensor of the adapter file found a parameter in the model and now
holds the saved value, tries the caller's renames of older names (a model family's ``adapter_renames``), and
fails loudly otherwise.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch

from .errors import UserError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
Renames = tuple[tuple[re.Pattern, str], ...]
_PEFT_PREFIX = "base_model.model."


def _unmatched(peft_model, saved: dict[str, torch.Tensor]) -> list[str]:
    """Saved adapter keys that have no parameter in the model, or whose value did not arrive."""
    params = {name.replace(".default.", ".").replace(".default", ""): p for name, p in peft_model.named_parameters()}
    missing = []
    for key, tensor in saved.items():
        param = params.get(key)
        if param is None or param.shape != tensor.shape or not torch.equal(param.detach().cpu().to(tensor.dtype), tensor):
            missing.append(key)
    return missing


def renamed_key(key: str, renames: Renames) -> str:
    """``key`` after each (pattern, replacement) of ``renames``, applied to the name after PEFT's prefix."""
    body = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
    for pattern, replacement in renames:
        body = pattern.sub(replacement, body)
    return _PEFT_PREFIX + body


def load_adapter_verified(model, adapter_dir: str | Path, renames: Renames = ()):
    """Wrap ``model`` with the adapter in ``adapter_dir``; raise UserError if any adapter weight finds no home.
    When none does, the adapter is tried once more with its keys ``renames``d (names saved by older versions)."""
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.exists():
        raise UserError(f"{adapter_dir}: no {ADAPTER_WEIGHTS} (not a LoRA run directory?)")
    saved = load_file(str(weights))
    with warnings.catch_warnings():
        # PEFT only warns about keys it could not place; we check them ourselves below.
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    unmatched = _unmatched(peft_model, saved)
    if unmatched and len(unmatched) == len(saved) and renames:
        remapped = {renamed_key(k, renames): v for k, v in saved.items()}
        set_peft_model_state_dict(peft_model, remapped)
        unmatched = _unmatched(peft_model, remapped)
        if not unmatched:
            print(f"adapter {adapter_dir.name}: remapped {len(saved)} key names of an older layout (transformers 4) to the current one")
    if unmatched:
        shown = ", ".join(unmatched[:3])
        raise UserError(f"{weights}: {len(unmatched)} of {len(saved)} adapter weights found no parameter in the model "
                        f"(e.g. {shown}); the adapter does not match this base model")
    return peft_model
