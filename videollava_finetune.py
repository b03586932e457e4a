"""Video-LLaVA's fine-tuning under GeoLLaVA's script name: video_finetune.py with MODEL="videollava";
every constant of it is a setting here too (python videollava_finetune.py MODEL_ID=tiny;
an experiment file first, as there)."""
from video_finetune import *  # noqa: F403 -- the one script's constants and its steps (main)

MODEL = "videollava"
if __name__ == "__main__":
    main(globals())  # noqa: F405
