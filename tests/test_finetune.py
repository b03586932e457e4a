"""Fine-tuning on the tiny models and the bundled sample (CPU)."""
import json
import os
import re
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import geochange.trainer
import geochange.video_llm.finetune as finetune
import geochange.video_llm.modeling
import geochange.video_llm.weights as weights
from geochange.adapters import load_adapter_verified, renamed_key
from geochange.errors import UserError
from geochange.video_llm.families import FAMILIES, VIDEO_LLAVA
from geochange.locks import lock_for_writing
from geochange.overrides import make_settings, settings_of
from geochange.video_llm.modeling import (count_parameters, load_model, load_processor, resolve_model_path,
                                          video_prompt, video_token_count, video_unused_parameter_names)
from geochange.video_llm.pruning import measure_sparsity
from geochange.sample.data import SAMPLE_TRAIN, SAMPLE_VAL, ensure_sample_media

REPO = Path(__file__).resolve().parent.parent
NEWEST = list(FAMILIES)[-1]
SCRIPT = REPO / "video_finetune.py"  # every family's, as MODEL


@pytest.fixture(scope="module", autouse=True)
def sample_media():
    ensure_sample_media()


def constants(family: str, output_dir: Path, **overrides) -> dict:
    """The script's own constants (as a user would edit them), with test-size overrides."""
    scope = {k: v for k, v in runpy.run_path(str(SCRIPT), run_name="constants_only").items() if k.isupper()}
    scope.update(MODEL=family, MODEL_ID="tiny", OUTPUT_DIR=str(output_dir), TRAIN_LIMIT=16, MAX_STEPS=8, BATCH_SIZE=4, LR=1e-2,
                 WARMUP_STEPS=0, LOGGING_STEPS=1, SAVE_STEPS=100, EVAL_STEPS=0, GRADIENT_CHECKPOINTING=False,
                 EVAL_AFTER_TRAIN=False, RESULTS_DIR=str(output_dir / "results"))
    scope.update(overrides)
    return scope


def settings(family: str, output_dir: Path, **overrides):
    """The settings value the script would build from those constants."""
    return make_settings(settings_of(constants(family, output_dir, **overrides)))


def train_script(family: str, output_dir: Path, **overrides) -> Path:
    """Run the fine-tuning script as a user would (``python <script> NAME=VALUE ...``), in this process to stay
    fast; returns the run directory."""
    scope = constants(family, output_dir, **overrides)
    defaults = {k: v for k, v in runpy.run_path(str(SCRIPT), run_name="constants_only").items() if k.isupper()}
    argv = [str(SCRIPT)] + [f"{k}={v}" for k, v in scope.items() if v != defaults[k]]
    saved = sys.argv
    sys.argv = argv
    try:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    finally:
        sys.argv = saved
    return output_dir / finetune.run_name(settings(family, output_dir, **overrides), family)


def tiny_inputs(family: str):
    from geochange.video import read_video_frames
    from geochange.annotations import load_annotations
    from geochange.sample.data import SAMPLE_VIDEO_DIR

    processor = load_processor(resolve_model_path("tiny", family))
    sample = load_annotations(SAMPLE_VAL, SAMPLE_VIDEO_DIR, limit=1)[0]
    frames = read_video_frames(sample.video, 2)
    return processor(text=[video_prompt(processor, sample.question)], videos=[frames], return_tensors="pt")


def logits_of(model, inputs) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits.float()


@pytest.mark.parametrize("family,overrides,mode", [
    pytest.param("videollava", {}, "LORA", marks=pytest.mark.slow),  # the shared tiny runs train it too
    pytest.param("llavanext", {}, "LORA", marks=pytest.mark.slow),
    (NEWEST, {}, "LORA"),  # its processor's outputs are not LLaVA-shaped: the quick loop trains through them
    pytest.param(NEWEST, {"USE_QLORA": True}, "QLORA", marks=pytest.mark.slow),  # 4-bit here, 8-bit below
    pytest.param("videollava", {"USE_QLORA": True, "USE_8BIT": True}, "QLORA", marks=pytest.mark.slow),
])
def test_training_lowers_the_loss_and_the_adapter_reloads(tmp_path, family, overrides, mode):
    run_dir = train_script(family, tmp_path, **overrides)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["completed"] and record["mode"] == mode and record["global_step"] == 8
    losses = [point["loss"] for point in record["loss_curve"]]
    assert len(losses) == 8 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    expected_bits = (8 if overrides.get("USE_8BIT") else 4) if mode == "QLORA" else None
    assert record["quant_bits"] == expected_bits
    # GeoLLaVA's scheme, then the settings the test changed from the script's (LR, TRAIN_LIMIT, WARMUP_STEPS)
    scheme = f"{mode}_{expected_bits}bit_r8_alpha16_8steps" if expected_bits else f"{mode}_r8_alpha16_8steps"
    assert run_dir.name.endswith(f"{scheme}_lr0.01_trainlimit16_warmupsteps0")
    # LoRA sits on every Linear of the language model and nowhere else
    assert record["lora_targets"] and all(".language_model." in name for name in record["lora_targets"])
    assert not any(part in name for name in record["lora_targets"] for part in ("tower", "projector", "lm_head"))
    assert len(record["lora_targets"]) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    assert record["trainable_parameters"] < record["total_parameters"] / 5
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tensorboard"):
        assert (run_dir / name).exists(), name
    # the adapter changes the model, and loading it twice gives the same logits
    inputs = tiny_inputs(family)
    tuned = logits_of(weights.load_run_model(run_dir, family), inputs)
    again = logits_of(weights.load_run_model(run_dir, family), inputs)
    base = logits_of(load_model(resolve_model_path("tiny", family), family, bits=expected_bits), inputs)
    assert torch.equal(tuned, again)
    assert (tuned - base).abs().max() > 1e-3


