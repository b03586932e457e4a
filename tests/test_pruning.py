"""Pruning on tiny random models built offline from configs.

Checks: each method reaches its amount; whole heads/channels go, consistently across
q/k/v/o and gate/up/down; the chosen ones are the lowest-norm ones (recomputed here
independently); nothing outside the targets changes; nothing of torch's pruning
machinery is left behind; the pruned model still runs, saves and reloads.
"""
from __future__ import annotations

import copy
import math
import re

import numpy as np
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from geochange.errors import UserError
from geochange.video_llm.families import FAMILIES, ModelParts
from geochange.video_llm.modeling import video_prompt
from geochange.video_llm.pruning import (PRUNE_METHODS, measure_sparsity, prune_model, target_linears,
                                         validate_prune_settings)

HEADS, HEAD_DIM, HIDDEN, INTERMEDIATE = 8, 8, 64, 96
LLAMA = ModelParts(vision_towers=(), projectors=(), language_model="model")  # a plain causal LM's parts


def parts_of(model: nn.Module) -> ModelParts:
    """The parts the model's family entry names (a plain Llama: its ``model``)."""
    by_class = {family.model_class_name: family.parts for family in FAMILIES.values()}
    return by_class.get(type(model).__name__, LLAMA)


def text_config(**overrides) -> LlamaConfig:
    settings = dict(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                    intermediate_size=INTERMEDIATE, vocab_size=200, pad_token_id=0)
    return LlamaConfig(**{**settings, **overrides})


def spread(model: nn.Module) -> nn.Module:
    """Random biases; heads and MLP channels scaled by clearly different factors (no near-ties in the norms)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:  # initialised to 0: make them count
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
            if isinstance(getattr(module, "q_proj", None), nn.Linear) and getattr(module, "head_dim", None):
                heads = module.q_proj.out_features // module.head_dim
                factors = torch.rand(heads, generator=generator) * 3 + 0.2
                module.q_proj.weight *= factors.repeat_interleave(module.head_dim)[:, None]
            if hasattr(module, "gate_proj"):
                factors = torch.rand(module.gate_proj.out_features, generator=generator) * 3 + 0.2
                module.gate_proj.weight *= factors[:, None]
    return model


def llama(kv_heads: int = HEADS, layers: int = 5, bias: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = text_config(num_hidden_layers=layers, num_key_value_heads=kv_heads, attention_bias=bias, mlp_bias=bias)
    return spread(LlamaForCausalLM(config).eval())


def language_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a plain Llama (model.model.layers) or of a VLM's language model."""
    inner = model.model
    return getattr(inner, "language_model", inner).layers


@torch.no_grad()
def zeroed_heads(model: nn.Module) -> dict[int, list[int]]:
    """Read from the weights: per layer, the heads whose q rows (and k/v rows, without GQA) and o columns are zero."""
    result = {}
    for index, layer in enumerate(language_layers(model)):
        attention, size = layer.self_attn, layer.self_attn.head_dim
        rows = [attention.q_proj] + ([] if attention.k_proj.out_features < attention.q_proj.out_features
                                     else [attention.k_proj, attention.v_proj])
        heads = attention.q_proj.out_features // size
        result[index] = [h for h in range(heads)
                         if not any(r.weight[h * size:(h + 1) * size].any() for r in rows)
                         and not attention.o_proj.weight[:, h * size:(h + 1) * size].any()]
    return result


@torch.no_grad()
def zeroed_channels(model: nn.Module) -> dict[int, list[int]]:
    """Read from the weights: per layer, the MLP channels whose gate/up rows and down column are zero."""
    result = {}
    for index, layer in enumerate(language_layers(model)):
        mlp = layer.mlp
        alive = mlp.gate_proj.weight.ne(0).any(1) | mlp.up_proj.weight.ne(0).any(1) | mlp.down_proj.weight.ne(0).any(0)
        result[index] = (~alive).nonzero().flatten().tolist()
    return result


_VLMS: dict[str, nn.Module] = {}


def vlm(family: str) -> nn.Module:
    """A fresh copy of the family's tiny twin (its entry's builder, random weights; built once per session)."""
    if family not in _VLMS:
        torch.manual_seed(0)
        model, _ = FAMILIES[family].build_tiny()
        _VLMS[family] = spread(model.eval())
    return copy.deepcopy(_VLMS[family])


def text_units(model: nn.Module, unit: str) -> int:
    """Heads or MLP channels of the language model, all layers."""
    text = model.config.text_config
    return text.num_hidden_layers * (text.num_attention_heads if unit == "heads" else text.intermediate_size)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def target_params(model: nn.Module, include_vision: bool = False) -> set[str]:
    return {f"{name}.{p}" for name, linear in target_linears(model, parts_of(model), include_vision).items() for p in ("weight", "bias")}


