"""The embedding metrics: BERTScore F1 and sentence-embedding cosine ("sbert"), at one encoder pass per text.

Each unique text is encoded once per model, in batches of similar length, on
the chosen device. When BERTScore and sbert use the same encoder (the offline
default, all-MiniLM-L6-v2), one forward pass serves both: BERTScore reads the
token embeddings of its layer, sbert mean-pools the last layer as the
sentence-transformers pipeline does (a pipeline that pools otherwise gets its
own pass).

BERTScore here is bert-score's definition (``bert_score.score`` with
``idf=False``, no baseline rescaling): token embeddings of the chosen layer,
cosine similarity, greedy matching, [CLS]/[SEP] weighted 0 as candidates but
matchable, best reference by F1. One difference in a corner: bert-score pads
sentences within its batches and multiplies padded similarities by 0, so a
token whose similarities to every real token are negative gets 0 from the
padding in bert-score; here the maximum runs over real tokens only. Contextual
embeddings practically never have such tokens (all cosines < 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

# Texts per forward pass; the texts are sorted by token count first, so padding stays small.
ENCODE_BATCH_SIZE = 128
# Candidate-reference pairs matched per batched similarity product.
MATCH_BATCH_SIZE = 1024


@dataclass(frozen=True)
class Encoder:
    """A loaded transformer and its tokenizer on one device; ``max_length`` is bert-score's truncation."""

    name: str
    model: object
    tokenizer: object
    device: object
    max_length: int


@dataclass
class TokenEmbeddings:
    """Every text's token embeddings (unit length), concatenated; text k owns rows offsets[k]:offsets[k]+lengths[k]."""

    flat: object  # torch.Tensor [tokens, dim]
    offsets: object  # torch.LongTensor [texts]
    lengths: object  # torch.LongTensor [texts]
    weights: object  # torch.Tensor [tokens]: 0 for [CLS]/[SEP], 1 otherwise (bert-score without IDF)


def unique_texts(*groups: Sequence[str]) -> tuple[list[str], dict[str, int]]:
    """The distinct texts of all groups, in first-seen order, and each one's index."""
    index: dict[str, int] = {}
    for group in groups:
        for text in group:
            index.setdefault(text, len(index))
    return list(index), index


