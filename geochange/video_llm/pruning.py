"""Pruning the full-precision weights of a video-language model before fine-tuning.

Three methods, all acting on the language model's decoder Linear layers (and, with
``include_vision=True``, also on the vision towers and the multimodal projector):

- ``magnitude``: L1 unstructured; every targeted Linear weight gets ``amount`` of its
  entries (the smallest in absolute value) set to zero.
- ``attention``: whole attention heads with the lowest L2 norm are zeroed: head ``h``
  is rows ``[h*d, (h+1)*d)`` of q_proj/k_proj/v_proj (weights and biases) and the same
  columns of o_proj. With grouped-query attention (fewer k/v heads than q heads) a
  k/v head is shared by a whole group of query heads, so zeroing it would also silence
  the query heads that were kept: only the q rows and o columns are zeroed then, and
  the head's norm is taken over those alone.
- ``channel``: whole MLP intermediate channels with the lowest L2 norm are zeroed:
  channel ``i`` is row ``i`` of gate_proj and up_proj (weights and biases) and column
  ``i`` of down_proj (CLIP's fc1/fc2 and the projector's linear_1/linear_2 pair up the
  same way). A part with no such pairs falls back to zeroing output rows of its Linears.

How many heads/channels each layer loses: per layer, ``floor(amount * n)`` of its
lowest-norm ones, plus one more in as many layers as are needed for the total to be
``round(amount * total)``. Rounding each layer on its own would miss the requested
fraction (5 % of Vicuna's 32 heads is 1.6 heads, so 2 = 6.25 % in every layer), while a
plain global ranking across layers lets layers whose weights happen to be smaller lose
far more than others (and may empty a layer). The extra heads go to the layers whose
next candidate is weakest relative to its own layer (norm divided by the layer's mean
head norm), and every layer always keeps at least one head/channel.

Edits are permanent: the weight tensors themselves hold the zeros (no masks, hooks or
``weight_orig`` are left behind), so the model saves with ``save_pretrained`` and can be
quantised afterwards. Embeddings, norms and ``lm_head`` are never touched.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from ..errors import UserError
from .families import ModelParts

PRUNE_METHODS = ("magnitude", "attention", "channel")


# (output-row side, input-column side) of the MLP pairs a channel runs through.
_MLP_PAIRS = ((("gate_proj", "up_proj"), ("down_proj",)), (("fc1",), ("fc2",)), (("linear_1",), ("linear_2",)))


def validate_prune_settings(method: str, amount: float) -> None:
    """Raise UserError for an unknown method or an amount outside [0, 1)."""
    if method not in PRUNE_METHODS:
        raise UserError(f"unknown PRUNE_METHOD {method!r}; expected one of {', '.join(PRUNE_METHODS)}")
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0 <= amount < 1:
        raise UserError(f"PRUNE_AMOUNT must be in [0, 1) (a fraction: 0.05 prunes 5 %), not {amount!r}")


# ---------------------------------------------------------------- what gets pruned

@dataclass
class _Part:
    """One separately pruned part: the language model, a vision tower, or the projector."""

    prefix: str  # "" for the language model, else e.g. "video_tower" (used in the sparsity keys)
    linears: dict[str, nn.Linear] = field(default_factory=dict)  # full module name -> Linear


@dataclass
class _Attention:
    layer: int
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    head_dim: int
    grouped: bool  # fewer k/v heads than q heads: only q rows and o columns are head-specific

    @property
    def heads(self) -> int:
        return self.q.out_features // self.head_dim

    def head_parts(self) -> list[tuple[nn.Linear, int]]:
        """(Linear, dim) pairs holding the per-head slices: dim 0 = rows, dim 1 = columns."""
        rows = [self.q] if self.grouped else [self.q, self.k, self.v]
        return [(linear, 0) for linear in rows] + [(self.o, 1)]


@dataclass
class _Mlp:
    layer: int
    rows: list[nn.Linear]  # channel i = output row i of these
    cols: list[nn.Linear]  # channel i = input column i of these

    @property
    def channels(self) -> int:
        return self.rows[0].out_features

    def channel_parts(self) -> list[tuple[nn.Linear, int]]:
        return [(linear, 0) for linear in self.rows] + [(linear, 1) for linear in self.cols]


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _inside(name: str, root: str) -> bool:
    return root == "" or name == root or name.startswith(root + ".")


def _parts(model: nn.Module, parts: ModelParts, include_vision: bool) -> list[_Part]:
    """The language model's Linears (first), then each vision part's if asked (the outermost modules named as a
    tower or projector in ``parts``: a projector inside a tower is pruned with it)."""
    names = [name for name, _ in model.named_modules()]
    vision_roots: list[str] = []
    for name in names:  # outermost modules named like a vision part
        if _leaf(name) in parts.vision and not any(_inside(name, root) for root in vision_roots):
            vision_roots.append(name)
    # transformers 5 keeps the LLM at model.language_model (4.x: language_model); a plain causal LM's is its model
    language_root = next((name for name in names if _leaf(name) == parts.language_model
                          and not any(_inside(name, root) for root in vision_roots)), None)
    if language_root is None:
        raise UserError(f"{type(model).__name__} has no module named {parts.language_model!r} (its language model)")
    try:
        output_embeddings = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        output_embeddings = None

    language = _Part("")
    vision = {root: _Part(_leaf(root) if [_leaf(r) for r in vision_roots].count(_leaf(root)) == 1 else root)
              for root in vision_roots}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module is output_embeddings or parts.lm_head in name.split("."):
            continue
        root = next((root for root in vision_roots if _inside(name, root)), None)
        if root is not None:
            vision[root].linears[name] = module
        elif _inside(name, language_root):
            language.linears[name] = module
    return [language] + (list(vision.values()) if include_vision else [])


def target_linears(model: nn.Module, parts: ModelParts, include_vision: bool = False) -> dict[str, nn.Linear]:
    """Every Linear that pruning may touch, by full module name."""
    return {name: linear for part in _parts(model, parts, include_vision) for name, linear in part.linears.items()}


def _layer_index(name: str, fallback: int) -> int:
    """The first numeric component of a module name (``layers.3.self_attn`` -> 3)."""
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return int(match.group(1)) if match else fallback


def _children(module: nn.Module, names: tuple[str, ...], allowed: set[int]) -> list[nn.Linear] | None:
    found = [getattr(module, n, None) for n in names]
    return found if all(isinstance(f, nn.Linear) and id(f) in allowed for f in found) else None


def _attention_blocks(model: nn.Module, part: _Part) -> list[_Attention]:
    allowed = {id(linear) for linear in part.linears.values()}
    blocks = []
    for name, module in model.named_modules():
        for out_name in ("o_proj", "out_proj"):
            found = _children(module, ("q_proj", "k_proj", "v_proj", out_name), allowed)
            if not found:
                continue
            q, k, v, o = found
            config = getattr(module, "config", None)
            head_dim = getattr(module, "head_dim", None) or getattr(config, "head_dim", None)
            if not head_dim:
                head_dim = q.out_features // (getattr(module, "num_heads", None) or config.num_attention_heads)
            blocks.append(_Attention(_layer_index(name, len(blocks)), q, k, v, o, int(head_dim),
                                     grouped=k.out_features < q.out_features))
    return blocks


def _mlp_blocks(model: nn.Module, part: _Part) -> list[_Mlp]:
    allowed = {id(linear) for linear in part.linears.values()}
    blocks = []
    for name, module in model.named_modules():
        for row_names, col_names in _MLP_PAIRS:
            rows, cols = _children(module, row_names, allowed), _children(module, col_names, allowed)
            if rows and cols:
                blocks.append(_Mlp(_layer_index(name, len(blocks)), rows, cols))
    return blocks


def _check_prunable(model: nn.Module, parts: list[_Part]) -> None:
    if not parts[0].linears:
        raise UserError(f"found no Linear layers in the language model of {type(model).__name__}")
    for part in parts:
        for name, linear in part.linears.items():
            if "lora_" in name:
                raise UserError("prune the base model before adding LoRA adapters (found " + name + ")")
            if not linear.weight.is_floating_point():
                raise UserError(f"{name} holds {linear.weight.dtype} weights: prune the full-precision model, "
                                "then quantise it")


# ---------------------------------------------------------------- choosing heads / channels

def _per_slice(values: torch.Tensor, dim: int, count: int, reduce) -> torch.Tensor:
    """Reduce a weight-shaped tensor to one value per slice along ``dim`` (viewed, never transposed: no copy)."""
    if dim == 0:
        return reduce(values.reshape(count, -1), 1)
    return reduce(reduce(values.reshape(values.shape[0], count, -1), 2), 0)


def _slice_norms(parts: list[tuple[nn.Linear, int]], count: int) -> torch.Tensor:
    """L2 norm of each of ``count`` equal slices, over every (Linear, dim) that holds one (biases included)."""
    square = torch.zeros(count, dtype=torch.float64)
    for linear, dim in parts:
        square += _per_slice(linear.weight.detach().float().pow(2), dim, count, torch.sum).double().cpu()
        if dim == 0 and linear.bias is not None:
            square += linear.bias.detach().float().reshape(count, -1).pow(2).sum(1).double().cpu()
    return square.sqrt()


def _head_norms(block: _Attention) -> torch.Tensor:
    return _slice_norms(block.head_parts(), block.heads)


def _channel_norms(block: _Mlp) -> torch.Tensor:
    return _slice_norms(block.channel_parts(), block.channels)


def _layer_quotas(scores: list[torch.Tensor], amount: float) -> list[int]:
    """How many units each layer loses: floor(amount * n) each, then the remainder one per layer.

    The total is round(amount * all units), capped so that every layer keeps one unit. The
    remainder goes first to layers whose next candidate has the lowest norm relative to its
    layer's mean norm (a second extra per layer only when layers differ in size).
    """
    sizes = [len(s) for s in scores]
    caps = [max(n - 1, 0) for n in sizes]
    target = min(round(amount * sum(sizes)), sum(caps))
    quotas = [min(math.floor(amount * n + 1e-9), cap) for n, cap in zip(sizes, caps)]
    candidates = []
    for layer, (layer_scores, base, cap) in enumerate(zip(scores, quotas, caps)):
        relative = torch.sort(layer_scores).values / layer_scores.mean().clamp_min(1e-30)
        candidates += [(position - base, float(relative[position]), layer) for position in range(base, cap)]
    for _, _, layer in sorted(candidates)[:max(target - sum(quotas), 0)]:
        quotas[layer] += 1
    return quotas


def _lowest(scores: torch.Tensor, count: int) -> list[int]:
    return sorted(torch.argsort(scores, stable=True)[:count].tolist())


@torch.no_grad()
def _zero_slices(parts: list[tuple[nn.Linear, int]], count: int, chosen: list[int]) -> None:
    """Zero slices ``chosen`` of ``count`` equal slices along each Linear's dim (and the matching bias rows)."""
    if not chosen:
        return
    for linear, dim in parts:
        size = linear.weight.shape[dim] // count
        index = (torch.tensor(chosen)[:, None] * size + torch.arange(size)).flatten().to(linear.weight.device)
        linear.weight.index_fill_(dim, index, 0)
        if dim == 0 and linear.bias is not None:
            linear.bias.index_fill_(0, index, 0)


