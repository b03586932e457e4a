"""GeoLLaVA's table row "Video-LLaVA, 100K Pruning 5%" (annotations/geollava_paper_results.csv):
5 % of the language model's Linear weights pruned by L1 magnitude before training, then LoRA r8 alpha16, lr 2e-4;
3 epochs of batch 4 on GeoLLaVA's 100K training pairs, evaluated on its val pairs after training.
The files it expects (docs/experiments.md): data/geollava/train_100k.json, val.json, videos/.

    python video_finetune.py configs/experiments/videollava_100k_prune5.py
    python videollava_finetune.py configs/experiments/videollava_100k_prune5.py      # GeoLLaVA's script name
"""
MODEL = "videollava"
TRAIN_ANNOTATIONS = "data/geollava/train_100k.json"
VAL_ANNOTATIONS = "data/geollava/val.json"
VIDEO_DIR = "data/geollava/videos"
PRUNE = True
PRUNE_METHOD = "magnitude"
PRUNE_AMOUNT = 0.05