def assert_only_targets_changed(model, before, include_vision=False):
    targets = target_params(model, include_vision)
    for name, value in model.named_parameters():
        if name not in targets:
            assert torch.equal(value, before[name]), f"{name} changed"


def assert_clean(model, keys):
    """No masks, hooks or reparametrisations left; state dict keys unchanged."""
    assert set(model.state_dict()) == keys
    for name, module in model.named_modules():
        assert not module._forward_pre_hooks, name
        assert not any(n.endswith(("_orig", "_mask")) for n in list(module._parameters) + list(module._buffers)), name


# ------------------------------------------------------------------ independent reference computations

@torch.no_grad()
def reference_head_norms(attn, grouped: bool) -> torch.Tensor:
    """L2 norm per head over its q (and k/v without GQA) rows, biases included, and its o columns."""
    rows = [attn.q_proj] if grouped else [attn.q_proj, attn.k_proj, attn.v_proj]
    square = torch.zeros(HEADS, dtype=torch.float64)
    for linear in rows:
        square += linear.weight.double().view(HEADS, HEAD_DIM, -1).pow(2).sum((1, 2))
        if linear.bias is not None:
            square += linear.bias.double().view(HEADS, HEAD_DIM).pow(2).sum(1)
    square += attn.o_proj.weight.double().view(-1, HEADS, HEAD_DIM).pow(2).sum((0, 2))
    return square.sqrt()


@torch.no_grad()
def reference_channel_norms(mlp) -> torch.Tensor:
    square = mlp.down_proj.weight.double().pow(2).sum(0)
    for linear in (mlp.gate_proj, mlp.up_proj):
        square += linear.weight.double().pow(2).sum(1)
        if linear.bias is not None:
            square += linear.bias.double().pow(2)
    return square.sqrt()


def expected_choice(norms: list[torch.Tensor], amount: float) -> dict[int, set[int]]:
    """floor(amount*n) lowest per layer; the rest of round(amount*total), one each, to the layers whose
    next-lowest unit is weakest relative to its layer's mean."""
    size = len(norms[0])
    base = math.floor(amount * size + 1e-9)
    extra = round(amount * size * len(norms)) - base * len(norms)
    relative = [float(n.sort().values[base] / n.mean()) for n in norms]
    bonus = set(sorted(range(len(norms)), key=lambda layer: relative[layer])[:extra])
    return {layer: set(n.argsort()[:base + (layer in bonus)].tolist()) for layer, n in enumerate(norms)}


# ------------------------------------------------------------------ magnitude

@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("amount", [0.05, 0.3])
def test_magnitude_zeroes_the_smallest_weights_of_every_language_linear(family, amount):
    model = vlm(family)
    before, keys = snapshot(model), set(model.state_dict())
    targets = target_linears(model, parts_of(model))
    assert targets and all(".language_model." in name for name in targets)
    assert len(targets) == 2 * 7  # q k v o gate up down in each of the 2 layers; not lm_head, not the towers

    sparsity = prune_model(model, parts_of(model), "magnitude", amount)

    for name, linear in targets.items():
        weight, original = linear.weight, before[name + ".weight"].abs()
        assert abs((weight == 0).float().mean().item() - amount) < 0.005, name
        assert original[weight == 0].max() <= original[weight != 0].min(), name  # the smallest went
        assert torch.equal(weight[weight != 0], before[name + ".weight"][weight != 0])  # the rest kept
    for kind in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "total"):
        assert abs(sparsity[kind] - amount) < 0.005, kind
    assert not any(kind.startswith(parts_of(model).vision) for kind in sparsity)
    assert_only_targets_changed(model, before)
    assert_clean(model, keys)
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 5, 7, 9]])).logits).all()


# ------------------------------------------------------------------ attention heads

