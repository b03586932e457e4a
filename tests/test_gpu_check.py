"""benchmarks/gpu_check.py runs without a GPU: the same code on the tiny models, labelled as not GPU figures."""
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

from geochange.video_llm.families import FAMILIES

REPO = Path(__file__).resolve().parent.parent
NEWEST = list(FAMILIES.values())[-1]  # its processor's outputs are not LLaVA-shaped: the batches are built through it


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the check builds the 7B models")
def test_gpu_check_runs_on_the_cpu_with_the_tiny_models(tmp_path, monkeypatch, capsys):
    # run as ``python benchmarks/gpu_check.py ...`` would, in this process (its libraries are already loaded here)
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    monkeypatch.setattr(sys, "argv", ["benchmarks/gpu_check.py", f"FAMILIES=('{NEWEST.id}',)", "MODES=('QLORA4',)",
                                      "MAX_LENGTH=192", "TRAIN_STEPS=1", "TRAIN_BATCHES=(1,)", "GENERATE_BATCHES=(3,)",
                                      "NEW_TOKENS=3", "DELTAVLM_BATCH=2", "SCENE_TILES=1", f"OUT_DIR={tmp_path}"])
    runpy.run_path(str(REPO / "benchmarks" / "gpu_check.py"), run_name="__main__")
    assert "NOT GPU figures" in capsys.readouterr().out
    report = json.loads((tmp_path / "gpu_check_cpu_tiny.json").read_text())
    assert report["gpu"] is False and report["peak_bf16_flops"] is None
    (result,) = report["results"]
    from geochange.video_llm.modeling import load_model, resolve_model_path

    import gpu_check

    model = load_model(resolve_model_path("tiny", NEWEST.id), NEWEST.id)
    parts = NEWEST.parts
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    load = result["load"]
    assert load["quantised_linears"][parts.language_model] == {"quantised": 14, "kept": 0}
    for part in parts.vision:  # the vision parts kept whole
        kept = sum(parts.part_of(n) == part for n in linears)
        assert kept and load["quantised_linears"][part] == {"quantised": 0, "kept": kept}
    # placement counts values: the 4-bit language-model Linears sit packed in uint8
    in_language_model = [m for n, m in linears.items() if n.startswith("model.language_model.")]
    assert load["placement"]["cpu uint8"] == sum(m.weight.numel() for m in in_language_model)
    assert sum(load["placement"].values()) == load["parameters"]
    (train,) = result["train"]
    assert train["batch"] == 1 and train["tokens_per_s"] == pytest.approx(192 / train["step_s"], rel=0.01)
    assert train["mfu"] is None and train["peak_gib"] is None
    # model FLOPs, as the MFU counts them: 4 per frozen language-model weight and token (LoRA / QLoRA), the vision
    # tower forward only (over the tokens it computes on for a clip of CLIP_SIZE), attention's T^2 terms
    language, tower = gpu_check.matmul_params(model, NEWEST.id)
    text = model.config.text_config
    assert language == sum(m.weight.numel() for n, m in linears.items()
                           if n.startswith("model.language_model.") or n == "lm_head")
    assert tower == sum(m.weight.numel() for n, m in linears.items()
                        if parts.in_tower(n) and not parts.is_image_only(n))
    patches = NEWEST.tower_tokens(model.config, 2, *gpu_check.CLIP_SIZE[::-1])
    expected = 4 * language * 192 + 12 * text.num_hidden_layers * 192 ** 2 * text.hidden_size + 2 * tower * patches
    assert train["model_tflops_per_step"] == round(expected / 1e12, 2)
    assert gpu_check.model_flops(model, NEWEST.id, "LORA", 1, 192) == expected
    assert gpu_check.model_flops(model, NEWEST.id, "FULL", 1, 192) == expected + 2 * language * 192
    assert train["memory_check_estimate_gib"] > 0
    (generate,) = result["generate"]
    assert generate["batch"] == 3 and generate["identical_rows"] is True
    # the DeltaVLM training step ran (tiny twin) and the embedding metrics stayed where the models are: the CPU here
    assert report["deltavlm"]["batch"] == 2 and report["deltavlm"]["trainable"] > 0 and report["deltavlm"]["loss"] > 0
    assert report["metrics"]["device"] == "cpu"
    # the example scene's tiles read, and answered on the device the check runs on
    assert report["scene"]["tiles"] == 1 and report["scene"]["model_device"] == "cpu"
    assert report["scene"]["read_tiles_per_s"] > 0 and report["scene"]["answered_tiles_per_s"] > 0
    assert "NOT GPU figures" in (tmp_path / "gpu_check_cpu_tiny.md").read_text()