@pytest.mark.parametrize("bits", [None, 4, 8])
def test_saved_adapter_reloads_to_identical_logits(tmp_path, bits):
    cfg = settings("videollava", tmp_path, USE_QLORA=bits is not None, USE_8BIT=bits == 8)
    path = resolve_model_path("tiny", "videollava")
    model, _ = finetune.build_training_model(cfg, path, "videollava")
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # stand-in for training: lora_B starts at zero
            param.data.normal_(0, 0.5)
    inputs = tiny_inputs("videollava")
    trained = logits_of(model, inputs)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = logits_of(load_adapter_verified(load_model(path, "videollava", bits=bits), tmp_path / "adapter"), inputs)
    assert torch.allclose(trained, reloaded, atol=1e-5), (trained - reloaded).abs().max()


def test_adapter_that_matches_nothing_fails_loudly_and_legacy_names_are_remapped(tmp_path):
    from safetensors.torch import load_file, save_file

    path = resolve_model_path("tiny", "videollava")
    model, _ = finetune.build_training_model(settings("videollava", tmp_path), path, "videollava")
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.fill_(0.01)
    model.save_pretrained(tmp_path / "good")
    saved = load_file(str(tmp_path / "good" / "adapter_model.safetensors"))
    # transformers-4 layout: language_model.model.layers... instead of model.language_model.layers...
    legacy = {k.replace("base_model.model.model.language_model.", "base_model.model.language_model.model."): v
              for k, v in saved.items()}
    assert all(renamed_key(k, VIDEO_LLAVA.adapter_renames) in saved for k in legacy)
    for name, tensors in (("legacy", legacy), ("broken", {k.replace("layers", "blocks"): v for k, v in saved.items()})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text((tmp_path / "good" / "adapter_config.json").read_text())
        save_file(tensors, str(tmp_path / name / "adapter_model.safetensors"))
    loaded = load_adapter_verified(load_model(path, "videollava"), tmp_path / "legacy", VIDEO_LLAVA.adapter_renames)
    assert any("lora_B" in n and torch.all(p == 0.01) for n, p in loaded.named_parameters())
    with pytest.raises(UserError, match=r"adapter_model.safetensors: 28 of 28 adapter weights found no parameter"):
        load_adapter_verified(load_model(path, "videollava"), tmp_path / "broken")


@pytest.mark.slow
def test_interrupted_run_resumes_only_under_its_settings_and_alone(tmp_path, monkeypatch):
    quick = dict(MAX_STEPS=6, SAVE_STEPS=3, SAVE_TOTAL_LIMIT=5)
    steps = {"n": 0}
    real_step = transformers.Trainer.training_step

    def crash_at_step_5(self, *args, **kwargs):  # a crash after checkpoint-3, as a killed job leaves it
        steps["n"] += 1
        if steps["n"] == 5:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "training_step", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train_script("videollava", tmp_path, **quick)
    monkeypatch.setattr(transformers.Trainer, "training_step", real_step)
    run_dir = tmp_path / finetune.run_name(settings("videollava", tmp_path, **quick), "videollava")
    # MAX_STEPS decides the length, not EPOCHS; then the settings the test changed from the script's
    assert run_dir.name.endswith("_LORA_r8_alpha16_6steps_lr0.01_trainlimit16_warmupsteps0")
    assert finetune.run_name(settings("videollava", tmp_path, MAX_STEPS=-1), "videollava").endswith("_3epochs_lr0.01_trainlimit16_warmupsteps0")
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-3"]
    assert not json.loads((run_dir / "run.json").read_text())["completed"]
    # other settings never resume into this run (a default name would differ: here a RUN_NAME names it), and
    # nothing is touched
    before = (run_dir / "run.json").read_text()
    with pytest.raises(UserError, match=rf"^{run_dir} holds a run with other settings \(LR, WARMUP_STEPS\); "
                                        rf"restore them to resume it, set RUN_NAME={run_dir.name}_lr0.005_warmupsteps2 "
                                        rf"\(or another OUTPUT_DIR than {tmp_path}\) for a new run beside it, or "
                                        r"OVERWRITE=True to train it again \(deleting it\)$"):
        train_script("videollava", tmp_path, LR=5e-3, WARMUP_STEPS=2, RUN_NAME=run_dir.name, **quick)
    # settings that cannot change what trains may change on resume (they are not compared)
    assert finetune.prepare_run_dir(settings("videollava", tmp_path, NUM_WORKERS=1, LOGGING_STEPS=3, **quick),
                                    run_dir, main=False)
    # a second writer of the same run directory stops in one line while the first holds it
    with lock_for_writing(run_dir, "held by the test"):
        with pytest.raises(UserError, match=rf"the run directory {run_dir} is being written by another process "
                                            rf"\(pid {os.getpid()}"):
            train_script("videollava", tmp_path, **quick)
    assert (run_dir / "run.json").read_text() == before
    # the same settings resume from the checkpoint
    assert train_script("videollava", tmp_path, **quick) == run_dir
    record = json.loads((run_dir / "run.json").read_text())
    assert record["completed"] and record["global_step"] == 6 and record["resumed_from"].endswith("checkpoint-3")
    assert [p["step"] for p in record["loss_curve"]] == [1, 2, 3, 4, 5, 6]
    assert record["settings"] == settings("videollava", tmp_path, **quick).as_dict()
    # merged weights for deployment behave like base + adapter
    merged_dir = weights.merge_and_save(run_dir, "videollava")
    inputs = tiny_inputs("videollava")
    merged = logits_of(load_model(str(merged_dir), "videollava"), inputs)
    assert torch.allclose(merged, logits_of(weights.load_run_model(run_dir, "videollava"), inputs), atol=1e-4)
    # a finished run is not overwritten unless asked
    with pytest.raises(UserError, match=rf"already holds a finished run; set RUN_NAME={run_dir.name}_2 .*"
                                        r"or OVERWRITE=True"):
        train_script("videollava", tmp_path, **quick)
    # an ablation gets a directory of its own by name, beside the first run
    other = train_script("videollava", tmp_path, RUN_NAME="ablation-seed7", SEED=7, MAX_STEPS=1)
    assert other == tmp_path / "ablation-seed7" and json.loads((other / "run.json").read_text())["completed"]


@pytest.mark.slow
def test_full_finetune_and_pruned_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "CHECKPOINTS_DIR", tmp_path / "checkpoints")
    run_dir = train_script("videollava", tmp_path, USE_LORA=False, MAX_STEPS=4, LR=1e-3)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["mode"] == "FULL" and run_dir.name.endswith("_FULL_4steps_lr0.001_trainlimit16_warmupsteps0") and (run_dir / "model.safetensors").exists()
    trained = load_model(str(run_dir), "videollava")
    frozen = {n for n, p in trained.named_parameters() if "tower" in n}
    frozen |= set(video_unused_parameter_names(trained, "videollava"))
    assert record["trainable_parameters"] == record["total_parameters"] - sum(
        p.numel() for n, p in trained.named_parameters() if n in frozen)  # FREEZE_VISION
    inputs = tiny_inputs("videollava")
    base = logits_of(load_model(resolve_model_path("tiny", "videollava"), "videollava"), inputs)
    assert (logits_of(weights.load_run_model(run_dir, "videollava"), inputs) - base).abs().max() > 1e-3

    pruned = train_script("videollava", tmp_path, PRUNE=True, PRUNE_METHOD="attention", PRUNE_AMOUNT=0.25,
                          USE_QLORA=True, MAX_STEPS=2)
    record = json.loads((pruned / "run.json").read_text())
    assert pruned.name.startswith("attention25pct-videollava-tiny_")
    assert record["sparsity"]["heads"] == 0.25  # 2 of the 8 heads of the tiny language model
    assert record["quantised_linears"]["language_model"] == {"quantised": 14, "kept": 0}
    assert (tmp_path / "checkpoints" / "pruned").exists()