@pytest.mark.parametrize("amount", [0.05, 0.3])
def test_attention_zeroes_whole_lowest_norm_heads_across_qkvo(amount):
    model = llama()  # 5 layers x 8 heads, MHA, with q/k/v/o biases
    before, keys = snapshot(model), set(model.state_dict())
    norms = [reference_head_norms(layer.self_attn, grouped=False) for layer in model.model.layers]
    expected = expected_choice(norms, amount)

    sparsity = prune_model(model, parts_of(model), "attention", amount)

    heads = zeroed_heads(model)
    assert {layer: set(h) for layer, h in heads.items()} == expected
    assert abs(sparsity["heads"] - amount) < 0.005
    assert sum(map(len, heads.values())) == round(amount * 40)
    for index, layer in enumerate(model.model.layers):
        attn, prefix = layer.self_attn, f"model.layers.{index}.self_attn."
        for h in range(HEADS):
            rows = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
            slices = {f"{p}.{t}": (lambda w, rows=rows: w[rows]) for p in ("q_proj", "k_proj", "v_proj")
                      for t in ("weight", "bias")}
            slices["o_proj.weight"] = lambda w, rows=rows: w[:, rows]
            for param, take in slices.items():
                now = take(attn.get_parameter(param))
                if h in expected[index]:
                    assert (now == 0).all(), (index, h, param)
                else:
                    assert torch.equal(now, take(before[prefix + param])), (index, h, param)
        assert torch.equal(attn.o_proj.bias, before[prefix + "o_proj.bias"])  # per output, not per head
    assert sparsity["channels"] == 0 and sparsity["gate_proj"] == 0
    assert_only_targets_changed(model, before)
    assert_clean(model, keys)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_attention_with_grouped_query_zeroes_q_rows_and_o_columns_only():
    model = llama(kv_heads=2, bias=False)  # 4 query heads share each k/v head
    before = snapshot(model)
    norms = [reference_head_norms(layer.self_attn, grouped=True) for layer in model.model.layers]
    expected = expected_choice(norms, 0.25)

    sparsity = prune_model(model, parts_of(model), "attention", 0.25)

    assert {layer: set(h) for layer, h in zeroed_heads(model).items()} == expected
    assert sparsity["heads"] == 0.25 and sparsity["q_proj"] == 0.25 and sparsity["o_proj"] == 0.25
    assert sparsity["k_proj"] == 0 and sparsity["v_proj"] == 0
    for index, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        for h in expected[index]:
            assert (attn.q_proj.weight[h * HEAD_DIM:(h + 1) * HEAD_DIM] == 0).all()
            assert (attn.o_proj.weight[:, h * HEAD_DIM:(h + 1) * HEAD_DIM] == 0).all()
        for name in ("k_proj", "v_proj"):
            assert torch.equal(getattr(attn, name).weight, before[f"model.layers.{index}.self_attn.{name}.weight"])
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_every_layer_keeps_at_least_one_head():
    model = llama(layers=2)
    sparsity = prune_model(model, parts_of(model), "attention", 0.99)
    assert all(len(h) == HEADS - 1 for h in zeroed_heads(model).values())
    assert sparsity["heads"] == 14 / 16
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


# ------------------------------------------------------------------ MLP channels

@pytest.mark.parametrize("amount", [0.05, 0.5])
def test_channel_zeroes_whole_lowest_norm_mlp_channels(amount):
    model = llama(kv_heads=2)  # 5 layers x 96 channels, with gate/up/down biases
    before, keys = snapshot(model), set(model.state_dict())
    norms = [reference_channel_norms(layer.mlp) for layer in model.model.layers]
    expected = expected_choice(norms, amount)

    sparsity = prune_model(model, parts_of(model), "channel", amount)

    assert {layer: set(c) for layer, c in zeroed_channels(model).items()} == expected
    assert abs(sparsity["channels"] - amount) < 0.005
    for kind in ("gate_proj", "up_proj", "down_proj"):
        assert abs(sparsity[kind] - amount) < 0.005
    for index, layer in enumerate(model.model.layers):
        mlp, prefix = layer.mlp, f"model.layers.{index}.mlp."
        gone = sorted(expected[index])
        kept = [c for c in range(INTERMEDIATE) if c not in expected[index]]
        for name in ("gate_proj", "up_proj"):
            linear = getattr(mlp, name)
            assert (linear.weight[gone] == 0).all() and (linear.bias[gone] == 0).all()
            assert torch.equal(linear.weight[kept], before[prefix + name + ".weight"][kept])
            assert torch.equal(linear.bias[kept], before[prefix + name + ".bias"][kept])
        assert (mlp.down_proj.weight[:, gone] == 0).all()
        assert torch.equal(mlp.down_proj.weight[:, kept], before[prefix + "down_proj.weight"][:, kept])
        assert torch.equal(mlp.down_proj.bias, before[prefix + "down_proj.bias"])
    assert sparsity["heads"] == 0 and sparsity["q_proj"] == 0
    assert_only_targets_changed(model, before)
    assert_clean(model, keys)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


# ------------------------------------------------------------------ the video-language models

