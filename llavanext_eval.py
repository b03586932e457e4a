"""LLaVA-NeXT-Video's evaluation under GeoLLaVA's script name: video_evaluate.py with MODEL="llavanext";
every constant of it is a setting here too (python llavanext_eval.py MODEL_ID=tiny MODEL_PATH=base;
an experiment file first, as there)."""
from video_evaluate import *  # noqa: F403 -- the one script's constants and its steps (main)

MODEL = "llavanext"
if __name__ == "__main__":
    main(globals())  # noqa: F405
