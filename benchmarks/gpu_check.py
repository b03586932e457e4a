"""GPU check: every model family at real 7B size, LoRA / QLoRA 4-bit / QLoRA 8-bit, through the suite's own code.

    python benchmarks/gpu_check.py                 # on a CUDA GPU: the 7B figures
    python benchmarks/gpu_check.py FAMILIES="('qwen25vl',)" MODES="('QLORA4',)"

The 7B models are built from configs written below (random weights, nothing downloaded) and saved
once to CHECKPOINTS_DIR, then loaded through ``load_model`` / ``build_training_model`` exactly as a
fine-tuning run loads them (quantisation, skip modules, precision, LoRA). For each family and mode it
reports, per phase (load, train, generate): where every parameter lives and its dtype, quantised
Linears per part, peak GPU memory (allocated and reserved, GiB) beside the memory check's estimate,
training step time, tokens/s, MFU (model FLOPs / time / the GPU's peak bf16 FLOP/s: for LoRA/QLoRA the
frozen weights get no weight gradient, 4·N per token; full fine-tuning 6·N; attention's T² terms; the
vision tower that runs, forward only; Video-LLaVA's image tower never runs) and greedy generation
samples/s with identical prompts. With 2+ GPUs it also times ZeRO-3 full fine-tuning steps (torchrun,
configs/deepspeed/zero3.json; the Trainer's steps after the first, as run.json records them), and the evaluation of
the first family's 7B on one GPU against all of them (torchrun: each process on its own GPU, one results file). Writes
JSON and a markdown table to OUT_DIR. Without CUDA it runs the same
code on the tiny models and says so: those figures are not GPU figures. Offline (HF_HUB_OFFLINE=1).
"""
FAMILIES = None             # the family ids to check, e.g. ('qwen25vl',); None = every family entry (families.py)
MODES = ("LORA", "QLORA4", "QLORA8")  # LoRA on a bf16 base, QLoRA on a 4-bit nf4 / 8-bit base
NUM_FRAMES = 2
CLIP_SIZE = (256, 256)      # (width, height) of the clip in each batch (Qwen2.5-VL reads a clip at its own size)
MAX_LENGTH = 1024           # tokens per training example (the video tokens plus text)
TRAIN_BATCHES = (1, 4)
TRAIN_STEPS = 3             # timed optimiser steps per batch size (after one warm-up step)
GENERATE_BATCHES = (1, 16)
NEW_TOKENS = 32             # greedy tokens per sample, forced (min_new_tokens) so every batch does equal work
OUT_DIR = "benchmarks/results"
ZERO3_STEPS = 3             # with 2+ GPUs: optimiser steps of the ZeRO-3 full fine-tuning run (torchrun, all GPUs)
SHARDED_EVAL_SAMPLES = 48   # with 2+ GPUs: sample val pairs the evaluation answers on one GPU, then on all of them
DELTAVLM = True             # also one DeltaVLM training step (the paper's setting; benchmarks/deltavlm_train_step.py
DELTAVLM_BATCH = 12         # has every setting) at InstructBLIP-Vicuna-7B shapes, and its peak memory
METRICS = True              # also where the embedding metrics (BERTScore, sbert) run: on the GPU when there is one
SCENE = True                # also the example scene (scene_changes.py): its tiles read, and answered by the 7B
SCENE_TILES = 8             # the first family's 7B with scene_changes.py's questions (NEW_TOKENS each): tiles/s of each
# Targets from issue 8, reported against (H100).
TARGET_LORA_MFU = 0.40
TARGET_QLORA4_PEAK_GB = 14.0
# Dense bf16 peak FLOP/s by GPU name (no sparsity); unknown GPUs report no MFU.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 PCIe": 756e12,
                   "H100 NVL": 835e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}

import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from contextlib import nullcontext  # noqa: E402
from pathlib import Path  # noqa: E402

_REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(_REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights: nothing to download, no Hub retries to wait for

import torch  # noqa: E402

from deltavlm_train_step import one_training_step  # noqa: E402
from geochange.devices import parameter_numel, peak_memory_gib  # noqa: E402
from geochange.fileio import atomic_write_text  # noqa: E402
from geochange.metrics import compute_metrics_report  # noqa: E402
from geochange.overrides import load_settings, make_settings, script_constants  # noqa: E402
from geochange.paths import CHECKPOINTS_DIR  # noqa: E402
from geochange.video_llm import families  # noqa: E402
from geochange.video_llm.families import get_family  # noqa: E402
from geochange.video_llm.finetune import build_training_model, device_precision  # noqa: E402
from geochange.video_llm.memory import Setup, estimate, parameter_counts  # noqa: E402
from geochange.video_llm.modeling import (VideoQACollator, count_parameters, encode_training_example,  # noqa: E402
                                          linear_counts, load_processor, plan_lengths, resolve_model_path,
                                          video_token_count)


# ---------------------------------------------------------------- the 7B models (random weights, no download)

def real_checkpoint(family: str) -> str:
    """The random 7B model saved once (bf16, about 14 GB), so that quantisation happens at load time as in a run, with
    a processor that fits it (``fit_processor``): a fine-tuning run (the ZeRO-3 step) loads the folder offline."""
    target = CHECKPOINTS_DIR / f"gpu-check-7b-{family}"
    if not (target / "config.json").exists():
        print(f"building a random 7B {family} in {target} (once)")
        config, _ = get_family(family).real_size_twin()
        with torch.device("cuda"):
            model = get_family(family).model_class(config).to(torch.bfloat16)
        model.save_pretrained(target)
        del model
        torch.cuda.empty_cache()
    if not (target / "processor_config.json").exists():
        fit_processor(family, target)
    return str(target)


def fit_processor(family: str, target: Path) -> None:
    """A processor beside the 7B model in ``target`` (which a fine-tuning run needs, and no download provides): the
    7B image size and patch, the tiny twin's tokenizer (it ships offline), and the model's config given that
    tokenizer's image and video token ids (a folder saved before had the Hub's)."""
    config, processor = get_family(family).real_size_twin()
    processor.save_pretrained(target)
    config.save_pretrained(target)  # the same shapes as the weights', with the tokenizer's token ids


# ---------------------------------------------------------------- measuring

def placement(model) -> dict[str, int]:
    """Parameter values per 'device dtype'."""
    where: Counter = Counter()
    for param in model.parameters():
        where[f"{param.device.type} {str(param.dtype).removeprefix('torch.')}"] += parameter_numel(param)
    return dict(where)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


GIB = 2 ** 30


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def batch_of(processor, batch: int, length: int, device, dtype, *, labels: bool) -> dict:
    """Identical rows of ``length`` tokens as a fine-tuning run encodes them (``encode_training_example``): the
    prompt with a zeros clip of ``CLIP_SIZE`` (its video tokens and every other processor output), then an answer
    cut to fill the row; floating outputs (the pixels) in ``dtype``."""
    import numpy as np

    width, height = CLIP_SIZE
    frames = np.zeros((NUM_FRAMES, height, width, 3), dtype=np.uint8)
    question, answer = "What changed?", " ".join(["a new road crosses the field"] * length)
    plan = plan_lengths(processor, question, answer, video_token_count(processor, NUM_FRAMES, CLIP_SIZE), length)
    example = encode_training_example(processor, frames, question, answer, plan.answer_budget)
    inputs = VideoQACollator(processor.tokenizer.pad_token_id)([example] * batch)
    if not labels:
        del inputs["labels"]
    return {key: value.to(device, dtype if value.is_floating_point() else value.dtype) for key, value in inputs.items()}


def matmul_params(model, family: str) -> tuple[int, int]:
    """(language model + lm_head, the vision tower a video runs through) weights that take part in matmuls."""
    parts = get_family(family).parts
    language, tower = 0, 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or not (isinstance(module, torch.nn.Linear) or type(module).__name__.startswith("Linear")):
            continue
        if hasattr(module, "base_layer"):  # PEFT's LoRA wrapper shows its base layer's weight: counted there
            continue
        size = parameter_numel(weight)  # a 4-bit weight's true count, not its packed bytes
        if parts.part_of(name) in (parts.language_model, parts.lm_head) and "lora_" not in name:
            language += size
        elif parts.in_tower(name) and not parts.is_image_only(name):
            tower += size
    return language, tower


def model_flops(model, family: str, mode: str, batch: int, tokens: int) -> float:
    """FLOPs of one training step, as the model computes them: the language model forward 2·N per token, backward
    2·N for the activations plus 2·N for the weight gradients only when the weights train (full fine-tuning);
    attention 4·L·T²·h forward, twice that backward; the vision tower forward only (it is frozen), over its
    frames' patches. LoRA's own small matmuls and the projector are left out."""
    config = model.config
    language, tower = matmul_params(model, family)
    per_token = (6 if mode == "FULL" else 4) * language
    text = config.text_config
    attention = 3 * 4 * text.num_hidden_layers * tokens * tokens * text.hidden_size
    patches = get_family(family).tower_tokens(config, NUM_FRAMES, CLIP_SIZE[1], CLIP_SIZE[0])
    return batch * (per_token * tokens + attention + 2 * tower * patches)


def train_figures(model, family, processor, mode, cfg, device, peak_flops) -> list[dict]:
    precision = device_precision(cfg)
    autocast = (torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision.compute])
                if precision.compute != "fp32" else nullcontext())
    if cfg.GRADIENT_CHECKPOINTING:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # as the Trainer
        model.enable_input_require_grads()
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    # the optimizer the Trainer builds from OPTIM (adamw_torch_fused): fused where the device has it
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=device.type == "cuda")
    counts = parameter_counts(model.config, family, cfg.LORA_R)
    rows = []
    for batch in TRAIN_BATCHES:
        inputs = batch_of(processor, batch, MAX_LENGTH, device, torch.float32, labels=True)
        reset_peak(device)

        def step():
            with autocast:
                loss = model(**inputs).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()  # warm-up: allocations, kernels, optimizer state
        synchronize(device)
        started = time.perf_counter()
        for _ in range(TRAIN_STEPS):
            step()
        synchronize(device)
        seconds = (time.perf_counter() - started) / TRAIN_STEPS
        tokens_per_s = batch * MAX_LENGTH / seconds
        flops = model_flops(model, family, "FULL" if mode == "FULL" else "LORA", batch, MAX_LENGTH)
        setup = Setup("QLORA" if mode.startswith("QLORA") else mode, bits={"QLORA4": 4, "QLORA8": 8}.get(mode),
                      batch_size=batch, max_length=MAX_LENGTH, checkpointing=cfg.GRADIENT_CHECKPOINTING,
                      gpu=device.type == "cuda")
        rows.append({"batch": batch, "step_s": round(seconds, 3), "tokens_per_s": round(tokens_per_s, 1),
                     "model_tflops_per_step": round(flops / 1e12, 2),
                     "mfu": round(flops / seconds / peak_flops, 3) if peak_flops else None,
                     "peak_gib": peak_memory_gib(device),
                     "memory_check_estimate_gib": round(estimate(counts, setup).total / GIB, 2)})
    return rows


