"""Pruning the full-precision weights of a video-language model before fine-tuning.

- ``magnitude``: L1 unstructured, each targeted Linear weight gets ``amount`` of its entries zeroed.
- ``attention``: whole heads zeroed across q/k/v/o (q/k/v rows, o columns); with grouped-query
  attention only q rows and o columns, since a k/v head is shared by several q heads.
- ``channel``: whole MLP channels zeroed (gate/up rows and the down column; CLIP's fc1 row and fc2 column).

Heads and channels are ranked across all layers at once, each score divided by its layer's mean
so that no layer is emptied just because its weights are smaller; one global count then hits
``amount`` as closely as the number of heads/channels allows (per-layer rounding would not:
5 % of 32 heads is 1.6). The edits are permanent (no masks, hooks or ``weight_orig``), so the
model saves with ``save_pretrained`` and can then be quantised.
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import UserError

PRUNE_METHODS = ("magnitude", "attention", "channel")
_VISION = ("vision_tower", "video_tower", "image_tower", "multi_modal_projector", "vision_resampler")


def validate_prune_settings(method: str, amount: float) -> None:
    if method not in PRUNE_METHODS:
        raise UserError(f"unknown PRUNE_METHOD {method!r}; expected one of {', '.join(PRUNE_METHODS)}")
    if not 0 <= amount < 1:
        raise UserError(f"PRUNE_AMOUNT must be in [0, 1), not {amount}")


def _in_scope(name: str, include_vision: bool) -> bool:
    parts = name.split(".")
    if "lm_head" in parts or "embed_tokens" in parts:
        return False
    return include_vision or not any(p in _VISION for p in parts)


def target_linears(model: nn.Module, include_vision: bool = False) -> dict[str, nn.Linear]:
    """The Linear layers pruning may touch: the language model's (and the vision side's if asked)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and _in_scope(name, include_vision) and not name.endswith("lm_head")}


def _blocks(model: nn.Module, include_vision: bool, wanted: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules()
            if all(isinstance(getattr(m, w, None), nn.Linear) for w in wanted) and _in_scope(name, include_vision)]


def _attention_units(model, include_vision):
    """(layer name, q, k, v, o, num_heads, grouped) for every attention block in scope."""
    units = []
    for out_name in ("o_proj", "out_proj"):
        for name, attn in _blocks(model, include_vision, ("q_proj", "k_proj", "v_proj", out_name)):
            q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, getattr(attn, out_name)
            config = getattr(attn, "config", None)
            heads = getattr(attn, "num_heads", None) or getattr(config, "num_attention_heads", None)
            head_dim = getattr(attn, "head_dim", None) or q.out_features // heads
            heads = q.out_features // head_dim
            units.append((name, q, k, v, o, heads, k.out_features != q.out_features))
    return units


def _mlp_units(model, include_vision):
    """(layer name, rows: Linears whose output row i is channel i, cols: Linears whose input column i is)."""
    units = [(name, [m.gate_proj, m.up_proj], [m.down_proj])
             for name, m in _blocks(model, include_vision, ("gate_proj", "up_proj", "down_proj"))]
    units += [(name, [m.fc1], [m.fc2]) for name, m in _blocks(model, include_vision, ("fc1", "fc2"))]
    return units


def _zero_lowest(scores: list[torch.Tensor], amount: float) -> list[torch.Tensor]:
    """Per layer, the indices to zero: the globally lowest ``amount`` of layer-normalised scores."""
    normalised = torch.cat([s / s.mean().clamp_min(1e-12) for s in scores])
    count = round(amount * normalised.numel())
    chosen = torch.zeros(normalised.numel(), dtype=torch.bool)
    if count:
        chosen[torch.argsort(normalised, stable=True)[:count]] = True
    return [idx.nonzero().flatten() for idx in torch.split(chosen, [len(s) for s in scores])]


