"""GeoLLaVA's script name, kept: video_evaluate.py (the evaluation) for LLaVA-NeXT-Video, MODEL="llavanext".
Every constant of video_evaluate.py is a setting here too (NAME=VALUE,
after an experiment file).

    python llavanext_eval.py MODEL_ID=tiny MODEL_PATH=base
"""
from video_evaluate import *  # noqa: F403 -- the one script's constants and its steps (main)

MODEL = "llavanext"

if __name__ == "__main__":
    main(globals())  # noqa: F405
