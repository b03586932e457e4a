"""DeltaVLM's released training recipe (hanlinwu/DeltaVLM, LAVIS): ChangeChat's instructions, validated on LEVIR-CC's
val captions, InstructBLIP-Vicuna-7B plus a fresh CSRM, AdamW (the released loop) at lr 1e-5, wd 0.05, 1,000 warm-up
steps then cosine down to min_lr 1e-6 (LAVIS's linear_warmup_cosine_lr), batch 12, 50 epochs, fp16 autocast, best
checkpoint by BLEU-4, 4 loader workers. The CSRM stays in the training pass (the released code's fault fixed).

    python deltavlm_finetune.py configs/experiments/deltavlm_released.py
    torchrun --nproc_per_node=4 deltavlm_finetune.py configs/experiments/deltavlm_released.py BATCH_SIZE=3
"""
TRAIN_ANNOTATIONS = "data/changechat/annotations/train.json"
VAL_ANNOTATIONS = "data/levir-cc/LevirCCcaptions.json"
VAL_SPLIT = "val"
IMAGE_ROOT = "data/levir-cc/images"
LR = 1e-5
WARMUP_STEPS = 1000
EPOCHS = 50
LR_SCHEDULER = "cosine_with_min_lr"
LR_SCHEDULER_KWARGS = {"min_lr": 1e-6}
OPTIM = "adamw_torch"
WEIGHT_DECAY = 0.05
MAX_GRAD_NORM = 1.0
BATCH_SIZE = 12
PRECISION = "fp16"
BEST_METRIC = "bleu4"
NUM_WORKERS = 4
