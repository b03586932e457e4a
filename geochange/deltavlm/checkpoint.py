"""DeltaVLM's released checkpoint (LAVIS names) <-> our modules (transformers' InstructBLIP names).

The released ``checkpoint_best.pth`` is ``{"model": state_dict, "optimizer": ..., ...}``
whose state dict holds only what DeltaVLM trained (LAVIS's runner drops every
parameter with ``requires_grad=False`` but keeps buffers). The map is explicit:
one rule per LAVIS name pattern, checked against the full-size modules in the tests.
Most renames are those of transformers' ``convert_instructblip_original_to_pytorch.py``;
two need work beyond a rename:

* EVA attention keeps ``attn.q_bias`` and ``attn.v_bias`` apart; transformers has one
  ``qkv.bias = [q_bias, 0, v_bias]`` (the key projection has no bias);
* the CSRM layers (``context1..3``, ``gate1..2``) are DeltaVLM's own: ``csrm.*`` here.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

# (LAVIS pattern, our name). "{part}" in a target marks a fused tensor (see QKV_BIAS_PARTS).
RULES: tuple[tuple[str, str], ...] = (
    (r"visual_encoder\.cls_token", r"vision_model.embeddings.class_embedding"),
    (r"visual_encoder\.pos_embed", r"vision_model.embeddings.position_embedding"),
    (r"visual_encoder\.patch_embed\.proj\.(weight|bias)", r"vision_model.embeddings.patch_embedding.\1"),
    (r"visual_encoder\.blocks\.(\d+)\.norm([12])\.(weight|bias)", r"vision_model.encoder.layers.\1.layer_norm\2.\3"),
    (r"visual_encoder\.blocks\.(\d+)\.attn\.qkv\.weight", r"vision_model.encoder.layers.\1.self_attn.qkv.weight"),
    (r"visual_encoder\.blocks\.(\d+)\.attn\.([qv])_bias", r"vision_model.encoder.layers.\1.self_attn.qkv.bias{\2}"),
    (r"visual_encoder\.blocks\.(\d+)\.attn\.proj\.(weight|bias)",
     r"vision_model.encoder.layers.\1.self_attn.projection.\2"),
    (r"visual_encoder\.blocks\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", r"vision_model.encoder.layers.\1.mlp.\2.\3"),
    (r"ln_vision\.(weight|bias)", r"vision_model.post_layernorm.\1"),
    (r"Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings)\.weight", r"qformer.embeddings.\1.weight"),
    (r"Qformer\.bert\.embeddings\.LayerNorm\.(weight|bias)", r"qformer.embeddings.layernorm.\1"),
    (r"Qformer\.bert\.encoder\.layer\.(\d+)\.(attention|crossattention)\.self\.(query|key|value)\.(weight|bias)",
     r"qformer.encoder.layer.\1.\2.attention.\3.\4"),
    (r"Qformer\.bert\.encoder\.layer\.(\d+)\.(attention|crossattention)\.output\.(dense|LayerNorm)\.(weight|bias)",
     r"qformer.encoder.layer.\1.\2.output.\3.\4"),
    (r"Qformer\.bert\.encoder\.layer\.(\d+)\.(intermediate|intermediate_query)\.dense\.(weight|bias)",
     r"qformer.encoder.layer.\1.\2.dense.\3"),
    (r"Qformer\.bert\.encoder\.layer\.(\d+)\.(output|output_query)\.(dense|LayerNorm)\.(weight|bias)",
     r"qformer.encoder.layer.\1.\2.\3.\4"),
    (r"query_tokens", r"query_tokens"),
    (r"llm_proj\.(weight|bias)", r"language_projection.\1"),
    (r"(context[123]|gate[12])\.(weight|bias)", r"csrm.\1.\2"),
)
# Entries of the released state dict that inference does not use, and why.
IGNORED: tuple[tuple[str, str], ...] = (
    (r"(vision_proj|text_proj)\.(weight|bias)", "contrastive-loss projection of the training code"),
    (r"temp", "contrastive-loss temperature of the training code"),
    (r"Qformer\.bert\.embeddings\.position_ids", "buffer 0..511, rebuilt by the Q-Former"),
    (r"llm_model\..*\.rotary_emb\.inv_freq", "rotary-embedding buffer of the frozen LLM, recomputed by it"),
)
# Order of the parts inside transformers' fused EVA qkv bias: [q_bias, zeros (key), v_bias].
QKV_BIAS_PARTS = ("q", "k", "v")

_RULES = tuple((re.compile(pattern), target) for pattern, target in RULES)
_IGNORED = tuple((re.compile(pattern), why) for pattern, why in IGNORED)
_FUSED = re.compile(r"^(.*)\{([qkv])\}$")


@dataclass(frozen=True)
class Target:
    """Where a LAVIS tensor goes: our parameter ``name``, whole (part None) or one third of a fused qkv bias."""
    name: str
    part: str | None = None


def lavis_to_ours(key: str) -> Target | str | None:
    """Our Target for a LAVIS key; a str (the reason) for a key inference ignores; None: no home."""
    for pattern, target in _RULES:
        if pattern.fullmatch(key):
            mapped = pattern.sub(target, key)
            fused = _FUSED.match(mapped)
            return Target(fused.group(1), fused.group(2)) if fused else Target(mapped)
    for pattern, why in _IGNORED:
        if pattern.fullmatch(key):
            return why
    return None


# Our names back to LAVIS's, for writing a LAVIS-layout checkpoint (the tiny twin).
_INVERSE: tuple[tuple[re.Pattern, str], ...] = tuple(
    (re.compile(p), t) for p, t in (
        (r"vision_model\.embeddings\.class_embedding", "visual_encoder.cls_token"),
        (r"vision_model\.embeddings\.position_embedding", "visual_encoder.pos_embed"),
        (r"vision_model\.embeddings\.patch_embedding\.(weight|bias)", r"visual_encoder.patch_embed.proj.\1"),
        (r"vision_model\.encoder\.layers\.(\d+)\.layer_norm([12])\.(weight|bias)",
         r"visual_encoder.blocks.\1.norm\2.\3"),
        (r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.weight", r"visual_encoder.blocks.\1.attn.qkv.weight"),
        (r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.bias", r"visual_encoder.blocks.\1.attn.{}_bias"),
        (r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection\.(weight|bias)",
         r"visual_encoder.blocks.\1.attn.proj.\2"),
        (r"vision_model\.encoder\.layers\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", r"visual_encoder.blocks.\1.mlp.\2.\3"),
        (r"vision_model\.post_layernorm\.(weight|bias)", r"ln_vision.\1"),
        (r"qformer\.embeddings\.layernorm\.(weight|bias)", r"Qformer.bert.embeddings.LayerNorm.\1"),
        (r"qformer\.encoder\.layer\.(\d+)\.(attention|crossattention)\.attention\.(query|key|value)\.(weight|bias)",
         r"Qformer.bert.encoder.layer.\1.\2.self.\3.\4"),
        (r"qformer\.(.*)", r"Qformer.bert.\1"),
        (r"query_tokens", "query_tokens"),
        (r"language_projection\.(weight|bias)", r"llm_proj.\1"),
        (r"csrm\.(.*)", r"\1"),
    ))


def ours_to_lavis(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """The LAVIS entries holding our parameter ``name`` (two for a fused qkv bias)."""
    for pattern, target in _INVERSE:
        if pattern.fullmatch(name):
            key = pattern.sub(target, name)
            if "{}" not in key:
                return {key: tensor}
            q, k, v = tensor.chunk(3)
            if not k.is_meta and k.count_nonzero():
                raise ValueError(f"{name}: the key third of a fused EVA qkv bias must be zero")
            return {key.format("q"): q.clone(), key.format("v"): v.clone()}
    raise KeyError(f"no LAVIS name for {name}")


@dataclass
class Conversion:
    """A LAVIS state dict in our names, and what did not fit."""
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    no_home: list[str] = field(default_factory=list)        # LAVIS keys with no rule, or a rule to nothing we have
    wrong_shape: list[str] = field(default_factory=list)    # 'key: checkpoint [..] vs model [..]'
    ignored: dict[str, str] = field(default_factory=dict)   # LAVIS key -> why inference does not need it
    incomplete: list[str] = field(default_factory=list)     # fused tensors with a part missing


def convert_lavis_state(lavis_state: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> Conversion:
    """Rename (and fuse) a LAVIS state dict for a model whose parameter shapes are ``shapes``."""
    result = Conversion()
    parts: dict[str, dict[str, torch.Tensor]] = {}
    sources: dict[str, list[str]] = {}
    for key, tensor in lavis_state.items():
        target = lavis_to_ours(key)
        if isinstance(target, str):
            result.ignored[key] = target
            continue
        if target is None or target.name not in shapes:
            result.no_home.append(key)
            continue
        sources.setdefault(target.name, []).append(key)
        if target.part is None:
            result.state[target.name] = tensor
        else:
            parts.setdefault(target.name, {})[target.part] = tensor
    for name, found in parts.items():
        if set(found) != {"q", "v"}:
            result.incomplete.append(f"{name} (has {'/'.join(sorted(found))}_bias, needs q_bias and v_bias)")
            continue
        result.state[name] = torch.cat([found["q"], torch.zeros_like(found["v"]), found["v"]])
    for name, tensor in list(result.state.items()):
        if tuple(tensor.shape) != shapes[name]:
            result.wrong_shape.append(f"{', '.join(sources[name])}: checkpoint {list(tensor.shape)} "
                                      f"vs model {list(shapes[name])}")
            del result.state[name]
    return result


def export_lavis_state(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tensors under LAVIS names (the inverse of ``convert_lavis_state``)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in named.items():
        out.update(ours_to_lavis(name, tensor.detach().cpu().clone()))
    return out


# --------------------------------------------------------------------------- is the CSRM trained?

@dataclass
class CsrmCheck:
    """How the CSRM weights compare with PyTorch's default nn.Linear initialisation."""
    looks_untrained: bool
    ratios: dict[str, tuple[float, float]]  # weight -> (max |w| / bound, std / (bound / sqrt 3))

    def summary(self) -> str:
        detail = ", ".join(f"{name} max/bound {peak:.3f} std/uniform {spread:.3f}"
                           for name, (peak, spread) in self.ratios.items())
        verdict = ("the CSRM weights still look like their random initialisation (every |w| within PyTorch's "
                   "default uniform bound 1/sqrt(fan_in), spread of a uniform draw): the released training "
                   "forward never used them, so USE_CSRM=False may match training better"
                   if self.looks_untrained else "the CSRM weights differ from a default initialisation (trained)")
        return f"{verdict} [{detail}]"