@torch.no_grad()
def _prune_heads(model, amount, include_vision) -> None:
    units = _attention_units(model, include_vision)
    scores = []
    for _, q, k, v, o, heads, grouped in units:
        d = q.out_features // heads
        square = q.weight.float().view(heads, d, -1).pow(2).sum((1, 2))
        square += o.weight.float().view(o.out_features, heads, d).pow(2).sum((0, 2))
        if not grouped:
            square += k.weight.float().view(heads, d, -1).pow(2).sum((1, 2))
            square += v.weight.float().view(heads, d, -1).pow(2).sum((1, 2))
        scores.append(square.sqrt())
    for (_, q, k, v, o, heads, grouped), drop in zip(units, _zero_lowest(scores, amount)):
        d = q.out_features // heads
        for h in drop.tolist():
            rows = slice(h * d, (h + 1) * d)
            for linear in (q,) if grouped else (q, k, v):
                linear.weight[rows] = 0
                if linear.bias is not None:
                    linear.bias[rows] = 0
            o.weight[:, rows] = 0


@torch.no_grad()
def _prune_channels(model, amount, include_vision) -> None:
    units = _mlp_units(model, include_vision)
    scores = []
    for _, rows, cols in units:
        square = sum(r.weight.float().pow(2).sum(1) for r in rows) + sum(c.weight.float().pow(2).sum(0) for c in cols)
        scores.append(square.sqrt())
    for (_, rows, cols), drop in zip(units, _zero_lowest(scores, amount)):
        for r in rows:
            r.weight[drop] = 0
            if r.bias is not None:
                r.bias[drop] = 0
        for c in cols:
            c.weight[:, drop] = 0


@torch.no_grad()
def _prune_magnitude(model, amount, include_vision) -> None:
    for linear in target_linears(model, include_vision).values():
        weight = linear.weight
        count = round(amount * weight.numel())
        if count:
            threshold_index = torch.argsort(weight.detach().abs().flatten().float(), stable=True)[:count]
            weight.view(-1)[threshold_index] = 0


def zeroed_heads(model: nn.Module, include_vision: bool = False) -> dict[str, list[int]]:
    """Heads whose q rows are entirely zero, per attention block."""
    result = {}
    for name, q, *_rest, heads, _grouped in _attention_units(model, include_vision):
        d = q.out_features // heads
        result[name] = [h for h in range(heads) if not q.weight[h * d:(h + 1) * d].any()]
    return result


def zeroed_channels(model: nn.Module, include_vision: bool = False) -> dict[str, list[int]]:
    """MLP channels whose input-side rows are entirely zero, per MLP block."""
    result = {}
    for name, rows, _cols in _mlp_units(model, include_vision):
        alive = torch.zeros(rows[0].out_features, dtype=torch.bool)
        for r in rows:
            alive |= r.weight.any(1)
        result[name] = (~alive).nonzero().flatten().tolist()
    return result


def measure_sparsity(model: nn.Module, include_vision: bool = False) -> dict[str, float]:
    """Fraction of exactly-zero weights per kind of Linear (q_proj, mlp.up_proj...), and in total."""
    zeros: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for name, linear in target_linears(model, include_vision).items():
        kind = name.rsplit(".", 1)[-1]
        if any(p in _VISION for p in name.split(".")):
            kind = "vision." + kind
        zeros[kind] = zeros.get(kind, 0) + int((linear.weight == 0).sum())
        sizes[kind] = sizes.get(kind, 0) + linear.weight.numel()
    result = {kind: zeros[kind] / sizes[kind] for kind in sorted(sizes)}
    result["total"] = sum(zeros.values()) / max(1, sum(sizes.values()))
    return result


def prune_model(model: nn.Module, method: str, amount: float, *, include_vision: bool = False) -> dict[str, float]:
    """Prune ``model`` in place; returns the measured sparsity (per Linear kind, total, and heads/channels)."""
    validate_prune_settings(method, amount)
    if amount > 0:
        {"magnitude": _prune_magnitude, "attention": _prune_heads, "channel": _prune_channels}[method](
            model, amount, include_vision)
    sparsity = measure_sparsity(model, include_vision)
    if method == "attention":
        heads = zeroed_heads(model, include_vision)
        total = sum(unit[5] for unit in _attention_units(model, include_vision))
        sparsity["heads"] = sum(map(len, heads.values())) / max(1, total)
    if method == "channel":
        channels = zeroed_channels(model, include_vision)
        total = sum(rows[0].out_features for _, rows, _c in _mlp_units(model, include_vision))
        sparsity["channels"] = sum(map(len, channels.values())) / max(1, total)
    return sparsity