@torch.inference_mode()
def generate_figures(model, processor, device) -> list[dict]:
    model.eval()
    rows = []
    for batch in GENERATE_BATCHES:
        # the prompt (its video tokens) and 32 text tokens
        inputs = batch_of(processor, batch, video_token_count(processor, NUM_FRAMES, CLIP_SIZE) + 64, device,
                          model.dtype, labels=False)
        reset_peak(device)
        synchronize(device)
        started = time.perf_counter()
        output = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=NEW_TOKENS,
                                min_new_tokens=NEW_TOKENS, pad_token_id=model.config.text_config.pad_token_id)
        synchronize(device)
        seconds = time.perf_counter() - started
        new = output[:, inputs["input_ids"].shape[1]:]
        rows.append({"batch": batch, "samples_per_s": round(batch / seconds, 2), "seconds": round(seconds, 2),
                     "identical_rows": bool((new == new[:1]).all()), "peak_gib": peak_memory_gib(device)})
    return rows


def check(family: str, mode: str, path: str, device: torch.device, peak_flops) -> dict:
    cfg = script_constants("video_finetune.py", MODEL=family, MODEL_ID=path, USE_LORA=True,
                           USE_QLORA=mode != "LORA", USE_8BIT=mode == "QLORA8", MAX_LENGTH=MAX_LENGTH,
                           NUM_FRAMES=NUM_FRAMES)
    reset_peak(device)
    started = time.perf_counter()
    model, _ = build_training_model(cfg, path, family)  # the fine-tuning recipe's own loading
    if mode == "LORA":
        model.to(device)  # as the Trainer does; quantised models were loaded onto the GPU already
    synchronize(device)
    result = {"family": family, "mode": mode, "load": {
        "seconds": round(time.perf_counter() - started, 1), "placement": placement(model),
        "quantised_linears": linear_counts(model, get_family(family).parts), "parameters": count_parameters(model)[1],
        "trainable": count_parameters(model)[0], "peak_gib": peak_memory_gib(device)}}
    processor = load_processor(path)  # the batches are encoded as a run encodes them
    result["train"] = train_figures(model, family, processor, mode, cfg, device, peak_flops)
    result["train_placement"] = placement(model)
    result["generate"] = generate_figures(model, processor, device)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def scene_figures(family: str, path: str, device: torch.device) -> dict:
    """The bundled example scene as scene_changes.py reads it (tiles/s on one core) and as the ``family`` model at
    ``path`` answers its tiles (tiles/s on ``device``): the reader must outpace the GPU, never starve it."""
    from geochange import demo
    from geochange.map_outputs import resolve_questions
    from geochange.rasters import open_pair
    from geochange.sample.geotiffs import ensure_example_scene
    from geochange.tiles import plan_tiles, read_tile

    with open_pair(*ensure_example_scene(), say=lambda line: None) as pair:
        tiles = plan_tiles(pair.grid, script_constants("scene_changes.py").TILE_SIZE, 0)
        started = time.perf_counter()
        images = [read_tile(pair, tile, 0.5) for tile in tiles]
        read_rate = len(tiles) / (time.perf_counter() - started)
    pictures = [(image.before, image.after) for image in images if image.skipped is None][:SCENE_TILES]
    chat = demo.VideoChat(family, "base", path, str(device))
    questions = resolve_questions(script_constants("scene_changes.py").QUESTIONS).values()
    chat.answer_pairs(pictures[:1], next(iter(questions)), NEW_TOKENS)  # warm-up
    synchronize(device)
    started = time.perf_counter()
    for question in questions:
        chat.answer_pairs(pictures, question, NEW_TOKENS)
    synchronize(device)
    answer_rate = len(pictures) / (time.perf_counter() - started)
    result = {"tiles": len(pictures), "read_tiles_per_s": round(read_rate, 1),
              "answered_tiles_per_s": round(answer_rate, 2), "model_device": str(chat.device),
              "peak_gib": peak_memory_gib(device)}
    del chat
    gc.collect()
    return result


