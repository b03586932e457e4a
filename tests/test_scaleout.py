"""Outgrowing one GPU: DeepSpeed ZeRO-2/3 and several processes or nodes (gloo on this CPU), the combinations that
cannot work, and one process per GPU."""
from __future__ import annotations

import json
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
    """Everything after training works under ZeRO-3: the weights are gathered and saved whole, and rank 0 loads
    them for the evaluation outside ZeRO-3 (where it would wait for the others forever)."""
    from safetensors.torch import load_file

    run = torchrun(free_port, "videollava_finetune.py", *TINY, "USE_LORA=False", f"DEEPSPEED={ZERO3}", "MAX_STEPS=2",
                 "LR=1e-3", f"VAL_ANNOTATIONS={val4}", f"OUTPUT_DIR={tmp_path / 'runs'}",
                 f"RESULTS_DIR={tmp_path / 'results'}")
    assert run.returncode == 0, run.stderr[-3000:]
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["completed"] and record["world_size"] == 2 and record["mode"] == "FULL"
    assert record["engine"]["deepspeed"] == {"config": ZERO3, "zero_stage": 3}
    # parameter counts under ZeRO-3 use the partitioned parameters' true sizes
    saved = load_file(str(run_dir / "model.safetensors"))
    assert record["total_parameters"] == sum(t.numel() for t in saved.values()) > 0
    assert 0 < record["trainable_parameters"] < record["total_parameters"]
    metrics = json.loads((tmp_path / "results" / f"{run_dir.name}.metrics.json").read_text())
    assert metrics["num_samples"] == 4 and "rouge1" in metrics["metrics"]


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
    from safetensors.torch import load_file

    from geochange.deltavlm.tiny import ensure_tiny_deltavlm
    from geochange.deltavlm.training import TRAINABLE_WEIGHTS

    stage = 3 if config == ZERO3 else 2
    # 3 validation captions, one a batch: under ZeRO-3 rank 1 runs a spare batch beside rank 0's second
    run = torchrun(free_port, "deltavlm_finetune.py", "INIT=tiny", f"DEEPSPEED={config}", f"OUTPUT_DIR={tmp_path}",
                 "TRAIN_LIMIT=32", "VAL_LIMIT=3", "VAL_BATCH_SIZE=1", "BATCH_SIZE=4", "VAL_NUM_BEAMS=1",
                 "VAL_MAX_NEW_TOKENS=8", "EPOCHS=1", "MAX_STEPS=3", "RUN_NAME=zero")
    assert run.returncode == 0, run.stderr[-3000:]
    run_dir = tmp_path / "zero"
    record = json.loads((run_dir / "run.json").read_text())
    assert record["world_size"] == 2 and record["engine"]["deepspeed"]["zero_stage"] == stage
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


@pytest.mark.slow
def test_a_zero3_step_equals_the_same_step_without_deepspeed(tmp_path):
    """Same seed, fp32, one process: DeepSpeed's partitioned update lands on the same weights as the Trainer's own."""
    from geochange.video_llm.modeling import load_model, resolve_model_path

    same = ["MODEL_ID=tiny", "USE_LORA=False", "TRAIN_LIMIT=8", "BATCH_SIZE=2", "MAX_STEPS=2", "LR=1e-3",
            "WARMUP_STEPS=0", "EVAL_STEPS=0", "EVAL_AFTER_TRAIN=False", "GRADIENT_CHECKPOINTING=False",
            "VAL_ANNOTATIONS=None"]
    deepspeed = run_command([sys.executable, "videollava_finetune.py", *same, f"DEEPSPEED={ZERO3}",
                             f"OUTPUT_DIR={tmp_path / 'zero3'}"])
    assert deepspeed.returncode == 0, deepspeed.stderr[-3000:]
    run_script("videollava_finetune.py", *same, f"OUTPUT_DIR={tmp_path / 'plain'}")
    def weights(folder: Path) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in load_model(str(folder), "videollava").named_parameters()}

    (with_zero3,) = [p.parent for p in (tmp_path / "zero3").glob("*/model.safetensors")]
    (plain,) = [p.parent for p in (tmp_path / "plain").glob("*/model.safetensors")]
    with_zero3, plain = weights(with_zero3), weights(plain)
    base = weights(Path(resolve_model_path("tiny", "videollava")))
    assert set(with_zero3) == set(plain)
    moved = 0
    for name, weight in plain.items():
        torch.testing.assert_close(with_zero3[name], weight, rtol=0, atol=1e-5)
        moved += int((weight - base[name]).abs().max() > 1e-4)
    # the two steps changed every trained tensor of the language model and projector (25; the towers are frozen),
    # and identically with and without DeepSpeed
    assert moved == 25


# ---------------------------------------------------------------- several nodes

@pytest.mark.slow
def test_two_launchers_as_two_nodes_train_one_run(tmp_path, free_port):
    """Two torchrun launchers (one process each) meet at a c10d rendezvous on 127.0.0.1, as two machines would,
    and train one run in a shared run directory: DDP with its gradient buckets shared, fused AdamW."""
    settings = [*TINY, "MAX_STEPS=2", "LR=3e-3", "EVAL_AFTER_TRAIN=False", f"OUTPUT_DIR={tmp_path / 'runs'}",
                f"RESULTS_DIR={tmp_path / 'results'}"]
    launchers = [start_command([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                                "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port}", "--rdzv_id=nodes",
                                "videollava_finetune.py", *settings]) for _ in range(2)]
    nodes = [launcher.finish() for launcher in launchers]
    for node in nodes:
        assert node.returncode == 0, node.stderr[-3000:]
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["completed"] and record["world_size"] == 2 and record["global_step"] == 2
    assert record["engine"]["wrapper"] == "DistributedDataParallel"
    assert record["engine"]["gradient_as_bucket_view"] is True and record["engine"]["fused"] is True
    # one process printed the run (rank 0 is the one writer)
    assert sum(node.stdout.count("trainable parameters:") for node in nodes) == 1


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