@pytest.mark.slow
def test_pruning_survives_full_finetuning_and_merging(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "CHECKPOINTS_DIR", tmp_path / "checkpoints")
    prune = dict(PRUNE=True, PRUNE_METHOD="magnitude", PRUNE_AMOUNT=0.25, MAX_STEPS=3)
    full = train_script("videollava", tmp_path, USE_LORA=False, LR=1e-3, **prune)
    record = json.loads((full / "run.json").read_text())
    assert record["sparsity"]["total"] == pytest.approx(0.25, abs=1e-3)
    trained = load_model(str(full), "videollava")
    # measured again on the saved weights, independently of what run.json says
    assert measure_sparsity(trained, VIDEO_LLAVA.parts)["total"] == pytest.approx(0.25, abs=1e-3)
    assert record["sparsity_after_training"]["total"] == pytest.approx(0.25, abs=1e-3)
    base = load_model(str(tmp_path / "checkpoints" / "pruned" / "videollava-tiny_magnitude0.25"), "videollava")
    changed = [(p != q).float().mean().item() for (n, p), (_, q) in zip(trained.named_parameters(),
               base.named_parameters()) if ".language_model." in n and n.endswith("q_proj.weight")]
    assert min(changed) == pytest.approx(0.75, abs=0.01)  # every kept weight trained, no pruned one came back

    lora = train_script("videollava", tmp_path, MERGE_AND_SAVE=True, **prune)
    record = json.loads((lora / "run.json").read_text())
    merged = load_model(str(lora / "merged"), "videollava")
    assert measure_sparsity(merged, VIDEO_LLAVA.parts)["total"] == pytest.approx(0.25, abs=1e-3)
    assert record["sparsity_after_merging"]["total"] == pytest.approx(0.25, abs=1e-3)
    assert record["sparsity_after_training"] is None  # LoRA leaves the pruned base as it was


@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_finetuning_trains_only_what_the_video_path_reaches(tmp_path, family):
    # DDP with find_unused_parameters=False stops at step 2 over a trainable parameter that got no gradient.
    cfg = settings(family, tmp_path, USE_LORA=False, FREEZE_VISION=False)
    model, _ = finetune.build_training_model(cfg, resolve_model_path("tiny", family), family)
    inputs = tiny_inputs(family)
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trainable == with_grad
    parts = FAMILIES[family].parts
    assert any(parts.in_tower(n) for n in trainable)  # FREEZE_VISION=False: the video tower does train
    # what only images reach (an image tower, an image-newline embedding) gets no gradient and is frozen
    image_only = {n for n, _ in model.named_parameters() if parts.is_image_only(n)}
    assert image_only <= set(video_unused_parameter_names(model, family)) - trainable


@pytest.mark.parametrize("family", list(FAMILIES))
def test_freeze_vision_freezes_the_towers_by_module_and_the_projector_trains(tmp_path, family):
    """FULL with FREEZE_VISION: the trainable count is the total less the tower modules' weights (their projector
    aside when it sits inside a tower, as Qwen2.5-VL's merger does) and what a video never reaches; read off the
    modules, not off name suffixes (a ``visual`` tower matched no ``_tower`` suffix, and 100 % trained)."""
    cfg = settings(family, tmp_path, USE_LORA=False, FREEZE_VISION=True)
    model, _ = finetune.build_training_model(cfg, resolve_model_path("tiny", family), family)
    parts = FAMILIES[family].parts
    modules = dict(model.model.named_children())
    tower_weights = {id(p) for tower in parts.vision_towers for p in modules[tower].parameters()}
    projector_weights = {id(p) for name, module in model.named_modules() if name.split(".")[-1] in parts.projectors
                         for p in module.parameters()}
    frozen = (tower_weights - projector_weights) | {id(model.get_parameter(n))
                                                   for n in video_unused_parameter_names(model, family)}
    assert tower_weights and projector_weights
    trainable, total = count_parameters(model)
    assert trainable == total - sum(p.numel() for p in model.parameters() if id(p) in frozen)
    assert all(p.requires_grad for p in model.parameters() if id(p) in projector_weights)
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith("model.language_model."))


