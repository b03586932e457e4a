"""Outgrowing one GPU: DeepSpeed ZeRO-2/3 and several processes or nodes (gloo on this CPU), the combinations that
cannot work, and one process per GPU."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import run_command, run_script, start_command, torchrun

from geochange.engines import one_process_per_gpu

REPO = Path(__file__).resolve().parent.parent
ZERO2, ZERO3, ZERO3_OFFLOAD = (f"configs/deepspeed/{name}.json" for name in ("zero2", "zero3", "zero3_offload"))
TINY = ["MODEL_ID=tiny", "TRAIN_LIMIT=8", "BATCH_SIZE=2", "EVAL_STEPS=0", "GRADIENT_CHECKPOINTING=False",
        "MAX_NEW_TOKENS=4", "LOGGING_STEPS=1"]




@pytest.fixture(scope="module")
def val4(tmp_path_factory) -> Path:
    from geochange.sample.data import SAMPLE_VAL, ensure_sample_media

    ensure_sample_media()
    path = tmp_path_factory.mktemp("val") / "val4.json"
    path.write_text(json.dumps(json.loads(SAMPLE_VAL.read_text())[:4]))
    return path


# ---------------------------------------------------------------- combinations that cannot work: one line, no model

@pytest.mark.parametrize("script, settings, message", [
    ("videollava_finetune.py", ["USE_QLORA=True", f"DEEPSPEED={ZERO3}"], "USE_QLORA with ZeRO-3"),
    ("llavanext_finetune.py", ["USE_LORA=False", "PRUNE=True", f"DEEPSPEED={ZERO2}"],
     "PRUNE with full fine-tuning under DeepSpeed"),
    ("deltavlm_finetune.py", ["INIT=tiny", "LOAD_LLM_IN_8BIT=True", f"DEEPSPEED={ZERO3}"],
     "ZeRO-3 cannot partition quantised weights"),
    ("videollava_finetune.py", ["DEEPSPEED=configs/deepspeed/zero4.json"], "no config file configs/deepspeed/zero4.json"),
])
def test_combinations_that_cannot_work_stop_in_one_line_before_any_model(script, settings, message, tmp_path,
                                                                         user_error, monkeypatch):
    import geochange.video_llm.finetune as finetune
    from geochange.deltavlm import training

    monkeypatch.setattr(finetune, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(training, "load_deltavlm", lambda *a, **k: pytest.fail("a model was loaded"))
    user_error(lambda: run_script(script, "MODEL_ID=tiny" if "INIT=tiny" not in settings else "TRAIN_LIMIT=4",
                                  *settings, f"OUTPUT_DIR={tmp_path}"), message)
    assert not any(tmp_path.iterdir())


def test_an_offload_config_without_its_own_optimizer_is_refused(tmp_path, user_error):
    from geochange.engines import deepspeed_plan

    config = json.loads((REPO / ZERO3_OFFLOAD).read_text())
    plan = deepspeed_plan(str(REPO / ZERO3_OFFLOAD))
    assert (plan.stage, plan.offload_optimizer, plan.offload_params, plan.has_optimizer) == (3, True, True, True)
    # what its optimizer block runs, as the line at the start of training says
    assert plan.optimizer.startswith("AdamW as DeepSpeed's DeepSpeedCPUAdam, compiled on first use")
    assert deepspeed_plan(str(REPO / ZERO3)).optimizer is None  # OPTIM runs
    del config["optimizer"]
    (tmp_path / "offload.json").write_text(json.dumps(config))
    user_error(lambda: deepspeed_plan(str(tmp_path / "offload.json")), "offloads to the CPU but names no optimizer")
    (tmp_path / "broken.json").write_text("{stage: 3")
    user_error(lambda: deepspeed_plan(str(tmp_path / "broken.json")), "is not a JSON config")
    for stage in (4, "auto"):
        (tmp_path / "stage.json").write_text(json.dumps({"zero_optimization": {"stage": stage}}))
        user_error(lambda: deepspeed_plan(str(tmp_path / "stage.json")), f"asks for ZeRO stage {stage!r}; DeepSpeed "
                                                                           "has stages 0-3")
    assert deepspeed_plan(str(REPO / ZERO2)).stage == 2 and deepspeed_plan(None) is None


@pytest.mark.parametrize("script", ["videollava_finetune.py", "deltavlm_finetune.py"])
def test_a_deepspeed_run_resumed_on_another_number_of_processes_stops_in_one_line_before_any_model(
        script, tmp_path, user_error, monkeypatch, sample_dir):
    """DeepSpeed's checkpoints hold one optimizer shard per process: resumed on another number of processes,
    DeepSpeed failed deep inside its loading (state_dict_list[dp_rank]), after the model had loaded. The run's
    run.json names the processes it trained on; a launch with another number stops first, naming both."""
    import geochange.video_llm.finetune as finetune
    from geochange.deltavlm import training
    from geochange.overrides import script_constants
    from geochange.runs import write_run_file

    monkeypatch.setattr(finetune, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(training, "load_deltavlm", lambda *a, **k: pytest.fail("a model was loaded"))
    chosen = {"DEEPSPEED": ZERO2, "OUTPUT_DIR": str(tmp_path), "RUN_NAME": "run", "TRAIN_LIMIT": 4,
              **({"INIT": "tiny"} if script.startswith("deltavlm") else {"MODEL_ID": "tiny"})}
    cfg = script_constants(script, **chosen)
    if script.startswith("deltavlm"):
        cfg = training.resolve_recipe(cfg)
    run_dir = tmp_path / "run"
    (run_dir / "checkpoint-4").mkdir(parents=True)
    write_run_file(run_dir, {"completed": False, "settings": cfg.as_dict(), "world_size": 2})
    message = user_error(lambda: run_script(script, *(f"{k}={v}" for k, v in chosen.items())),
                         f"{run_dir} was trained on 2 processes under DeepSpeed ({ZERO2}) and this launch has 1",
                         "resume it on 2 processes")
    assert "\n" not in message and sorted(p.name for p in run_dir.iterdir()) == ["checkpoint-4", "run.json"]


def test_a_filesystem_without_file_locks_is_one_line(tmp_path, monkeypatch, user_error):
    """fcntl.flock on a filesystem without locks (Lustre mounted without -o flock) raises ENOSYS: one line naming
    the lock and the ways out, for the writer lock and for a first-use build alike."""
    import errno
    import os

    from geochange import locks

    def no_locks(handle, operation):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(locks.fcntl, "flock", no_locks)
    message = user_error(lambda: locks.lock_for_writing(tmp_path / "run", "the run directory"),
                         f"cannot lock {tmp_path / 'run.lock'}: its filesystem does not support file locks "
                         f"({os.strerror(errno.ENOSYS)}); mount it with locks (Lustre: -o flock)")
    assert "\n" not in message
    user_error(lambda: locks.build_folder_once(tmp_path / "built", lambda folder: False, lambda staging: None, "x"),
               f"cannot lock {tmp_path / 'built.lock'}")


def test_several_gpus_without_a_launcher_train_on_one_never_dataparallel():
    args = SimpleNamespace(world_size=1, n_gpu=4, _n_gpu=4)
    note = one_process_per_gpu(args)
    assert args._n_gpu == 1  # the Trainer wraps nn.DataParallel when n_gpu > 1: it now sees one GPU
    assert "4 GPUs visible but one process" in note and "torchrun --nproc_per_node 4" in note
    assert one_process_per_gpu(SimpleNamespace(world_size=2, n_gpu=1, _n_gpu=1)) is None  # under torchrun: fine
    assert one_process_per_gpu(SimpleNamespace(world_size=1, n_gpu=1, _n_gpu=1)) is None


# ---------------------------------------------------------------- ZeRO-3 and ZeRO-2 runs, 2 processes (gloo)

@pytest.mark.slow
def test_zero3_full_finetuning_then_evaluation_after_training(tmp_path, free_port, val4):
    """Everything after training works under ZeRO-3: the weights are gathered and saved whole, and each process
    loads them for its share of the evaluation outside ZeRO-3 (where it would wait for the others forever). The
    validation captions 3 pairs at steps 1 and 2, both processes generating in step (one with a spare pair at the
    second batch), and BEST_METRIC ends the run with the checkpoint whose captions scored best."""
    from safetensors.torch import load_file

    run = torchrun(free_port, "videollava_finetune.py", *TINY, "USE_LORA=False", f"DEEPSPEED={ZERO3}", "MAX_STEPS=2",
                   "LR=1e-3", f"VAL_ANNOTATIONS={val4}", f"OUTPUT_DIR={tmp_path / 'runs'}",
                   f"RESULTS_DIR={tmp_path / 'results'}", "DIST_TIMEOUT_MINUTES=7", "EVAL_STEPS=1", "SAVE_STEPS=1",
                   "VAL_GENERATE_LIMIT=3", "BEST_METRIC=sbert")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "process 1 of 2: generating on cpu" in run.stdout  # the evaluation after training, shared
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["completed"] and record["world_size"] == 2 and record["mode"] == "FULL"
    engine = record["engine"]
    assert engine["deepspeed"] == {"config": ZERO3, "zero_stage": 3}
    # DeepSpeed's process group waits DIST_TIMEOUT_MINUTES for a late process (its own default was 10 minutes, and
    # the Trainer's ddp_timeout never reached a group DeepSpeed had made): read back from the group itself
    assert engine["dist_timeout_minutes"] == 7
    # every process's peak host memory; the Trainer's step times, the first (warm-up) apart, as the GPU check reads
    assert len(engine["peak_host_memory_gib"]) == 2 and min(engine["peak_host_memory_gib"]) > 0.1
    assert engine["step_seconds"]["steps"] == 2 and engine["step_seconds"]["mean_after_first_s"] > 0
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check

    figures = gpu_check.zero3_figures(record)
    assert figures["step_s"] == engine["step_seconds"]["mean_after_first_s"] and figures["timed_steps"] == 1
    assert figures["step_s"] < record["seconds"] / record["global_step"]  # not the whole run's time over its steps
    # parameter counts under ZeRO-3 use the partitioned parameters' true sizes
    saved = load_file(str(run_dir / "model.safetensors"))
    assert record["total_parameters"] == sum(t.numel() for t in saved.values()) > 0
    assert 0 < record["trainable_parameters"] < record["total_parameters"]
    metrics = json.loads((tmp_path / "results" / f"{run_dir.name}.metrics.json").read_text())
    assert metrics["num_samples"] == 4 and "rouge1" in metrics["metrics"] and metrics["processes"] == 2
    curve = {entry["step"]: entry["sbert"] for entry in record["caption_curve"]}
    for step, value in curve.items():  # every process's captions reached the one scorer
        scored = json.loads((run_dir / "validation" / f"step{step:06d}.metrics.json").read_text())
        assert scored["num_samples"] == 3 and scored["metrics"]["sbert"] == value
    best = max(sorted(curve), key=lambda step: curve[step])
    assert sorted(curve) == [1, 2] and record["best_checkpoint"]["step"] == best
    kept = load_file(str(run_dir / f"checkpoint-{best}" / "model.safetensors"))
    assert all(torch.equal(saved[name], kept[name]) for name in saved)  # the run ends with the best checkpoint


@pytest.mark.slow
def test_zero3_lora_with_merge_and_evaluation_the_merged_weights_are_base_plus_ba(tmp_path, free_port, val4):
    """Also a fresh clone's first run: the tiny model is built (main process first) while the ZeRO-3 config is alive;
    built inside zero.Init on one process it would wait for the others, who wait for it."""
    from safetensors.torch import load_file

    from geochange.video_llm.modeling import load_model, resolve_model_path
    from geochange.video_llm.tiny import tiny_checkpoint_dir

    fresh = tmp_path / "checkpoints"
    run = torchrun(free_port, "llavanext_finetune.py", *TINY, f"DEEPSPEED={ZERO3}", "MAX_STEPS=2", "LR=1e-2",
                 "MERGE_AND_SAVE=True", f"VAL_ANNOTATIONS={val4}", f"OUTPUT_DIR={tmp_path / 'runs'}",
                 f"RESULTS_DIR={tmp_path / 'results'}", env={"GEOLLAVA_CHECKPOINTS_DIR": str(fresh)})
    assert run.returncode == 0, run.stderr[-3000:]
    built = fresh / tiny_checkpoint_dir("llavanext").name
    assert json.loads((built / "tiny.json").read_text())["seed"] >= 0  # built by this run, whole
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    assert json.loads((tmp_path / "results" / f"{run_dir.name}.metrics.json").read_text())["num_samples"] == 4
    adapter = load_file(str(run_dir / "adapter_model.safetensors"))
    # the models as from_pretrained names their parameters (the files on disk may use older key names)
    merged = {n: p.detach() for n, p in load_model(str(run_dir / "merged"), "llavanext").named_parameters()}
    base = {n: p.detach() for n, p in load_model(str(built), "llavanext").named_parameters()}
    repo_tiny = load_model(resolve_model_path("tiny", "llavanext"), "llavanext")
    assert all(torch.equal(base[n], p) for n, p in repo_tiny.named_parameters())  # the same seeded build
    config = json.loads((run_dir / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    lora_a = {k.split(".lora_A")[0].removeprefix("base_model.model."): v for k, v in adapter.items() if ".lora_A." in k}
    assert len(lora_a) == 14
    for module, a in lora_a.items():
        b = adapter[f"base_model.model.{module}.lora_B.weight"]
        assert b.abs().max() > 0  # trained: LoRA's B starts at zero
        expected = base[f"{module}.weight"] + scaling * (b @ a)
        torch.testing.assert_close(merged[f"{module}.weight"], expected, rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("config", [ZERO2, ZERO3])
def test_deltavlm_trains_under_zero2_and_zero3_writing_the_released_layout_with_identical_replicas(
        config, tmp_path, free_port, sample_dir):
    """Under ZeRO-2 with a config of the user's that names its own optimizer (DeepSpeed's AdamW, as LLaVA-NeXT's
    zero2.json): the released recipe's weight decay 0.05 stays off biases and norms. Under ZeRO-3 with LoRA on the
    LLM: the adapter holds the LoRA weights alone (Vicuna is resized by a row, so PEFT saved its embeddings and
    lm_head too, empty placeholders under ZeRO-3) and the predictor loads it. Both: DeepSpeed's own checkpoint
    leaves the frozen weights out (it held all of Vicuna), the group waits DIST_TIMEOUT_MINUTES."""
    from safetensors.torch import load_file

    from geochange.deltavlm.loading import load_deltavlm
    from geochange.deltavlm.tiny import ensure_tiny_deltavlm
    from geochange.deltavlm.training import TRAINABLE_WEIGHTS

    stage = 3 if config == ZERO3 else 2
    chosen = (["LLM_LORA_R=4"] if stage == 3 else [f"DEEPSPEED={deepspeed_optimizer_config(tmp_path, config)}"])
    # 3 validation captions, one a batch: under ZeRO-3 rank 1 runs a spare batch beside rank 0's second
    run = torchrun(free_port, "deltavlm_finetune.py", "INIT=tiny", f"DEEPSPEED={config}", f"OUTPUT_DIR={tmp_path}",
                   "TRAIN_LIMIT=32", "VAL_LIMIT=3", "VAL_BATCH_SIZE=1", "BATCH_SIZE=4", "VAL_NUM_BEAMS=1",
                   "VAL_MAX_NEW_TOKENS=8", "EPOCHS=1", "MAX_STEPS=3", "RUN_NAME=zero", "DIST_TIMEOUT_MINUTES=9",
                   *chosen)
    assert run.returncode == 0, run.stderr[-3000:]
    run_dir = tmp_path / "zero"
    record = json.loads((run_dir / "run.json").read_text())
    engine = record["engine"]
    assert record["world_size"] == 2 and engine["deepspeed"]["zero_stage"] == stage
    assert engine["dist_timeout_minutes"] == 9 and len(engine["peak_host_memory_gib"]) == 2
    first, second = record["replica_checksums"]
    assert first == second  # both processes hold the same trained weights
    validation = [json.loads(line) for line in (run_dir / "validation" / "epoch001.jsonl").read_text().splitlines()]
    assert len(validation) == 3 == len({r["id"] for r in validation})  # every caption once, no spare recorded
    # Whole tensors, not one process's shard, in the released layout and in the Trainer's checkpoint
    saved = torch.load(run_dir / "checkpoint_best.pth", weights_only=True)["model"]
    released = torch.load(ensure_tiny_deltavlm().checkpoint, weights_only=True)["model"]
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in released.items()}
    assert not torch.equal(saved["llm_proj.weight"], released["llm_proj.weight"])  # trained
    trainable = load_file(str(run_dir / "checkpoint-3" / TRAINABLE_WEIGHTS))
    torch.testing.assert_close(trainable["language_projection.weight"].float(), saved["llm_proj.weight"].float())
    qkv_bias = trainable["vision_model.encoder.layers.2.self_attn.qkv.bias"]
    third = qkv_bias.shape[0] // 3
    assert qkv_bias[third:2 * third].abs().max() == 0 and qkv_bias.abs().max() > 0  # EVA's absent key bias stays 0
    # DeepSpeed's checkpoint (optimizer shards, the module's weights) holds what trains, no frozen weight
    model_states = sorted((run_dir / "checkpoint-3").glob("global_step*/*model_states.pt"))  # ZeRO-3: one a rank
    assert len(model_states) == (2 if stage == 3 else 1)
    for states in model_states:
        module = torch.load(states, weights_only=False, map_location="cpu")["module"]
        assert set(module) == set(trainable) and not any(k.startswith("language_model.") and "lora_" not in k
                                                          for k in module)
    if stage == 2:
        assert engine["optimizer"] == "AdamW" and engine["optimizer_from"].startswith('the "optimizer" block of ')
        assert engine["weight_decay_per_group"] == [0.05, 0.0]  # the released 0.05, none on biases and norms
        return
    adapter = load_file(str(run_dir / "llm_lora" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in name for name in adapter)  # no embeddings or lm_head
    assert all(t.numel() > 0 for t in adapter.values())
    tiny = ensure_tiny_deltavlm()
    model, _, report = load_deltavlm(str(run_dir / "checkpoint_best.pth"), base=str(tiny.base), llm_model=str(tiny.llm),
                                     bert_model=str(tiny.bert), device=torch.device("cpu"))
    assert report.llm_adapter == run_dir / "llm_lora"  # loaded, every weight verified
    loaded = {n.replace(".default", "").removeprefix("language_model."): p
              for n, p in model.named_parameters() if "lora_" in n}
    assert loaded.keys() == adapter.keys() and all(torch.equal(p, adapter[n]) for n, p in loaded.items())
    assert any(adapter[n].abs().max() > 0 for n in adapter if "lora_B" in n)  # trained


def deepspeed_optimizer_config(tmp_path: Path, source: str) -> Path:
    """``source`` with an "optimizer" block of its own, as LLaVA-NeXT's scripts/zero2.json / zero3.json have one
    (DeepSpeed's AdamW; ``torch_adam``: PyTorch's kernel, which needs no compiler here)."""
    config = json.loads((REPO / source).read_text())
    config["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                       "weight_decay": "auto", "torch_adam": True}}
    path = tmp_path / f"with_optimizer_{Path(source).name}"
    path.write_text(json.dumps(config))
    return path


ONE_STEP = ["MODEL_ID=tiny", "TRAIN_LIMIT=8", "BATCH_SIZE=2", "LR=1e-3", "WARMUP_STEPS=0", "EVAL_STEPS=0",
            "EVAL_AFTER_TRAIN=False", "GRADIENT_CHECKPOINTING=False", "VAL_ANNOTATIONS=None", "RUN_NAME=run"]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["zero3 full, its config's own optimizer, weight decay", "zero2 LoRA in bf16"])
def test_a_deepspeed_step_equals_the_same_step_without_deepspeed(engine, tmp_path):
    """Same seed, one process, with DeepSpeed and without (the Trainer's own step, as under DDP).

    ZeRO-3, fp32: a DeepSpeed config with its own "optimizer" block runs DeepSpeed's AdamW instead of OPTIM, and it
    used to decay every parameter; it keeps the Trainer's groups (no decay on biases and norms), so with
    WEIGHT_DECAY=0.1 two steps land on the same weights, and run.json says which optimizer ran and why.

    ZeRO-2 in bf16 (LoRA): DeepSpeed casts the module to bf16 and keeps fp32 masters in its optimizer. The adapter
    held the bf16-rounded weights, and the masters themselves started from the rounded fresh LoRA A. Now both start
    from the same fp32 values and the adapter holds the masters: after one SGD step (the update is lr x the
    gradient) A, which gets no gradient while B is 0, is bit-identical, and B differs only by the bf16 compute's
    rounding of the gradient."""
    from safetensors.torch import load_file

    from geochange.video_llm.modeling import load_model, resolve_model_path

    if engine.startswith("zero3"):
        config = deepspeed_optimizer_config(tmp_path, ZERO3)
        same = [*ONE_STEP, "USE_LORA=False", "MAX_STEPS=2", "WEIGHT_DECAY=0.1", "OPTIM=adamw_torch"]
    else:
        config = REPO / ZERO2
        same = [*ONE_STEP, "PRECISION=bf16", "MAX_STEPS=1", "OPTIM=sgd"]
    deepspeed = run_command([sys.executable, "videollava_finetune.py", *same, f"DEEPSPEED={config}",
                             f"OUTPUT_DIR={tmp_path / 'deepspeed'}"])
    assert deepspeed.returncode == 0, deepspeed.stderr[-3000:]
    run_script("videollava_finetune.py", *same, f"OUTPUT_DIR={tmp_path / 'plain'}")
    engine_record = json.loads((tmp_path / "deepspeed" / "run" / "run.json").read_text())["engine"]

    if engine.startswith("zero2"):
        with_deepspeed, plain = (load_file(str(tmp_path / d / "run" / "adapter_model.safetensors"))
                                 for d in ("deepspeed", "plain"))
        assert set(with_deepspeed) == set(plain) and {t.dtype for t in with_deepspeed.values()} == {torch.float32}
        for name, weight in plain.items():
            if "lora_A" in name:
                assert torch.equal(with_deepspeed[name], weight), name
            else:
                assert weight.abs().max() > 1e-6  # B moved off zero
                torch.testing.assert_close(with_deepspeed[name], weight, rtol=0, atol=1e-6)
        assert engine_record["optimizer"] == "SGD" and engine_record["zero_optimizer"] == "DeepSpeedZeroOptimizer"
        return

    def weights(folder: Path) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in load_model(str(folder), "videollava").named_parameters()}

    with_deepspeed, plain = weights(tmp_path / "deepspeed" / "run"), weights(tmp_path / "plain" / "run")
    base = weights(Path(resolve_model_path("tiny", "videollava")))
    assert set(with_deepspeed) == set(plain)
    moved = 0
    for name, weight in plain.items():
        torch.testing.assert_close(with_deepspeed[name], weight, rtol=0, atol=1e-5)
        moved += int((weight - base[name]).abs().max() > 1e-4)
    # the two steps changed every trained tensor of the language model and projector (25; the towers are frozen),
    # and identically with and without DeepSpeed
    assert moved == 25
    assert engine_record["optimizer"] == "AdamW" and engine_record["weight_decay_per_group"] == [0.1, 0.0]
    assert engine_record["optimizer_from"] == f'the "optimizer" block of {config}'
    assert (f'optimizer: AdamW as torch.optim.AdamW (torch_adam) from the "optimizer" block of {config}, which '
            "DeepSpeed runs instead of OPTIM=adamw_torch; weight decay 0.1 on 18 tensors, none on 7 (biases, norms)"
            ) in deepspeed.stdout


# ---------------------------------------------------------------- several nodes

def two_nodes(free_port: int, script: str, *settings_per_node: list[str], env: dict | None = None) -> list:
    """Two torchrun launchers (one process each) that meet at a c10d rendezvous on 127.0.0.1, as two machines
    would; ``settings_per_node``: each launcher's settings (c10d, not the launch order, decides which one is rank 0).
    Their completed processes."""
    launchers = [start_command([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                                "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port}", "--rdzv_id=nodes",
                                script, *settings], env=env) for settings in settings_per_node]
    return [launcher.finish() for launcher in launchers]


@pytest.mark.slow
def test_two_launchers_as_two_nodes_train_one_run(tmp_path, free_port):
    """Two nodes train one run in a shared run directory (DDP with its gradient buckets shared, fused AdamW), from a
    pruned base, over torn checkpoints a killed run left. "Main process first" is global, not per node: rank 0 alone
    sets the torn checkpoints aside while node 1 waits (its first process scanned beside rank 0's renames); the
    pruned base is written once, by whichever process takes its lock first (node 1's first process pruned beside
    rank 0 into the same checkpoints/pruned/ folder); the DDP group waits DIST_TIMEOUT_MINUTES."""
    from geochange.video_llm.tiny import tiny_checkpoint_dir

    checkpoints = tmp_path / "checkpoints"  # a fresh checkpoints/ (the tiny model copied in), shared by the nodes
    shutil.copytree(tiny_checkpoint_dir("videollava"), checkpoints / tiny_checkpoint_dir("videollava").name)
    run_dir = tmp_path / "runs" / "nodes"
    for step in range(1, 9):  # killed while saving: a state, no weights
        (run_dir / f"checkpoint-{step}").mkdir(parents=True)
        (run_dir / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        for part in range(20):
            (run_dir / f"checkpoint-{step}" / f"part{part}").write_bytes(b"x")
    settings = [*TINY, "MAX_STEPS=2", "LR=3e-3", "EVAL_AFTER_TRAIN=False", f"OUTPUT_DIR={tmp_path / 'runs'}",
                "RUN_NAME=nodes", f"RESULTS_DIR={tmp_path / 'results'}", "PRUNE=True", "DIST_TIMEOUT_MINUTES=11"]
    nodes = two_nodes(free_port, "videollava_finetune.py", settings, settings,
                      env={"GEOLLAVA_CHECKPOINTS_DIR": str(checkpoints)})
    for node in nodes:
        assert node.returncode == 0, node.stderr[-3000:]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["completed"] and record["world_size"] == 2 and record["global_step"] == 2
    engine = record["engine"]
    assert engine["wrapper"] == "DistributedDataParallel" and engine["dist_timeout_minutes"] == 11
    assert engine["gradient_as_bucket_view"] is True and engine["fused"] is True
    output = "".join(node.stdout for node in nodes)
    # one process printed the run (rank 0 is the one writer); one pruned the base, the other read it
    assert output.count("trainable parameters:") == 1 and output.count("pruning videollava-tiny: magnitude") == 1
    (pruned,) = [p for p in (checkpoints / "pruned").iterdir() if p.is_dir()]
    assert json.loads((pruned / "pruning.json").read_text())["sparsity"] == record["sparsity"]
    # every torn checkpoint set aside once, by rank 0, and the run started over
    assert sorted(p.name for p in run_dir.glob("torn-checkpoint-*")) == sorted(f"torn-checkpoint-{s}" for s in range(1, 9))
    assert output.count("skipping checkpoint-") == 8 and "every checkpoint in" in output
    assert record["resumed_from"] is None


# What open_run does first on every process (the training scripts' step 2), without the libraries they import.
SHARED_CHECK = """
import sys
from pathlib import Path

import torch.distributed as dist

from geochange.engines import check_shared_directory, start_process_group
from geochange.errors import install_error_handler
from geochange.locks import lock_for_writing, lock_path

install_error_handler()
start_process_group(None, 1)
run_dir = Path(sys.argv[1]) / "run"
lock = lock_for_writing(run_dir, f"the run directory {run_dir}") if dist.get_rank() == 0 else None
check_shared_directory(lock_path(run_dir), f"the run directory {run_dir}")
print("shared", flush=True)
"""


@pytest.mark.slow
def test_nodes_that_do_not_share_the_run_directory_stop_in_one_line(tmp_path, free_port):
    """A node whose OUTPUT_DIR is its own (not a shared filesystem) would start afresh while node 0 resumes, and
    their collectives would wait on each other until the timeout: at start each node's first process reads back
    rank 0's lock file beside the run directory; node 1 cannot, and the run stops in one line from rank 0 (under
    torchrun the line used to be lost: torch's excepthook buffers stderr, and the suite's exited first). The
    training scripts pass this check on two nodes that share it (test_two_launchers_as_two_nodes_train_one_run)."""
    script = tmp_path / "shared_check.py"
    script.write_text(SHARED_CHECK)
    nodes = two_nodes(free_port, str(script), *([str(tmp_path / f"node{n}")] for n in (0, 1)),
                      env={"PYTHONPATH": str(REPO)})
    assert all(node.returncode != 0 for node in nodes) and not any("shared" in node.stdout for node in nodes)
    (line,) = [line for node in nodes for line in node.stderr.splitlines() if "error:" in line]  # rank 0's, once
    (rank0_dir,) = [tmp_path / f"node{n}" for n in (0, 1) if (tmp_path / f"node{n}" / "run.lock").is_file()]
    assert line.startswith(f"error: the run directory {rank0_dir / 'run'} is not shared between the nodes: ")
    assert f"(rank 1) cannot see {rank0_dir / 'run.lock'}, which rank 0 wrote on " in line
    assert line.endswith("put OUTPUT_DIR on a filesystem every node mounts (checkpoints, run.json and resuming need "
                         "one run directory)")


def test_overwrite_under_several_processes_deletes_the_run_once(tmp_path, capsys):
    """OVERWRITE with several processes: rank 0 deletes the finished run (and its results), the others, which the
    launcher lets through after it (main_process_first), find it gone and start it afresh; nobody deletes twice."""
    import geochange.video_llm.finetune as finetune
    from geochange.overrides import script_constants
    from geochange.runs import write_run_file

    cfg = script_constants("videollava_finetune.py", MODEL_ID="tiny", OUTPUT_DIR=str(tmp_path), OVERWRITE=True,
                           RESULTS_DIR=str(tmp_path / "results"))
    run_dir = tmp_path / finetune.run_name(cfg, "videollava")
    (run_dir / "checkpoint-2").mkdir(parents=True)
    write_run_file(run_dir, {"completed": True, "settings": cfg.as_dict()})
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / f"{run_dir.name}.jsonl").write_text("{}\n")
    assert finetune.prepare_run_dir(cfg, run_dir, main=True) is False  # rank 0: deleted, starts afresh
    assert not run_dir.exists() and not (tmp_path / "results" / f"{run_dir.name}.jsonl").exists()
    assert finetune.prepare_run_dir(cfg, run_dir, main=False) is False  # rank 1, after it: nothing left to delete
    assert capsys.readouterr().out.count("OVERWRITE: removed the earlier run") == 1
