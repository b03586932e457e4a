"""DeltaVLM on its tiny offline twin: the real loading path, the CSRM, answering, chat, batch + resume, errors."""
from __future__ import annotations

import hashlib
import json
import os
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_script

import geochange.changechat_format as cc
from geochange.deltavlm.checkpoint import CsrmCheck, check_csrm_initialisation, convert_lavis_state
from geochange.deltavlm.model import CSRM, build_on_meta, own_parameter_shapes, trained_parameter_names

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "deltavlm_predict.py"
pytestmark = pytest.mark.xdist_group("deltavlm")  # its module fixtures load the tiny twin once


@pytest.fixture(scope="module")
def tiny():
    from geochange.deltavlm.tiny import ensure_tiny_deltavlm

    return ensure_tiny_deltavlm()


def load(tiny, checkpoint=None, **kwargs):
    from geochange.deltavlm.loading import load_deltavlm

    return load_deltavlm(str(checkpoint or tiny.checkpoint), base=str(tiny.base), llm_model=str(tiny.llm),
                         bert_model=str(tiny.bert), device=torch.device("cpu"), **kwargs)


@pytest.fixture(scope="module")
def loaded(tiny, one_thread):
    return load(tiny)


@pytest.fixture(scope="module")
def predictor(loaded):
    from geochange.deltavlm.predictor import Decoding, Predictor, Prompting

    model, tokenizers, _ = loaded
    return Predictor(model, tokenizers, torch.device("cpu"), Decoding(num_beams=1, max_new_tokens=6), Prompting())


def released_checkpoint_state(tiny) -> dict[str, torch.Tensor]:
    return torch.load(tiny.checkpoint, map_location="cpu", weights_only=True)["model"]


# --------------------------------------------------------------------------- the CSRM

def test_csrm_equals_the_formula():
    torch.manual_seed(0)
    csrm = CSRM(8).eval()
    before, after = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    d = after - before

    def lin(name, x):
        layer = getattr(csrm, name)
        return F.linear(x, layer.weight, layer.bias)

    expected = []
    for x in (before, after):
        c = torch.tanh(lin("context1", d) + lin("context2", x))
        g = torch.sigmoid(lin("gate1", d) + lin("gate2", x))
        expected.append(lin("context3", torch.cat([x, d, g * c], dim=-1)))
    out = csrm(before, after)
    assert out.shape == (2, 10, 8)
    torch.testing.assert_close(out, torch.cat(expected, dim=1))
    assert csrm.context1.bias is None and csrm.gate1.bias is None


def test_csrm_initialisation_check():
    torch.manual_seed(1)
    csrm = CSRM(64)
    fresh = check_csrm_initialisation(csrm)
    assert isinstance(fresh, CsrmCheck) and fresh.looks_untrained
    peak, spread = fresh.ratios["context1"]
    assert peak <= 1.0 and spread == pytest.approx(1.0, abs=0.05)
    with torch.no_grad():
        csrm.gate2.weight.mul_(1.5)  # what training does: weights leave the init bound
    trained = check_csrm_initialisation(csrm)
    assert not trained.looks_untrained and trained.ratios["gate2"][0] > 1.4
    with torch.no_grad():
        csrm.gate2.weight.mul_(1 / 1.5).mul_(0.5)  # within the bound, but the spread of a different draw
    assert not check_csrm_initialisation(csrm).looks_untrained
    assert "random initialisation" in fresh.summary() and "trained" in trained.summary()


def test_image_tokens_with_and_without_csrm(loaded):
    model = loaded[0]
    pixels_a, pixels_b = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        features_a, features_b = model.image_features(pixels_a), model.image_features(pixels_b)
        model.use_csrm = False
        plain = model.image_tokens(pixels_a, pixels_b)
        model.use_csrm = True
        enhanced = model.image_tokens(pixels_a, pixels_b)
    torch.testing.assert_close(plain, torch.cat([features_a, features_b], dim=1))  # the training forward
    torch.testing.assert_close(enhanced, model.csrm(features_a, features_b))       # the released generate
    assert enhanced.shape == (1, 2 * 17, 32)  # (32/8)^2 patches + class token, per image


