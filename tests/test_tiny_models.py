"""The offline tiny models: real classes, real prompt format, loaded through from_pretrained."""
import dataclasses
import json
import re

import numpy as np
import pytest
import torch
from transformers import PreTrainedModel

from geochange.adapters import renamed_key
from geochange.locks import MARKER as TINY_MARKER
from geochange.locks import build_once
from geochange.video_llm.families import FAMILIES as ENTRIES
from geochange.errors import UserError
from geochange.video_llm.evaluation import generate_answers
from geochange.video_llm.families import get_family
from geochange.devices import is_quantised_linear
from geochange.video_llm.modeling import (IGNORE_INDEX, VideoQACollator, answer_text, answer_token_ids,
                                          count_parameters, encode_training_example, linear_counts, load_model,
                                          load_processor, plan_lengths, resolve_model_path, video_prompt,
                                          video_token_count)

FAMILIES = list(ENTRIES)


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    path = resolve_model_path("tiny", request.param)
    return request.param, load_model(path, request.param), load_processor(path)


def clip(seed=0, frames=2, height=96, width=96):
    return np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


def test_real_classes_and_prompt_format(tiny):
    family, model, processor = tiny
    entry = get_family(family)
    assert type(model).__name__ == entry.model_class_name and isinstance(model, entry.model_class)
    assert type(processor) is type(entry.processor_for(model.config, processor.tokenizer))  # saved, loaded back
    prompt = video_prompt(processor, "What changed?")
    # the clip once, then the question, then the template's generation prompt (what add_generation_prompt adds)
    assert prompt.count(processor.video_token) == 1 and prompt.index(processor.video_token) < prompt.index("What")
    user = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What changed?"}]}]
    without = processor.apply_chat_template(user)
    assert prompt.startswith(without.rstrip()) and len(prompt) > len(without.rstrip())
    # the answer follows the prompt as the template joins them, and ends in one EOS
    answered = processor.apply_chat_template(user + [{"role": "assistant", "content": [{"type": "text",
                                                                                         "text": "a road."}]}])
    assert answered.startswith(prompt) and answered[len(prompt):].strip().startswith("a road.")
    ids = answer_token_ids(processor, "a road.")
    assert ids[-1] == processor.tokenizer.eos_token_id and ids.count(processor.tokenizer.eos_token_id) == 1
    # small enough for CPU fine-tuning in minutes
    assert sum(p.numel() for p in model.parameters()) < 6_000_000


def test_video_tokens_are_asked_of_the_processor_at_the_clips_size(tiny):
    """The count the lengths are planned with is what a real clip of that size becomes, and the model takes
    exactly that many features (its forward checks the video tokens against the features)."""
    family, model, processor = tiny
    for frames, height, width in ((2, 96, 96), (2, 256, 192), (4, 64, 64)):
        expected = video_token_count(processor, frames, (width, height))
        example = encode_training_example(processor, clip(1, frames, height, width), "What changed?", "a road")
        assert int((example["input_ids"] == processor.video_token_id).sum()) == expected
    assert video_token_count(processor, 4, (64, 64)) == 2 * video_token_count(processor, 2, (64, 64))
    batch = VideoQACollator(processor.tokenizer.pad_token_id)([example])
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


def test_forward_and_generate(tiny):
    family, model, processor = tiny
    inputs = processor(text=[video_prompt(processor, "What changed?")], videos=[clip()], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()
    out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                         pad_token_id=processor.tokenizer.pad_token_id)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 4)
    assert torch.equal(out[0, : inputs["input_ids"].shape[1]], inputs["input_ids"][0])


def test_batched_generation_with_left_padding_answers_as_one_at_a_time(tiny):
    """Clips of different sizes and questions of different lengths in one left-padded batch (Qwen2.5-VL keeps its
    M-RoPE offsets per row) give each row the greedy answer it gets alone."""
    family, model, processor = tiny
    clips, questions = [clip(1), clip(2, height=160, width=128)], ["What changed?", "Describe every change you see."]
    with torch.no_grad():
        batched, _ = generate_answers(model, processor, clips, questions, 3)
        alone = [generate_answers(model, processor, [c], [q], 3)[0][0] for c, q in zip(clips, questions)]
    assert batched == alone


