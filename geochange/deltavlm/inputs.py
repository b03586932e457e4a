"""What DeltaVLM's modules are fed: pixels, the two tokenised prompts, and decoding back.

* images: resized to the ViT's size (224) with bicubic interpolation, scaled to 0..1 and
  normalised with CLIP's mean/std (LAVIS ``BlipImageEvalProcessor``);
* the prompt goes twice: to the Q-Former (BERT tokens, [CLS] .. [SEP], at most 128,
  cut on the left) and to the LLM (``</s>`` + the prompt's tokens, left-padded with [PAD]);
* the answer is the generated tokens up to the first ``</s>``.
"""
from __future__ import annotations

import numpy as np
import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
QFORMER_MAX_TOKENS = 128  # the released max_txt_len


def preprocess_image(image: np.ndarray, size: int) -> torch.Tensor:
    """An HxWx3 uint8 RGB array as a normalised [3, size, size] float tensor."""
    from PIL import Image

    resized = Image.fromarray(np.asarray(image, dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (pixels - mean) / std


def encode_prompts(prompts: list[str], tokenizers) -> dict[str, torch.Tensor]:
    """Q-Former ids/mask (right-padded) and LLM ids/mask (left-padded, </s> first) for a batch of prompts."""
    qformer = tokenizers.qformer(prompts, padding="longest", truncation=True, max_length=QFORMER_MAX_TOKENS,
                                 return_tensors="pt")
    llm = tokenizers.llm
    # The BOS is added by hand: how a fast tokenizer's post-processor treats a replaced BOS varies.
    rows = [[llm.bos_token_id] + llm(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), llm.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = torch.tensor(row)
        attention_mask[i, width - len(row):] = 1
    return {"qformer_input_ids": qformer["input_ids"], "qformer_attention_mask": qformer["attention_mask"],
            "input_ids": input_ids, "attention_mask": attention_mask}


def decode_answers(token_ids: torch.Tensor, tokenizer) -> list[str]:
    """Generated ids -> text, each cut at its first </s>; Vicuna's '<unk>' (id 0, no longer special once
    </s> is the UNK) counts as an end too, as the released code mapped 0 to 2."""
    ends = {tokenizer.eos_token_id}
    unk = tokenizer.convert_tokens_to_ids("<unk>") if "<unk>" in tokenizer.get_vocab() else None
    if unk is not None:
        ends.add(unk)
    answers = []
    for row in token_ids.tolist():
        cut = next((i for i, token in enumerate(row) if token in ends), len(row))
        answers.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    return answers