# --------------------------------------------------------------------------- loading the LAVIS-layout checkpoint

def test_tiny_checkpoint_loads_with_no_missing_or_unexpected_key(tiny, loaded):
    from safetensors.torch import load_file

    model, tokenizers, report = loaded
    lavis = released_checkpoint_state(tiny)
    shapes = own_parameter_shapes(build_on_meta(model.vision_model.config, model.qformer.config,
                                                model.query_tokens.shape[1], 64))
    conversion = convert_lavis_state(lavis, shapes)
    assert conversion.no_home == [] and conversion.wrong_shape == [] and conversion.incomplete == []
    assert set(conversion.state) == set(trained_parameter_names(model))
    assert report.from_checkpoint == len(conversion.state) and report.from_base == len(shapes) - len(conversion.state)
    assert set(report.ignored) == {"vision_proj.weight", "vision_proj.bias", "text_proj.weight", "text_proj.bias",
                                   "temp", "Qformer.bert.embeddings.position_ids",
                                   "llm_model.model.layers.0.self_attn.rotary_emb.inv_freq",
                                   "llm_model.model.layers.1.self_attn.rotary_emb.inv_freq"}
    # Every tensor holds its source's values: trained ones the checkpoint's, frozen ones the base's.
    base = load_file(str(tiny.base / "model.safetensors"))
    parameters = dict(model.named_parameters())
    for name in shapes:
        source = conversion.state[name] if name in conversion.state else base[name]
        assert torch.equal(parameters[name], source.float()), name
    assert torch.equal(parameters["query_tokens"], lavis["query_tokens"])
    assert torch.equal(parameters["csrm.context3.bias"], lavis["context3.bias"])
    # The fused EVA bias reproduces LAVIS's attention input: F.linear(x, qkv.weight, [q_bias, 0, v_bias]).
    x = torch.randn(2, 17, 32)
    lavis_qkv = F.linear(x, lavis["visual_encoder.blocks.2.attn.qkv.weight"],
                         torch.cat([lavis["visual_encoder.blocks.2.attn.q_bias"], torch.zeros(32),
                                    lavis["visual_encoder.blocks.2.attn.v_bias"]]))
    torch.testing.assert_close(model.vision_model.encoder.layers[2].self_attn.qkv(x), lavis_qkv)
    assert report.csrm.looks_untrained  # the tiny CSRM keeps PyTorch's default init, as the released one may
    # Tokenizers as released: [DEC] added to BERT's 30522; </s> is BOS = EOS = UNK, [PAD] pads.
    assert len(tokenizers.qformer) == 30523 and tokenizers.qformer.bos_token == "[DEC]"
    llm = tokenizers.llm
    assert llm.bos_token == llm.eos_token == llm.unk_token == "</s>" and llm.pad_token == "[PAD]"
    # As Vicuna (32000 -> 32001): [PAD] is appended, the LLM one row short of it and resized, its new rows the mean
    # of the others (the same on every load)
    from transformers import AutoConfig

    assert llm.pad_token_id == len(llm) - 1 == AutoConfig.from_pretrained(tiny.llm).vocab_size
    for embedding in (model.language_model.get_input_embeddings(), model.language_model.get_output_embeddings()):
        assert embedding.weight.shape[0] == len(llm)
        torch.testing.assert_close(embedding.weight[-1], embedding.weight[:-1].mean(0))


def test_vicuna_is_loaded_straight_onto_its_gpu(tiny, monkeypatch, user_error):
    """Each process asks for the LLM on its own GPU (device_map), not whole into host memory first and then moved
    (8 processes x 13.5 GB of host memory for Vicuna-7B)."""
    from transformers import AutoModelForCausalLM

    from geochange.deltavlm.loading import load_llm

    asked = []

    def from_pretrained(path, **kwargs):
        asked.append(kwargs)
        raise RuntimeError("no GPU here")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    user_error(lambda: load_llm(str(tiny.llm), torch.device("cuda", 1), 30524), "no GPU here")
    user_error(lambda: load_llm(str(tiny.llm), torch.device("cpu"), 30524), "no GPU here")
    assert asked[0]["device_map"] == {"": 1} and "device_map" not in asked[1]  # the CPU: where it loads anyway


