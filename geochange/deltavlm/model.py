"""DeltaVLM's modules, assembled from transformers' InstructBLIP parts.

    before, after --EVA ViT-g/14 (shared weights) + ln_vision--> F_A, F_B      [b, 257, 1408] each
    F_A, F_B --CSRM--> E_A, E_B --concat tokens--> image tokens                [b, 514, 1408]
    (32 query tokens + instruction) --Q-Former, cross-attending to the image tokens--> [b, 32, 768]
    --language_projection--> [b, 32, 4096], prepended to the prompt's embeddings --> Vicuna-7B generates

Names follow transformers' InstructBLIP (``vision_model``, ``qformer``, ``query_tokens``,
``language_projection``), so the frozen vision tower loads from an InstructBLIP
checkpoint as is; ``checkpoint.py`` maps DeltaVLM's LAVIS names onto them.
"""
from __future__ import annotations

import torch
from torch import nn

# LAVIS's ln_vision is a plain nn.LayerNorm (eps 1e-5); transformers' post_layernorm, which
# holds the same weights in an InstructBLIP checkpoint, defaults to the ViT's eps 1e-6.
LN_VISION_EPS = 1e-5
# The CSRM's dropout (active in training only; the released generate runs in eval mode).
CSRM_DROPOUT = 0.5