def test_labels_mask_prompt_video_and_padding_and_the_batch_is_the_processors_own(tiny):
    """Examples encoded one at a time and collated give the batch the processor itself builds from the whole
    texts (prompt, answer as the template joins it, EOS) padded on the right: every output joined by what it is
    (per-token values padded, clips stacked, patches and grids concatenated); only the answer is supervised."""
    family, model, processor = tiny
    tokenizer = processor.tokenizer
    long_answer = "two new buildings appeared in the upper left"
    questions, answers = ["What changed?", "Describe the change."], [long_answer, "no change"]
    clips = [clip(1), clip(2, height=128, width=96)]
    examples = [encode_training_example(processor, c, q, a) for c, q, a in zip(clips, questions, answers)]
    batch = VideoQACollator(tokenizer.pad_token_id)(examples)
    texts = [video_prompt(processor, q) + answer_text(processor, a).rstrip() for q, a in zip(questions, answers)]
    texts = [t if t.endswith(tokenizer.eos_token) else t + tokenizer.eos_token for t in texts]
    tokenizer.padding_side = "right"
    try:
        reference = processor(text=texts, videos=clips, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = "left"
    assert set(batch) == set(reference) | {"labels"}
    for key, value in reference.items():
        assert torch.equal(batch[key], value.to(batch[key].dtype)), key
    for row, answer in enumerate(answers):
        ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        answer_ids = answer_token_ids(processor, answer)
        supervised = labels != IGNORE_INDEX
        # exactly the answer tokens and EOS are supervised, and they are the last real tokens
        assert labels[supervised].tolist() == answer_ids and answer_ids[-1] == tokenizer.eos_token_id
        real = int(mask.sum())
        assert supervised.nonzero().flatten().tolist() == list(range(real - len(answer_ids), real))
        assert (labels[ids == processor.video_token_id] == IGNORE_INDEX).all()
        assert int((ids == processor.video_token_id).sum()) == video_token_count(processor, 2, clips[row].shape[2:0:-1])
        # padding: attention 0, label -100
        assert (labels[mask == 0] == IGNORE_INDEX).all() and (ids[mask == 0] == tokenizer.pad_token_id).all()
    with torch.no_grad():
        loss = model(**batch).loss
    assert torch.isfinite(loss) and loss.item() > 0


def test_answer_is_shortened_never_the_prompt(tiny):
    family, model, processor = tiny
    n_video = video_token_count(processor, 2, (96, 96))
    answer = "a road now crosses the center and three buildings were demolished in the lower right corner"
    plan = plan_lengths(processor, "What changed?", answer, n_video, max_length=10_000)
    assert plan.answer_budget == plan.answer_tokens
    tight = plan_lengths(processor, "What changed?", answer, n_video, max_length=plan.prompt_tokens + 5)
    assert tight.answer_budget == 5
    example = encode_training_example(processor, clip(), "What changed?", answer, tight.answer_budget)
    assert len(example["input_ids"]) == plan.prompt_tokens + 5
    assert all(len(value) == plan.prompt_tokens + 5 for key, value in example.items()
               if value.shape == example["input_ids"].shape)
    assert int((example["input_ids"] == processor.video_token_id).sum()) == n_video
    assert int((example["labels"] != IGNORE_INDEX).sum()) == 5


def test_every_linear_fits_the_bitsandbytes_cpu_kernel(tiny):
    # On AVX512-BF16 CPUs bitsandbytes packs 4-bit weights in blocks of 64 inputs x 32 outputs:
    # a 32-wide Linear fails there with "shape '[32, 0]' is invalid". Every Linear fits, so any could be quantised.
    family, model, processor = tiny
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"}
    assert sum(".language_model." in name for name in linears) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    for name, linear in linears.items():
        assert linear.in_features % 64 == 0 and linear.out_features % 32 == 0, (name, linear)
    assert max(max(m.in_features, m.out_features) for m in linears.values()) <= 256  # still tiny


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("family", FAMILIES)
def test_only_the_language_model_is_quantised(family, bits):
    path = resolve_model_path("tiny", family)
    full = load_model(path, family)
    parts = get_family(family).parts
    linears = [name for name, module in full.named_modules() if isinstance(module, torch.nn.Linear)]
    in_language_model = {name for name in linears if name.startswith("model.language_model.")}  # read off the name
    assert len(in_language_model) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    quantised = load_model(path, family, bits=bits)
    modules = dict(quantised.named_modules())
    for name in linears:  # the vision towers, the projectors and lm_head stay in full precision
        assert is_quantised_linear(modules[name]) == (name in in_language_model), name
        if name not in in_language_model:
            assert modules[name].weight.dtype == torch.float32, name
    counts = linear_counts(quantised, parts)
    assert counts[parts.language_model] == {"quantised": 14, "kept": 0}
    assert {*parts.projectors, parts.lm_head, *parts.vision_towers} - set(parts.image_only) <= set(counts)
    assert sum(c["quantised"] + c["kept"] for c in counts.values()) == len(linears)
    # 4-bit weights count as the values they hold
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
    weights beside the language model (a projector may sit inside its tower: the innermost part wins), every weight
    lies in a named part or is image-only, and an entry whose names miss the model stops the load in one line
    instead of freezing or quantising nothing."""
    family, model, _ = tiny
    entry = get_family(family)
    parts = entry.parts
    weighted = {name: child for name, child in model.model.named_children() if any(True for _ in child.parameters())}
    assert parts.language_model in weighted
    # the towers are the whole models beside the language model (CLIPVisionModel, Qwen's vision transformer); the
    # other parts beside it are projectors
    towers = {name for name, child in weighted.items() if isinstance(child, PreTrainedModel)} - {parts.language_model}
    assert set(parts.vision_towers) == towers
    assert set(weighted) - towers - {parts.language_model} <= set(parts.projectors)
    parts.check(model, "the tiny twin")
    for projector in parts.projectors:  # a projector's weights are the projector's, wherever it sits: never frozen
        module = next(m for name, m in model.named_modules() if name.split(".")[-1] == projector)
        names = {id(p) for p in module.parameters()}
        inside = [name for name, p in model.named_parameters() if id(p) in names]
        assert inside and all(parts.part_of(n) == projector and not parts.in_tower(n) for n in inside)
    for name, _ in model.named_parameters():
        assert parts.in_language_model(name) == name.startswith("model.language_model."), name
        assert parts.in_tower(name) == (any(f"model.{tower}." in name for tower in towers)
                                        and parts.part_of(name) not in parts.projectors), name
    assert parts.part_of("base_model.model.model.language_model.layers.1.mlp.up_proj.lora_A.default.weight") == \
        parts.language_model
    wrongs = [dataclasses.replace(parts, vision_towers=("no_such_tower",)),
              dataclasses.replace(parts, language_model="llm"), dataclasses.replace(parts, image_only=("pos",))]
    if set(parts.projectors) & set(weighted):  # a projector beside the towers, left out, leaves its weights in no part
        wrongs.append(dataclasses.replace(parts, projectors=()))
    for wrong in wrongs:
        with pytest.raises(UserError, match="the family's parts do not fit the model"):
            wrong.check(model, "the tiny twin")
    # adapters: transformers 5's own names are left as they are; a tower saved at the top (transformers 4) moves under
    # model.
    for name, _ in model.named_parameters():
        assert renamed_key(f"base_model.model.{name}", entry.adapter_renames) == f"base_model.model.{name}"
    for tower in parts.vision_towers:
        assert renamed_key(f"base_model.model.{tower}.x.lora_A.weight", entry.adapter_renames) == \
            f"base_model.model.model.{tower}.x.lora_A.weight"


def transformers_renamed(name: str, model) -> str:
    """``name`` as transformers itself renames a checkpoint saved by transformers 4 when loading it into ``model``
    (its own conversion rules, applied by its own loader's function)."""
    from transformers.conversion_mapping import WeightRenaming, get_model_conversion_mapping
    from transformers.core_model_loading import rename_source_key

    rules = get_model_conversion_mapping(model)
    renamings = [rule for rule in rules if isinstance(rule, WeightRenaming)]
    converters = [rule for rule in rules if not isinstance(rule, WeightRenaming)]
    return rename_source_key(name, renamings, converters, base_model_prefix=model.base_model_prefix,
                             meta_state_dict=model.state_dict())[0]


def test_old_adapter_names_are_renamed_as_transformers_renames_old_weights(tiny):
    """An adapter saved with transformers 4 loads: each entry's renames move every LoRA-able module's old name where
    transformers' own conversion moves the same name of a transformers-4 checkpoint (Video-LLaVA's
    ``language_model.model.…``, Qwen2.5-VL's ``model.layers.…`` and ``visual.…``)."""
    family, model, _ = tiny
    entry = get_family(family)
    modules = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    checked = set()
    for name in modules:
        candidates = {name.removeprefix("model."), "language_model." + name}
        if name.startswith("model.language_model."):
            rest = name.removeprefix("model.language_model.")
            candidates |= {"model." + rest, "language_model.model." + rest}
        for old in candidates - {name}:
            if transformers_renamed(old, model) != name:
                continue  # not a transformers-4 name of this module
            key = f"base_model.model.{old}.lora_A.weight"
            assert renamed_key(key, entry.adapter_renames) == f"base_model.model.{name}.lora_A.weight", old
            checked.add(entry.parts.part_of(name))
    assert {entry.parts.language_model, *entry.parts.vision_towers} - set(entry.parts.image_only) <= checked
