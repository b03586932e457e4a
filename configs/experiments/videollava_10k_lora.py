"""GeoLLaVA's table row "Video-LLaVA, 10K LoRA" (annotations/geollava_paper_results.csv):
LoRA r8 alpha16 on the language model's Linears, lr 2e-4;
3 epochs of batch 4 on GeoLLaVA's 10K training pairs, evaluated on its val pairs after training.
The files it expects (docs/experiments.md): data/geollava/train_10k.json, val.json, videos/.

    python video_finetune.py configs/experiments/videollava_10k_lora.py
    python videollava_finetune.py configs/experiments/videollava_10k_lora.py      # GeoLLaVA's script name
"""
MODEL = "videollava"
TRAIN_ANNOTATIONS = "data/geollava/train_10k.json"
VAL_ANNOTATIONS = "data/geollava/val.json"
VIDEO_DIR = "data/geollava/videos"