def _prune_structured(units: list, norms, parts_of, count_of, amount: float) -> None:
    scores = [norms(unit) for unit in units]
    for unit, layer_scores, quota in zip(units, scores, _layer_quotas(scores, amount)):
        _zero_slices(parts_of(unit), count_of(unit), _lowest(layer_scores, quota))


def _prune_heads(model: nn.Module, part: _Part, amount: float) -> None:
    blocks = _attention_blocks(model, part)
    if not blocks and part.prefix == "":
        raise UserError("attention pruning found no q_proj/k_proj/v_proj/o_proj blocks in the language model")
    _prune_structured(blocks, _head_norms, _Attention.head_parts, lambda b: b.heads, amount)


def _prune_channels(model: nn.Module, part: _Part, amount: float) -> None:
    blocks = _mlp_blocks(model, part)
    if blocks:
        _prune_structured(blocks, _channel_norms, _Mlp.channel_parts, lambda b: b.channels, amount)
        return
    # No MLP pairs to follow: each Linear's output rows are its channels.
    linears = list(part.linears.values())
    _prune_structured(linears, lambda lin: _slice_norms([(lin, 0)], lin.out_features),
                      lambda lin: [(lin, 0)], lambda lin: lin.out_features, amount)


def _prune_magnitude(model: nn.Module, part: _Part, amount: float) -> None:
    for linear in part.linears.values():
        # l1_unstructured adds weight_orig, weight_mask and a forward pre-hook; remove() bakes
        # the mask into the weight and takes all three away again.
        torch_prune.l1_unstructured(linear, "weight", amount=amount)
        torch_prune.remove(linear, "weight")


