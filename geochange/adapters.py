"""Loading LoRA adapters so that they really load.

Since transformers 5 the language model of these VLMs lives under
``model.language_model.*``; an adapter saved against other names loads as
"missing keys" and silently does nothing. ``load_adapter_verified`` checks that
every tensor of the adapter file found a parameter in the model and now holds
the saved value, remaps adapters saved with transformers-4 names, and fails
loudly otherwise.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch

from .errors import UserError
from .modeling import VISION_MODULE_NAMES

ADAPTER_WEIGHTS = "adapter_model.safetensors"
# transformers 4 -> 5 names of the LLaVA-family modules (after PEFT's "base_model.model." prefix).
_LEGACY_RENAMES = (
    (re.compile(r"^language_model\.model\."), "model.language_model."),
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
    (re.compile(rf"^({'|'.join(VISION_MODULE_NAMES)})\."), r"model.\1."),
)
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


def legacy_to_current_key(key: str) -> str:
    body = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
    for pattern, replacement in _LEGACY_RENAMES:
        body = pattern.sub(replacement, body)
    return _PEFT_PREFIX + body


def load_adapter_verified(model, adapter_dir: str | Path):
    """Wrap ``model`` with the adapter in ``adapter_dir``; raise UserError if any adapter weight finds no home."""
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
    if unmatched and len(unmatched) == len(saved):
        remapped = {legacy_to_current_key(k): v for k, v in saved.items()}
        set_peft_model_state_dict(peft_model, remapped)
        unmatched = _unmatched(peft_model, remapped)
        if not unmatched:
            print(f"adapter {adapter_dir.name}: remapped {len(saved)} transformers-4 key names to the current layout")
    if unmatched:
        shown = ", ".join(unmatched[:3])
        raise UserError(f"{weights}: {len(unmatched)} of {len(saved)} adapter weights found no parameter in the model "
                        f"(e.g. {shown}); the adapter does not match this base model")
    return peft_model
