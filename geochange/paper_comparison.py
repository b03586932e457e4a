"""Which of our metric columns are computed the way the papers computed theirs, and why not where they are not.

Read from a ``*.metrics.json`` record (``geochange.results.write_metrics``). The papers' definitions:

* GeoLLaVA (``Eval.ipynb``; fMoW val, one reference per pair): ROUGE-1/2/L = rouge-score F-measure with Porter
  stemming; BLEU = NLTK sentence BLEU on whitespace tokens, weights (0.5, 0.5), smoothing method1; "BERT" = cosine
  of ``bert-base-nli-mean-tokens`` sentence embeddings. Answers generated greedily, up to 350 new tokens.
* DeltaVLM (``scripts/test_cap.ipynb``; LEVIR-CC test, 5 references): coco-caption BLEU-1..4, METEOR, ROUGE-L,
  CIDEr on whitespace tokens of the lower-case captions with full stops removed, each word mapped through
  LEVIR-CC's word map (rare words become <unk>); 5-beam search, up to 256 new tokens, transformers 4.33.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .coco_metrics import FALLBACK_TOKENIZER
from .text_embeddings import GEOLLAVA_SBERT_MODEL

GEOLLAVA_COLUMNS = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "bleu": "BLEU", "sbert": "BERT"}
DELTAVLM_COLUMNS = {"bleu1": "BLEU-1", "bleu4": "BLEU-4", "meteor": "METEOR", "rouge_l": "ROUGE-L", "cider": "CIDEr"}
GEOLLAVA_MAX_NEW_TOKENS = 350
DELTAVLM_DECODING = {"NUM_BEAMS": 5, "MAX_NEW_TOKENS": 256}
# Our tokens against DeltaVLM's: the same words wherever every word is in LEVIR-CC's vocabulary.
DELTAVLM_TOKENS_NOTE = ("PTB tokens; DeltaVLM scored LEVIR-CC word-map ids (rare words -> <unk>, full stops "
                        "removed): the same wherever every word is in LEVIR-CC's vocabulary")


def _bundled_sample(settings: dict[str, Any]) -> bool:
    data = settings.get("VAL_ANNOTATIONS") or settings.get("TEST_ANNOTATIONS") or ""
    return Path(str(data)).name.startswith("sample_")


def geollava_differences(record: dict[str, Any]) -> dict[str, list[str]]:
    """{metric: [how it differs from the GeoLLaVA paper's column]} for the paper's five columns ([] = as the paper)."""
    settings = record.get("settings", {})
    common: list[str] = []
    if _bundled_sample(settings):
        common.append("the bundled synthetic sample, not fMoW val")
    max_new = record.get("max_new_tokens", settings.get("MAX_NEW_TOKENS"))
    if max_new is not None and max_new != GEOLLAVA_MAX_NEW_TOKENS:
        common.append(f"answers cut at {max_new} new tokens, the paper's at {GEOLLAVA_MAX_NEW_TOKENS}")
    out = {metric: list(common) for metric in GEOLLAVA_COLUMNS}
    sbert = record.get("metric_models", {}).get("sbert")
    if sbert is None:
        out["sbert"].append("no sbert model recorded")
    elif sbert != GEOLLAVA_SBERT_MODEL:
        shown = "/".join(Path(sbert).parts[-2:]) if Path(sbert).is_absolute() else sbert  # a folder: its tail
        out["sbert"].append(f"embeddings of {shown}, not bert-base-nli-mean-tokens")
    if "metric_model_fallbacks" not in record:  # written before sbert became GeoLLaVA's plain cosine
        out["sbert"].append("an empty text scored 0 (older metrics file)")
    return out


def deltavlm_differences(record: dict[str, Any]) -> dict[str, list[str]]:
    """{metric: [how it differs from the DeltaVLM paper's caption column]} ([] = as the paper)."""
    settings = record.get("settings", {})
    common: list[str] = []
    if _bundled_sample(settings):
        common.append("the bundled synthetic sample, not LEVIR-CC test")
    decoding = [f"{key}={settings[key]}" for key, value in DELTAVLM_DECODING.items()
                if key in settings and settings[key] != value]
    if decoding:
        common.append(f"decoding {', '.join(decoding)} (the paper: 5 beams, 256 new tokens)")
    tokenizer = record.get("coco_tokenizer")
    if tokenizer == FALLBACK_TOKENIZER:
        common.append("no Java: the fallback normaliser, not PTB tokens")
    elif not tokenizer:
        common.append("the fallback normaliser (older metrics file)")
    else:
        common.append(DELTAVLM_TOKENS_NOTE)
    return {metric: list(common) for metric in DELTAVLM_COLUMNS}


def comparability_rows(records: list[dict[str, Any]]) -> list[dict[str, str]]:
    """One row per run and paper column: ``run, paper, column, as_paper ("yes"/"no"), why``.

    A DeltaVLM run (task-prefixed keys) is held against DeltaVLM's caption columns, any other run against
    GeoLLaVA's columns.
    """
    rows = []
    for record in records:
        deltavlm = any(key.startswith("caption/") for key in record.get("metrics", {}))
        paper, columns, notes = (("DeltaVLM", DELTAVLM_COLUMNS, deltavlm_differences(record)) if deltavlm else
                                 ("GeoLLaVA", GEOLLAVA_COLUMNS, geollava_differences(record)))
        for metric, label in columns.items():
            # Only the tokenizer caveat left: the same definition up to LEVIR-CC's word map.
            strict = [n for n in notes[metric] if n != DELTAVLM_TOKENS_NOTE]
            rows.append({"run": record.get("run", "?"), "paper": paper, "column": label,
                         "as_paper": "no" if strict else "yes", "why": "; ".join(notes[metric])})
    return rows


def not_comparable(record: dict[str, Any], metric: str) -> bool:
    """Whether ``metric`` of this run differs from the paper's column of that name (see comparability_rows)."""
    metric = metric.split("/", 1)[-1]
    return any(row["as_paper"] == "no" for row in comparability_rows([record])
               if row["column"] in (GEOLLAVA_COLUMNS.get(metric), DELTAVLM_COLUMNS.get(metric)))