def test_a_checkpoint_missing_keys_names_them(tiny, tmp_path, one_thread, user_error):
    state = released_checkpoint_state(tiny)
    del state["context1.weight"], state["Qformer.bert.encoder.layer.1.output_query.dense.bias"]
    broken = tmp_path / "checkpoint_best.pth"
    torch.save({"model": state}, broken)
    message = user_error(lambda: load(tiny, broken), "lacks 2 trained parameters", "context1.weight",
                         "Qformer.bert.encoder.layer.1.output_query.dense.bias")
    assert "\n" not in message
    state["llm_proj.extra"] = torch.zeros(1)
    state["context1.weight"] = torch.zeros(4, 4)
    torch.save({"model": state}, broken)
    user_error(lambda: load(tiny, broken), "no place in the model: llm_proj.extra", "shapes differ",
               "context1.weight: checkpoint [4, 4] vs model [32, 32]")
    broken.write_text("not a checkpoint")
    user_error(lambda: load(tiny, broken), "cannot be read as a weights-only torch checkpoint")
    user_error(lambda: load(tiny, tmp_path / "nowhere.pth"), "does not exist")


def test_a_base_lacking_frozen_weights_names_them(tiny, tmp_path, one_thread, user_error):
    from safetensors.torch import load_file, save_file

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text((tiny.base / "config.json").read_text())
    weights = load_file(str(tiny.base / "model.safetensors"))
    del weights["vision_model.encoder.layers.0.mlp.fc1.weight"]
    save_file(weights, str(base / "model.safetensors"))
    from geochange.deltavlm.loading import load_deltavlm

    user_error(lambda: load_deltavlm(str(tiny.checkpoint), base=str(base), llm_model=str(tiny.llm),
                                     bert_model=str(tiny.bert), device=torch.device("cpu")),
               "1 parameters left uninitialised", "vision_model.encoder.layers.0.mlp.fc1.weight")


def test_a_sharded_base_is_read_shard_by_shard(tiny, tmp_path, one_thread):
    """A sharded base (as the real one is) loads, fetching only the shards that hold what is needed."""
    from transformers import InstructBlipForConditionalGeneration

    from geochange.deltavlm.loading import _base_weight_files, read_base_tensors

    sharded = tmp_path / "base"
    InstructBlipForConditionalGeneration.from_pretrained(str(tiny.base)).save_pretrained(sharded,
                                                                                         max_shard_size="1MB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    wanted = {"vision_model.embeddings.class_embedding", "vision_model.encoder.layers.0.mlp.fc1.weight"}
    files = _base_weight_files(str(sharded), wanted)
    assert {f.name for f in files} == {index[name] for name in wanted}
    assert len(set(index.values())) > len(files)  # the LLM's shards are never read
    single = read_base_tensors(str(tiny.base), sorted(wanted))
    split = read_base_tensors(str(sharded), sorted(wanted))
    assert set(split) == wanted and all(torch.equal(split[n], single[n]) for n in wanted)
    from geochange.deltavlm.loading import load_deltavlm

    model, _, report = load_deltavlm(str(tiny.checkpoint), base=str(sharded), llm_model=str(tiny.llm),
                                     bert_model=str(tiny.bert), device=torch.device("cpu"))
    assert report.from_base == 16 and torch.equal(model.vision_model.embeddings.class_embedding,
                                                  single["vision_model.embeddings.class_embedding"])


def test_llm_in_8bit(tiny, scene_images, one_thread):
    import bitsandbytes as bnb

    from geochange.deltavlm.predictor import Decoding, Predictor, Prompting

    model, tokenizers, _ = load(tiny, load_in_8bit=True)
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.language_model.modules())
    predictor = Predictor(model, tokenizers, torch.device("cpu"), Decoding(num_beams=1, max_new_tokens=4), Prompting())
    assert predictor.answer([scene_images], [predictor.prompt(cc.CAPTION_PROMPT)])[0]


