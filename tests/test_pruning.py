"""Pruning on tiny models: amounts reached, whole heads/channels, nothing else touched."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from geochange.errors import UserError
from geochange.modeling import load_model, resolve_model_path
from geochange.pruning import measure_sparsity, prune_model, target_linears, zeroed_channels, zeroed_heads


def tiny_vlm(family="videollava"):
    return load_model(resolve_model_path("tiny", family), family)


def gqa_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2)
    return LlamaForCausalLM(config)


def untouched(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if any(k in n for k in ("tower", "projector", "lm_head", "embed_tokens", "norm"))}


@pytest.mark.parametrize("family", ["videollava", "llavanext"])
@pytest.mark.parametrize("amount", [0.05, 0.3])
def test_magnitude_zeroes_the_smallest_weights_of_each_language_linear(family, amount):
    model = tiny_vlm(family)
    keep = untouched(model)
    before = {n: m.weight.detach().clone() for n, m in target_linears(model).items()}
    sparsity = prune_model(model, "magnitude", amount)
    for name, linear in target_linears(model).items():
        assert ".language_model." in name
        w = linear.weight
        assert abs((w == 0).float().mean().item() - amount) < 0.005, name
        # independent check: everything zeroed is no larger than everything kept
        original = before[name].abs()
        assert original[w == 0].max() <= original[w != 0].min()
    assert abs(sparsity["total"] - amount) < 0.005 and abs(sparsity["q_proj"] - amount) < 0.005
    for name, value in keep.items():
        assert torch.equal(dict(model.named_parameters())[name], value), name


def test_attention_zeroes_whole_lowest_norm_heads_across_qkvo():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=5,
                         num_attention_heads=8, num_key_value_heads=8)
    model = LlamaForCausalLM(config)
    for layer in model.model.layers:  # spread head norms so the choice is unambiguous
        scale = torch.rand(8).repeat_interleave(8)[:, None] + 0.1
        layer.self_attn.q_proj.weight.data *= scale
    reference = []
    for layer in model.model.layers:  # independent per-head norms, normalised by the layer mean
        a, d = layer.self_attn, 8
        sq = sum(p.weight.view(8, d, -1).pow(2).sum((1, 2)) for p in (a.q_proj, a.k_proj, a.v_proj))
        sq = sq + a.o_proj.weight.view(64, 8, d).pow(2).sum((0, 2))
        reference.append(sq.sqrt() / sq.sqrt().mean())
    flat = torch.cat(reference)
    expected = set(torch.argsort(flat)[:10].tolist())  # 25% of 40 heads
    sparsity = prune_model(model, "attention", 0.25)
    assert sparsity["heads"] == 0.25
    heads = zeroed_heads(model)
    assert {i * 8 + h for i, (name, hs) in enumerate(sorted(heads.items())) for h in hs} == expected
    for (name, hs), layer in zip(sorted(heads.items()), model.model.layers):
        a = layer.self_attn
        for h in range(8):
            rows = slice(h * 8, (h + 1) * 8)
            zero = h in hs
            for w in (a.q_proj.weight[rows], a.k_proj.weight[rows], a.v_proj.weight[rows], a.o_proj.weight[:, rows]):
                assert bool((w == 0).all()) == zero
    model(torch.tensor([[1, 2, 3]]))  # still runs


def test_attention_with_grouped_query_prunes_q_and_o_only():
    model = gqa_llama()
    k_before = [l.self_attn.k_proj.weight.clone() for l in model.model.layers]
    sparsity = prune_model(model, "attention", 0.25)
    assert sparsity["heads"] == 0.25 and sum(map(len, zeroed_heads(model).values())) == 8
    assert all(torch.equal(l.self_attn.k_proj.weight, k) for l, k in zip(model.model.layers, k_before))


@pytest.mark.parametrize("amount", [0.05, 0.5])
def test_channel_zeroes_whole_mlp_channels(amount):
    model = gqa_llama()
    norms = torch.cat([(l.mlp.gate_proj.weight.pow(2).sum(1) + l.mlp.up_proj.weight.pow(2).sum(1)
                        + l.mlp.down_proj.weight.pow(2).sum(0)).sqrt() for l in model.model.layers]).view(4, 160)
    normalised = (norms / norms.mean(1, keepdim=True)).flatten()
    sparsity = prune_model(model, "channel", amount)
    assert abs(sparsity["channels"] - amount) < 0.005
    chosen = zeroed_channels(model)
    got = {i * 160 + c for i, (name, cs) in enumerate(sorted(chosen.items())) for c in cs}
    assert got == set(torch.argsort(normalised)[:round(amount * 640)].tolist())
    for (name, cs), layer in zip(sorted(chosen.items()), model.model.layers):
        m = layer.mlp
        assert (m.gate_proj.weight[cs] == 0).all() and (m.up_proj.weight[cs] == 0).all()
        assert (m.down_proj.weight[:, cs] == 0).all()
        alive = [c for c in range(160) if c not in cs]
        assert (m.gate_proj.weight[alive] != 0).any(1).all()


def test_vision_is_pruned_only_when_asked_and_state_dict_keys_stay():
    model = tiny_vlm()
    keys = set(model.state_dict())
    vision = {n: p.clone() for n, p in model.named_parameters() if "tower" in n or "projector" in n}
    prune_model(model, "magnitude", 0.2)
    assert all(torch.equal(dict(model.named_parameters())[n], p) for n, p in vision.items())
    assert set(model.state_dict()) == keys and not any("orig" in k or "mask" in k for k in keys)
    sparsity = prune_model(model, "magnitude", 0.2, include_vision=True)
    assert abs(sparsity["vision.fc1"] - 0.2) < 0.005 and abs(sparsity["vision.linear_1"] - 0.2) < 0.005
    assert set(model.state_dict()) == keys


def test_zero_amount_is_a_no_op_and_bad_settings_raise():
    model = gqa_llama()
    before = {n: p.clone() for n, p in model.named_parameters()}
    assert prune_model(model, "channel", 0.0)["channels"] == 0.0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(UserError, match="unknown PRUNE_METHOD 'random'; expected one of magnitude, attention, channel"):
        prune_model(model, "random", 0.1)
    for amount in (1.0, -0.01):
        with pytest.raises(UserError, match="PRUNE_AMOUNT must be in"):
            prune_model(model, "magnitude", amount)
    assert measure_sparsity(model)["total"] == 0.0