def gib(peak: dict | None) -> str:
    return f"{peak['allocated']} / {peak['reserved']}" if peak else "n/a"


def markdown(report: dict) -> str:
    lines = [f"GPU check on **{report['device']}**" + ("" if report["gpu"] else
             " - NOT GPU figures: the tiny models on a CPU, proving only that the code runs"), "",
             "| family | mode | params | quantised / kept Linears (LM; vision+projector) | batch | step s | tokens/s | "
             "model TFLOP/step | MFU | train peak GiB (alloc. / reserved) | memory check GiB | gen batch | samples/s | "
             "identical | gen peak GiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["results"]:
        counts = r["load"]["quantised_linears"]
        parts = get_family(r["family"]).parts
        lm = counts.get(parts.language_model, {"quantised": 0, "kept": 0})
        vision = [c for part, c in counts.items() if part in parts.vision]
        quant = (f"{lm['quantised']}/{lm['kept']}; {sum(c['quantised'] for c in vision)}/"
                 f"{sum(c['kept'] for c in vision)}")
        for train, gen in zip(r["train"], r["generate"]):
            mfu = f"{train['mfu']:.1%}" if train["mfu"] is not None else "n/a"
            lines.append(f"| {r['family']} | {r['mode']} | {r['load']['parameters'] / 1e6:,.1f}M | {quant} | "
                         f"{train['batch']} | {train['step_s']} | {train['tokens_per_s']} | "
                         f"{train['model_tflops_per_step']} | {mfu} | {gib(train['peak_gib'])} | "
                         f"{train['memory_check_estimate_gib']} | {gen['batch']} | {gen['samples_per_s']} | "
                         f"{gen['identical_rows']} | {gib(gen['peak_gib'])} |")
    # the ZeRO-3 step, the sharded evaluation and the scene run the first family checked
    first = get_family(report["results"][0]["family"]).display_name if report["results"] else "the model"
    if report.get("zero3"):
        z = report["zero3"]
        lines += ["", f"ZeRO-3 full fine-tuning of {first} 7B on {z['gpus']} GPUs (torchrun, "
                      f"configs/deepspeed/zero3.json): " + (f"{z['step_s']:.2f} s per step (mean of {z['timed_steps']} "
                                                            f"steps after the first), peak {z['peak_gib']} GiB on rank 0"
                                                            if z.get("step_s") else z.get("error", "failed"))]
    if report.get("deltavlm"):
        d = report["deltavlm"]
        peak = f"{d['peak_gib']:.1f} GiB" if d.get("peak_gib") is not None else "n/a"
        lines += ["", f"DeltaVLM, one training step (CSRM, Vicuna frozen in {d.get('llm_dtype', '?')}, batch "
                      f"{d['batch']}): {d['step_s']:.2f} s, peak {peak}, {d['trainable']:,} trainable parameters"]
    if report.get("sharded_evaluation"):
        e = report["sharded_evaluation"]
        gpus = e["gpus"]
        lines += ["", f"Evaluation of {first} 7B, {e['samples']} pairs: " + (
            f"failed: {e['error']}" if "error" in e else
            f"{e['seconds_1']} s on 1 GPU, {e[f'seconds_{gpus}']} s on {gpus} (torchrun, x{e['speedup']}; processes "
            f"on {', '.join(e[f'devices_{gpus}'])}; {e['answers_agree']} answers agree)")]
    if report.get("metrics"):
        lines += ["", f"Embedding metrics (BERTScore, sbert) ran on: {report['metrics']['device']}"]
    if report.get("scene"):
        c = report["scene"]
        lines += ["", f"Example scene (scene_changes.py): tiles read at {c['read_tiles_per_s']}/s on one core, "
                      f"answered at {c['answered_tiles_per_s']}/s by {first} on {c['model_device']} "
                      f"({c['tiles']} tiles, 4 questions, {report['settings']['NEW_TOKENS']} tokens each)"]
    lines += ["", f"Targets (H100): LoRA MFU >= {TARGET_LORA_MFU:.0%}; QLoRA 4-bit peak <= {TARGET_QLORA4_PEAK_GB:g} GB "
              "at batch 1. MFU = model FLOPs per step / step time / peak bf16 FLOP/s (LoRA/QLoRA: 4·N per token for "
              "the frozen language model, full: 6·N; attention's T² terms; the vision tower's forward)."]
    return "\n".join(lines) + "\n"


def zero3_step(family: str, gpus: int, checkpoint: str, out_dir: Path) -> dict:
    """One ZeRO-3 full fine-tuning run of the 7B ``family`` model over every GPU (ZERO3_STEPS steps, torchrun), its time
    per step and rank 0's peak memory, as the fine-tuning script itself records them."""
    run_dir = out_dir / "zero3"
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={gpus}",
               str(_REPO / "video_finetune.py"), f"MODEL={family}", f"MODEL_ID={checkpoint}", "USE_LORA=False",
               "DEEPSPEED=configs/deepspeed/zero3.json", f"MAX_STEPS={ZERO3_STEPS}", "BATCH_SIZE=1", "EVAL_STEPS=0",
               "EVAL_AFTER_TRAIN=False", "SAVE_STEPS=100000", f"OUTPUT_DIR={run_dir}", "RUN_NAME=zero3",
               "OVERWRITE=True", "TRAIN_LIMIT=64", "LOGGING_STEPS=1"]
    done = subprocess.run(command, cwd=_REPO, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        return {"gpus": gpus, "error": done.stderr.strip().splitlines()[-1][:300] if done.stderr.strip() else "failed"}
    return {"gpus": gpus, **zero3_figures(json.loads((run_dir / "zero3" / "run.json").read_text()))}


def zero3_figures(record: dict) -> dict:
    """A run's step time as its Trainer timed the steps (StepTimer: forward, backward and update, the first step a
    warm-up left out; not the run's whole time, loading and saving included, over its steps) and rank 0's peak GPU
    memory, from its run.json."""
    engine = record.get("engine", {})
    steps = engine.get("step_seconds") or {}
    return {"step_s": steps.get("mean_after_first_s"), "timed_steps": max(0, (steps.get("steps") or 0) - 1),
            "peak_gib": engine.get("peak_memory_gib"), "engine": engine}


def sharded_evaluation(family: str, gpus: int, checkpoint: str, out_dir: Path) -> dict:
    """The family's evaluation script on its 7B (random weights) over SHARDED_EVAL_SAMPLES sample pairs, NEW_TOKENS new
    tokens each: in one process, then under torchrun on every GPU. Wall seconds of each (model loading included), the
    devices the processes generated on (each its own GPU), and how many answers of the two runs agree (bf16 greedy
    decoding over other batches may differ in a few)."""
    figures: dict = {"gpus": gpus, "samples": SHARDED_EVAL_SAMPLES}
    answers = {}
    for processes in (1, gpus):
        launcher = ([sys.executable] if processes == 1 else
                    [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}"])
        results = out_dir / f"sharded_eval_{processes}"
        started = time.time()
        done = subprocess.run([*launcher, str(_REPO / "video_evaluate.py"), f"MODEL={family}", f"MODEL_ID={checkpoint}",
                               "MODEL_PATH=base",
                               f"LIMIT={SHARDED_EVAL_SAMPLES}", f"MAX_NEW_TOKENS={NEW_TOKENS}", "OVERWRITE=True",
                               "RUN_NAME=sharded", f"RESULTS_DIR={results}"], cwd=_REPO, capture_output=True, text=True,
                              timeout=3600)
        if done.returncode != 0:
            return {**figures, "error": done.stderr.strip().splitlines()[-1][:300] if done.stderr.strip() else "failed"}
        figures[f"seconds_{processes}"] = round(time.time() - started, 1)
        figures[f"devices_{processes}"] = sorted(set(re.findall(r"generating on (cuda:\d+)", done.stdout)))
        answers[processes] = {r["id"]: r["generated"] for r in map(json.loads, (results / "sharded.jsonl").open())}
    figures["speedup"] = round(figures["seconds_1"] / figures[f"seconds_{gpus}"], 2)
    figures["answers_agree"] = sum(answers[1][key] == answers[gpus].get(key) for key in answers[1])
    return figures


if __name__ == "__main__":
    settings = load_settings(globals())
    gpu = torch.cuda.is_available()
    device = torch.device("cuda") if gpu else torch.device("cpu")
    name = torch.cuda.get_device_name(device) if gpu else "CPU (tiny models)"
    peak = next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None) if gpu else None
    if not gpu:
        print("no CUDA GPU: running the same code on the tiny models; these are NOT GPU figures")
    results = []
    checked = list(families.FAMILIES) if settings.FAMILIES is None else list(settings.FAMILIES)
    for family in checked:
        path = real_checkpoint(family) if gpu else resolve_model_path("tiny", family)
        for mode in settings.MODES:
            print(f"{family} {mode} ...", flush=True)
            results.append(check(family, mode, path, device, peak))
            print(json.dumps(results[-1]), flush=True)
    report = {"device": name, "gpu": gpu, "peak_bf16_flops": peak, "settings": settings.as_dict(), "results": results,
              "torch": torch.__version__}
    if gpu and torch.cuda.device_count() >= 2 and checked:  # the first family's, as the scene's below
        print(f"ZeRO-3 full fine-tuning step on {torch.cuda.device_count()} GPUs ...", flush=True)
        report["zero3"] = zero3_step(checked[0], torch.cuda.device_count(), real_checkpoint(checked[0]),
                                     Path(settings.OUT_DIR))
        print(f"evaluation on 1 GPU and on {torch.cuda.device_count()} GPUs ...", flush=True)
        report["sharded_evaluation"] = sharded_evaluation(checked[0], torch.cuda.device_count(),
                                                          real_checkpoint(checked[0]), Path(settings.OUT_DIR))
    if settings.DELTAVLM:
        print("DeltaVLM training step ...", flush=True)
        step = one_training_step(make_settings({"BATCH_SIZE": settings.DELTAVLM_BATCH, "PROMPT_TOKENS": 24,
                                                "ANSWER_TOKENS": 24}),
                                 use_csrm=True, gradient_checkpointing=False, lora_r=0, bits=None, real_size=gpu)
        report["deltavlm"] = {"batch": settings.DELTAVLM_BATCH, **step}
    if settings.METRICS:
        captions = ["a new road was built", "two buildings appeared near the river"]
        scored = compute_metrics_report([[c] for c in captions], captions[::-1])
        report["metrics"] = {"device": scored.device, "models": scored.models}
        if gpu and not scored.device.startswith("cuda"):
            print(f"warning: the embedding metrics ran on {scored.device}, not the GPU", flush=True)
    if settings.SCENE and checked:
        print("the example scene's tiles ...", flush=True)
        report["scene"] = scene_figures(checked[0], real_checkpoint(checked[0]) if gpu else resolve_model_path(
            "tiny", checked[0]), device)
    out = Path(settings.OUT_DIR)
    stem = "gpu_check" if gpu else "gpu_check_cpu_tiny"
    atomic_write_text(out / f"{stem}.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / f"{stem}.md", markdown(report))
    print(markdown(report))
    print(f"written: {out / (stem + '.json')}, {out / (stem + '.md')}")
