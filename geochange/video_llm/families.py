"""What a video model family is, in one entry each: Video-LLaVA, LLaVA-NeXT-Video and Qwen2.5-VL.

Everything else reads these entries (loading, quantisation skips, LoRA targets, pruning parts, adapter renames,
the tiny twins, the 7B shapes of the memory check and the GPU check, the scripts' MODEL, the results notebook, the
tests); nothing else lists the families, and a family costs no script (video_finetune.py, video_evaluate.py take it). Adding one: docs/add_a_model_family.md.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Callable

from ..errors import UserError
from ..overrides import load_settings
from .tiny import (CHATML_VIDEO_CHAT_TEMPLATE, QWEN_SPECIAL_TOKENS, TINY_IMAGE_SIZE, VICUNA_VIDEO_CHAT_TEMPLATE,
                   build_tiny_bpe_tokenizer, build_tiny_tokenizer, tiny_text_config, tiny_vision_config)


@dataclass(frozen=True)
class ModelParts:
    """What a model is made of, by module name: the name a part's module has in its parent, wherever it sits in a
    parameter's dotted path (``model.video_tower.…`` in transformers 5, ``video_tower.…`` in 4, ``base_model.model.…``
    under PEFT). Every use reads these names (freezing, quantisation, LoRA, pruning, the memory and GPU checks); a
    name that matches nothing stops the load (``check``) instead of silently freezing or quantising nothing."""
    vision_towers: tuple[str, ...]   # the image / video encoders: frozen with FREEZE_VISION
    projectors: tuple[str, ...]      # vision features -> the language model's width (trains with FREEZE_VISION); may
                                     # sit inside a tower (Qwen2.5-VL's ``merger`` inside ``visual``), or be none
    language_model: str              # the LLM: LoRA's targets, QLoRA's quantised Linears, pruning's scope
    image_only: tuple[str, ...] = ()  # modules or parameters only images reach: a video never gives them a gradient
    lm_head: str = "lm_head"         # the output head: never quantised, pruned or a LoRA target

    @property
    def vision(self) -> tuple[str, ...]:
        """The parts outside the language model: kept in full precision under QLoRA, never LoRA targets, pruned only
        with PRUNE_VISION, and renamed as a whole by transformers 5 (``ModelFamily.adapter_renames``)."""
        return self.vision_towers + self.projectors

    def part_of(self, name: str) -> str | None:
        """The part a module or parameter (its dotted name) lies in: the innermost of the named parts on its path
        (a projector inside a tower is the projector), or None (embeddings of a part-less model, stray buffers)."""
        named = {*self.vision, self.language_model, self.lm_head}
        return next((component for component in reversed(name.split(".")) if component in named), None)

    def in_tower(self, name: str) -> bool:
        return self.part_of(name) in self.vision_towers

    def in_language_model(self, name: str) -> bool:
        return self.part_of(name) == self.language_model

    def is_image_only(self, name: str) -> bool:
        return not set(self.image_only).isdisjoint(name.split("."))

    def check(self, model, what: str) -> None:
        """Every named part is in ``model`` and holds parameters, and every parameter lies in a named part or is
        image-only; otherwise one line naming what the entry gets wrong (``what``: the model, for that line)."""
        parameters = [name for name, _ in model.named_parameters(remove_duplicate=False)]  # a tied head's too
        found = {self.part_of(name) for name in parameters}
        missing = [part for part in (*self.vision, self.language_model, self.lm_head) if part not in found]
        missing += [part for part in self.image_only if not any(self.is_image_only(name) for name in parameters)]
        stray = [name for name in parameters if self.part_of(name) is None and not self.is_image_only(name)]
        if missing or stray:
            raise UserError(f"{what}: the family's parts do not fit the model"
                            + (f"; no parameter lies in {', '.join(missing)}" if missing else "")
                            + (f"; {len(stray)} parameters lie in no named part (e.g. {stray[0]})" if stray else ""))


def llava_adapter_renames(parts: ModelParts) -> tuple[tuple[re.Pattern, str], ...]:
    """transformers 4 -> 5 names of a LLaVA layout (``language_model.model.…``, ``video_tower.…``)."""
    language, head = re.escape(parts.language_model), re.escape(parts.lm_head)
    return ((re.compile(rf"^{language}\.model\."), f"model.{parts.language_model}."),
            (re.compile(rf"^{language}\.{head}\."), f"{parts.lm_head}."),
            (re.compile(rf"^{language}\."), f"model.{parts.language_model}."),  # a bare base model, as transformers
            (re.compile(rf"^({'|'.join(parts.vision)})\."), r"model.\1."))


@dataclass(frozen=True)
class ModelFamily:
    id: str                    # in run directories, results files, run.json and MODEL settings
    display_name: str          # in tables and plots
    model_class_name: str      # the transformers class
    default_model_id: str      # the 7B checkpoint on the Hub (the scripts' MODEL_ID=None)
    parts: ModelParts          # its vision towers, projectors, language model, by module name
    tiny_tokenizer: Callable       # () -> the offline twin's tokenizer (tiny.py's builders)
    tiny_config: Callable          # tokenizer -> the offline twin's config (tiny.py's pieces)
    # tokenizer or None -> the 7B model's config, as its config.json on the Hub describes it (None: the Hub's token
    # ids; a tokenizer: its image and video token ids)
    real_size_config: Callable
    processor_for: Callable        # (config, tokenizer) -> the processor whose images and video tokens fit the config
    # (config, frames, height, width) -> how many tokens the vision tower computes over for one clip (the memory
    # check's activations, the GPU check's FLOPs); the video tokens the language model sees are the processor's
    tower_tokens: Callable
    # the side (pixels) a demo upload is brought down to before the processor sees it (config -> side)
    input_side: Callable
    # adapters saved with transformers 4: their names -> transformers 5's (after PEFT's ``base_model.model.``)
    old_adapter_renames: Callable = llava_adapter_renames

    @property
    def model_class(self):
        import transformers

        return getattr(transformers, self.model_class_name)

    def build_tiny(self, tokenizer=None):
        """The offline twin: (model, processor) of the real classes at tiny size, random weights."""
        tokenizer = tokenizer if tokenizer is not None else self.tiny_tokenizer()
        config = self.tiny_config(tokenizer)
        return self.model_class(config), self.processor_for(config, tokenizer)

    def real_size_twin(self, tokenizer=None):
        """(the 7B config, its processor) with the tiny twin's ``tokenizer`` (it ships offline) and its image and
        video token ids: what the GPU check builds at real size with random weights, nothing downloaded."""
        tokenizer = tokenizer if tokenizer is not None else self.tiny_tokenizer()
        config = self.real_size_config(tokenizer)
        return config, self.processor_for(config, tokenizer)

    @property
    def adapter_renames(self) -> tuple[tuple[re.Pattern, str], ...]:
        """transformers 4 -> 5 names (after PEFT's ``base_model.model.``) of adapters saved before the move of the
        language model under ``model.language_model`` and of the vision parts under ``model.``."""
        return self.old_adapter_renames(self.parts)


# ---------------------------------------------------------------- the 7B shapes (no download)

def _llama_7b():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)


def _clip_large(image_size: int):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=image_size, patch_size=14, projection_dim=768, hidden_act="quick_gelu")


# ---------------------------------------------------------------- Video-LLaVA

def resize_to(config) -> dict:
    """The processors' resize and crop to the vision tower's input."""
    side = config.vision_config.image_size
    return {"size": {"shortest_edge": side}, "crop_size": {"height": side, "width": side}}


def _llava_token_ids(tokenizer, image: int, video: int) -> dict:
    """The ``<image>`` / ``<video>`` token ids of ``tokenizer``, or the Hub checkpoint's (``image``, ``video``)."""
    if tokenizer is not None:
        image, video = tokenizer.convert_tokens_to_ids("<image>"), tokenizer.convert_tokens_to_ids("<video>")
    return {"image_token_index": image, "video_token_index": video}


def _clip_tower_tokens(config, frames: int, height: int, width: int) -> int:
    """A CLIP tower sees every frame cropped to its input: its patches and CLS, whatever the clip's size."""
    vision = config.vision_config
    return frames * ((vision.image_size // vision.patch_size) ** 2 + 1)


def _clip_input_side(config) -> int:
    return config.vision_config.image_size


def _videollava_7b(tokenizer=None):
    from transformers import VideoLlavaConfig

    return VideoLlavaConfig(vision_config=_clip_large(224), text_config=_llama_7b(),
                            **_llava_token_ids(tokenizer, 32000, 32001), vision_feature_layer=-2,
                            vision_feature_select_strategy="default", projector_hidden_act="gelu")


def _videollava_tiny(tokenizer):
    from transformers import VideoLlavaConfig

    return VideoLlavaConfig(
        vision_config=tiny_vision_config(), text_config=tiny_text_config(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )


def _videollava_processor(config, tokenizer):
    from transformers import VideoLlavaImageProcessor, VideoLlavaProcessor, VideoLlavaVideoProcessor

    return VideoLlavaProcessor(
        image_processor=VideoLlavaImageProcessor(**resize_to(config)),
        video_processor=VideoLlavaVideoProcessor(**resize_to(config)),
        tokenizer=tokenizer, patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1, chat_template=VICUNA_VIDEO_CHAT_TEMPLATE,
    )


VIDEO_LLAVA = ModelFamily(
    id="videollava", display_name="Video-LLaVA", model_class_name="VideoLlavaForConditionalGeneration",
    default_model_id="LanguageBind/Video-LLaVA-7B-hf",
    parts=ModelParts(vision_towers=("video_tower", "image_tower"), projectors=("multi_modal_projector",),
                     language_model="language_model", image_only=("image_tower",)),
    tiny_tokenizer=build_tiny_tokenizer, tiny_config=_videollava_tiny, real_size_config=_videollava_7b,
    processor_for=_videollava_processor, tower_tokens=_clip_tower_tokens, input_side=_clip_input_side)


# ---------------------------------------------------------------- LLaVA-NeXT-Video

def _llavanext_7b(tokenizer=None):
    from transformers import LlavaNextVideoConfig

    return LlavaNextVideoConfig(vision_config=_clip_large(336), text_config=_llama_7b(),
                                **_llava_token_ids(tokenizer, 32001, 32000),
                                vision_feature_layer=-2, vision_feature_select_strategy="default",
                                spatial_pool_mode="average", spatial_pool_stride=2,
                                image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])


def _llavanext_tiny(tokenizer):
    from transformers import LlavaNextVideoConfig

    grid = [[TINY_IMAGE_SIZE, TINY_IMAGE_SIZE], [TINY_IMAGE_SIZE, 2 * TINY_IMAGE_SIZE], [2 * TINY_IMAGE_SIZE, TINY_IMAGE_SIZE]]
    return LlavaNextVideoConfig(
        vision_config=tiny_vision_config(), text_config=tiny_text_config(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_grid_pinpoints=grid, spatial_pool_mode="average", spatial_pool_stride=2,
    )


def _llavanext_processor(config, tokenizer):
    from transformers import LlavaNextImageProcessor, LlavaNextVideoProcessor, LlavaNextVideoVideoProcessor

    return LlavaNextVideoProcessor(
        video_processor=LlavaNextVideoVideoProcessor(**resize_to(config)),
        image_processor=LlavaNextImageProcessor(image_grid_pinpoints=config.image_grid_pinpoints, **resize_to(config)),
        tokenizer=tokenizer, patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        chat_template=VICUNA_VIDEO_CHAT_TEMPLATE,
    )


LLAVA_NEXT_VIDEO = ModelFamily(
    id="llavanext", display_name="LLaVA-NeXT-Video", model_class_name="LlavaNextVideoForConditionalGeneration",
    default_model_id="llava-hf/LLaVA-NeXT-Video-7B-hf",
    # (its vision_resampler pools without weights: nothing to name)
    parts=ModelParts(vision_towers=("vision_tower",), projectors=("multi_modal_projector",),
                     language_model="language_model", image_only=("image_newline",)),
    tiny_tokenizer=build_tiny_tokenizer, tiny_config=_llavanext_tiny, real_size_config=_llavanext_7b,
    processor_for=_llavanext_processor, tower_tokens=_clip_tower_tokens, input_side=_clip_input_side)


# ---------------------------------------------------------------- Qwen2.5-VL

# Qwen2.5-VL-7B-Instruct's preprocessor_config.json (which transformers' video processor also reads when a checkpoint
# has no video_preprocessor_config.json): each frame is resized to a multiple of 28 pixels a side, its area kept
# between these. The processor classes' own defaults differ (100352..602112): a processor built without them would
# blow a 64 x 64 clip up to ~100k pixels.
QWEN_MIN_PIXELS = 4 * 28 * 28      # 3136
QWEN_MAX_PIXELS = 16384 * 28 * 28  # 12845056
# The demo brings uploads down to this side: a 448 x 448 pair is 256 video tokens (a 3000 x 3000 one would be ~11k).
QWEN_DEMO_SIDE = 448


def _qwen_token_ids(tokenizer) -> dict:
    """The image, video and vision start/end token ids of ``tokenizer``, or the Hub checkpoint's."""
    if tokenizer is None:
        return {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
                "vision_end_token_id": 151653}
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    return {"image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
            "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"]}


def _qwen25vl_7b(tokenizer=None):
    """Qwen/Qwen2.5-VL-7B-Instruct's config.json shapes (8.29 B parameters), as the checkpoint publishes them."""
    from transformers import Qwen2_5_VLConfig

    text = dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, hidden_act="silu", max_position_embeddings=128000, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        use_sliding_window=False, sliding_window=32768, max_window_layers=28,
        bos_token_id=151643, eos_token_id=151645, initializer_range=0.02)
    vision = dict(
        depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, hidden_act="silu",
        patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, in_channels=3)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                            **_qwen_token_ids(tokenizer))


def _qwen25vl_tiny(tokenizer):
    """The 7B's structure at tiny size: grouped-query attention (4 query, 2 key/value heads), M-RoPE in the 7B's
    proportions, window attention with a last full-attention block, the 7B's patch / merge / temporal patch (so a
    clip becomes exactly as many video tokens as for the 7B). Every Linear is at least 64 wide (bitsandbytes)."""
    from transformers import Qwen2_5_VLConfig

    ids = _qwen_token_ids(tokenizer)
    text = dict(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
        # head_dim 32: M-RoPE's sections are halves of it in the 7B's proportions 16:24:24 of 64
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]},
        bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.2)  # as tiny_text_config: lm_head needs room to separate tokens at this width
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128, patch_size=14,
                  temporal_patch_size=2, spatial_merge_size=2, window_size=112, fullatt_block_indexes=[1],
                  tokens_per_second=2)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)