def check_csrm_initialisation(csrm: torch.nn.Module, tolerance: float = 0.05) -> CsrmCheck:
    """Untrained if every weight matrix lies within ±1/sqrt(fan_in) with the std of U(-b, b) (b / sqrt 3).

    nn.Linear draws weights from U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (1/sqrt(1408) for context1,
    context2, gate1, gate2; 1/sqrt(4224) for context3). Training moves weights past the bound
    or changes their spread; a layer no loss reached keeps its draw exactly (AdamW skips
    parameters without gradients, weight decay included).
    """
    ratios = {}
    for name in ("context1", "context2", "gate1", "gate2", "context3"):
        weight = getattr(csrm, name).weight.detach().float()
        bound = 1.0 / math.sqrt(weight.shape[1])
        ratios[name] = (float(weight.abs().max()) / bound, float(weight.std()) / (bound / math.sqrt(3)))
    untrained = all(peak <= 1.0 + 1e-4 and abs(spread - 1.0) <= tolerance for peak, spread in ratios.values())
    return CsrmCheck(untrained, ratios)


# --------------------------------------------------------------------------- writing a released-layout checkpoint

ITC_DIM = 256                 # BLIP-2's contrastive heads vision_proj / text_proj: Q-Former width -> 256
ITC_TEMPERATURE = 0.07        # BLIP-2's initial contrastive temperature ("temp")
UNUSED_HEADS = ("vision_proj.weight", "vision_proj.bias", "text_proj.weight", "text_proj.bias", "temp")