def test_one_seed_gives_one_lora_initialisation(tmp_path):
    path = resolve_model_path("tiny", "videollava")

    def lora_weights(seed):
        model, _ = finetune.build_training_model(settings("videollava", tmp_path, SEED=seed), path, "videollava")
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}

    first, second, other = lora_weights(7), lora_weights(7), lora_weights(8)
    assert len(first) == 14 and first.keys() == second.keys()
    assert all(torch.equal(first[n], second[n]) for n in first)
    assert not torch.equal(first[next(iter(first))], other[next(iter(first))])


def test_training_precision_keeps_fp32_weights_for_full_finetuning(tmp_path):
    def precision(cuda, bf16, **overrides):
        cfg = settings("videollava", tmp_path, **overrides)
        return finetune.training_precision(cfg, cuda=cuda, cuda_bf16=bf16)

    full = {"USE_LORA": False}
    assert precision(True, True, **full) == finetune.TrainingPrecision("bf16", torch.float32)
    assert precision(True, False, **full) == finetune.TrainingPrecision("fp16", torch.float32)
    assert precision(False, False, **full) == finetune.TrainingPrecision("fp32", torch.float32)
    assert precision(True, True) == finetune.TrainingPrecision("bf16", torch.bfloat16)  # LoRA: frozen base in bf16
    assert precision(True, False, USE_QLORA=True) == finetune.TrainingPrecision("fp16", torch.float16)
    assert precision(False, False, PRECISION="bf16", **full) == finetune.TrainingPrecision("bf16", torch.float32)
    with pytest.raises(UserError, match="PRECISION='fp16' needs a CUDA GPU"):
        precision(False, False, PRECISION="fp16")
    with pytest.raises(UserError, match="no bf16 support"):
        precision(True, False, PRECISION="bf16")


def changed_fraction(before: dict, after: dict) -> float:
    changed = sum(int((after[n].float() != before[n].float()).sum()) for n in before)
    return changed / sum(before[n].numel() for n in before)


