"""GeoLLaVA's table row "LLaVA-NeXT-Video, 10K LoRA" (annotations/geollava_paper_results.csv):
LoRA r8 alpha16 on the language model's Linears, lr 2e-4;
3 epochs of batch 4 on GeoLLaVA's 10K training pairs, evaluated on its val pairs after training.
The files it expects (docs/experiments.md): data/geollava/train_10k.json, val.json, videos/.

    python video_finetune.py configs/experiments/llavanext_10k_lora.py
    python llavanext_finetune.py configs/experiments/llavanext_10k_lora.py      # GeoLLaVA's script name
"""
MODEL = "llavanext"
TRAIN_ANNOTATIONS = "data/geollava/train_10k.json"
VAL_ANNOTATIONS = "data/geollava/val.json"
VIDEO_DIR = "data/geollava/videos"
