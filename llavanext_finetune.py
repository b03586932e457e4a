"""GeoLLaVA's script name, kept: video_finetune.py (the fine-tuning) for LLaVA-NeXT-Video, MODEL="llavanext".
Every constant of video_finetune.py is a setting here too (NAME=VALUE,
after an experiment file).

    python llavanext_finetune.py MODEL_ID=tiny
"""
from video_finetune import *  # noqa: F403 -- the one script's constants and its steps (main)

MODEL = "llavanext"

if __name__ == "__main__":
    main(globals())  # noqa: F405