def _qwen25vl_processor(config, tokenizer):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    vision = config.vision_config
    shapes = dict(patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
                  merge_size=vision.spatial_merge_size, min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS)
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**shapes),
        # stated (transformers 5's behaviour) so that it does not warn on every call
        video_processor=Qwen2VLVideoProcessor(**shapes, cap_pixels_per_frame=False),
        tokenizer=tokenizer, chat_template=CHATML_VIDEO_CHAT_TEMPLATE)


def _qwen25vl_tower_tokens(config, frames: int, height: int, width: int) -> int:
    """Qwen's tower reads the clip at its own size: each side resized to a multiple of patch x merge, the area kept
    within the pixel limits; one token per patch of ``temporal_patch_size`` frames."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    vision = config.vision_config
    resized_h, resized_w = smart_resize(height, width, factor=vision.patch_size * vision.spatial_merge_size,
                                        min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS)
    groups = -(-frames // vision.temporal_patch_size)
    return groups * (resized_h // vision.patch_size) * (resized_w // vision.patch_size)


QWEN25_VL = ModelFamily(
    id="qwen25vl", display_name="Qwen2.5-VL", model_class_name="Qwen2_5_VLForConditionalGeneration",
    default_model_id="Qwen/Qwen2.5-VL-7B-Instruct",
    # its merger (the projector) sits inside the vision model: the innermost named part wins, so FREEZE_VISION
    # freezes the patch embedding and blocks and the merger trains, as LLaVA's projector does
    parts=ModelParts(vision_towers=("visual",), projectors=("merger",), language_model="language_model"),
    tiny_tokenizer=build_tiny_bpe_tokenizer, tiny_config=_qwen25vl_tiny, real_size_config=_qwen25vl_7b,
    processor_for=_qwen25vl_processor, tower_tokens=_qwen25vl_tower_tokens, input_side=lambda config: QWEN_DEMO_SIDE,
    # before transformers 5: ``model.layers.…`` and ``visual.…`` at the top
    old_adapter_renames=lambda parts: ((re.compile(r"^model\.(?!language_model\.|visual\.)"), "model.language_model."),
                                       (re.compile(r"^visual\."), "model.visual.")))


FAMILIES: dict[str, ModelFamily] = {family.id: family for family in (VIDEO_LLAVA, LLAVA_NEXT_VIDEO, QWEN25_VL)}


def get_family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise UserError(f"unknown model family {name!r}; expected one of {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def load_video_settings(scope: dict):
    """A video script's settings (``overrides.load_settings``: an experiment file, then NAME=VALUE, over the
    constants in ``scope``), ``MODEL_ID=None`` made the family's 7B checkpoint (``resolve_model_id``)."""
    return resolve_model_id(load_settings(scope))


def resolve_model_id(cfg):
    """A video script's settings with ``MODEL_ID=None`` made the ``MODEL`` family's 7B checkpoint (an unknown
    ``MODEL`` stops in one line naming the families)."""
    family = get_family(cfg.MODEL)
    return cfg if cfg.MODEL_ID is not None else dataclasses.replace(cfg, MODEL_ID=family.default_model_id)
