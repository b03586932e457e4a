"""DeltaVLM (Deng, Zhou & Wu, Remote Sensing 2026) inference and training, built from transformers' InstructBLIP parts.

    model.py       the modules: EVA ViT + ln_vision, the CSRM, the instruction-guided Q-Former, the LLM
    checkpoint.py  LAVIS <-> transformers key map, the released checkpoint's conversion, the CSRM-init check
    loading.py     base + checkpoint + LLM + tokenizers -> a model, with what came from where
    inputs.py      pixels, the prompt layout (training and answering), the tokenised prompts, labels, decoding
    predictor.py   answering pairs (single, chat, batch with resume)
    run.py         the steps of deltavlm_predict.py (inputs, loading, batch + scores + metrics files)
    training.py    the steps of deltavlm_finetune.py (settings, data, model, Trainer, epoch validation, the
                   released-layout checkpoint_best.pth, run.json)
    scoring.py     the ChangeChat sub-task scores (yes/no, counting, 3x3 localization)
    tiny.py        the tiny offline twin (CHECKPOINT="tiny")
"""
FAMILY_ID = "deltavlm"      # in results files, run.json and the demo's MODEL setting
DISPLAY_NAME = "DeltaVLM"   # in tables and plots