# --------------------------------------------------------------------------- answering

def test_answers_are_deterministic_and_depend_on_the_images(predictor, scene_images):
    before, after = scene_images
    prompt = predictor.prompt(cc.CAPTION_PROMPT)
    first = predictor.answer([(before, after), (after, before)], [prompt, prompt])
    assert len(first) == 2 and all(isinstance(a, str) and a for a in first)
    assert predictor.answer([(before, after), (after, before)], [prompt, prompt]) == first
    assert predictor.answer([(before, after)], [prompt]) == first[:1]  # batching (padding) changes nothing
    model, tokenizers = predictor.model, predictor.tokenizers
    from geochange.deltavlm.inputs import encode_prompts, preprocess_image

    batch = encode_prompts([prompt], tokenizers)
    pa, pb = preprocess_image(before, 32)[None], preprocess_image(after, 32)[None]
    with torch.no_grad():
        forward = model.query_embeddings(pa, pb, batch["qformer_input_ids"], batch["qformer_attention_mask"])
        swapped = model.query_embeddings(pb, pa, batch["qformer_input_ids"], batch["qformer_attention_mask"])
    assert forward.shape == (1, 4, 64) and not torch.allclose(forward, swapped)


def test_prompt_encoding_as_released(predictor):
    from geochange.deltavlm.inputs import encode_prompts, preprocess_image

    tokenizers = predictor.tokenizers
    batch = encode_prompts(["a b c", "a"], tokenizers)
    llm = tokenizers.llm
    # LLM: left padding with [PAD], then </s>, then the prompt.
    assert batch["input_ids"][1].tolist()[:2] == [llm.pad_token_id] * 2
    assert batch["input_ids"][1, 2].item() == llm.bos_token_id == llm.convert_tokens_to_ids("</s>")
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    # Q-Former: [CLS] text [SEP], right padding.
    qformer = tokenizers.qformer
    assert batch["qformer_input_ids"][1].tolist() == [qformer.cls_token_id, qformer.convert_tokens_to_ids("a"),
                                                      qformer.sep_token_id, 0, 0]
    image = np.zeros((10, 20, 3), dtype=np.uint8)
    image[..., 0] = 255
    pixels = preprocess_image(image, 32)
    assert pixels.shape == (3, 32, 32)
    assert pixels[0, 0, 0].item() == pytest.approx((1 - 0.48145466) / 0.26862954, rel=1e-5)
    assert pixels[2, 5, 5].item() == pytest.approx(-0.40821073 / 0.27577711, rel=1e-5)


def test_chat_keeps_the_history_in_the_prompt(predictor, scene_images):
    seen: list[str] = []
    original = predictor.answer

    def spy(pairs, prompts):
        seen.extend(prompts)
        return original(pairs, prompts)

    from geochange.deltavlm.predictor import chat

    lines = iter(["Has anything changed?", "How many buildings?", "reset", "Where?", "quit", "never asked"])
    written: list[str] = []
    predictor.answer = spy
    try:
        turns = chat(predictor, scene_images, read=lambda _: next(lines), write=written.append)
    finally:
        del predictor.answer
    answers = [line.removeprefix("deltavlm> ") for line in written if line.startswith("deltavlm> ")]
    first_answer = answers[0]
    assert len(answers) == 3 and seen == ["has anything changed?",
                    cc.normalise_text(cc.dialog_prompt([("Has anything changed?", first_answer)],
                                                       "How many buildings?")),
                    "where?"]
    assert "(history cleared)" in written
    assert turns == [("Where?", answers[2])]  # the history after the reset


# --------------------------------------------------------------------------- batch mode with resume

def write_pair(folder: Path, name: str, images) -> None:
    from geochange.video import write_image

    write_image(images[0], folder / "A" / name)
    write_image(images[1], folder / "B" / name)