@pytest.mark.slow
def test_full_finetuning_at_a_small_lr_updates_every_weight_under_bf16_autocast(tmp_path):
    # 10 AdamW steps at lr 2e-5, bf16 autocast: the fp32 master weights all move. The same steps
    # applied to bf16 weights (the model loaded in bf16, as before) round most updates away.
    run_dir = train_script("videollava", tmp_path, USE_LORA=False, PRECISION="bf16", LR=2e-5, MAX_STEPS=10,
                           BATCH_SIZE=1, TRAIN_LIMIT=10)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["precision"] == {"compute": "bf16", "weights": "torch.float32"}
    layers = lambda model: {n: p.detach().clone() for n, p in model.named_parameters()
                            if ".language_model.layers." in n and n.endswith("proj.weight")}
    base = layers(load_model(resolve_model_path("tiny", "videollava"), "videollava"))
    trained = layers(load_model(str(run_dir), "videollava", dtype=torch.float32))
    assert changed_fraction(base, trained) > 0.95
    # reference: the same number of AdamW steps on bf16 weights, with gradients of the trained run's size
    bf16 = {n: torch.nn.Parameter(w.to(torch.bfloat16)) for n, w in base.items()}
    optimizer = torch.optim.AdamW(bf16.values(), lr=2e-5, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(10):
        for p in bf16.values():
            p.grad = torch.randn(p.shape, generator=generator).to(torch.bfloat16) * 1e-3
        optimizer.step()
    assert changed_fraction({n: w.to(torch.bfloat16) for n, w in base.items()}, {n: p.detach() for n, p in bf16.items()}) < 0.8


@pytest.mark.slow
def test_gradient_checkpointing_reaches_the_language_model_layers_during_training(tmp_path, monkeypatch):
    """GRADIENT_CHECKPOINTING=True (the scripts' default: 7B activations do not fit otherwise) makes every decoder
    layer recompute its activations in the backward pass, non-reentrant (LoRA's frozen inputs need no grad)."""
    seen = []
    original = transformers.Trainer.training_step

    def recording_step(self, model, *args, **kwargs):
        layers = [m for n, m in model.named_modules() if n.endswith(tuple(f"language_model.layers.{i}" for i in
                                                                              range(64)))]
        seen.append([(m.gradient_checkpointing, m._gradient_checkpointing_func.keywords.get("use_reentrant"))
                     for m in layers if hasattr(m, "_gradient_checkpointing_func")] + [len(layers)])
        return original(self, model, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "training_step", recording_step)
    train_script("videollava", tmp_path, GRADIENT_CHECKPOINTING=True, MAX_STEPS=1, TRAIN_LIMIT=4)
    (step,) = seen
    *flags, layer_count = step
    assert layer_count == 2 and flags == [(True, False)] * layer_count


@pytest.mark.parametrize("overrides,message", [
    ({"PRUNE": True, "PRUNE_METHOD": "random"}, "random"),
    ({"PRUNE": True, "PRUNE_AMOUNT": 1.0}, "PRUNE_AMOUNT"),
    ({"PRUNE": True, "PRUNE_AMOUNT": -0.1}, "PRUNE_AMOUNT"),
    ({"LORA_R": 0}, "LORA_R must be >= 1"),
    ({"TRAIN_ANNOTATIONS": "annotations/nope.json"}, "TRAIN_ANNOTATIONS: annotation file annotations/nope.json does not exist"),
    ({"NUM_FRAMES": 1}, "NUM_FRAMES must be >= 2"),
    ({"VAL_GENERATE_LIMIT": 0}, "VAL_GENERATE_LIMIT must be >= 1"),
    ({"BEST_METRIC": "accuracy"}, "BEST_METRIC='accuracy' is not a caption metric; one of rouge1, "),
    ({"BEST_METRIC": "sbert", "VAL_GENERATE_LIMIT": 4}, "set VAL_ANNOTATIONS and EVAL_STEPS > 0 \\(now 0\\)"),
    ({"BEST_METRIC": "sbert", "EVAL_STEPS": 3}, "SAVE_STEPS \\(100\\) must be a multiple of EVAL_STEPS \\(3\\)"),
])
def test_bad_settings_stop_before_any_model_is_loaded(tmp_path, monkeypatch, overrides, message):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(finetune, "load_model", no_model)
    monkeypatch.setattr(geochange.video_llm.modeling, "load_processor", no_model)
    with pytest.raises(UserError, match=message):
        train_script("videollava", tmp_path, **overrides)
    assert not any(tmp_path.iterdir())


def test_missing_video_and_too_small_max_length_are_one_line_errors(tmp_path, capsys, user_error):
    broken = tmp_path / "train.json"
    records = json.loads(Path(SAMPLE_TRAIN).read_text())[:3]
    records[1]["video"] = "does_not_exist.mp4"
    broken.write_text(json.dumps(records))
    user_error(lambda: train_script("videollava", tmp_path / "runs", TRAIN_ANNOTATIONS=str(broken)),
               str(broken), "record 1", "does_not_exist.mp4")
    assert "trainable parameters" not in capsys.readouterr().out  # stopped before any model loaded
    with pytest.raises(UserError, match=r"MAX_LENGTH=40 cannot hold the prompt .* 130 of them video tokens"):
        train_script("videollava", tmp_path, MAX_LENGTH=40)


@pytest.mark.parametrize("script", ["videollava_finetune.py", "llavanext_finetune.py", "deltavlm_finetune.py"])
def test_every_training_setting_is_a_constant_that_reaches_the_trainer(tmp_path, script, user_error, monkeypatch):
    """LR_SCHEDULER, WEIGHT_DECAY, OPTIM, MAX_GRAD_NORM and DIST_TIMEOUT_MINUTES are the scripts' constants, built
    into the Trainer's arguments by the one shared builder (both recipes), and recorded in run.json with every other
    constant."""
    from geochange.deltavlm import training as deltavlm_training
    from geochange.overrides import script_constants
    from geochange.trainer import TRAINER_SETTINGS, check_training_settings

    chosen = {"LR_SCHEDULER": "cosine_with_min_lr", "LR_SCHEDULER_KWARGS": {"min_lr": 1e-6}, "WEIGHT_DECAY": 0.01,
              "OPTIM": "adamw_torch", "MAX_GRAD_NORM": 0.5, "REPORT_TO": "none"}
    defaults = script_constants(script)
    assert set(TRAINER_SETTINGS) <= set(defaults.as_dict())
    if script.startswith("deltavlm"):
        cfg = deltavlm_training.resolve_recipe(script_constants(script, INIT="tiny", **chosen))
        args = deltavlm_training.training_arguments(cfg, tmp_path)
        assert (defaults.WEIGHT_DECAY, defaults.MAX_GRAD_NORM) == (0.05, 1.0)  # the released recipe
        # DeltaVLM's PRECISION: the Trainer's autocast and the frozen Vicuna's dtype (int8 keeps fp16 for its matmuls)
        from geochange.deltavlm.loading import frozen_llm_dtype
        bf16 = deltavlm_training.resolve_recipe(script_constants(script, INIT="tiny", PRECISION="bf16"))
        assert deltavlm_training.training_arguments(bf16, tmp_path).bf16 and not args.bf16 | args.fp16
        cpu = torch.device("cpu")
        assert (frozen_llm_dtype(cpu, None, torch.bfloat16), frozen_llm_dtype(cpu, None),
                frozen_llm_dtype(cpu, 8, torch.bfloat16)) == (torch.bfloat16, torch.float32, torch.float16)
    else:
        cfg = script_constants(script, MODEL_ID="tiny", **chosen)
        args = finetune.training_arguments(cfg, tmp_path)
        assert (defaults.WEIGHT_DECAY, defaults.MAX_GRAD_NORM) == (0.0, 1.0)
    assert (args.lr_scheduler_type.value, args.weight_decay, args.optim.value, args.max_grad_norm, args.report_to) == \
        ("cosine_with_min_lr", 0.01, "adamw_torch", 0.5, [])
    # the Trainer's own schedule, built from these arguments, ends at min_lr (LAVIS's released schedule)
    trainer = transformers.Trainer(model=torch.nn.Linear(2, 2), args=args, eval_dataset=[None])
    trainer.create_optimizer_and_scheduler(num_training_steps=20)
    for _ in range(20):
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(1e-6)
    assert (defaults.OPTIM, defaults.LR_SCHEDULER, defaults.LR_SCHEDULER_KWARGS, defaults.REPORT_TO,
            defaults.PRECISION) == ("adamw_torch_fused", "cosine", {}, "tensorboard", "auto")
    # the DDP group the Trainer makes waits DIST_TIMEOUT_MINUTES, as DeepSpeed's does (at least the Trainer's 30 min)
    assert defaults.DIST_TIMEOUT_MINUTES >= 30 and args.ddp_timeout == defaults.DIST_TIMEOUT_MINUTES * 60
    user_error(lambda: check_training_settings(script_constants(script, DIST_TIMEOUT_MINUTES=0)),
               "DIST_TIMEOUT_MINUTES must be > 0")
    user_error(lambda: check_training_settings(script_constants(script, OPTIM="adam")), "OPTIM='adam'")
    user_error(lambda: check_training_settings(script_constants(script, LR_SCHEDULER="cosinus")), "LR_SCHEDULER")
    # scheduler arguments, the logger and the precision: one line each, before any model loads
    user_error(lambda: check_training_settings(script_constants(script, LR_SCHEDULER="cosine_with_min_lr")),
               "LR_SCHEDULER_KWARGS={} do not fit LR_SCHEDULER='cosine_with_min_lr'", "min_lr")
    user_error(lambda: check_training_settings(script_constants(script, LR_SCHEDULER_KWARGS={"min_lr": 1e-6})),
               "do not fit LR_SCHEDULER='cosine'")
    user_error(lambda: check_training_settings(script_constants(script, REPORT_TO="wandb")),
               "REPORT_TO='wandb' but wandb is not installed (pip install wandb); installed: tensorboard")
    user_error(lambda: check_training_settings(script_constants(script, REPORT_TO="comet")), "REPORT_TO='comet'")
    monkeypatch.setattr(geochange.trainer, "get_available_reporting_integrations",
                        lambda: ["tensorboard", "wandb"])  # as where wandb is installed
    check_training_settings(script_constants(script, REPORT_TO="wandb"))
    if not torch.cuda.is_available():
        user_error(lambda: check_training_settings(script_constants(script, PRECISION="fp16")),
                   "PRECISION='fp16' needs a CUDA GPU")


def test_a_resume_under_another_schedule_is_refused_and_harmless_settings_may_change(tmp_path):
    from geochange.runs import resume_state, write_run_file

    cfg = settings("videollava", tmp_path)
    run_dir = tmp_path / finetune.run_name(cfg, "videollava")
    run_dir.mkdir()
    write_run_file(run_dir, {"completed": False, "settings": cfg.as_dict()})
    assert resume_state(run_dir, cfg.as_dict(), overwrite=False) == "resume"
    harmless = dict(cfg.as_dict(), NUM_WORKERS=3, LOGGING_STEPS=1, EVAL_BATCH_SIZE=2, SAVE_TOTAL_LIMIT=9)
    assert resume_state(run_dir, harmless, overwrite=False) == "resume"
    with pytest.raises(UserError, match=r"other settings \(LR_SCHEDULER, MAX_GRAD_NORM\); restore them to resume it, "
                                        rf"set RUN_NAME={run_dir.name}_lrschedulerlinear_maxgradnorm0.5 "):
        resume_state(run_dir, dict(cfg.as_dict(), LR_SCHEDULER="linear", MAX_GRAD_NORM=0.5), overwrite=False)
    assert resume_state(run_dir, dict(cfg.as_dict(), LR_SCHEDULER="linear"), overwrite=True) == "replace"


def test_evaluation_after_training_reads_the_evaluation_scripts_own_constants(tmp_path, monkeypatch):
    """Not a copied list: every constant of the family's evaluation script, this run's model, data and device."""
    from geochange.overrides import script_constants

    for family in ("videollava", "llavanext"):
        cfg = settings(family, tmp_path, VAL_ANNOTATIONS=str(SAMPLE_VAL), EVAL_BATCH_SIZE=3, MAX_NEW_TOKENS=9)
        run = finetune.FinetuneRun(cfg, family, tmp_path / "run", finetune.training_arguments(cfg, tmp_path / "run"),
                                   False, "unused", tmp_path, None)
        evaluation = finetune.evaluation_settings(run)
        script = script_constants(finetune.EVALUATION_SCRIPT)
        assert set(evaluation.as_dict()) == set(script.as_dict())
        chosen = {"MODEL_PATH": str(tmp_path / "run"), "BATCH_SIZE": 3, "MAX_NEW_TOKENS": 9, "DEVICE": "cpu",
                  "VAL_ANNOTATIONS": str(SAMPLE_VAL), "SPLIT": "val", "MODEL_ID": "tiny", "MODEL": family}
        assert {k: evaluation.as_dict()[k] for k in chosen} == chosen
        untouched = set(script.as_dict()) - set(chosen) - {"RESULTS_DIR", "VIDEO_DIR", "NUM_FRAMES"}
        assert {k: evaluation.as_dict()[k] for k in untouched} == {k: script.as_dict()[k] for k in untouched}
        assert "SBERT_MODEL" in untouched and "LOAD_IN_4BIT" in untouched


def crash_at(monkeypatch, step: int):
    """The Trainer dies (as a killed job) when it reaches optimiser step ``step``."""
    steps = {"n": 0}
    real_step = transformers.Trainer.training_step

    def crashing(self, *args, **kwargs):
        steps["n"] += 1
        if steps["n"] == step:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "training_step", crashing)
    return lambda: monkeypatch.setattr(transformers.Trainer, "training_step", real_step)


