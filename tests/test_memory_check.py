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


def test_under_deepspeed_the_estimates_are_deepspeeds_own_at_7b_for_each_mode():
    """DeepSpeed's estimators (what ``estimate_zero3_model_states_mem_needs_all_cold`` and the stage-2 one print)
    count the model states of a model whose every parameter trains: the memory check gives the same for a full
    fine-tuning at 7B, per GPU and host memory per node (8 GPUs on a node, ZeRO-3 loads under zero.Init), and for
    LoRA / QLoRA the same for what trains plus the frozen weights in 16 bits (4-bit nf4: NF4_BYTES), partitioned
    under ZeRO-3. ZeRO-3 + CPU offload of a 7B full fine-tuning needs about 200 GB of host memory."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs as zero3
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs as zero2

    from geochange.video_llm.families import FAMILIES
    from geochange.video_llm.memory import GB, NF4_BYTES, Setup, estimate, parameter_counts

    counts = parameter_counts(FAMILIES["videollava"].real_size_config(), "videollava", 8)
    assert counts.largest_layer == 32064 * 4096  # the embeddings (and lm_head)
    gpus = 8

    def deepspeed(trained: int, stage: int, offload: bool, offload_params: bool) -> tuple[int, int]:
        """(host bytes per node, bytes per GPU) as DeepSpeed estimates them for ``trained`` parameters."""
        if stage == 2:
            return zero2(trained, gpus, 1, cpu_offload=offload)
        cpu, gpu, _ = zero3(trained, counts.largest_layer, gpus, 1, cpu_offload=offload,
                            cpu_offload_params=offload_params, zero_init=True)
        return cpu, gpu

    linears, others = counts.language_linears, counts.total - counts.language_linears
    frozen16 = {"FULL": 0, "LORA": 2 * counts.total, "QLORA": NF4_BYTES * linears + 2 * others}
    engines = [(2, False, False), (2, True, False), (3, False, False), (3, True, False), (3, True, True)]
    for mode in ("FULL", "LORA", "QLORA"):
        trained = counts.total if mode == "FULL" else counts.lora
        for stage, offload, offload_params in engines if mode != "QLORA" else engines[:2]:
            ours = estimate(counts, Setup(mode, bits=4 if mode == "QLORA" else None, freeze_vision=False,
                                          zero_stage=stage, offload_optimizer=offload, offload_params=offload_params,
                                          world_size=gpus, local_processes=gpus))
            host, gpu = deepspeed(trained, stage, offload, offload_params)
            frozen = 0 if offload_params else frozen16[mode] / (gpus if stage == 3 else 1)
            assert ours.model_states == pytest.approx(gpu + frozen, rel=1e-6), (mode, stage, offload)
            if mode == "FULL":
                assert ours.host == pytest.approx(host, rel=1e-6), (stage, offload)
            elif not offload:  # each process loads its model on the CPU first; under ZeRO-3 a layer at a time
                frozen_loading = 0 if stage == 3 else 1.5 * 4 * counts.total * gpus
                assert ours.host == pytest.approx(host + frozen_loading, rel=1e-6), (mode, stage)
    offloaded = estimate(counts, Setup("FULL", zero_stage=3, offload_optimizer=True, offload_params=True,
                                       freeze_vision=False))
    assert 195 < offloaded.host / GB < 205


def test_qlora_keeps_what_it_does_not_quantise_in_fp32_and_the_estimate_says_so(tmp_path):
    """prepare_model_for_kbit_training upcasts every weight it does not quantise to fp32 (0.89 B values at 7B, 1.8 GB
    more than in bf16): the tiny QLoRA model, loaded in bf16 as on a GPU, holds as many bytes as the estimate."""
    from geochange.overrides import script_constants
    from geochange.video_llm.finetune import build_training_model
    from geochange.video_llm.memory import Setup, estimate, parameter_counts
    from geochange.video_llm.modeling import resolve_model_path

    cfg = script_constants("videollava_finetune.py", MODEL_ID="tiny", USE_QLORA=True, PRECISION="bf16",
                           OUTPUT_DIR=str(tmp_path))
    model, _ = build_training_model(cfg, resolve_model_path("tiny", "videollava"), "videollava")
    held = 0
    for parameter in model.parameters():
        held += parameter.numel() * parameter.element_size()  # 4-bit: two values a byte
        state = getattr(parameter, "quant_state", None)
        if state is not None:  # its scales (double quantisation: themselves quantised, with their own)
            held += state.absmax.numel() * state.absmax.element_size()
            held += state.state2.absmax.numel() * state.state2.absmax.element_size() + state.state2.code.numel() * 4
    assert {p.dtype for p in model.parameters() if p.dtype != torch.uint8} == {torch.float32}
    counts = parameter_counts(model.config, "videollava", cfg.LORA_R)
    assert estimate(counts, Setup("QLORA", bits=4)).weights == pytest.approx(held, rel=0.01)


def test_a_run_that_needs_more_host_memory_than_the_machine_has_stops_in_one_line():
    from geochange.errors import UserError
    from geochange.video_llm.families import FAMILIES
    from geochange.video_llm.memory import GB, Setup, check_fits, estimate, parameter_counts

    counts = parameter_counts(FAMILIES["videollava"].real_size_config(), "videollava", 8)
    offload = Setup("FULL", zero_stage=3, offload_optimizer=True, offload_params=True)
    need = estimate(counts, offload).host / GB
    assert 180 < need < 190  # the vision towers frozen (FREEZE_VISION): their 16-bit weights offloaded, no states
    with pytest.raises(UserError) as stopped:
        check_fits(counts, offload, "FULL, ZeRO-3 over 1 processes, 7.37 B", (80 * GB, "free on cuda:0"), 128 * GB)
    message = str(stopped.value)
    assert message.startswith(f"memory check: FULL, ZeRO-3 over 1 processes, 7.37 B parameters needs about {need:.0f} GB "
                              "of host memory per node under DeepSpeed (the optimizer states and the weights offloaded "
                              "to the CPU) but 128.0 GB are available on this machine; ways out: "
                              "DEEPSPEED=configs/deepspeed/zero3.json on 8 GPUs (no offload")
    assert "more nodes" in message and "LoRA (USE_LORA=True" in message and "\n" not in message
    check_fits(counts, offload, "FULL", (80 * GB, "free on cuda:0"), 256 * GB)  # fits: no error