@pytest.mark.java
def test_batch_scores_every_task_and_resumes(predictor, scene_images, tmp_path, monkeypatch, user_error):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    from geochange.deltavlm import run
    from geochange.deltavlm import scoring
    from geochange.coco_metrics import PTB_TOKENIZER

    write_pair(tmp_path, "p1.png", scene_images)
    refs = ["a new building appeared", "one building was built", "a building now stands here",
            "a house was built", "there is a new building"]

    def record(task_id, prompt, answer):
        return {"id": task_id, "image": ["A/p1.png", "B/p1.png"], "changeflag": 1,
                "conversations": [{"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": answer}]}

    dialog = record("dialog", cc.YESNO_PROMPT, "yes")
    dialog["conversations"] += [{"from": "human", "value": cc.COUNT_PROMPT},
                                {"from": "gpt", "value": cc.count_answer(0, 1)}]
    annotations = tmp_path / "mixed.json"
    annotations.write_text(json.dumps([
        {"image_A": "A/p1.png", "image_B": "B/p1.png", "captions": refs, "changeflag": 1},
        record("yn", cc.YESNO_PROMPT, "yes"), record("count", cc.COUNT_PROMPT, cc.count_answer(0, 1)),
        record("loc", cc.LOCALIZATION_PROMPT, cc.localization_answer([], [(2, 2)])), dialog]))
    from geochange.locks import lock_for_writing
    from geochange.overrides import load_settings

    # the script's settings, as ``python deltavlm_predict.py CHECKPOINT=tiny TEST_ANNOTATIONS=...`` builds them
    cfg = load_settings(runpy.run_path(str(SCRIPT), run_name="constants_only"),
                        ["CHECKPOINT=tiny", f"RESULTS_DIR={tmp_path / 'results'}", f"TEST_ANNOTATIONS={annotations}"],
                        quiet=True)
    items = run.batch_items(str(annotations), None, None)
    assert [(i.id, i.task) for i in items] == [("p1", "caption"), ("yn", "yesno"), ("count", "count"),
                                               ("loc", "localization"), ("dialog_turn1", "yesno"),
                                               ("dialog_turn2", "count")]
    assert items[-1].history == [(cc.YESNO_PROMPT, "yes")]
    results = tmp_path / "results" / "deltavlm-tiny_mixed.jsonl"
    with lock_for_writing(results, "held by the test"):  # another process writing the same results file
        user_error(lambda: run.run_batch(predictor, items, cfg), f"the results file {results} is being written by "
                   f"another process (pid {os.getpid()}")
    assert not results.exists()
    metrics_path = run.run_batch(predictor, items, cfg)
    lines = results.read_text().splitlines()
    records = {r["id"]: r for r in map(json.loads, lines)}
    assert sorted(records) == sorted(i.id for i in items) and len(lines) == len(items)
    assert records["p1"]["true"] == refs  # all five references
    assert records["dialog_turn2"]["prompt"].startswith("q please judge whether")
    written = json.loads(metrics_path.read_text())
    assert written["settings"] == cfg.as_dict()
    metrics = written["metrics"]
    for key in ("caption/bleu4", "caption/cider", "cls_from_captions/accuracy", "cls_from_captions/nochange_recall",
                "yesno/accuracy", "yesno/f1", "count/exact_accuracy", "count/roads_mae", "count/buildings_rmse",
                "localization/f1", "localization/exact_match", "localization/roads_jaccard"):
        assert key in metrics, key
    # the caption's changeflag is 1: the released rule is right unless the caption is a no-change sentence
    assert metrics["cls_from_captions/accuracy"] == float(records["p1"]["generated"] not in scoring.NO_CHANGE_SENTENCES)
    assert written["coco_tokenizer"] == PTB_TOKENIZER and written["metric_device"] == "cpu"
    assert set(written["metric_models"]) == {"bertscore_f1", "sbert"}
    gts = PTBTokenizer().tokenize({0: [{"caption": r} for r in refs]})
    res = PTBTokenizer().tokenize({0: [{"caption": records["p1"]["generated"]}]})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert metrics["caption/bleu1"] == pytest.approx(bleu[0])
    assert json.loads(metrics_path.read_text())["test_set"] == {
        "file": "mixed.json", "sha256": hashlib.sha256(annotations.read_bytes()).hexdigest(), "split": None}
    counted = [cc.parse_count_answer(records[i]["generated"]) for i in ("count", "dialog_turn2")]
    assert metrics["count/buildings_mae"] == pytest.approx(np.mean([abs(1 - (b or 0)) for _, b in counted]))
    assert (tmp_path / "results" / "deltavlm-tiny_mixed.csv").exists()

    # An interrupted run: the last answer is lost; the rerun answers only that one and keeps the rest.
    from geochange.deltavlm.predictor import answer_items, generation_settings

    settings = generation_settings(predictor.decoding, predictor.prompting, checkpoint="tiny", use_csrm=True,
                                   load_in_8bit=False)
    results.write_text("\n".join(lines[:-1]) + "\n")
    calls: list[int] = []
    original = predictor.answer
    monkeypatch.setattr(predictor, "answer",
                        lambda pairs, prompts: calls.append(len(prompts)) or original(pairs, prompts))
    answer_items(predictor, items, results, 4, settings)
    assert calls == [1]
    assert results.read_text().splitlines() == lines  # deterministic: the redone answer is the same
    answer_items(predictor, items, results, 4, settings)
    assert calls == [1]  # nothing left to do
    # Other generation settings must not append to the same file.
    user_error(lambda: answer_items(predictor, items, results, 4, settings | {"num_beams": 3}),
               "written with other settings (num_beams)")
    assert results.read_text().splitlines() == lines


