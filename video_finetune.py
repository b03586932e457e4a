"""Fine-tune a video LLM (Video-LLaVA, LLaVA-NeXT-Video or Qwen2.5-VL: MODEL) to describe what changed between two satellite
images.

GeoLLaVA's recipe, done right: the steps in ``main``, each a function of geochange/video_llm/finetune.py. Prompts come
from the processor's chat template, the loss falls on the answer only, the sequence is never cut inside the expanded
video tokens; pruning acts on the full-precision weights before QLoRA quantises them; a rerun resumes from the newest
checkpoint. GeoLLaVA's script names (videollava_finetune.py, llavanext_finetune.py) run this with their MODEL.

    python video_finetune.py MODEL_ID=tiny                       # offline tiny Video-LLaVA, bundled sample data
    python video_finetune.py MODEL=llavanext USE_QLORA=True      # the real 7B LLaVA-NeXT-Video on a GPU
    python video_finetune.py configs/experiments/videollava_10k_lora.py   # a row of GeoLLaVA's table
Multi-GPU: torchrun --nproc_per_node N video_finetune.py ... (or accelerate launch video_finetune.py ...).
"""
# --- model: the family (geochange/video_llm/families.py) and its weights
MODEL = "videollava"        # "videollava" (Video-LLaVA), "llavanext" (LLaVA-NeXT-Video) or "qwen25vl" (Qwen2.5-VL)
MODEL_ID = None             # None = the family's 7B model on the Hub; a Hugging Face id, a local folder, or "tiny"
                            # (a small random model of the family, built offline)
# --- data (GeoLLaVA conversation JSON; VIDEO_DIR=None = the bundled sample videos, generated on first use)
TRAIN_ANNOTATIONS = "annotations/sample_train.json"
VAL_ANNOTATIONS = "annotations/sample_val.json"
VIDEO_DIR = None
TRAIN_SPLIT = "train"       # a file naming splits (converted LEVIR-CC): train on this split (None = all records)
VAL_SPLIT = "val"           # ... and validate / evaluate on this one
TRAIN_LIMIT = None          # use only the first N training pairs (None = all)
NUM_FRAMES = 2              # frames sampled uniformly per clip: 2 = before/after
SKIP_BAD_CLIPS = False      # every clip is opened before training: False = stop, listing the bad ones; True = leave
                            # their records out (counted in run.json)
MAX_LENGTH = 1024           # tokens per example; 2 frames expand to 514 video tokens in Video-LLaVA-7B (288 pooled in
                            # LLaVA-NeXT-Video-7B)
SHORTEN_ANSWERS = True      # an answer that does not fit is shortened (and counted); False = stop with an error
# --- what to train: QLoRA wins over LoRA; neither = full fine-tuning
USE_LORA = True
USE_QLORA = False
USE_8BIT = False            # QLoRA base in 8-bit instead of 4-bit nf4
LORA_R = 8
LORA_ALPHA = 16
LORA_DROPOUT = 0.05
FREEZE_VISION = True        # full fine-tuning: keep the vision tower frozen (the projector trains)
# --- pruning before training (full-precision weights; QLoRA quantises the pruned model)
PRUNE = False
PRUNE_METHOD = "magnitude"  # "magnitude" | "attention" | "channel"
PRUNE_AMOUNT = 0.05         # fraction of weights / heads / channels, in [0, 1)
PRUNE_VISION = False        # also prune the vision tower and projector
# --- optimisation
BATCH_SIZE = 4
GRAD_ACCUM = 1
EPOCHS = 3.0
MAX_STEPS = -1              # > 0 overrides EPOCHS
LR = None                   # None = 2e-4 for LoRA/QLoRA, 2e-5 for full (5e-3 / 1e-3 for the tiny model)
WARMUP_STEPS = 10
LR_SCHEDULER = "cosine"     # any transformers scheduler: "linear", "constant_with_warmup", "cosine_with_min_lr"...
LR_SCHEDULER_KWARGS = {}    # the scheduler's own arguments, e.g. {"min_lr": 1e-6} for "cosine_with_min_lr"
WEIGHT_DECAY = 0.0
OPTIM = "adamw_torch_fused" # any Trainer optimizer: "adamw_torch", "adafactor", "adamw_bnb_8bit"...
MAX_GRAD_NORM = 1.0         # gradient clipping (0 = none)
GRADIENT_CHECKPOINTING = True
PRECISION = "auto"          # compute: "auto" = bf16 on GPUs with it, fp16 on older GPUs, fp32 on CPU; or "bf16",
                            # "fp16", "fp32". Full fine-tuning keeps fp32 weights (master copy) whatever this says
