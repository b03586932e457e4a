"""Caption metrics, each computed by its reference library, called directly.

(``evaluate.load()`` fetches metric code from the Hub and fails offline.) Every
score is in 0..1. A reference may be a string or a list of strings (LEVIR-CC
has five); "best reference" means the highest score over the references.
"""
from __future__ import annotations

import io
import shutil
import sys
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

from .errors import UserError

PER_SAMPLE = ("rouge1", "rouge2", "rougeL", "bleu", "bertscore_f1", "sbert")


@dataclass
class MetricsReport:
    metrics: dict[str, float]
    missing: dict[str, str] = field(default_factory=dict)  # metric -> why it could not be computed
    models: dict[str, str] = field(default_factory=dict)  # embedding metric -> model used
    per_sample: dict[str, list[float]] = field(default_factory=dict)


def default_embedding_model() -> str:
    from .tiny import minilm_dir

    return str(minilm_dir())


def coco_normalise(text: str) -> str:
    """Lower-case; every character that is not a letter, digit or white space becomes a space; collapse spaces."""
    kept = "".join(c if c.isalnum() or c.isspace() else " " for c in text.lower())
    return " ".join(kept.split())


def _as_lists(references: Sequence[str | Sequence[str]]) -> list[list[str]]:
    lists = []
    for i, ref in enumerate(references):
        refs = [ref] if isinstance(ref, str) else list(ref)
        if not refs or not all(isinstance(r, str) for r in refs):
            raise UserError(f"reference {i} must be a string or a non-empty list of strings")
        lists.append(refs)
    return lists


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values))


def rouge_scores(refs: list[list[str]], preds: list[str]) -> dict[str, list[float]]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    out: dict[str, list[float]] = {"rouge1": [], "rouge2": [], "rougeL": []}
    for ref, pred in zip(refs, preds):
        scores = scorer.score_multi(ref, pred)
        for key in out:
            out[key].append(scores[key].fmeasure)
    return out


def geollava_bleu(refs: list[list[str]], preds: list[str]) -> list[float]:
    """GeoLLaVA's BLEU: sentence BLEU on whitespace tokens, weights (0.5, 0.5), smoothing method1."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    smooth = SmoothingFunction().method1
    return [float(sentence_bleu([r.split() for r in ref], pred.split(), weights=(0.5, 0.5), smoothing_function=smooth))
            if pred.split() else 0.0 for ref, pred in zip(refs, preds)]


def sacre_bleu(refs: list[list[str]], preds: list[str]) -> float:
    import sacrebleu

    most = max(map(len, refs))
    # sacreBLEU wants reference streams; a sample with fewer references pads with None.
    streams = [[ref[k] if k < len(ref) else None for ref in refs] for k in range(most)]
    return sacrebleu.corpus_bleu(preds, streams).score / 100


def coco_scores(refs: list[list[str]], preds: list[str], missing: dict[str, str]) -> dict[str, float]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = {i: [coco_normalise(r) for r in ref] for i, ref in enumerate(refs)}
    res = {i: [coco_normalise(p)] for i, p in enumerate(preds)}
    out: dict[str, float] = {}
    with redirect_stdout(io.StringIO()):  # the coco scorers print their internals
        bleu, _ = Bleu(4).compute_score(gts, res)
        out.update({f"bleu{n + 1}": float(b) for n, b in enumerate(bleu)})
        out["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
        out["cider"] = float(Cider().compute_score(gts, res)[0])
    if shutil.which("java") is None:
        missing["meteor"] = "Java is not installed (pycocoevalcap's METEOR runs a Java program)"
    else:
        try:
            from pycocoevalcap.meteor.meteor import Meteor

            with redirect_stdout(io.StringIO()):
                out["meteor"] = float(Meteor().compute_score(gts, res)[0])
        except Exception as exc:  # a broken Java install must not cost the other metrics
            missing["meteor"] = f"METEOR failed: {exc}"
    return out


@lru_cache(maxsize=2)
def _sentence_model(path: str):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(path, device="cpu")


def bertscore_f1(refs: list[list[str]], preds: list[str], model: str, num_layers: int) -> list[float]:
    """BERTScore F1, best reference; an empty prediction scores 0 (bert-score's rule, without its crash)."""
    from bert_score import score

    scores = [0.0] * len(preds)
    keep = [i for i, p in enumerate(preds) if p.strip()]
    if keep:
        _, _, f1 = score([preds[i] for i in keep], [refs[i] for i in keep], model_type=model, num_layers=num_layers,
                         idf=False, rescale_with_baseline=False, verbose=False, device="cpu")
        for i, value in zip(keep, f1.tolist()):
            scores[i] = float(value)
    return scores


def sbert_similarity(refs: list[list[str]], preds: list[str], model: str) -> list[float]:
    """Cosine similarity of sentence embeddings, best reference; an empty prediction scores 0."""
    from sentence_transformers import util

    encoder = _sentence_model(model)
    flat = [r for ref in refs for r in ref]
    ref_emb = encoder.encode(flat, convert_to_tensor=True, show_progress_bar=False)
    pred_emb = encoder.encode(preds, convert_to_tensor=True, show_progress_bar=False)
    scores, start = [], 0
    for i, ref in enumerate(refs):
        sims = util.cos_sim(pred_emb[i:i + 1], ref_emb[start:start + len(ref)])
        scores.append(float(sims.max()) if preds[i].strip() else 0.0)
        start += len(ref)
    return scores


def compute_metrics_report(references: Sequence[str | Sequence[str]], predictions: Sequence[str], *,
                           bertscore_model: str | None = None, bertscore_layers: int = 6,
                           sbert_model: str | None = None) -> MetricsReport:
    """Every metric of the suite, with the per-sample values, what is missing and why, and the models used."""
    if len(references) != len(predictions):
        raise UserError(f"{len(references)} references but {len(predictions)} predictions")
    if not predictions:
        raise UserError("no predictions to score")
    refs = _as_lists(references)
    preds = [p if isinstance(p, str) else "" for p in predictions]
    report = MetricsReport(metrics={})
    per = report.per_sample
    per.update(rouge_scores(refs, preds))
    per["bleu"] = geollava_bleu(refs, preds)
    report.metrics["sacrebleu"] = sacre_bleu(refs, preds)
    report.metrics.update(coco_scores(refs, preds, report.missing))
    bert_model = bertscore_model or default_embedding_model()
    sentence_model = sbert_model or default_embedding_model()
    for key, model, run in (("bertscore_f1", bert_model, lambda: bertscore_f1(refs, preds, bert_model, bertscore_layers)),
                            ("sbert", sentence_model, lambda: sbert_similarity(refs, preds, sentence_model))):
        try:
            per[key] = run()
            report.models[key] = model
        except (OSError, ValueError, ImportError) as exc:
            report.missing[key] = f"model {model!r} could not be used: {str(exc).splitlines()[0]}"
    for key in PER_SAMPLE:
        if key in per:
            report.metrics[key] = _mean(per[key])
    report.metrics = {key: report.metrics[key] for key in sorted(report.metrics)}
    return report


def compute_metrics(references: Sequence[str | Sequence[str]], predictions: Sequence[str], **models) -> dict[str, float]:
    """``{metric: value}`` averaged over samples; metrics that could not be computed are left out (and named on stderr)."""
    report = compute_metrics_report(references, predictions, **models)
    for key, reason in report.missing.items():
        print(f"warning: {key} not computed: {reason}", file=sys.stderr)
    return report.metrics
