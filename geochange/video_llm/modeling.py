"""Loading a video LLM (quantised or not), its parts and Linears, prompts and the answer-only training encoding.

Every family shares one recipe: the prompt comes from the processor's own chat template (Vicuna's
``USER: <video>\\n{question} ASSISTANT:``, ChatML's ``<|im_start|>assistant\\n``), the same at training and
evaluation time; training appends the answer as the template joins it and EOS as separate tokens, so the label mask
is exact: -100 on BOS, prompt text, every expanded video token and padding, the answer ids (and EOS) everywhere else.
The processor's other outputs are kept as what they are: per token (grown over the answer, padded like
``input_ids``) or a batch of one (joined along their first dimension: LLaVA's clips stack, Qwen's patches
concatenate).
"""
from __future__ import annotations

import re
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..devices import compute_dtype, is_quantised_linear, parameter_numel, pick_device, quantization_config
from ..errors import UserError
from ..paths import local_or_hub
from .families import ModelParts, get_family
from .tiny import ensure_tiny_checkpoint

IGNORE_INDEX = -100


def resolve_model_path(model_id: str, family: str) -> str:
    """``"tiny"`` -> the offline tiny checkpoint (built on first use); anything else unchanged."""
    if model_id == "tiny":
        return str(ensure_tiny_checkpoint(get_family(family)))
    return model_id


def model_label(model_id: str, family: str) -> str:
    """A short name for run directories: 'videollava', 'llavanext-tiny', or a local folder's name."""
    if model_id == "tiny":
        return f"{family}-tiny"
    if model_id == get_family(family).default_model_id:
        return family
    return f"{family}-{Path(model_id).name}"


def quantization_skip_patterns(parts: ModelParts) -> list[str]:
    """What bitsandbytes must leave in full precision: the family's vision towers, projectors and output head.

    transformers 5 matches a skip entry only as a prefix of the full module name (as a regex) or as
    its suffix, and the real names are ``model.video_tower...``, so a bare ``video_tower`` matches
    nothing there; the regex form matches the part wherever it sits. transformers 4 matched
    substrings, which the bare names serve.
    """
    vision = "|".join(map(re.escape, parts.vision))
    return [rf"(?:.*\.)?(?:{vision})", *parts.vision, parts.lm_head]


def video_quantization_config(bits: int | None, parts: ModelParts):
    """bitsandbytes settings for QLoRA: 4-bit nf4 (double quantisation) or 8-bit; None = full precision.
    Only the language model's Linears are quantised (see ``quantization_skip_patterns``)."""
    return quantization_config(bits, quantization_skip_patterns(parts))


def load_processor(model_path: str):
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(local_or_hub(model_path))
    except OSError as exc:
        raise UserError(f"cannot load a processor from {model_path!r}: {str(exc).splitlines()[0]}") from None
    # Left padding: batched generation appends new tokens at the right end of every row.
    processor.tokenizer.padding_side = "left"
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.unk_token or processor.tokenizer.eos_token
    return processor


def load_model(model_path: str, family: str, *, bits: int | None = None, dtype: torch.dtype | None = None,
               device: torch.device | None = None):
    """The model in ``dtype`` (default: the compute dtype of ``device``), loaded straight onto ``device``.

    ``device=None`` leaves a full-precision model on the CPU (the Trainer places it) and puts a
    quantised one on the current GPU, or the CPU without one.
    """
    entry = get_family(family)
    if device is None and bits is not None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    kwargs: dict[str, Any] = {"dtype": dtype or compute_dtype(device if device is not None else pick_device("auto"))}
    if bits is not None:
        kwargs["quantization_config"] = video_quantization_config(bits, entry.parts)
    if device is not None:
        kwargs["device_map"] = {"": device}
    try:
        model = entry.model_class.from_pretrained(local_or_hub(model_path), **kwargs)
    except OSError as exc:
        raise UserError(f"cannot load a {family} model from {model_path!r}: {str(exc).splitlines()[0]}") from None
    entry.parts.check(model, f"the {family} model at {model_path}")
    return model


def linear_counts(model, parts: ModelParts) -> dict[str, dict[str, int]]:
    """Per named part, how many Linear layers bitsandbytes quantised and how many it kept (LoRA's own layers
    aside)."""
    counts: dict[str, dict[str, int]] = {}
    for name, module in model.named_modules():
        quantised = is_quantised_linear(module)
        if "lora_" in name or not (quantised or type(module) is torch.nn.Linear):
            continue
        part = counts.setdefault(parts.part_of(name) or "other", {"quantised": 0, "kept": 0})
        part["quantised" if quantised else "kept"] += 1
    return counts