def released_extras(qformer_config, llm_config, carried: dict[str, torch.Tensor] | None = None
                    ) -> dict[str, torch.Tensor]:
    """The entries DeltaVLM's checkpoint holds that neither its code nor ours uses, so that a checkpoint we
    write has the released key set: BLIP-2's contrastive heads (trainable in LAVIS but reached by no loss, so
    they kept their values: ``carried`` from the starting checkpoint, else BLIP-2's initialisation), the
    Q-Former's ``position_ids`` buffer and Vicuna's rotary ``inv_freq`` buffer per layer (LAVIS saved buffers)."""
    carried = carried or {}
    extras = {key: carried[key].detach().cpu().clone() for key in UNUSED_HEADS if key in carried}
    width = qformer_config.hidden_size
    for head in ("vision_proj", "text_proj"):
        if f"{head}.weight" not in extras:
            layer = torch.nn.Linear(width, ITC_DIM)
            extras[f"{head}.weight"], extras[f"{head}.bias"] = layer.weight.detach(), layer.bias.detach()
    extras.setdefault("temp", torch.tensor(ITC_TEMPERATURE))
    extras["Qformer.bert.embeddings.position_ids"] = torch.arange(qformer_config.max_position_embeddings)[None]
    head_dim = getattr(llm_config, "head_dim", None) or llm_config.hidden_size // llm_config.num_attention_heads
    rope = getattr(llm_config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(llm_config, "rope_theta", 10000.0))
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    for layer in range(llm_config.num_hidden_layers):
        extras[f"llm_model.model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    return extras


def released_layout_state(named: dict[str, torch.Tensor], extras: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LAVIS ``"model"`` state dict: our tensors ``named`` under LAVIS names, plus the ``extras``."""
    return {**export_lavis_state(named), **extras}
