"""The video LLMs (Video-LLaVA, LLaVA-NeXT-Video): a before/after pair as a 2-frame clip, fine-tuned and evaluated.

    families.py    what each family is, in one entry (classes, ids, vision parts, tiny twin, 7B shapes)
    tiny.py        the pieces the tiny twins are built from, and building one once
    modeling.py    loading (quantised or not), parts and Linears, prompts, the answer-only encoding
    pruning.py     magnitude / attention-head / channel pruning of the full-precision weights
    weights.py     a run's weights: its (pruned) base, loading it back, merging, fingerprints
    evaluation.py  the steps of the evaluation scripts (batched greedy answers with resume, scores)
    finetune.py    the steps of the fine-tuning scripts
"""