def format_linear_counts(counts: dict[str, dict[str, int]], bits: int) -> str:
    return f"Linear layers quantised to {bits}-bit / kept: " + ", ".join(
        f"{part} {c['quantised']}/{c['kept']}" for part, c in counts.items())


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts, 4-bit weights counted as the values they hold."""
    trainable = sum(parameter_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(parameter_numel(p) for p in model.parameters())
    return trainable, total


def language_model_linear_names(model, parts: ModelParts) -> list[str]:
    """Every Linear (incl. bitsandbytes' quantised Linears) of the language model, not the head, towers or
    projectors."""
    return [name for name, module in model.named_modules()
            if (isinstance(module, torch.nn.Linear) or is_quantised_linear(module)) and parts.in_language_model(name)]


def video_unused_parameter_names(model, family: str) -> list[str]:
    """Parameters that a video-only forward pass never reaches, so they can get no gradient.

    The family's image-only parts (Video-LLaVA's ``image_tower``, LLaVA-NeXT's ``image_newline``) serve images
    only; in a CLIP-like tower read at ``vision_feature_layer`` the encoder layers after it and ``post_layernorm``
    (which only feeds the pooled output) are computed but never used. A tower read to its end (Qwen2.5-VL's) has no
    ``vision_feature_layer``.
    """
    parts = get_family(family).parts
    config = model.config
    feature_layers = getattr(config, "vision_feature_layer", None)
    feature_layers = feature_layers if isinstance(feature_layers, (list, tuple)) else [feature_layers]
    feature_layers = [i for i in feature_layers if i is not None]
    last_used = None
    if feature_layers:
        num_layers = config.vision_config.num_hidden_layers
        # hidden_states[i] is the output of encoder layer i-1 (hidden_states[0] the embeddings)
        last_used = max(i if i >= 0 else num_layers + 1 + i for i in feature_layers)
    unused = []
    for name, _ in model.named_parameters():
        path = name.split(".")
        if parts.is_image_only(name):
            unused.append(name)
        elif parts.in_tower(name) and last_used is not None:
            layer = next((int(path[i + 1]) for i in range(len(path) - 1) if path[i] == "layers"
                          and path[i + 1].isdigit()), None)
            if "post_layernorm" in path or (layer is not None and layer >= last_used):
                unused.append(name)
    return unused


def lora_target_regex(model, parts: ModelParts) -> str:
    """A PEFT ``target_modules`` regex matching exactly the language model's Linears."""
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in language_model_linear_names(model, parts)})
    if not suffixes:
        raise UserError(f"found no Linear layer under the language model ({parts.language_model}) to put LoRA on")
    return rf"^(?:.*\.)?{re.escape(parts.language_model)}\.(?:.*\.)?(?:{'|'.join(map(re.escape, suffixes))})$"


# ---------------------------------------------------------------- prompts and encoding

