"""What DeltaVLM's modules are fed: pixels, the two tokenised prompts, and decoding back.

* images: resized to the ViT's size (224) with bicubic interpolation, scaled to 0..1 and
  normalised with CLIP's mean/std (LAVIS ``BlipImageEvalProcessor``);
* the prompt goes twice: to the Q-Former (BERT tokens, [CLS] .. [SEP], at most 128,
  cut on the left) and to the LLM (``</s>`` + the prompt's tokens, left-padded with [PAD]);
* the answer is the generated tokens up to the first ``</s>``;
* training appends the answer and ``</s>`` to the prompt (right-padded) and learns only them.

``build_prompt`` lays out a question with the dialog before it, for training and answering alike.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .. import changechat_format as cc

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
QFORMER_MAX_TOKENS = 128  # the released max_txt_len
LLM_MAX_PROMPT_TOKENS = 128   # the released max_txt_len for the LLM's prompt (cut on the left)
LLM_MAX_ANSWER_TOKENS = 256   # the released max_output_txt_len (answer + </s>, cut on the right)
IGNORE_INDEX = -100           # label of every token the loss skips (queries, prompt, padding)


@dataclass(frozen=True)
class Prompting:
    """How a question becomes the prompt: DeltaVLM normalised its training text (``normalise``);
    training wrote every question as 'q: <question>' after the earlier turns (``training_format``),
    its evaluation fed the bare question. A question with history always uses the training layout."""
    normalise: bool = True
    training_format: bool = False
    max_words: int = cc.MAX_PROMPT_WORDS


def build_prompt(question: str, history: list[tuple[str, str]] | tuple, prompting: Prompting) -> str:
    """The text both the Q-Former and the LLM read for ``question`` after the dialog ``history``
    (earlier (question, answer) turns): the one layout for training and answering."""
    history = list(history)
    if not (history or prompting.training_format):
        return cc.normalise_text(question, prompting.max_words) if prompting.normalise else question
    while True:
        text = cc.dialog_prompt(history, question)
        if not prompting.normalise:
            return text
        # Training kept the first 50 words, which cuts off the question of a long dialog;
        # dropping the oldest turns instead keeps the question (and as much history as fits).
        if not history or len(cc.normalise_text(text, None).split()) <= prompting.max_words:
            return cc.normalise_text(text, prompting.max_words)
        history = history[1:]


def normalise_answer(answer: str, prompting: Prompting) -> str:
    """A training target as DeltaVLM's text processor made it (lower-case, punctuation out, 50 words)."""
    return cc.normalise_text(answer, prompting.max_words) if prompting.normalise else answer.strip()


def preprocess_image(image: np.ndarray, size: int) -> torch.Tensor:
    """An HxWx3 uint8 RGB array as a normalised [3, size, size] float tensor."""
    resized = Image.fromarray(np.asarray(image, dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (pixels - mean) / std


def _qformer_tokens(prompts: list[str], tokenizers) -> dict[str, torch.Tensor]:
    qformer = tokenizers.qformer(prompts, padding="longest", truncation=True, max_length=QFORMER_MAX_TOKENS,
                                 return_tensors="pt")
    return {"qformer_input_ids": qformer["input_ids"], "qformer_attention_mask": qformer["attention_mask"]}


def llm_prompt_ids(prompt: str, llm, max_tokens: int | None = None) -> list[int]:
    """``</s>`` + the prompt's tokens; with ``max_tokens``, the prompt is cut on the left (as released)."""
    # The BOS is added by hand: how a fast tokenizer's post-processor treats a replaced BOS varies.
    ids = llm(prompt, add_special_tokens=False)["input_ids"]
    if max_tokens is not None and len(ids) + 1 > max_tokens:
        ids = ids[len(ids) + 1 - max_tokens:]
    return [llm.bos_token_id] + ids


def encode_prompts(prompts: list[str], tokenizers) -> dict[str, torch.Tensor]:
    """Q-Former ids/mask (right-padded) and LLM ids/mask (left-padded, </s> first) for a batch of prompts."""
    llm = tokenizers.llm
    rows = [llm_prompt_ids(prompt, llm) for prompt in prompts]
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), llm.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = torch.tensor(row)
        attention_mask[i, width - len(row):] = 1
    return {**_qformer_tokens(prompts, tokenizers), "input_ids": input_ids, "attention_mask": attention_mask}


def encode_training_batch(prompts: list[str], answers: list[str], tokenizers) -> dict[str, torch.Tensor]:
    """The prompts as ``encode_prompts`` feeds them, each followed by its answer and ``</s>``; right-padded.

    ``labels`` are the answer tokens and the ``</s>``; the prompt and the padding are IGNORE_INDEX.
    """
    llm = tokenizers.llm
    rows, labels = [], []
    for prompt, answer in zip(prompts, answers, strict=True):
        prompt_ids = llm_prompt_ids(prompt, llm, LLM_MAX_PROMPT_TOKENS)
        answer_ids = (llm(answer, add_special_tokens=False)["input_ids"] + [llm.eos_token_id])
        answer_ids = answer_ids[:LLM_MAX_ANSWER_TOKENS]
        rows.append(prompt_ids + answer_ids)
        labels.append([IGNORE_INDEX] * len(prompt_ids) + answer_ids)
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), llm.pad_token_id, dtype=torch.long)
    label_ids = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, label) in enumerate(zip(rows, labels)):
        input_ids[i, :len(row)] = torch.tensor(row)
        label_ids[i, :len(row)] = torch.tensor(label)
        attention_mask[i, :len(row)] = 1
    return {**_qformer_tokens(prompts, tokenizers), "input_ids": input_ids, "attention_mask": attention_mask,
            "labels": label_ids}


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
