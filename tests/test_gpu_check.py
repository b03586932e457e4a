"""benchmarks/gpu_check.py runs without a GPU: the same code on the tiny models, labelled as not GPU figures."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the check builds the 7B models")
def test_gpu_check_runs_on_the_cpu_with_the_tiny_models(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "FAMILIES=('videollava',)", "MODES=('QLORA4',)",
                          "MAX_LENGTH=192", "TRAIN_STEPS=1", "TRAIN_BATCHES=(1,)", "GENERATE_BATCHES=(3,)",
                          "NEW_TOKENS=3", "DELTAVLM_BATCH=2", f"OUT_DIR={tmp_path}"], cwd=REPO, capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "NOT GPU figures" in run.stdout
    report = json.loads((tmp_path / "gpu_check_cpu_tiny.json").read_text())
    assert report["gpu"] is False and report["peak_bf16_flops"] is None
    (result,) = report["results"]
    load = result["load"]
    assert load["quantised_linears"]["language_model"] == {"quantised": 14, "kept": 0}
    assert load["quantised_linears"]["video_tower"] == {"quantised": 0, "kept": 12}
    # placement counts values: the 4-bit language-model Linears (2 x 40960 values) sit packed in uint8
    assert load["placement"]["cpu uint8"] == 81920 and sum(load["placement"].values()) == load["parameters"]
    (train,) = result["train"]
    assert train["batch"] == 1 and train["tokens_per_s"] == pytest.approx(192 / train["step_s"], rel=0.01)
    assert train["mfu"] is None and train["peak_gb"] is None
    (generate,) = result["generate"]
    assert generate["batch"] == 3 and generate["identical_rows"] is True
    # the DeltaVLM training step ran (tiny twin) and the embedding metrics stayed where the models are: the CPU here
    assert report["deltavlm"]["batch"] == 2 and report["deltavlm"]["trainable"] > 0 and report["deltavlm"]["loss"] > 0
    assert report["metrics"]["device"] == "cpu"
    assert "NOT GPU figures" in (tmp_path / "gpu_check_cpu_tiny.md").read_text()