def video_prompt(processor, question: str, history: list[tuple[str, str]] | tuple = ()) -> str:
    """The generation prompt, from the processor's own chat template: the clip with the first question, then the
    earlier (question, answer) turns of ``history`` as user and assistant messages, then ``question``."""
    conversation = []
    for question_before, answer in history:
        conversation += [{"role": "user", "content": [{"type": "text", "text": question_before}]},
                         {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    conversation.append({"role": "user", "content": [{"type": "text", "text": question}]})
    conversation[0]["content"].insert(0, {"type": "video"})  # the clip once, in the first user message
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


# per processor (not stored on it: save_pretrained would write it to processor_config.json)
_VIDEO_TOKEN_COUNTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def video_token_count(processor, num_frames: int, size: tuple[int, int]) -> int:
    """How many video tokens the processor expands a clip of ``num_frames`` frames of ``size`` (width, height) into:
    asked of the processor itself, at the clip's real size (LLaVA's processors crop every clip to one size;
    Qwen2.5-VL's read it at its own, so a 1024 x 1024 pair is 17 times a 256 x 256 one)."""
    cache = _VIDEO_TOKEN_COUNTS.setdefault(processor, {})  # one zeros clip per size, not per sample
    key = (num_frames, *size)
    if key not in cache:
        width, height = size
        frames = np.zeros((num_frames, height, width, 3), dtype=np.uint8)
        encoded = processor(text=[processor.video_token], videos=[frames], return_tensors="pt")
        cache[key] = int((encoded["input_ids"][0] == processor.video_token_id).sum())
    return cache[key]


def answer_text(processor, answer: str) -> str:
    """The answer as the chat template joins it to the prompt: the text after the generation prompt of a
    [user, assistant] conversation (Vicuna: ``" a road. "``, a space first; ChatML: ``"a road.<|im_end|>\\n"``)."""
    user = [{"role": "user", "content": [{"type": "text", "text": "?"}]}]
    prompt = processor.apply_chat_template(user, add_generation_prompt=True)
    full = processor.apply_chat_template(user + [{"role": "assistant", "content": [{"type": "text",
                                                                                     "text": answer.strip()}]}])
    if not full.startswith(prompt):
        raise UserError("the processor's chat template renders an answered conversation that does not start with its "
                        "generation prompt, so where an answer joins the prompt is unknown; give the model a chat "
                        "template whose assistant turn follows add_generation_prompt's text")
    return full[len(prompt):]


def answer_token_ids(processor, answer: str) -> list[int]:
    """The answer's tokens as they follow the prompt, ending in one EOS (the template's own, or appended)."""
    tokenizer = processor.tokenizer
    ids = tokenizer(answer_text(processor, answer).rstrip(), add_special_tokens=False)["input_ids"]
    return ids if ids and ids[-1] == tokenizer.eos_token_id else ids + [tokenizer.eos_token_id]


@dataclass
class EncodedLength:
    prompt_tokens: int
    answer_tokens: int  # incl. EOS, before any shortening
    answer_budget: int  # answer tokens kept


def plan_lengths(processor, question: str, answer: str, num_video_tokens: int, max_length: int) -> EncodedLength:
    """Token counts of one example without reading its video (``num_video_tokens``: its clip's, from
    ``video_token_count`` at the clip's size); decides answer shortening up front."""
    prompt = video_prompt(processor, question).replace(processor.video_token, processor.video_token * num_video_tokens)
    prompt_tokens = len(processor.tokenizer(prompt)["input_ids"])
    answer_tokens = len(answer_token_ids(processor, answer))
    return EncodedLength(prompt_tokens, answer_tokens, max(0, min(answer_tokens, max_length - prompt_tokens)))


def encode_training_example(processor, frames: np.ndarray, question: str, answer: str,
                            answer_budget: int | None = None) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask / labels and the processor's other outputs for one (video, question, answer).

    The sequence is never cut inside the prompt (that would break the merge of the video features); only the
    answer is shortened, to ``answer_budget`` tokens. An output with one value per prompt token (Qwen's
    ``mm_token_type_ids``) grows over the answer with zeros (text); every other output stays the batch of one the
    processor returned (``VideoQACollator`` joins them along their first dimension).
    """
    prompt = video_prompt(processor, question)
    encoded = processor(text=[prompt], videos=[frames], return_tensors="pt")
    prompt_ids = encoded["input_ids"][0]
    answer_ids = torch.tensor(answer_token_ids(processor, answer), dtype=prompt_ids.dtype)
    if answer_budget is not None:
        answer_ids = answer_ids[:answer_budget]
    input_ids = torch.cat([prompt_ids, answer_ids])
    labels = torch.cat([torch.full_like(prompt_ids, IGNORE_INDEX), answer_ids])
    example = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    for key, value in encoded.items():
        if key in example:
            continue
        if value.shape == encoded["input_ids"].shape:  # one value per token: the answer's tokens are text (0)
            example[key] = torch.cat([value[0], value.new_zeros(len(answer_ids))])
        else:
            example[key] = value
    return example


class VideoQACollator:
    """Pads the per-token values of encoded examples on the right (input_ids with the pad id, labels with -100,
    the others with 0) and joins every other value along its first dimension (each example holds a batch of one:
    LLaVA's (1, frames, 3, H, W) clips stack; Qwen's patches and grids concatenate)."""

    def __init__(self, pad_token_id: int):
        self.pad_values = {"input_ids": pad_token_id, "labels": IGNORE_INDEX}

    def __call__(self, examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        longest = max(len(e["input_ids"]) for e in examples)
        batch = {}
        for key, first in examples[0].items():
            if first.shape == examples[0]["input_ids"].shape:
                value = self.pad_values.get(key, 0)
                batch[key] = torch.stack([torch.cat([e[key], e[key].new_full((longest - len(e[key]),), value)])
                                          for e in examples])
            else:
                batch[key] = torch.cat([e[key] for e in examples])
        return batch
