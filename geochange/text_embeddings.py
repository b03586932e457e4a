"""The embedding metrics: BERTScore F1 and sentence-embedding cosine ("sbert"), at one encoder pass per text, and
their models (loaded once per process; GeoLLaVA's sbert model falls back to the offline MiniLM).

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

import sys
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from threading import Thread
from typing import Iterator, Sequence

from .errors import first_line
from .paths import local_or_hub, minilm_dir

# all-MiniLM-L6-v2 has 6 layers; BERTScore uses the last one (bert-score has no tuned layer for it).
DEFAULT_BERTSCORE_LAYERS = 6
# The GeoLLaVA paper's "BERT" column: cosine of these sentence embeddings (its Eval.ipynb).
GEOLLAVA_SBERT_MODEL = "sentence-transformers/bert-base-nli-mean-tokens"
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

    source = local_or_hub(name)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModel.from_pretrained(source, dtype=torch.float32).to(device).eval()
    return Encoder(name, model, tokenizer, torch.device(device), bertscore_max_length(tokenizer, model.config))


def bertscore_max_length(tokenizer, config) -> int:
    """bert-score cuts texts at the tokenizer's ``model_max_length``; never beyond the model's positions."""
    return min(int(tokenizer.model_max_length), int(getattr(config, "max_position_embeddings", 512)))


def length_sorted_batches(encoder: Encoder, texts: Sequence[str], max_length: int | None = None) -> list[tuple[list[int], dict]]:
    """Tokenised batches of ``texts`` (stripped, as bert-score and sentence-transformers do), shortest first.

    Returns (indices into ``texts``, the tokenizer's tensors on the device) per batch. The texts are tokenised once;
    each batch is padded here, as the tokenizer's ``padding=True`` pads (its pad id, its side, zeros elsewhere).
    """
    import torch

    max_length = max_length or encoder.max_length
    tokenizer = encoder.tokenizer
    encoded = tokenizer([t.strip() for t in texts], truncation=True, max_length=max_length)
    ids = encoded["input_ids"]
    order = sorted(range(len(texts)), key=lambda k: len(ids[k]))
    batches = []
    for start in range(0, len(order), ENCODE_BATCH_SIZE):
        chosen = order[start:start + ENCODE_BATCH_SIZE]
        width = max(len(ids[k]) for k in chosen)
        inputs = {}
        for key, values in encoded.items():
            fill = [tokenizer.pad_token_id if key == "input_ids" else 0]
            left = tokenizer.padding_side == "left"
            rows = [fill * (width - len(values[k])) + values[k] if left else values[k] + fill * (width - len(values[k]))
                    for k in chosen]
            inputs[key] = torch.tensor(rows, dtype=torch.long, device=encoder.device)
        batches.append((chosen, inputs))
    return batches


def encode(encoder: Encoder, texts: Sequence[str], layer: int | None, pooled: bool, beside: Thread | None = None):
    """One forward pass over ``texts``: the token embeddings of ``layer`` (None: none) and the masked mean of the
    last layer (``pooled``; the sentence-transformers mean pooling). Returns (TokenEmbeddings | None, Tensor | None).

    ``beside``: a thread whose work (Python, and the Java programs it waits on) shares this machine's cores with a
    pass on the CPU. While it runs, torch computes on one thread fewer: with every core's worth of torch threads, the
    one that the other work preempts holds the rest up at each parallel region, where they wait spinning (on 2
    cores the metric set's pass took ~12 s longer than alone with every thread, ~9 s with one fewer while the worker
    ran). Thread counts do not change the results.
    """
    import torch

    special = torch.tensor(sorted({encoder.tokenizer.cls_token_id, encoder.tokenizer.sep_token_id} - {None}),
                           dtype=torch.long, device=encoder.device)
    order, means, flats, lengths, weights = [], [], [], [], []  # per batch, in batch order
    threads = torch.get_num_threads()
    with torch.inference_mode(), _threads_restored(threads):
        for chosen, inputs in length_sorted_batches(encoder, texts):
            if beside is not None and encoder.device.type == "cpu" and threads > 1:
                wanted = threads - 1 if beside.is_alive() else threads
                if torch.get_num_threads() != wanted:
                    torch.set_num_threads(wanted)
            hidden_wanted = layer is not None and layer != encoder.model.config.num_hidden_layers
            out = encoder.model(**inputs, output_hidden_states=hidden_wanted)
            last = out.last_hidden_state
            mask = inputs["attention_mask"]
            order.append(torch.tensor(chosen, dtype=torch.long))
            if pooled:
                means.append((last * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1))
            if layer is not None:
                tokens = out.hidden_states[layer] if hidden_wanted else last
                real = mask.bool()
                # the real tokens of every text, text after text: boolean indexing keeps row-major order
                flats.append((tokens / tokens.norm(dim=-1, keepdim=True))[real])
                lengths.append(real.sum(1))
                # bert-score without IDF: weight 1 per token, 0 for [CLS] and [SEP]
                weights.append((~torch.isin(inputs["input_ids"], special)).float()[real])
    texts_in_batch_order = torch.cat(order) if order else torch.zeros(0, dtype=torch.long)
    embeddings = sentences = None
    if layer is not None:
        # the rows stay in batch order; each text's offset says where its rows are
        batch_lengths = torch.cat(lengths).cpu() if lengths else torch.zeros(0, dtype=torch.long)
        text_lengths = torch.zeros(len(texts), dtype=torch.long)
        text_offsets = torch.zeros(len(texts), dtype=torch.long)
        text_lengths[texts_in_batch_order] = batch_lengths
        text_offsets[texts_in_batch_order] = torch.cumsum(batch_lengths, 0) - batch_lengths
        embeddings = TokenEmbeddings(torch.cat(flats), text_offsets.to(encoder.device),
                                     text_lengths.to(encoder.device), torch.cat(weights))
    if pooled:
        batch_means = torch.cat(means)
        sentences = batch_means.new_empty((len(texts), batch_means.shape[-1]))
        sentences[texts_in_batch_order.to(batch_means.device)] = batch_means
    return embeddings, sentences


@contextmanager
def _threads_restored(threads: int) -> Iterator[None]:
    import torch

    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


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


# --------------------------------------------------------------------------- the models, loaded once

def bertscore_layers_for(model: str) -> int:
    """bert-score's tuned layer for a model it knows, else the model's last layer."""
    from bert_score.utils import model2layers

    if model in model2layers:
        return model2layers[model]
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(local_or_hub(model)).num_hidden_layers)


@lru_cache(maxsize=4)
def sentence_model(model: str, device: str):
    """A SentenceTransformer on ``device``, loaded once (a Hub id from the local cache, or after one short try of
    the Hub: never a minute of the Hub client's retries offline)."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(local_or_hub(model), device=device)


def mean_pooling_pipeline(model) -> bool:
    """Whether a SentenceTransformer is transformer -> mean pooling (-> normalise): then its sentence embedding
    (up to scale, which a cosine ignores) is the masked mean of the transformer's last layer."""
    modules = list(model)
    names = [type(m).__name__ for m in modules]
    if names[:2] != ["Transformer", "Pooling"] or names[2:] not in ([], ["Normalize"]):
        return False
    config = modules[1].get_config_dict()
    return config.get("pooling_mode") == "mean" and config.get("include_prompt", True)


def load_embedding_model(key: str, model: str | None, layers: int | None, device: str) -> tuple[str, int | None]:
    """(model, layers) after loading it once (cached); raises OSError with the reason when it cannot be loaded."""
    name = model
    try:
        if name is None:
            name = str(minilm_dir())
        with _quiet_loading():
            if key == "sbert":
                sentence_model(name, device)
                return name, None
            if layers is None:
                layers = DEFAULT_BERTSCORE_LAYERS if model is None else bertscore_layers_for(name)
            encoder = load_encoder(name, device)
            if not 1 <= layers <= encoder.model.config.num_hidden_layers:
                raise OSError(f"layer {layers} is not one of the model's 1..{encoder.model.config.num_hidden_layers}")
        return name, layers
    except ImportError as exc:
        raise OSError(f"a library is missing: {first_line(exc)}") from None
    except Exception as exc:  # offline with no local copy, no such folder, unknown architecture...
        raise OSError(f"model {name!r} could not be loaded: {first_line(exc)}") from None



@lru_cache(maxsize=8)
def sbert_with_fallback(requested: str, device: str) -> tuple[str, str]:
    """(the sbert model used, why it is not the requested one or ""). GeoLLaVA's model falls back to the offline
    MiniLM, with one warning line per process; any other model that cannot be loaded raises OSError."""
    try:
        return load_embedding_model("sbert", requested, None, device)[0], ""
    except OSError as exc:
        if requested != GEOLLAVA_SBERT_MODEL:
            raise
        reason = str(exc)
    fallback = load_embedding_model("sbert", str(minilm_dir()), None, device)[0]
    print(f"warning: sbert: {reason}; using the offline all-MiniLM-L6-v2 instead, so sbert is not comparable "
          f"with GeoLLaVA's BERT column", file=sys.stderr)
    return fallback, reason


def embedding_scores(refs: list[list[str]], preds: list[str], *, bertscore: tuple[str, int] | None,
                     sbert: str | None, device: str, beside: Thread | None = None) -> dict[str, list[float]]:
    """Per-sample ``bertscore_f1`` and/or ``sbert`` (models already loaded), each distinct text encoded once per
    model (``encode_texts``; ``beside``: see ``encode``).

    BERTScore: best reference by F1; an empty prediction scores 0 and empty
    references are skipped (bert-score's rule for empty sentences, whose own
    handling crashes with transformers 5). sbert: GeoLLaVA's plain cosine of the
    two sentence embeddings, best reference, empty texts included.
    """
    texts, position = unique_texts(preds, *refs)
    token_embeddings, sentence_embeddings = encode_texts(texts, bertscore, sbert, device, beside)
    scores: dict[str, list[float]] = {}
    if token_embeddings is not None:
        scores["bertscore_f1"] = best_bertscore_f1(token_embeddings, refs, preds, position)
    if sentence_embeddings is not None:
        scores["sbert"] = best_cosine(sentence_embeddings, refs, preds, position)
    return scores


def encode_texts(texts: list[str], bertscore: tuple[str, int] | None, sbert: str | None, device: str,
                 beside: Thread | None = None):
    """(BERTScore's token embeddings of ``texts`` at its layer, or None; sbert's sentence embeddings, or None). Where
    both metrics name one mean-pooling sentence model, its transformer serves both in one pass."""
    import torch

    sentence_encoder = sentence_model(sbert, device) if sbert else None
    if (bertscore is not None and sentence_encoder is not None and bertscore[0] == sbert
            and mean_pooling_pipeline(sentence_encoder)):
        model = sentence_encoder[0].auto_model
        encoder = Encoder(sbert, model, sentence_encoder.tokenizer, torch.device(device),
                          bertscore_max_length(sentence_encoder.tokenizer, model.config))
        token_embeddings, sentence_embeddings = encode(encoder, texts, bertscore[1], pooled=True, beside=beside)
        # sentence-transformers cuts texts at its own max_seq_length: those few get their own pass.
        longer = [k for k, n in enumerate(token_embeddings.lengths.tolist()) if n > sentence_encoder.max_seq_length]
        if longer:
            sentence_embeddings[longer] = sentence_encoder.encode([texts[k] for k in longer], convert_to_tensor=True,
                                                                  show_progress_bar=False).to(sentence_embeddings)
        return token_embeddings, sentence_embeddings
    token_embeddings = sentence_embeddings = None
    if bertscore is not None:
        token_embeddings, _ = encode(load_encoder(bertscore[0], device), texts, bertscore[1], pooled=False,
                                     beside=beside)
    if sentence_encoder is not None:
        sentence_embeddings = sentence_encoder.encode(texts, batch_size=ENCODE_BATCH_SIZE, convert_to_tensor=True,
                                                      show_progress_bar=False)
    return token_embeddings, sentence_embeddings


def best_bertscore_f1(token_embeddings, refs: list[list[str]], preds: list[str],
                      position: dict[str, int]) -> list[float]:
    """Each sample's BERTScore F1 against its best reference: each distinct (prediction, reference) pair of texts
    scored once (``position``: a text's row in ``token_embeddings``); empty texts left out (an empty prediction
    scores 0)."""
    import torch

    # (prediction's row, reference's row, sample) for every pair to score
    pairs = sorted({(position[pred], position[ref], sample) for sample, (group, pred) in enumerate(zip(refs, preds))
                    if pred.strip() for ref in group if ref.strip()})
    # by length, so that each batch of the matching pads its texts little
    length = token_embeddings.lengths.tolist()
    distinct = sorted({(pred_row, ref_row) for pred_row, ref_row, _ in pairs},
                      key=lambda pair: (length[pair[0]], length[pair[1]], pair))
    on = token_embeddings.flat.device
    f1 = bertscore_pairs(token_embeddings, torch.tensor([p for p, _ in distinct], dtype=torch.long, device=on),
                         torch.tensor([r for _, r in distinct], dtype=torch.long, device=on))
    row_of = {pair: k for k, pair in enumerate(distinct)}
    per_pair = f1[[row_of[(p, r)] for p, r, _ in pairs]] if pairs else torch.zeros(0)
    return best_per_sample(per_pair, torch.tensor([sample for _, _, sample in pairs], dtype=torch.long), len(preds))


def best_cosine(sentence_embeddings, refs: list[list[str]], preds: list[str], position: dict[str, int]) -> list[float]:
    """Each sample's cosine between its prediction's sentence embedding and its best reference's (``position``: a
    text's row in ``sentence_embeddings``)."""
    import torch

    unit = torch.nn.functional.normalize(sentence_embeddings.float(), dim=-1).cpu()
    pred_rows = torch.tensor([position[pred] for group, pred in zip(refs, preds) for _ in group], dtype=torch.long)
    ref_rows = torch.tensor([position[ref] for group in refs for ref in group], dtype=torch.long)
    samples = torch.tensor([sample for sample, group in enumerate(refs) for _ in group], dtype=torch.long)
    cosine = (unit[pred_rows] * unit[ref_rows]).sum(-1)
    # Cosines can be negative: start from -inf, not 0, so the best reference is the true maximum.
    best = torch.full((len(preds),), float("-inf"))
    best.scatter_reduce_(0, samples, cosine, reduce="amax", include_self=True)
    return best.tolist()


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """No "Loading weights" progress bar in the middle of an evaluation's output."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