class CSRM(nn.Module):
    """Cross-semantic relation measuring: each image's features, filtered by the difference.

    With ``d = F_B - F_A`` and, for each ``X`` in ``(F_A, F_B)``:
    ``c = tanh(context1(d) + context2(X))``, ``g = sigmoid(gate1(d) + gate2(X))``,
    ``X' = g * c`` and ``E_X = context3([X, d, X'])``; the image tokens are ``[E_A; E_B]``.
    The weights are shared between the two images, as in DeltaVLM's ``generate``.
    """

    def __init__(self, width: int):
        super().__init__()
        self.context1 = nn.Linear(width, width, bias=False)
        self.context2 = nn.Linear(width, width)
        self.gate1 = nn.Linear(width, width, bias=False)
        self.gate2 = nn.Linear(width, width)
        self.context3 = nn.Linear(3 * width, width)
        self.dropout = nn.Dropout(CSRM_DROPOUT)

    def enhance(self, features: torch.Tensor, difference: torch.Tensor) -> torch.Tensor:
        context = self.dropout(torch.tanh(self.context1(difference) + self.context2(features)))
        gate = self.dropout(torch.sigmoid(self.gate1(difference) + self.gate2(features)))
        return self.context3(torch.cat([features, difference, gate * context], dim=-1))

    def forward(self, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        difference = after - before
        return torch.cat([self.enhance(before, difference), self.enhance(after, difference)], dim=1)


class DeltaVLM(nn.Module):
    """The vision side of DeltaVLM plus the frozen LLM (attached as ``language_model``).

    ``use_csrm`` picks the image tokens: True = the CSRM (the released ``generate``),
    False = the two feature maps side by side (the released training ``forward``).
    """

    def __init__(self, vision_config, qformer_config, num_query_tokens: int, llm_hidden_size: int,
                 *, use_csrm: bool = True):
        super().__init__()
        from transformers.models.instructblip.modeling_instructblip import (InstructBlipQFormerModel,
                                                                            InstructBlipVisionModel)

        self.vision_model = InstructBlipVisionModel(vision_config)
        self.vision_model.post_layernorm.eps = LN_VISION_EPS
        self.query_tokens = nn.Parameter(torch.zeros(1, num_query_tokens, qformer_config.hidden_size))
        self.qformer = InstructBlipQFormerModel(qformer_config)
        self.language_projection = nn.Linear(qformer_config.hidden_size, llm_hidden_size)
        self.csrm = CSRM(vision_config.hidden_size)
        self.use_csrm = use_csrm
        self.language_model = None  # a causal LM, attached by the loader (frozen)

    @property
    def vision_width(self) -> int:
        return self.vision_model.config.hidden_size

    @property
    def image_size(self) -> int:
        size = self.vision_model.config.image_size
        return size if isinstance(size, int) else size[0]

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """ln_vision(ViT(images)): [b, patches + 1, width] (post_layernorm is LAVIS's ln_vision)."""
        return self.vision_model(pixel_values=pixel_values).last_hidden_state

    def image_tokens(self, pixels_before: torch.Tensor, pixels_after: torch.Tensor) -> torch.Tensor:
        """The tokens the Q-Former attends to: [b, 2 * (patches + 1), width]."""
        # One pass over both images: the ViT's weights are shared between them anyway.
        features = self.image_features(torch.cat([pixels_before, pixels_after], dim=0))
        before, after = features.chunk(2, dim=0)
        if self.use_csrm:
            return self.csrm(before, after)
        return torch.cat([before, after], dim=1)

    def query_embeddings(self, pixels_before: torch.Tensor, pixels_after: torch.Tensor, qformer_input_ids: torch.Tensor,
                         qformer_attention_mask: torch.Tensor) -> torch.Tensor:
        """The instruction-guided Q-Former's query outputs in LLM width: [b, num_query_tokens, llm hidden]."""
        image_tokens = self.image_tokens(pixels_before, pixels_after)
        image_mask = torch.ones(image_tokens.shape[:-1], dtype=torch.long, device=image_tokens.device)
        queries = self.query_tokens.expand(image_tokens.shape[0], -1, -1)
        query_mask = torch.ones(queries.shape[:-1], dtype=torch.long, device=queries.device)
        output = self.qformer(input_ids=qformer_input_ids,
                              attention_mask=torch.cat([query_mask, qformer_attention_mask], dim=1),
                              query_embeds=queries, encoder_hidden_states=image_tokens,
                              encoder_attention_mask=image_mask)
        return self.language_projection(output.last_hidden_state[:, : queries.shape[1], :])

    def forward(self, pixels_before: torch.Tensor, pixels_after: torch.Tensor, qformer_input_ids: torch.Tensor,
                qformer_attention_mask: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The training loss: the LLM's next-token cross-entropy on the answer tokens (``labels`` != -100),
        with the query outputs in front of the prompt, as ``generate`` lays them out. Unlike the released
        training forward, the image tokens go through the CSRM when ``use_csrm`` (as ``generate`` does)."""
        if self.language_model is None:
            raise RuntimeError("no language model attached (the loader attaches it)")
        queries = self.query_embeddings(pixels_before, pixels_after, qformer_input_ids, qformer_attention_mask)
        prompt_embeds = self.language_model.get_input_embeddings()(input_ids)
        inputs_embeds = torch.cat([queries.to(prompt_embeds.dtype), prompt_embeds], dim=1)
        query_mask = torch.ones(queries.shape[:-1], dtype=attention_mask.dtype, device=attention_mask.device)
        query_labels = torch.full(queries.shape[:-1], -100, dtype=labels.dtype, device=labels.device)
        output = self.language_model(inputs_embeds=inputs_embeds,
                                     attention_mask=torch.cat([query_mask, attention_mask], dim=1),
                                     labels=torch.cat([query_labels, labels], dim=1), use_cache=False)
        return {"loss": output.loss}

    @torch.no_grad()
    def generate(self, pixels_before: torch.Tensor, pixels_after: torch.Tensor, qformer_input_ids: torch.Tensor,
                 qformer_attention_mask: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 **generate_kwargs) -> torch.Tensor:
        """Token ids of the answers (new tokens only): query outputs first, then the prompt, as released."""
        if self.language_model is None:
            raise RuntimeError("no language model attached (the loader attaches it)")
        use_autocast = pixels_before.device.type == "cuda"
        # DeltaVLM ran its vision side in fp32 weights under fp16 autocast on the GPU.
        with torch.autocast("cuda", dtype=torch.float16, enabled=use_autocast):
            queries = self.query_embeddings(pixels_before, pixels_after, qformer_input_ids, qformer_attention_mask)
        prompt_embeds = self.language_model.get_input_embeddings()(input_ids)
        inputs_embeds = torch.cat([queries.to(prompt_embeds.dtype), prompt_embeds], dim=1)
        query_mask = torch.ones(queries.shape[:-1], dtype=attention_mask.dtype, device=attention_mask.device)
        return self.language_model.generate(inputs_embeds=inputs_embeds,
                                            attention_mask=torch.cat([query_mask, attention_mask], dim=1),
                                            **generate_kwargs)


RELEASED_VIT_BLOCKS = 2  # DeltaVLM trained the last two EVA ViT blocks (37 and 38)


def trained_parameter_names(model: DeltaVLM, vit_blocks: int = RELEASED_VIT_BLOCKS) -> list[str]:
    """What DeltaVLM trained (and its checkpoint holds): the last ``vit_blocks`` ViT blocks, ln_vision, the whole
    Q-Former, the query tokens, the LLM projection and the CSRM. The rest comes from the base."""
    layers = model.vision_model.config.num_hidden_layers
    trained_prefixes = tuple(f"vision_model.encoder.layers.{i}." for i in range(layers - vit_blocks, layers)) + (
        "vision_model.post_layernorm.", "qformer.", "query_tokens", "language_projection.", "csrm.")
    return [name for name, _ in _own_parameters(model) if name.startswith(trained_prefixes)]


def _own_parameters(model: DeltaVLM):
    """Parameters outside the attached LLM."""
    return [(name, p) for name, p in model.named_parameters() if not name.startswith("language_model.")]


def own_parameter_shapes(model: DeltaVLM) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in _own_parameters(model)}


def full_size_configs():
    """(vision, Q-Former, num query tokens, LLM hidden) of the released DeltaVLM, without any download.

    EVA ViT-g/14 at 224 px (39 blocks, width 1408, 16 heads, MLP 6144), the BERT-base
    Q-Former with 30523 tokens (BERT + [DEC]) and cross-attention every 2nd layer on
    1408-wide image tokens, 32 queries, Vicuna-7B's width 4096.
    """
    from transformers import InstructBlipQFormerConfig, InstructBlipVisionConfig

    vision = InstructBlipVisionConfig(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39,
                                      num_attention_heads=16, image_size=224, patch_size=14, qkv_bias=True,
                                      layer_norm_eps=1e-6)
    qformer = InstructBlipQFormerConfig(vocab_size=30523, hidden_size=768, num_hidden_layers=12,
                                        num_attention_heads=12, intermediate_size=3072, cross_attention_frequency=2,
                                        encoder_hidden_size=1408)
    return vision, qformer, 32, 4096


def build_on_meta(vision_config=None, qformer_config=None, num_query_tokens: int | None = None,
                  llm_hidden_size: int | None = None, *, use_csrm: bool = True) -> DeltaVLM:
    """DeltaVLM with parameters on the meta device (no memory, no init cost); full size by default.

    Buffers are real (the Q-Former's position ids), so loading only has to supply parameters.
    """
    from accelerate import init_empty_weights

    defaults = full_size_configs()
    with init_empty_weights(include_buffers=False):
        return DeltaVLM(vision_config or defaults[0], qformer_config or defaults[1],
                        num_query_tokens or defaults[2], llm_hidden_size or defaults[3], use_csrm=use_csrm)
