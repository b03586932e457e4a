"""The memory check, before any weight loads: a 7B config alone (no weights) is enough to estimate, print, and stop
a run that cannot fit; the estimates at 7B and docs/gpu.md's table."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_script

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def config_only_7b(tmp_path_factory) -> Path:
    """A folder holding Video-LLaVA-7B's config.json and processor files, and no weights."""
    from geochange.video_llm.families import VIDEO_LLAVA
    from geochange.video_llm.modeling import load_processor, resolve_model_path

    folder = tmp_path_factory.mktemp("videollava-7b-config-only")
    VIDEO_LLAVA.real_size_config().save_pretrained(folder)
    load_processor(resolve_model_path("tiny", "videollava")).save_pretrained(folder)
    assert not list(folder.glob("*.safetensors"))
    return folder


def test_the_memory_check_stops_a_7b_run_that_cannot_fit_before_any_weight_loads(config_only_7b, tmp_path,
                                                                                user_error, capsys, monkeypatch):
    import geochange.video_llm.finetune as finetune
    from geochange.video_llm.memory import GB, free_memory

    monkeypatch.setattr(finetune, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    available = free_memory(torch.device("cpu"))[0] / GB
    assert available < 90  # this machine: full fine-tuning of 7B (113 GB) cannot fit
    message = user_error(lambda: run_script("videollava_finetune.py", f"MODEL_ID={config_only_7b}", "USE_LORA=False",
                                            f"OUTPUT_DIR={tmp_path}"),
                         "memory check: FULL, 7.37 B parameters needs about 1", "of RAM available",
                         "ways out: DEEPSPEED=configs/deepspeed/zero3.json on", "LoRA (USE_LORA=True",
                         "QLoRA (USE_QLORA=True", "BATCH_SIZE=1", "MEMORY_CHECK=False")
    assert "\n" not in message
    # the line is printed at start-up either way; MEMORY_CHECK=False goes on (to the weights, which are not there)
    monkeypatch.undo()
    user_error(lambda: run_script("videollava_finetune.py", f"MODEL_ID={config_only_7b}", "MEMORY_CHECK=False",
                                  "USE_QLORA=True", f"OUTPUT_DIR={tmp_path}"), "cannot load a videollava model")
    assert "memory check (QLORA 4-bit, 7.37 B parameters): about" in capsys.readouterr().out


def test_memory_estimates_at_7b_and_the_tiny_models_parameter_count():
    from geochange.video_llm.families import FAMILIES
    from geochange.video_llm.memory import GB, Setup, estimate, parameter_counts
    from geochange.video_llm.modeling import load_model, resolve_model_path

    counts = parameter_counts(FAMILIES["videollava"].real_size_config(), "videollava", 8)
    assert counts.total == 7_366_279_168 and counts.language_linears == 6_476_005_376
    full = estimate(counts, Setup("FULL"))
    # fp32 weights + gradients + AdamW of what trains (all but the towers): the "about 110 GB"
    assert 105 < (full.weights + full.gradients + full.optimizer) / GB < 115
    foreach = estimate(counts, Setup("FULL", fused_optimizer=False))
    assert (foreach.temporaries - full.temporaries) / GB == pytest.approx(4 * (counts.total - counts.towers) / GB)
    zero3 = estimate(counts, Setup("FULL", zero_stage=3, world_size=8))
    assert zero3.total < estimate(counts, Setup("FULL", zero_stage=2, world_size=8)).total < full.total
    qlora4, qlora8 = estimate(counts, Setup("QLORA", bits=4)), estimate(counts, Setup("QLORA", bits=8))
    assert qlora4.weights < qlora8.weights < estimate(counts, Setup("LORA")).weights
    assert qlora4.total / GB < 14  # the 14 GB target for QLoRA 4-bit at batch 1 holds at batch 4 too, on paper
    # the meta-device count is the real model's count
    tiny = load_model(resolve_model_path("tiny", "videollava"), "videollava")
    assert parameter_counts(tiny.config, "videollava", 8).total == sum(p.numel() for p in tiny.parameters())


def test_the_gpu_page_shows_the_memory_table_the_check_computes(capsys):
    import common
    from geochange.video_llm.memory import memory_table

    assert common.main(["memory-table"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == memory_table() and printed in (REPO / "docs" / "gpu.md").read_text(encoding="utf-8")
    assert "| full, ZeRO-3 over 8 GPUs |" in printed and printed.count("\n") == 8
