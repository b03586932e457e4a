"""The LAVIS -> transformers key map against the full-size model, built on the meta device (no weights)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from geochange.deltavlm.checkpoint import Target, convert_lavis_state, lavis_to_ours, ours_to_lavis
from geochange.deltavlm.model import build_on_meta, own_parameter_shapes, trained_parameter_names

FIXTURE = Path(__file__).parent / "data" / "deltavlm_released_keys.json"


@pytest.fixture(scope="module")
def released() -> dict[str, list[int]]:
    """Names and shapes of the released checkpoint's state dict (derived from DeltaVLM's module definitions)."""
    return json.loads(FIXTURE.read_text())["keys"]


@pytest.fixture(scope="module")
def full_model():
    return build_on_meta()


def test_full_size_model_has_the_published_sizes(full_model):
    shapes = own_parameter_shapes(full_model)
    assert shapes["vision_model.embeddings.patch_embedding.weight"] == (1408, 3, 14, 14)
    assert shapes["vision_model.embeddings.position_embedding"] == (1, 257, 1408)  # 16x16 patches + class
    assert len([n for n in shapes if n.endswith("self_attn.qkv.weight")]) == 39
    assert shapes["qformer.embeddings.word_embeddings.weight"] == (30523, 768)
    assert shapes["qformer.encoder.layer.0.crossattention.attention.key.weight"] == (768, 1408)
    assert "qformer.encoder.layer.1.crossattention.attention.key.weight" not in shapes  # every 2nd layer
    assert shapes["query_tokens"] == (1, 32, 768) and shapes["language_projection.weight"] == (4096, 768)
    assert shapes["csrm.context3.weight"] == (1408, 3 * 1408) and "csrm.context1.bias" not in shapes
    assert full_model.vision_model.post_layernorm.eps == 1e-5  # LAVIS's ln_vision


def test_key_map_covers_every_parameter_of_the_released_checkpoint(released, full_model):
    shapes = own_parameter_shapes(full_model)
    state = {name: torch.empty(shape, device="meta") for name, shape in released.items()}
    conversion = convert_lavis_state(state, shapes)
    assert conversion.no_home == [] and conversion.wrong_shape == [] and conversion.incomplete == []
    # Exactly the trained subset: the last two ViT blocks, ln_vision, Q-Former, queries, projection, CSRM.
    assert set(conversion.state) == set(trained_parameter_names(full_model))
    assert len(conversion.state) == 365
    ignored = set(conversion.ignored)
    assert ignored == ({"vision_proj.weight", "vision_proj.bias", "text_proj.weight", "text_proj.bias", "temp",
                        "Qformer.bert.embeddings.position_ids"}
                       | {f"llm_model.model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(32)})
    # Everything else is the frozen ViT the base supplies: embeddings and blocks 0-36.
    frozen = set(shapes) - set(conversion.state)
    assert {n.split(".")[3] for n in frozen if n.startswith("vision_model.encoder.layers.")} == {
        str(i) for i in range(37)}
    assert {n for n in frozen if not n.startswith("vision_model.encoder.")} == {
        "vision_model.embeddings.class_embedding", "vision_model.embeddings.position_embedding",
        "vision_model.embeddings.patch_embedding.weight", "vision_model.embeddings.patch_embedding.bias"}


def test_our_names_are_transformers_instructblip_names(full_model):
    """So the frozen part loads from Salesforce/instructblip-vicuna-7b as saved, without renaming."""
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration, LlamaConfig

    vision, qformer = full_model.vision_model.config, full_model.qformer.config
    config = InstructBlipConfig(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                                text_config=LlamaConfig(num_hidden_layers=1).to_dict(), num_query_tokens=32)
    with torch.device("meta"):
        reference = InstructBlipForConditionalGeneration(config)
    theirs = {n: tuple(p.shape) for n, p in reference.named_parameters() if not n.startswith("language_")}
    ours = {n: s for n, s in own_parameter_shapes(full_model).items() if not n.startswith(("csrm.", "language_"))}
    assert ours == theirs


def test_inverse_map_returns_the_released_names(released, full_model):
    """ours -> LAVIS -> ours is the identity, and lands on the released names (q/v bias split in two)."""
    parameters = dict(full_model.named_parameters())
    written = {}
    for name in trained_parameter_names(full_model):
        lavis = ours_to_lavis(name, parameters[name])
        for key in lavis:
            target = lavis_to_ours(key)
            assert isinstance(target, Target) and target.name == name
        written.update({k: list(v.shape) for k, v in lavis.items()})
    assert written == {k: v for k, v in released.items() if isinstance(lavis_to_ours(k), Target)}


def test_qkv_bias_fusion_is_q_zero_v():
    q, v = torch.randn(6), torch.randn(6)
    shapes = {"vision_model.encoder.layers.3.self_attn.qkv.bias": (18,)}
    conversion = convert_lavis_state({"visual_encoder.blocks.3.attn.q_bias": q,
                                      "visual_encoder.blocks.3.attn.v_bias": v}, shapes)
    fused = conversion.state["vision_model.encoder.layers.3.self_attn.qkv.bias"]
    assert torch.equal(fused[:6], q) and torch.equal(fused[6:12], torch.zeros(6)) and torch.equal(fused[12:], v)
    back = ours_to_lavis("vision_model.encoder.layers.3.self_attn.qkv.bias", fused)
    assert torch.equal(back["visual_encoder.blocks.3.attn.q_bias"], q)
    assert torch.equal(back["visual_encoder.blocks.3.attn.v_bias"], v)
    half = convert_lavis_state({"visual_encoder.blocks.3.attn.q_bias": q}, shapes)
    assert half.incomplete and not half.state


def test_unknown_and_misshapen_keys_are_reported(full_model):
    shapes = own_parameter_shapes(full_model)
    conversion = convert_lavis_state({"Qformer.cls.predictions.bias": torch.empty(3, device="meta"),
                                      "llm_proj.weight": torch.empty(5, 768, device="meta")}, shapes)
    assert conversion.no_home == ["Qformer.cls.predictions.bias"]
    assert conversion.wrong_shape == ["llm_proj.weight: checkpoint [5, 768] vs model [4096, 768]"]