def run_killed_at(step: int, tmp_path, monkeypatch, quick: dict):
    """A tiny Video-LLaVA run interrupted at training step ``step``; its run directory."""
    restore = crash_at(monkeypatch, step)
    with pytest.raises(KeyboardInterrupt):
        train_script("videollava", tmp_path, **quick)
    restore()
    return tmp_path / finetune.run_name(settings("videollava", tmp_path, **quick), "videollava")


@pytest.mark.slow
def test_a_torn_checkpoint_is_skipped_kept_aside_and_the_run_resumes_from_the_older_one(tmp_path, monkeypatch, capsys):
    quick = dict(MAX_STEPS=6, SAVE_STEPS=2, SAVE_TOTAL_LIMIT=5)
    run_dir = run_killed_at(5, tmp_path, monkeypatch, quick)
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    weights = run_dir / "checkpoint-4" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # killed while writing its weights
    capsys.readouterr()
    train_script("videollava", tmp_path, **quick)
    out = capsys.readouterr().out
    assert "skipping checkpoint-4: adapter_model.safetensors is cut short or damaged" in out
    assert "kept aside as torn-checkpoint-4" in out and (run_dir / "torn-checkpoint-4").is_dir()
    record = json.loads((run_dir / "run.json").read_text())
    assert record["completed"] and record["resumed_from"].endswith("checkpoint-2") and record["global_step"] == 6


@pytest.mark.slow
def test_a_run_whose_every_checkpoint_is_torn_starts_over(tmp_path, monkeypatch, capsys):
    quick = dict(MAX_STEPS=4, SAVE_STEPS=2, SAVE_TOTAL_LIMIT=5)
    run_dir = run_killed_at(3, tmp_path, monkeypatch, quick)
    (run_dir / "checkpoint-2" / "trainer_state.json").unlink()  # killed before its state was written
    capsys.readouterr()
    train_script("videollava", tmp_path, **quick)
    out = capsys.readouterr().out
    assert "skipping checkpoint-2: it has no trainer_state.json" in out and "is torn" in out and "starting over" in out
    record = json.loads((run_dir / "run.json").read_text())
    assert record["completed"] and record["resumed_from"] is None and record["global_step"] == 4
    assert [p["step"] for p in record["loss_curve"]] == [1, 2, 3, 4]


