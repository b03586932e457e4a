"""What a video model family is, in one entry each: Video-LLaVA and LLaVA-NeXT-Video.

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
from .tiny import TINY_IMAGE_SIZE, VICUNA_VIDEO_CHAT_TEMPLATE, tiny_text_config, tiny_vision_config


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


@dataclass(frozen=True)
class ModelFamily:
    id: str                    # in run directories, results files, run.json and MODEL settings
    display_name: str          # in tables and plots
    model_class_name: str      # the transformers class
    default_model_id: str      # the 7B checkpoint on the Hub (the scripts' MODEL_ID=None)
    parts: ModelParts          # its vision towers, projectors, language model, by module name
    tiny_config: Callable          # tokenizer -> the offline twin's config (tiny.py's pieces)
    # (image_token_index=, video_token_index=) -> the 7B model's config, as its config.json on the Hub describes it
    real_size_config: Callable
    processor_for: Callable        # (config, tokenizer) -> the processor whose images and video tokens fit the config

    @property
    def model_class(self):
        import transformers

        return getattr(transformers, self.model_class_name)

    def build_tiny(self, tokenizer):
        """The offline twin: (model, processor) of the real classes at tiny size, random weights."""
        config = self.tiny_config(tokenizer)
        return self.model_class(config), self.processor_for(config, tokenizer)

    def real_size_twin(self, tokenizer):
        """(the 7B config, its processor) with the tiny twin's ``tokenizer`` (it ships offline) and its image and
        video token ids: what the GPU check builds at real size with random weights, nothing downloaded."""
        config = self.real_size_config(image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                                       video_token_index=tokenizer.convert_tokens_to_ids("<video>"))
        return config, self.processor_for(config, tokenizer)

    @property
    def adapter_renames(self) -> tuple[tuple[re.Pattern, str], ...]:
        """transformers 4 -> 5 names (after PEFT's ``base_model.model.``) of adapters saved before the move of the
        language model under ``model.language_model`` and of the vision parts under ``model.``."""
        language, head = re.escape(self.parts.language_model), re.escape(self.parts.lm_head)
        return ((re.compile(rf"^{language}\.model\."), f"model.{self.parts.language_model}."),
                (re.compile(rf"^{language}\.{head}\."), f"{self.parts.lm_head}."),
                (re.compile(rf"^({'|'.join(self.parts.vision)})\."), r"model.\1."))


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


def _videollava_7b(image_token_index: int = 32000, video_token_index: int = 32001):
    from transformers import VideoLlavaConfig

    return VideoLlavaConfig(vision_config=_clip_large(224), text_config=_llama_7b(), image_token_index=image_token_index,
                            video_token_index=video_token_index, vision_feature_layer=-2,
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
    tiny_config=_videollava_tiny, real_size_config=_videollava_7b, processor_for=_videollava_processor)


# ---------------------------------------------------------------- LLaVA-NeXT-Video

def _llavanext_7b(image_token_index: int = 32001, video_token_index: int = 32000):
    from transformers import LlavaNextVideoConfig

    return LlavaNextVideoConfig(vision_config=_clip_large(336), text_config=_llama_7b(),
                                image_token_index=image_token_index, video_token_index=video_token_index,
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
    tiny_config=_llavanext_tiny, real_size_config=_llavanext_7b, processor_for=_llavanext_processor)


FAMILIES: dict[str, ModelFamily] = {family.id: family for family in (VIDEO_LLAVA, LLAVA_NEXT_VIDEO)}


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
