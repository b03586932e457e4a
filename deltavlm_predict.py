"""DeltaVLM: answer instructions about what changed between two satellite images.

DeltaVLM (Deng, Zhou & Wu, Remote Sensing 2026; github.com/hanlinwu/DeltaVLM) re-implemented
from transformers' InstructBLIP parts (geochange/deltavlm/):
  1. vision: EVA ViT-g/14 at 224 px on both images (shared weights), then LAVIS's ln_vision;
  2. difference: the CSRM turns (F_A, F_B) into E_A, E_B around d = F_B - F_A; the image
     tokens are [E_A; E_B] (USE_CSRM=False: [F_A; F_B], as the released training forward did);
  3. the instruction-guided Q-Former: 32 queries read the instruction and cross-attend to the
     image tokens; a linear layer lifts them to the LLM's width;
  4. the frozen Vicuna-7B v1.5 generates the answer after the queries and the prompt.
Weights: the frozen ViT from VISION_QFORMER_BASE (InstructBLIP-Vicuna-7B), everything DeltaVLM
trained from CHECKPOINT (its checkpoint_best.pth, LAVIS names, mapped explicitly), the LLM from
LLM_MODEL, the Q-Former's tokenizer from BERT_MODEL.

    python deltavlm_predict.py CHECKPOINT=tiny                          # offline tiny twin, a bundled pair
    python deltavlm_predict.py IMAGE_A=before.png IMAGE_B=after.png     # the real model (GPU)
    python deltavlm_predict.py IMAGE_A=a.png IMAGE_B=b.png INTERACTIVE=True
    python deltavlm_predict.py TEST_ANNOTATIONS=annotations/sample_changechat_instructions.json
    torchrun --nproc_per_node 8 deltavlm_predict.py TEST_ANNOTATIONS=...   # 8 GPUs share the batch, one results file
"""
# --- what to ask
IMAGE_A = None              # the before image (None = a bundled sample pair)
IMAGE_B = None              # the after image
PROMPT = "Please briefly describe the changes in these two images."
INTERACTIVE = False         # True = chat about the pair; each question sees the earlier turns
# --- the model: a checkpoint_best.pth (file, folder or Hugging Face repo), or "tiny" (offline twin)
CHECKPOINT = "hlwu/DeltaVLM"
VISION_QFORMER_BASE = "Salesforce/instructblip-vicuna-7b"  # supplies the frozen ViT blocks 0-36
LLM_MODEL = "lmsys/vicuna-7b-v1.5"
BERT_MODEL = "google-bert/bert-base-uncased"              # the Q-Former's tokenizer (+ [DEC])
USE_CSRM = True             # True = the released generate; False = the released training forward
LOAD_IN_8BIT = False        # the LLM in 8-bit (bitsandbytes): ~7 GB instead of ~14 GB
DEVICE = "auto"             # "auto" = the GPU if there is one
# --- prompts as DeltaVLM was trained: lower-case, .!"()*#:;~ stripped, at most 50 words
NORMALISE_PROMPT = True
TRAINING_TURN_FORMAT = False  # True = 'q: <question>' as in training; False = the bare question as its evaluation
# --- decoding: DeltaVLM's evaluation (5 beams, 256 tokens, repetition penalty 1.5);
#     its sub-task script used NUM_BEAMS=1 MAX_NEW_TOKENS=128, its config 1 beam / 30 tokens
NUM_BEAMS = 5
MAX_NEW_TOKENS = 256
MIN_NEW_TOKENS = 1
REPETITION_PENALTY = 1.5
LENGTH_PENALTY = 1.0
# --- batch mode: a ChangeChat-format file (instruction records or the 5-reference caption split)
TEST_ANNOTATIONS = None     # e.g. annotations/sample_changechat_instructions.json
IMAGE_ROOT = None           # image paths in the file are relative to it (None: the file's folder / the sample)
SPLIT = "test"              # a file naming splits (LEVIR-CC's LevirCCcaptions.json): only this one (None = all)
LIMIT = None                # only the first N records (None = all)
BATCH_SIZE = 4
RESULTS_DIR = "results"     # <run>.jsonl (resumable), <run>.metrics.json, <run>.csv
RUN_NAME = None             # None = deltavlm[-tiny][-nocsrm]_<annotation file>[_<split>]
DIST_TIMEOUT_MINUTES = 60   # under torchrun (batch mode): how long a process waits for the slowest at a collective

if __name__ == "__main__":
    from geochange.deltavlm import run as deltavlm
    from geochange.deltavlm.predictor import chat, read_pair

    # 1. the settings, checked (under torchrun: a batch); this process's share of the work (left at the end, every
    #    process done); the input, checked before minutes of model loading: a ChangeChat file (read by rank 0, once),
    #    or one pair
    cfg = deltavlm.load_checked_settings(globals())
    with deltavlm.join_shards(cfg) as shard:
        if cfg.TEST_ANNOTATIONS:
            items = deltavlm.batch_items(cfg.TEST_ANNOTATIONS, cfg.IMAGE_ROOT, cfg.LIMIT, cfg.SPLIT, shard)
        else:
            image_a, image_b = deltavlm.pair_paths(cfg.IMAGE_A, cfg.IMAGE_B)
            pair = read_pair(image_a, image_b)
        # 2. the model, on this process's device (the load report says what came from where, and whether the CSRM
        #    looks trained)
        predictor = deltavlm.load_predictor(cfg, shard)
        # 3. batch: every turn of the file, each process its share, resumable, one writer, then scores per task
        #    (once); one pair: one answer, or a chat that keeps the history in the prompt
        if cfg.TEST_ANNOTATIONS:
            deltavlm.run_batch(predictor, items, cfg, shard)
        elif cfg.INTERACTIVE:
            print(f"pair: {image_a} -> {image_b}")
            chat(predictor, pair)
        else:
            prompt = predictor.prompt(cfg.PROMPT)
            print(f"pair: {image_a} -> {image_b}\nprompt: {prompt}")
            print(f"answer: {predictor.answer([pair], [prompt])[0]}")