# --------------------------------------------------------------------------- the script

def test_script_answers_a_bundled_pair_offline(tiny, sample_dir, capsys):
    run_script("deltavlm_predict.py", "CHECKPOINT=tiny", "NUM_BEAMS=1", "MAX_NEW_TOKENS=6")
    out = capsys.readouterr().out
    assert "pair: " in out and "val_00002.png" in out
    assert "prompt: please briefly describe the changes in these two images" in out
    answer = [line for line in out.splitlines() if line.startswith("answer: ")]
    assert len(answer) == 1 and len(answer[0]) > len("answer: ")
    assert "trained tensors loaded" in out and "random initialisation" in out


@pytest.mark.parametrize("problem", ["missing", "not_an_image", "one_image"])
def test_script_bad_images_give_one_line(problem, tmp_path, image_pair, user_error, capsys):
    before, after = image_pair
    if problem == "missing":
        args, expected = [f"IMAGE_A={tmp_path / 'nope.png'}", f"IMAGE_B={after}"], "does not exist"
    elif problem == "not_an_image":
        text = tmp_path / "notes.png"
        text.write_text("hello")
        args, expected = [f"IMAGE_A={before}", f"IMAGE_B={text}"], "is not a readable image"
    else:
        args, expected = [f"IMAGE_A={before}"], "set both IMAGE_A and IMAGE_B"
    user_error(lambda: run_script("deltavlm_predict.py", "CHECKPOINT=tiny", *args), expected)
    assert "loaded on" not in capsys.readouterr().out  # the input is checked before the model loads


def test_script_checkpoint_missing_keys_gives_one_line(tiny, tmp_path, sample_dir, user_error):
    state = released_checkpoint_state(tiny)
    del state["gate2.bias"]
    broken = tmp_path / "checkpoint_best.pth"
    torch.save({"model": state}, broken)
    user_error(lambda: run_script("deltavlm_predict.py", f"CHECKPOINT={broken}", f"VISION_QFORMER_BASE={tiny.base}",
                                  f"LLM_MODEL={tiny.llm}", f"BERT_MODEL={tiny.bert}",
                                  f"IMAGE_A={sample_dir / 'changechat/A/val_00000.png'}",
                                  f"IMAGE_B={sample_dir / 'changechat/B/val_00000.png'}"),
               "lacks 1 trained parameters: gate2.bias (-> csrm.gate2.bias)")