NUM_WORKERS = None          # data-loader workers; None = the machine's cores (at most 8) on a GPU, 0 on a CPU
DEEPSPEED = None            # configs/deepspeed/zero2.json, zero3.json or zero3_offload.json (docs/gpu.md); None = DDP
MEMORY_CHECK = True         # estimate the memory per device from the config before loading; too much = stop
DIST_TIMEOUT_MINUTES = 30   # how long a process waits for the others (every engine's process group; the Trainer's 30)
SEED = 42
# --- bookkeeping
OUTPUT_DIR = "runs"
RUN_NAME = None             # the run directory's name; None = from the settings (model, data, mode, rank, length)
OVERWRITE = False           # True = delete a finished run (or one with other settings) of that name, train again
LOGGING_STEPS = 5
REPORT_TO = "tensorboard"   # where the Trainer logs: "tensorboard" (<run>/tensorboard), "wandb" or "mlflow" (when
                            # installed), "none"
SAVE_STEPS = 50             # checkpoint every N steps (the newest SAVE_TOTAL_LIMIT are kept)
SAVE_TOTAL_LIMIT = 2
EVAL_STEPS = 50             # validation every N steps (0 = never): the loss on VAL_ANNOTATIONS (and captions below)
BEST_METRIC = None          # None = validation loss only, the run ends with its last weights; a caption metric (rouge1,
                            # bleu4, cider, sbert... or sm = mean of BLEU-4, METEOR, ROUGE-L, CIDEr) = each validation
                            # also captions val pairs and scores them, and the run ends with the checkpoint that scored
                            # best (SAVE_STEPS must be a multiple of EVAL_STEPS)
VAL_GENERATE_LIMIT = None   # with BEST_METRIC: the first N val pairs are captioned (None = all), as the evaluation
                            # generates (MAX_NEW_TOKENS, EVAL_BATCH_SIZE)
MERGE_AND_SAVE = False      # also write merged full weights to <run>/merged
# --- evaluation after training, on the device this process trained on (video_evaluate.py with MODEL_PATH=<run dir>)
EVAL_AFTER_TRAIN = True
EVAL_BATCH_SIZE = 8
MAX_NEW_TOKENS = 350        # as GeoLLaVA's evaluation (greedy, stops at EOS)
RESULTS_DIR = "results"


def main(scope: dict) -> None:
    """The steps, on the constants in ``scope`` (this file's, or a GeoLLaVA-named script's with its MODEL)."""
    from geochange.video_llm import finetune
    from geochange.video_llm.families import load_video_settings
    from geochange.video_llm.modeling import load_processor

    # 1. settings (MODEL_ID=None: the family's model) checked before any model is loaded
    cfg = load_video_settings(scope)
    finetune.check_settings(cfg)
    # 2. the run directory, named from the settings: one writer, resumed only under the same settings
    with finetune.open_run(cfg, family=cfg.MODEL) as run:
        # 3. the memory it needs per device, from the config alone, against what the device has free
        finetune.check_memory(run)
        # 4. the before/after clips with their questions and answers (every clip opened once)
        train_samples, val_samples = finetune.load_samples(run)
        # 5. the processor's chat template makes the prompts; the loss falls on the answer only
        processor = load_processor(run.model_path)
        train_set, val_set = finetune.encode_samples(run, processor, train_samples, val_samples)
        # 6. pruning (PRUNE) on the full-precision weights, saved once as the base to train
        base_path = finetune.prune_base(run)
        # 7. the model: quantised for QLoRA, LoRA on every Linear of the language model (or all of it)
        model = finetune.build_model(run, base_path)
        # 8. train, resuming from the newest complete checkpoint of this run (BEST_METRIC: ending with the best one)
        trainer = finetune.train(run, model, processor, train_set, val_set)
        # 9. save the adapter (or weights), the processor and run.json (merged weights with MERGE_AND_SAVE)
        finetune.save_run(run, trainer, processor)
        del trainer, model  # the training memory is freed before evaluation
        # 10. evaluate on VAL_ANNOTATIONS (EVAL_AFTER_TRAIN), as video_evaluate.py would (every process its share)
        finetune.evaluate_run(run)


if __name__ == "__main__":
    main(globals())
