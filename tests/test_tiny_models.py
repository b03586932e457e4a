"""The offline tiny models: real classes, real prompt format, loaded through from_pretrained."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from transformers import PreTrainedModel

from geochange.adapters import renamed_key
from geochange.locks import MARKER as TINY_MARKER
from geochange.locks import build_once
from geochange.video_llm.families import FAMILIES as ENTRIES
from geochange.errors import UserError
from geochange.video_llm.families import get_family
from geochange.video_llm.modeling import (IGNORE_INDEX, VideoQACollator, count_parameters, encode_training_example,
                                          linear_counts, load_model, load_processor, plan_lengths, resolve_model_path,
                                          video_prompt, video_token_count)

FAMILIES = list(ENTRIES)
EXPECTED_CLASSES = {"videollava": ("VideoLlavaForConditionalGeneration", "VideoLlavaProcessor"),
                    "llavanext": ("LlavaNextVideoForConditionalGeneration", "LlavaNextVideoProcessor")}


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    path = resolve_model_path("tiny", request.param)
    return request.param, load_model(path, request.param), load_processor(path)


def clip(seed=0, frames=2):
    return np.random.default_rng(seed).integers(0, 256, (frames, 96, 96, 3), dtype=np.uint8)


def test_real_classes_and_prompt_format(tiny):
    family, model, processor = tiny
    assert (type(model).__name__, type(processor).__name__) == EXPECTED_CLASSES[family]
    assert isinstance(model, get_family(family).model_class)
    assert video_prompt(processor, "What changed?") == "USER: <video>\nWhat changed? ASSISTANT:"
    # small enough for CPU fine-tuning in minutes
    assert sum(p.numel() for p in model.parameters()) < 6_000_000


def test_video_tokens_match_the_architecture(tiny):
    family, model, processor = tiny
    patches = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    # Video-LLaVA keeps CLS + every patch per frame; LLaVA-NeXT-Video pools the patch grid by 2x2.
    per_frame = patches + 1 if family == "videollava" else patches // 4
    assert video_token_count(processor, 2) == 2 * per_frame
    assert video_token_count(processor, 4) == 4 * per_frame


def test_forward_and_generate(tiny):
    family, model, processor = tiny
    inputs = processor(text=[video_prompt(processor, "What changed?")], videos=[clip()], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 4)
    assert torch.equal(out[0, : inputs["input_ids"].shape[1]], inputs["input_ids"][0])


def test_labels_mask_prompt_video_and_padding(tiny):
    family, model, processor = tiny
    tokenizer = processor.tokenizer
    long_answer = "two new buildings appeared in the upper left"
    examples = [encode_training_example(processor, clip(1), "What changed?", long_answer),
                encode_training_example(processor, clip(2), "Describe the change.", "no change")]
    batch = VideoQACollator(tokenizer.pad_token_id)(examples)
    n_video = video_token_count(processor, 2)
    for row, answer in zip(range(2), [long_answer, "no change"]):
        ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        supervised = labels != IGNORE_INDEX
        # exactly the answer tokens and EOS are supervised, and they are the last real tokens
        assert labels[supervised].tolist() == answer_ids
        real = int(mask.sum())
        assert supervised.nonzero().flatten().tolist() == list(range(real - len(answer_ids), real))
        # every video token, the BOS and the prompt text carry -100
        assert (labels[ids == processor.video_token_id] == IGNORE_INDEX).all()
        assert int((ids == processor.video_token_id).sum()) == n_video
        assert labels[0] == IGNORE_INDEX and ids[0] == tokenizer.bos_token_id
        # padding: attention 0, label -100
        assert (labels[mask == 0] == IGNORE_INDEX).all() and (ids[mask == 0] == tokenizer.pad_token_id).all()
    assert batch["pixel_values_videos"].shape[:2] == (2, 2)
    with torch.no_grad():
        loss = model(**batch).loss
    assert torch.isfinite(loss) and loss.item() > 0


def test_answer_is_shortened_never_the_prompt(tiny):
    family, model, processor = tiny
    n_video = video_token_count(processor, 2)
    answer = "a road now crosses the center and three buildings were demolished in the lower right corner"
    plan = plan_lengths(processor, "What changed?", answer, n_video, max_length=10_000)
    assert plan.answer_budget == plan.answer_tokens
    tight = plan_lengths(processor, "What changed?", answer, n_video, max_length=plan.prompt_tokens + 5)
    assert tight.answer_budget == 5
    example = encode_training_example(processor, clip(), "What changed?", answer, tight.answer_budget)
    assert len(example["input_ids"]) == plan.prompt_tokens + 5
    assert int((example["input_ids"] == processor.video_token_id).sum()) == n_video
    assert int((example["labels"] != IGNORE_INDEX).sum()) == 5


def test_every_linear_fits_the_bitsandbytes_cpu_kernel(tiny):
    # On AVX512-BF16 CPUs bitsandbytes packs 4-bit weights in blocks of 64 inputs x 32 outputs:
    # a 32-wide Linear fails there with "shape '[32, 0]' is invalid". Every Linear fits, so any could be quantised.
    family, model, processor = tiny
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"}
    assert len(linears) == {"videollava": 40, "llavanext": 28}[family]
    for name, linear in linears.items():
        assert linear.in_features % 64 == 0 and linear.out_features % 32 == 0, (name, linear)
    assert max(max(m.in_features, m.out_features) for m in linears.values()) == 128  # still tiny


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("family", FAMILIES)
def test_only_the_language_model_is_quantised(family, bits):
    path = resolve_model_path("tiny", family)
    full = load_model(path, family)
    expected = {}
    for name, module in full.named_modules():
        if isinstance(module, torch.nn.Linear):  # model.<part>.… or lm_head, read off the name here
            part = name.split(".")[1] if name.startswith("model.") else name
            expected[part] = expected.get(part, 0) + 1
    quantised = load_model(path, family, bits=bits)
    counts = linear_counts(quantised, get_family(family).parts)
    assert counts["language_model"] == {"quantised": expected["language_model"], "kept": 0}
    assert expected["language_model"] == 14  # 2 layers x (q, k, v, o, gate, up, down)
    for part, number in expected.items():
        if part != "language_model":  # the vision towers, the projector and lm_head stay in full precision
            assert counts[part] == {"quantised": 0, "kept": number}, (part, counts)
    assert {"multi_modal_projector", "lm_head"} <= set(counts)
    # the kept layers still hold full-precision weights, and 4-bit weights count as the values they hold
    assert quantised.model.multi_modal_projector.linear_1.weight.dtype == torch.float32
    assert count_parameters(quantised)[1] == count_parameters(full)[1]
    assert count_parameters(full)[1] == sum(p.numel() for p in full.parameters())


def test_build_once_builds_under_its_seed_once_swaps_in_whole_and_rebuilds_a_new_version(tmp_path):
    builds = []

    def build(staging):
        builds.append(staging)
        (staging / "weights.txt").write_text(repr(torch.rand(1).item()))

    torch.manual_seed(7)
    callers_next = torch.rand(1)
    torch.manual_seed(7)
    target = build_once(tmp_path / "tiny-x", 1, build, seed=3, what="x")
    assert torch.equal(torch.rand(1), callers_next)  # the caller's random state is left as it was
    torch.manual_seed(3)
    assert float((target / "weights.txt").read_text()) == torch.rand(1).item()  # drawn under the build's seed
    assert json.loads((target / TINY_MARKER).read_text()) == {"version": 1, "seed": 3}
    assert build_once(target, 1, build, seed=3, what="x") == target and len(builds) == 1  # built once

    def broken(staging):
        (staging / "half.txt").write_text("half a build")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        build_once(target, 2, broken, seed=3, what="x")
    # The finished build stays, and nothing half-built is left beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-x", "tiny-x.lock"]
    assert not (target / "half.txt").exists()
    (target / TINY_MARKER).write_text("{damaged")
    build_once(target, 1, build, seed=3, what="x")
    assert len(builds) == 2 and json.loads((target / TINY_MARKER).read_text())["version"] == 1
    build_once(target, 2, build, seed=3, what="x")
    assert len(builds) == 3 and json.loads((target / TINY_MARKER).read_text())["version"] == 2


def test_each_family_entry_names_the_parts_of_its_model(tiny):
    """The entry's parts (freezing, quantisation skips, LoRA targets, pruning, the memory and GPU checks, adapter
    renames) are the real class's: its towers and projectors are exactly the children of ``model.model`` that hold
    weights beside the language model, every weight lies in a named part or is image-only, and an entry whose names
    miss the model stops the load in one line instead of freezing or quantising nothing."""
    family, model, _ = tiny
    entry = get_family(family)
    parts = entry.parts
    weighted = {name: child for name, child in model.model.named_children() if any(True for _ in child.parameters())}
    assert parts.language_model in weighted
    # the towers are the whole models beside the language model (CLIPVisionModel...); the other parts beside it are
    # projectors (a projector may also sit inside a tower)
    towers = {name for name, child in weighted.items() if isinstance(child, PreTrainedModel)} - {parts.language_model}
    assert set(parts.vision_towers) == towers
    assert set(weighted) - towers - {parts.language_model} <= set(parts.projectors)
    assert all(any(name.split(".")[-1] == p for name, _ in model.named_modules()) for p in parts.projectors)
    parts.check(model, "the tiny twin")
    tower = f"model.{parts.vision_towers[0]}.vision_model.encoder.layers.0.mlp.fc1.weight"
    assert (parts.part_of(tower), parts.part_of("model.multi_modal_projector.linear_1.weight"),
            parts.part_of("base_model.model.model.language_model.layers.1.mlp.up_proj.lora_A.default.weight"),
            parts.part_of("lm_head.weight")) == (parts.vision_towers[0], "multi_modal_projector", "language_model",
                                                 "lm_head")
    for wrong in (dataclasses.replace(parts, vision_towers=("visual",)), dataclasses.replace(parts, projectors=()),
                  dataclasses.replace(parts, language_model="llm"), dataclasses.replace(parts, image_only=("pos",))):
        with pytest.raises(UserError, match="the family's parts do not fit the model"):
            wrong.check(model, "the tiny twin")
    for part in parts.vision:  # an adapter saved with transformers-4 names finds each part under model.
        assert renamed_key(f"base_model.model.{part}.linear_1.lora_A.weight", entry.adapter_renames) == \
            f"base_model.model.model.{part}.linear_1.lora_A.weight"


def test_a_projector_inside_the_tower_is_the_projector():
    """Qwen2.5-VL's layout (the merger inside ``visual``, no projector beside it): the innermost named part wins, so
    FREEZE_VISION freezes the tower and the merger trains, as LLaVA's projector does."""
    parts = dataclasses.replace(get_family("llavanext").parts, vision_towers=("visual",), projectors=("merger",))
    assert parts.part_of("model.visual.blocks.0.mlp.up_proj.weight") == "visual"
    assert parts.part_of("model.visual.merger.mlp.0.weight") == "merger"
    assert parts.in_tower("model.visual.patch_embed.proj.weight")
    assert not parts.in_tower("model.visual.merger.ln_q.weight")