@pytest.fixture
def gpu_check(monkeypatch):
    """benchmarks/gpu_check.py as a module (its __main__ does not run)."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import gpu_check

    return gpu_check


def test_mfu_counts_each_lora_targeted_linear_once(gpu_check, tmp_path):
    """PEFT's LoRA wrapper shows its base layer's weight: counted on both, the 7B language model was 13.1 B
    parameters instead of 6.6 B, and MFU came out 1.9x too high."""
    from geochange.overrides import script_constants
    from geochange.video_llm.finetune import build_training_model
    from geochange.video_llm.modeling import load_model, resolve_model_path

    path = resolve_model_path("tiny", "videollava")
    wrapped, targets = build_training_model(script_constants("videollava_finetune.py", MODEL_ID="tiny",
                                                             OUTPUT_DIR=str(tmp_path)), path, "videollava")
    from peft import PeftModel

    assert len(targets) == 14 and isinstance(wrapped, PeftModel)
    plain = load_model(path, "videollava")
    language = sum(m.weight.numel() for n, m in plain.named_modules()
                   if isinstance(m, torch.nn.Linear) and (".language_model." in n or n == "lm_head"))
    assert gpu_check.matmul_params(wrapped, "videollava") == gpu_check.matmul_params(plain, "videollava")
    assert gpu_check.matmul_params(wrapped, "videollava")[0] == language


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_7b_model_folder_gets_a_processor_that_fits_it(family, gpu_check, tmp_path, sample_dir):
    """The ZeRO-3 step trains the random 7B model through the fine-tuning script, which loads the folder's
    processor: without one it stopped every time (offline nothing provides it). A folder saved before holds the
    Hub's token ids; the processor written beside it (the tiny twin's tokenizer, the 7B vision shapes) and the config
    agree, and a clip expands to the video tokens the GPU check's batches hold."""
    from transformers import AutoConfig

    from geochange.annotations import load_annotations
    from geochange.sample.data import SAMPLE_TRAIN, SAMPLE_VIDEO_DIR
    from geochange.video import clip_size, read_video_frames
    from geochange.video_llm.families import get_family
    from geochange.video_llm.modeling import encode_training_example, load_processor, video_token_count

    hub = get_family(family).real_size_config(None)
    hub.save_pretrained(tmp_path)  # as an earlier gpu_check saved it (no weights)
    gpu_check.fit_processor(family, tmp_path)
    config, processor = AutoConfig.from_pretrained(tmp_path), load_processor(str(tmp_path))
    def shapes(text_config):  # the 7B language model's shapes, token ids aside
        return {key: value for key, value in text_config.to_dict().items() if not key.endswith("_id")}

    assert shapes(config.text_config) == shapes(hub.text_config) and config.text_config.hidden_size >= 3584
    sample = load_annotations(SAMPLE_TRAIN, SAMPLE_VIDEO_DIR, limit=1, num_frames=2)[0]
    example = encode_training_example(processor, read_video_frames(sample.video, 2), sample.question, sample.answer)
    video_id = getattr(config, "video_token_index", None) or config.video_token_id
    assert processor.video_token_id == video_id
    tokens = int((example["input_ids"] == video_id).sum())
    assert tokens == video_token_count(processor, 2, clip_size(sample.video)) > 0
    assert int(example["input_ids"].max()) < config.text_config.vocab_size