@lru_cache(maxsize=4)
def load_encoder(name: str, device: str) -> Encoder:
    """A transformer encoder (``AutoModel``, fp32, eval mode) on ``device``; cached per (name, device)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name)
    model = AutoModel.from_pretrained(name, dtype=torch.float32).to(device).eval()
    return Encoder(name, model, tokenizer, torch.device(device), bertscore_max_length(tokenizer, model.config))


def bertscore_max_length(tokenizer, config) -> int:
    """bert-score cuts texts at the tokenizer's ``model_max_length``; never beyond the model's positions."""
    return min(int(tokenizer.model_max_length), int(getattr(config, "max_position_embeddings", 512)))


def length_sorted_batches(encoder: Encoder, texts: Sequence[str], max_length: int | None = None) -> list[tuple[list[int], dict]]:
    """Tokenised batches of ``texts`` (stripped, as bert-score and sentence-transformers do), shortest first.

    Returns (indices into ``texts``, tokenizer output on the device) per batch.
    """
    max_length = max_length or encoder.max_length
    stripped = [t.strip() for t in texts]
    lengths = [len(ids) for ids in encoder.tokenizer(stripped, truncation=True, max_length=max_length)["input_ids"]]
    order = sorted(range(len(texts)), key=lengths.__getitem__)
    batches = []
    for start in range(0, len(order), ENCODE_BATCH_SIZE):
        chosen = order[start:start + ENCODE_BATCH_SIZE]
        inputs = encoder.tokenizer([stripped[i] for i in chosen], padding=True, truncation=True,
                                   max_length=max_length, return_tensors="pt")
        batches.append((chosen, {k: v.to(encoder.device) for k, v in inputs.items()}))
    return batches


def encode(encoder: Encoder, texts: Sequence[str], layer: int | None, pooled: bool):
    """One forward pass over ``texts``: the token embeddings of ``layer`` (None: none) and the masked mean of the
    last layer (``pooled``; the sentence-transformers mean pooling). Returns (TokenEmbeddings | None, Tensor | None).
    """
    import torch

    special = torch.tensor(sorted({encoder.tokenizer.cls_token_id, encoder.tokenizer.sep_token_id} - {None}),
                           dtype=torch.long, device=encoder.device)
    rows: list = [None] * len(texts)
    means: list = [None] * len(texts)
    with torch.inference_mode():
        for chosen, inputs in length_sorted_batches(encoder, texts):
            hidden_wanted = layer is not None and layer != encoder.model.config.num_hidden_layers
            out = encoder.model(**inputs, output_hidden_states=hidden_wanted)
            last = out.last_hidden_state
            tokens = out.hidden_states[layer] if hidden_wanted else last
            mask = inputs["attention_mask"]
            if pooled:
                summed = (last * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
                for row, k in enumerate(chosen):
                    means[k] = summed[row]
            if layer is not None:
                tokens = tokens / tokens.norm(dim=-1, keepdim=True)
                # bert-score without IDF: weight 1 per token, 0 for [CLS] and [SEP]
                weights = (~torch.isin(inputs["input_ids"], special)).float()
                for row, k in enumerate(chosen):
                    n = int(mask[row].sum())
                    rows[k] = (tokens[row, :n].clone(), weights[row, :n])
    embeddings = None
    if layer is not None:
        lengths = torch.tensor([r[0].shape[0] for r in rows], dtype=torch.long)
        offsets = torch.cumsum(lengths, 0) - lengths
        embeddings = TokenEmbeddings(torch.cat([r[0] for r in rows]), offsets.to(encoder.device),
                                     lengths.to(encoder.device), torch.cat([r[1] for r in rows]))
    return embeddings, (torch.stack(means) if pooled else None)


def _gather(embeddings: TokenEmbeddings, texts):
    """[B, L, D] token embeddings, [B, L] weights and [B, L] mask of the texts with indices ``texts``."""
    import torch

    lengths = embeddings.lengths[texts]
    width = int(lengths.max())
    positions = torch.arange(width, device=lengths.device)
    mask = positions.unsqueeze(0) < lengths.unsqueeze(1)
    index = torch.where(mask, embeddings.offsets[texts].unsqueeze(1) + positions, 0)
    return embeddings.flat[index], embeddings.weights[index] * mask, mask


def bertscore_pairs(embeddings: TokenEmbeddings, candidates, references):
    """BERTScore F1 of each (candidate, reference) text-index pair (torch.LongTensors of equal length)."""
    import torch

    out = []
    with torch.inference_mode():
        for start in range(0, len(candidates), MATCH_BATCH_SIZE):
            cand, cand_w, cand_mask = _gather(embeddings, candidates[start:start + MATCH_BATCH_SIZE])
            ref, ref_w, ref_mask = _gather(embeddings, references[start:start + MATCH_BATCH_SIZE])
            sim = torch.bmm(cand, ref.transpose(1, 2))
            sim = sim.masked_fill(~(cand_mask.unsqueeze(2) & ref_mask.unsqueeze(1)), float("-inf"))
            precision_tokens = sim.max(dim=2).values.masked_fill(~cand_mask, 0.0)
            recall_tokens = sim.max(dim=1).values.masked_fill(~ref_mask, 0.0)
            precision = (precision_tokens * cand_w).sum(1) / cand_w.sum(1)
            recall = (recall_tokens * ref_w).sum(1) / ref_w.sum(1)
            f1 = 2 * precision * recall / (precision + recall)
            out.append(torch.nan_to_num(f1, nan=0.0))  # bert-score's rule: an undefined F1 is 0
    return torch.cat(out).cpu() if out else torch.zeros(0)


def best_per_sample(values, samples, count: int) -> list[float]:
    """Max of ``values`` per sample index (``samples``); samples without a value get 0."""
    import torch

    best = torch.zeros(count, dtype=values.dtype)
    best.scatter_reduce_(0, samples.cpu(), values.cpu(), reduce="amax", include_self=False)
    return best.tolist()