def test_checkpoint_problems_name_what_is_missing_or_cut_short(tmp_path):
    from geochange.trainer import checkpoint_problem

    def checkpoint(**damage) -> Path:
        folder = tmp_path / f"checkpoint-{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text('{"global_step": 2}')
        for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
            torch.save({"x": torch.zeros(3)}, folder / name)
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(4)}, str(folder / "model.safetensors"))
        for name, action in damage.items():
            path = folder / name.replace("__", ".")
            if action == "delete":
                path.unlink()
            else:
                path.write_bytes(path.read_bytes()[:-10])
        return folder

    assert checkpoint_problem(checkpoint()) is None
    assert checkpoint_problem(checkpoint(trainer_state__json="delete")) == "it has no trainer_state.json"
    assert "trainer_state.json is cut short" in checkpoint_problem(checkpoint(trainer_state__json="cut"))
    assert "optimizer.pt is cut short" in checkpoint_problem(checkpoint(optimizer__pt="cut"))
    assert checkpoint_problem(checkpoint(scheduler__pt="delete")) == "it lacks scheduler.pt"
    assert checkpoint_problem(checkpoint(rng_state__pth="delete")) == "it lacks rng_state*.pth"
    assert "model.safetensors is cut short" in checkpoint_problem(checkpoint(model__safetensors="cut"))
    assert checkpoint_problem(checkpoint(model__safetensors="delete")) == "it holds no weights"
    # DeepSpeed's layout: ``latest`` names the folder of its states
    folder = checkpoint(optimizer__pt="delete", scheduler__pt="delete", model__safetensors="delete")
    (folder / "latest").write_text("global_step2")
    assert checkpoint_problem(folder) == "latest names global_step2, which is missing"
    (folder / "global_step2").mkdir()
    torch.save({"x": 1}, folder / "global_step2" / "mp_rank_00_model_states.pt")
    assert checkpoint_problem(folder) is None


def test_bad_clips_are_all_listed_before_any_model_loads_or_left_out_and_counted(tmp_path, clips_with_two_bad_ones,
                                                                                monkeypatch, user_error):
    annotations, videos, records = clips_with_two_bad_ones
    loaded = []
    real_load = finetune.load_model
    monkeypatch.setattr(finetune, "load_model", lambda *a, **k: loaded.append(1) or real_load(*a, **k))
    common_settings = dict(TRAIN_ANNOTATIONS=str(annotations), VIDEO_DIR=str(videos), VAL_ANNOTATIONS=None,
                           TRAIN_LIMIT=None, MAX_STEPS=1, BATCH_SIZE=2)
    message = user_error(lambda: train_script("videollava", tmp_path / "runs", **common_settings),
                         str(annotations), "2 of 6 clips cannot be used", "SKIP_BAD_CLIPS=True",
                         f"record 2 (id {records[2]['id']!r}): {records[2]['video']} is not a readable video",
                         f"record 4 (id {records[4]['id']!r}): {records[4]['video']} has 1 frame(s), 2 needed")
    assert message.count("\n  record") == 2 and loaded == []  # both listed, and no model was loaded
    run_dir = train_script("videollava", tmp_path / "runs", SKIP_BAD_CLIPS=True, **common_settings)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["completed"] and record["num_train"] == 4 and record["bad_clips_skipped"] == {"train": 2, "val": 0}


def test_runs_that_train_differently_never_share_a_name_or_a_label(tmp_path):
    """The default run name and the leaderboard label add every setting that changes what trains and differs from the
    script's defaults (GeoLLaVA's scheme alone for the defaults); what cannot change the weights, or what the mode
    ignores, adds nothing; a name past RUN_NAME_LIMIT ends in a hash of its settings."""
    from geochange.deltavlm import training as deltavlm_training
    from geochange.overrides import script_constants
    from geochange.report import settings_label
    from geochange.runs import RUN_NAME_LIMIT, settings_record

    def named(**overrides) -> tuple[str, str]:
        cfg = script_constants("videollava_finetune.py", MODEL_ID="tiny", **overrides)
        record = {"mode": finetune.training_mode(cfg), "num_train": 240, "learning_rate": finetune.learning_rate(cfg),
                  **settings_record(cfg, finetune.run_settings(cfg, "videollava"))}
        return finetune.run_name(cfg, "videollava"), settings_label(record)

    default = named()
    assert default == ("videollava-tiny_sample_train_LORA_r8_alpha16_3epochs", "LoRA r8, 240 pairs, lr 0.005, 3 epochs")
    changed = {"NUM_FRAMES": 4, "LR_SCHEDULER": "linear", "OPTIM": "adamw_torch"}
    runs = {name: named(**{name: value}) for name, value in changed.items()}
    assert runs["NUM_FRAMES"] == (default[0] + "_numframes4", default[1] + ", numframes4")
    assert runs["LR_SCHEDULER"][0] == default[0] + "_lrschedulerlinear"
    assert runs["OPTIM"][1] == default[1] + ", optimadamw-torch"  # "_" parts the tokens
    assert len({*runs.values(), default}) == 4
    assert named(**changed)[0] == default[0] + "_lrschedulerlinear_numframes4_optimadamw-torch"  # by name
    # nothing that cannot change the weights, nor what LoRA ignores (FREEZE_VISION), nor what the label says already
    assert named(NUM_WORKERS=2, REPORT_TO="none", GRADIENT_CHECKPOINTING=False, FREEZE_VISION=False,
                 OUTPUT_DIR=str(tmp_path)) == default
    assert named(LR=1e-3) == (default[0] + "_lr0.001", "LoRA r8, 240 pairs, lr 0.001, 3 epochs")
    long, other = named(TRAIN_SPLIT="a" * 20, SEED=1, **changed, WARMUP_STEPS=3, MAX_LENGTH=512, WEIGHT_DECAY=0.1,
                        LR_SCHEDULER_KWARGS={"num_cycles": 0.4}), named(TRAIN_SPLIT="a" * 20, SEED=2, **changed,
                        WARMUP_STEPS=3, MAX_LENGTH=512, WEIGHT_DECAY=0.1, LR_SCHEDULER_KWARGS={"num_cycles": 0.4})
    assert len(long[0]) <= RUN_NAME_LIMIT and long[0] != other[0] and long[0].startswith(default[0] + "_lrschedulerlinear")
    assert re.fullmatch(r"[0-9a-f]{8}", long[0].rsplit("_", 1)[1]) and "trainsplit" not in long[0]  # hashed
    # DeltaVLM's default names add theirs the same way (its defaults resolved for the same INIT)
    delta = script_constants("deltavlm_finetune.py", INIT="tiny")
    assert deltavlm_training.run_dir_of(deltavlm_training.resolve_recipe(delta)).name == \
        "deltavlm-tiny_sample_changechat_instructions"
    cider = deltavlm_training.resolve_recipe(script_constants("deltavlm_finetune.py", INIT="tiny", BEST_METRIC="cider"))
    assert deltavlm_training.run_dir_of(cider).name == "deltavlm-tiny_sample_changechat_instructions_bestmetriccider"


