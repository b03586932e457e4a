"""GeoLLaVA's table row "LLaVA-NeXT-Video, 100K QLoRA" (annotations/geollava_paper_results.csv):
QLoRA: the base quantised to 4-bit nf4, LoRA r8 alpha16, lr 2e-4;
3 epochs of batch 4 on GeoLLaVA's 100K training pairs, evaluated on its val pairs after training.
The files it expects (docs/experiments.md): data/geollava/train_100k.json, val.json, videos/.

    python video_finetune.py configs/experiments/llavanext_100k_qlora.py
    python llavanext_finetune.py configs/experiments/llavanext_100k_qlora.py      # GeoLLaVA's script name
"""
MODEL = "llavanext"
TRAIN_ANNOTATIONS = "data/geollava/train_100k.json"
VAL_ANNOTATIONS = "data/geollava/val.json"
VIDEO_DIR = "data/geollava/videos"
USE_QLORA = True