_PRUNERS = {"magnitude": _prune_magnitude, "attention": _prune_heads, "channel": _prune_channels}


# ---------------------------------------------------------------- public API

def prune_model(model: nn.Module, parts: ModelParts, method: str, amount: float, *,
                include_vision: bool = False) -> dict[str, float]:
    """Prune ``model`` (made of ``parts``) in place and permanently; returns ``measure_sparsity`` of what was
    targeted.

    Each part (language model, and with ``include_vision`` each vision tower and the
    projector) is pruned to ``amount`` on its own. ``amount == 0`` changes nothing.
    """
    validate_prune_settings(method, amount)
    targets = _parts(model, parts, include_vision)
    _check_prunable(model, targets)
    if amount > 0:
        for part in targets:
            _PRUNERS[method](model, part, amount)
    return measure_sparsity(model, parts, include_vision)


@torch.no_grad()
def measure_sparsity(model: nn.Module, parts: ModelParts, include_vision: bool = False) -> dict[str, float]:
    """Fraction of exactly-zero weights per kind of Linear, in total, and of wholly zero heads/channels.

    Keys: the Linear's own name for the language model (``q_proj``, ``gate_proj``...), prefixed
    by the part for vision parts (``video_tower.fc1``, ``multi_modal_projector.linear_1``);
    ``heads`` / ``channels`` (and ``<part>.heads``...) are fractions of attention heads / MLP
    channels whose every weight is zero; ``total`` covers every targeted Linear weight.
    """
    zeros: dict[str, int] = {}
    sizes: dict[str, int] = {}
    result: dict[str, float] = {}
    for part in _parts(model, parts, include_vision):
        dot = part.prefix + "." if part.prefix else ""
        for name, linear in part.linears.items():
            kind = dot + _leaf(name)
            zeros[kind] = zeros.get(kind, 0) + linear.weight.numel() - int(torch.count_nonzero(linear.weight))
            sizes[kind] = sizes.get(kind, 0) + linear.weight.numel()
        heads = _attention_blocks(model, part)
        if heads:
            dead = sum(len(_zeroed(block.head_parts(), block.heads)) for block in heads)
            result[dot + "heads"] = dead / sum(block.heads for block in heads)
        mlps = _mlp_blocks(model, part)
        if mlps:
            dead = sum(len(_zeroed(block.channel_parts(), block.channels)) for block in mlps)
            result[dot + "channels"] = dead / sum(block.channels for block in mlps)
    by_kind = {kind: zeros[kind] / sizes[kind] for kind in sorted(sizes)}
    return {**by_kind, **result, "total": sum(zeros.values()) / max(1, sum(sizes.values()))}


