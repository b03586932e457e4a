"""Evaluate a video LLM (Video-LLaVA, LLaVA-NeXT-Video or Qwen2.5-VL: MODEL; base or fine-tuned) on before/after pairs.

Greedy, batched generation (left padding, prompts sorted by length), only the new tokens decoded. Each finished batch
is appended to results/<run>.jsonl, so a rerun resumes where it stopped. Writes results/<run>.metrics.json and a
per-sample results/<run>.csv (the steps in ``main``, functions of geochange/video_llm/evaluation.py). Only one process
writes a results file at a time; under torchrun every process answers its share of the samples (one per GPU) and
rank 0 writes them all to that one file and scores once. GeoLLaVA's script names (videollava_test.py,
llavanext_eval.py) run this with their MODEL.

    python video_evaluate.py MODEL_ID=tiny MODEL_PATH=base
    python video_evaluate.py MODEL_PATH=runs/<run directory>     # MODEL: the run's family
    torchrun --nproc_per_node 8 video_evaluate.py MODEL=llavanext MODEL_PATH=runs/<run directory>   # 8 GPUs
"""
MODEL = "videollava"        # the family: "videollava" (Video-LLaVA), "llavanext" (LLaVA-NeXT-Video), "qwen25vl"
MODEL_ID = None             # the base model: None = the family's 7B model on the Hub; an id, a folder, or "tiny"
MODEL_PATH = "base"         # a fine-tuning run directory, or "base" for the untuned MODEL_ID
VAL_ANNOTATIONS = "annotations/sample_val.json"
SPLIT = "test"              # a file naming splits (converted LEVIR-CC): only this split (None = all records)
VIDEO_DIR = None            # None = the bundled sample videos (generated on first use)
NUM_FRAMES = 2
SKIP_BAD_CLIPS = False      # every clip is opened first: False = stop, listing the bad ones; True = leave their
                            # records out (counted in the metrics file)
BATCH_SIZE = 8
MAX_NEW_TOKENS = 350        # GeoLLaVA's evaluation generated up to 350 new tokens (greedy, stops at EOS)
LOAD_IN_4BIT = False        # load the base in 4-bit nf4 (QLoRA runs always load as they were trained)
DEVICE = "auto"             # "auto" = the GPU if there is one, else the CPU; or "cuda:1", "cpu"
RESULTS_DIR = "results"
LIMIT = None                # evaluate only the first N samples (None = all)
RUN_NAME = None             # results file name (None = the run directory's name, or <model>_base)
OVERWRITE = False           # True = discard this results file's earlier answers (else they resume, if the same
                            # model, weights, generation settings and test set wrote them; any other mix is refused)
SBERT_MODEL = "sentence-transformers/bert-base-nli-mean-tokens"  # sbert = the paper's "BERT" column (offline: MiniLM stands in)
DIST_TIMEOUT_MINUTES = 60   # under torchrun: how long a process waits for the slowest at a collective


def main(scope: dict) -> None:
    """The steps, on the constants in ``scope`` (this file's, or a GeoLLaVA-named script's with its MODEL)."""
    from geochange.video_llm import evaluation
    from geochange.video_llm.families import load_video_settings

    cfg = load_video_settings(scope)  # MODEL_ID=None: the family's model
    # 1. under torchrun, this process's share of the work (each answers its share on its own GPU; left at the end,
    #    every process done); the settings and the device, checked before minutes of model loading
    with evaluation.join_shards(cfg) as shard:
        device = evaluation.check_settings(cfg, shard)
        # 2. the test pairs, every clip checked (by rank 0, once)
        samples = evaluation.load_test_samples(cfg, shard)
        # 3. the results file: one writer (rank 0); earlier answers resume only under the same model, weights,
        #    generation, test set
        with evaluation.open_results(cfg, family=cfg.MODEL, shard=shard) as results:
            # 4. greedy answers for the samples not yet there, in batches, every batch of every process appended as
            #    it finishes
            evaluation.answer_samples(results, samples, device)
            # 5. scores (once, rank 0): results/<run>.metrics.json and the per-sample results/<run>.csv
            evaluation.score_results(results, samples)


if __name__ == "__main__":
    main(globals())