@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", ["attention", "channel"])
def test_vlm_language_model_only_unless_vision_is_included(family, method):
    model = vlm(family)
    parts = parts_of(model)
    before, keys = snapshot(model), set(model.state_dict())
    sparsity = prune_model(model, parts, method, 0.25)
    unit = "heads" if method == "attention" else "channels"
    assert sparsity[unit] == 0.25
    zeroed = zeroed_heads(model) if method == "attention" else zeroed_channels(model)
    layers = model.config.text_config.num_hidden_layers
    assert sorted(zeroed) == list(range(layers)) and sum(map(len, zeroed.values())) == text_units(model, unit) // 4
    for name, value in model.named_parameters():  # towers, projector, embeddings, norms, lm_head
        if ".language_model.layers." not in name:
            assert torch.equal(value, before[name]), name
    assert_clean(model, keys)
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 5, 7, 9]])).logits).all()

    model = vlm(family)
    sparsity = prune_model(model, parts, method, 0.25, include_vision=True)
    for tower in parts.vision_towers:
        linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and parts.in_tower(name)]
        if method == "channel":  # every tower's MLP (CLIP's fc1/fc2, Qwen's gate/up/down)
            assert sparsity[f"{tower}.channels"] == 0.25
        elif any(name.endswith(".q_proj") for name in linears):  # CLIP's heads; Qwen's fused qkv is left whole
            assert sparsity[f"{tower}.heads"] == 0.25
    for name, value in model.named_parameters():
        if ".language_model.layers." not in name and parts.part_of(name) not in parts.vision:
            assert torch.equal(value, before[name]), name
    assert_clean(model, keys)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_vision_magnitude_only_when_asked_and_a_video_forward_still_runs(family):
    model = vlm(family)
    parts = parts_of(model)
    before = snapshot(model)
    prune_model(model, parts, "magnitude", 0.2)
    for name, value in model.named_parameters():
        if parts.part_of(name) in parts.vision:
            assert torch.equal(value, before[name]), name

    sparsity = prune_model(model, parts, "magnitude", 0.2, include_vision=True)
    vision = [kind for kind in sparsity if kind.startswith(parts.vision) and not kind.endswith(("heads", "channels"))]
    assert vision
    for kind in vision:
        assert abs(sparsity[kind] - 0.2) < 0.005, kind
    for name, module in model.named_modules():  # every vision Linear lost its smallest weights, the projector's too
        if isinstance(module, nn.Linear) and parts.part_of(name) in parts.vision:
            assert abs((module.weight == 0).float().mean().item() - 0.2) < 0.01, name
    for name in ("lm_head.weight", "model.language_model.embed_tokens.weight", "model.language_model.norm.weight"):
        assert torch.equal(model.get_parameter(name), before[name])
    _, processor = FAMILIES[family].build_tiny()
    frames = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    inputs = processor(text=[video_prompt(processor, "What changed?")], videos=[frames], return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


def test_pruned_model_saves_and_reloads_with_its_zeros(tmp_path):
    family = list(FAMILIES.values())[-1]
    model = vlm(family.id)
    sparsity = prune_model(model, parts_of(model), "channel", 0.25)
    model.save_pretrained(tmp_path)
    reloaded = family.model_class.from_pretrained(tmp_path)
    assert set(reloaded.state_dict()) == set(model.state_dict())
    assert measure_sparsity(reloaded, parts_of(reloaded)) == sparsity
    assert zeroed_channels(reloaded) == zeroed_channels(model)


# ------------------------------------------------------------------ no-ops and bad settings

@pytest.mark.parametrize("method", PRUNE_METHODS)
def test_zero_amount_changes_nothing(method):
    model = llama(layers=2)
    before = snapshot(model)
    sparsity = prune_model(model, parts_of(model), method, 0.0)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert set(sparsity.values()) == {0.0} and "q_proj" in sparsity and "total" in sparsity
    assert zeroed_heads(model) == {0: [], 1: []} and zeroed_channels(model) == {0: [], 1: []}


@pytest.mark.parametrize("method,amount,message", [
    ("random", 0.1, "unknown PRUNE_METHOD 'random'; expected one of magnitude, attention, channel"),
    ("magnitude", 1.0, "PRUNE_AMOUNT must be in [0, 1)"),
    ("attention", -0.01, "PRUNE_AMOUNT must be in [0, 1)"),
    ("channel", float("nan"), "PRUNE_AMOUNT must be in [0, 1)"),
    ("channel", "0.1", "PRUNE_AMOUNT must be in [0, 1)"),
    ("magnitude", 5, "PRUNE_AMOUNT must be in [0, 1)"),
])
def test_bad_settings_raise_user_error(method, amount, message):
    with pytest.raises(UserError, match=re.escape(message)):
        validate_prune_settings(method, amount)
    model = llama(layers=1)
    before = snapshot(model)
    with pytest.raises(UserError):
        prune_model(model, parts_of(model), method, amount)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_quantised_weights_are_refused():
    model = llama(layers=1)
    layer = model.model.layers[0].mlp.up_proj
    layer.weight = nn.Parameter(torch.zeros_like(layer.weight, dtype=torch.int8), requires_grad=False)
    with pytest.raises(UserError, match="prune the full-precision model, then quantise"):
        prune_model(model, parts_of(model), "magnitude", 0.1)