@pytest.mark.xdist_group("tiny_repo")
def test_best_metric_ends_the_run_with_the_checkpoint_a_hand_computation_picks(tiny_repo):
    """The shared tiny run validates at steps 2 and 4, captioning its 4 val pairs, with BEST_METRIC=sbert: sbert
    recomputed here from the written captions with sentence-transformers picks the checkpoint, and the run's final
    adapter (and so its evaluation after training) is that checkpoint's."""
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer

    (run_dir,) = [p for p in (tiny_repo / "runs").iterdir() if p.is_dir()]
    record = json.loads((run_dir / "run.json").read_text())
    encoder = None
    by_hand = {}
    for step in (2, 4):
        scored = json.loads((run_dir / "validation" / f"step{step:06d}.metrics.json").read_text())
        encoder = encoder or SentenceTransformer(scored["metric_models"]["sbert"], device="cpu")
        answers = [json.loads(line) for line in (run_dir / "validation" / f"step{step:06d}.jsonl").read_text().split("\n")
                   if line]
        assert len(answers) == 4  # VAL_GENERATE_LIMIT pairs, the same ones each time
        cosines = [max(float(encoder.similarity(encoder.encode(a["generated"]), encoder.encode(reference)))
                       for reference in ([a["true"]] if isinstance(a["true"], str) else a["true"])) for a in answers]
        by_hand[step] = sum(cosines) / len(cosines)
        assert scored["metrics"]["sbert"] == pytest.approx(by_hand[step], abs=1e-5)
    assert [entry["step"] for entry in record["caption_curve"]] == [2, 4]
    assert [entry["sbert"] for entry in record["caption_curve"]] == pytest.approx([by_hand[2], by_hand[4]], abs=1e-5)
    assert by_hand[2] != pytest.approx(by_hand[4], abs=1e-6)  # a real choice
    best = max((2, 4), key=lambda step: (by_hand[step], -step))  # ties: the earlier one, as the Trainer keeps it
    assert record["best_checkpoint"] == {"metric": "sbert", "value": pytest.approx(by_hand[best], abs=1e-5),
                                         "step": best, "checkpoint": f"checkpoint-{best}"}
    final = load_file(str(run_dir / "adapter_model.safetensors"))
    kept = {step: load_file(str(run_dir / f"checkpoint-{step}" / "adapter_model.safetensors")) for step in (2, 4)}
    assert all(torch.equal(final[name], kept[best][name]) for name in final)
    other = 6 - best
    assert not all(torch.equal(final[name], kept[other][name]) for name in final)
    evaluated = json.loads((tiny_repo / "results" / f"{run_dir.name}.metrics.json").read_text())
    assert evaluated["metrics"]["sbert"] == pytest.approx(by_hand[best], abs=1e-5)  # same pairs, same weights


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lengths_are_planned_with_each_clips_own_video_tokens(tmp_path, family):
    """Clips of two sizes in one data set: each example is planned with the video tokens its clip becomes (Qwen2.5-VL
    reads a clip at its size), so the planned length is the encoded one, and a MAX_LENGTH too small for the larger
    clip's prompt names that record and its size."""
    from geochange.annotations import Sample
    from geochange.video import write_video

    processor = load_processor(resolve_model_path("tiny", family))
    rng = np.random.default_rng(0)
    samples = [Sample(f"clip{side}", write_video(list(rng.integers(0, 256, (2, side, side, 3), dtype=np.uint8)),
                                                 tmp_path / f"clip{side}.mp4"), "What changed?", "a new road")
               for side in (64, 256)]
    data = finetune.VideoQADataset(samples, processor, 2, 1024, shorten_answers=False, name="train")
    for index, sample in enumerate(samples):
        example = data[index]
        plan = data.plans[index]
        assert len(example["input_ids"]) == plan.prompt_tokens + plan.answer_budget
        side = sample.video.stem.removeprefix("clip")
        assert int((example["input_ids"] == processor.video_token_id).sum()) == \
            video_token_count(processor, 2, (int(side), int(side)))
    assert data.num_video_tokens == max(video_token_count(processor, 2, (s, s)) for s in (64, 256))
    small = data.plans[0].prompt_tokens + 1
    if data.plans[1].prompt_tokens > data.plans[0].prompt_tokens:  # only a family that reads clips at their size
        with pytest.raises(UserError, match=r"record 'clip256'.*of 256x256"):
            finetune.VideoQADataset(samples, processor, 2, small, shorten_answers=True, name="train")