@torch.no_grad()
def pruning_masks(model: nn.Module, parts: ModelParts, include_vision: bool = False) -> dict[str, torch.Tensor]:
    """Parameter name -> True where a prunable Linear's weight (or bias) is zero, for those holding zeros.

    Taken from a pruned model before training or merging, so that the zeros can be put back after
    each optimiser step (full fine-tuning) or after merging an adapter (whose B·A is dense).
    One byte per masked value, on the parameter's device.
    """
    masks = {}
    for name, linear in target_linears(model, parts, include_vision).items():
        for kind in ("weight", "bias"):
            param = getattr(linear, kind)
            if param is not None and param.is_floating_point():
                zero = param == 0
                if zero.any():
                    masks[f"{name}.{kind}"] = zero
    return masks


@torch.no_grad()
def apply_pruning_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero again what ``pruning_masks`` recorded; a masked parameter missing from ``model`` is an error."""
    params = dict(model.named_parameters())
    missing = [name for name in masks if name not in params]
    if missing:
        raise UserError(f"pruning masks do not fit this model: no parameter {missing[0]} ({len(missing)} in all)")
    for name, mask in masks.items():
        params[name].masked_fill_(mask.to(params[name].device), 0)


def _zeroed(parts: list[tuple[nn.Linear, int]], count: int) -> list[int]:
    """Indices of the slices whose weights are zero in every one of ``parts``."""
    alive = torch.zeros(count, dtype=torch.bool)
    for linear, dim in parts:
        alive |= _per_slice(linear.weight.ne(0), dim, count, torch.any).cpu()
    return (~alive).nonzero().flatten().tolist()
