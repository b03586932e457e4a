"""Caption metrics: the one list of them, each computed by its reference library, called directly.

(``evaluate.load()`` fetches metric code from the Hub and fails offline.) A reference may be a string or a list of
strings (LEVIR-CC has five); "best reference" means the highest score over a sample's references. Scores are in
0..1, except CIDEr, which keeps coco-caption's scale (0..10).

Where our runs sit beside the papers' numbers, each metric is computed as the paper computed it: ``rouge*`` and
``bleu`` as GeoLLaVA's ``Eval.ipynb``, ``sbert`` as its "BERT" column (cosine of ``bert-base-nli-mean-tokens``
sentence embeddings; offline the MiniLM stands in and the report says so), the coco metrics after pycocoevalcap's
``PTBTokenizer`` (``coco_metrics.py``). BERTScore and sbert share one encoder pass (``text_embeddings.py``).

A metric that cannot be computed here (no Java for METEOR, a library or an embedding model that cannot be loaded)
is reported in ``MetricsReport.missing`` with the reason; it is never reported as 0.

``METRICS`` is the one list: the metrics files, the leaderboard, the notebook and the tests read it. A new metric is
one entry there (its key, its name in tables, per-sample or corpus-level, the function that computes it).
"""
from __future__ import annotations

import importlib
import sys
from collections import Counter
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import Callable, Sequence

from .coco_metrics import (CocoTokens, coco_scores, coco_tokenize, java_available, lcs_length, meteor_score,
                           reference_counts)
from .devices import pick_device
from .errors import UserError, first_line
from .text_embeddings import GEOLLAVA_SBERT_MODEL, embedding_scores, load_embedding_model, sbert_with_fallback

Reference = str | Sequence[str]


@dataclass
class MetricsReport:
    metrics: dict[str, float]
    missing: dict[str, str] = field(default_factory=dict)  # metric -> why it could not be computed
    models: dict[str, str] = field(default_factory=dict)  # embedding metric -> model used
    per_sample: dict[str, list[float]] = field(default_factory=dict)
    fallbacks: dict[str, str] = field(default_factory=dict)  # metric -> why its model is not the one asked for
    coco_tokenizer: str = ""  # coco_metrics.PTB_TOKENIZER or FALLBACK_TOKENIZER
    device: str = ""  # where the embedding models ran
    seconds: dict[str, float] = field(default_factory=dict)  # metric family -> wall time


class Texts:
    """What the metric functions read: references (lists), predictions, and the coco tokens made once for all."""

    def __init__(self, refs: list[list[str]], preds: list[str]):
        self.refs, self.preds = refs, preds
        self._coco: CocoTokens | BaseException | None = None

    def coco_tokens(self) -> CocoTokens:
        """coco-caption's tokens (PTB, or the fallback normaliser), made on first use; a failure is kept too, so
        every coco metric reports it without a second try."""
        if self._coco is None:
            try:
                self._coco = coco_tokenize(self.refs, self.preds)
            except OSError as exc:
                self._coco = exc
        if isinstance(self._coco, BaseException):
            raise self._coco
        return self._coco

    @property
    def coco_tokenizer(self) -> str:
        """The tokenizer the coco metrics used ("" when they did not run)."""
        return self._coco.tokenizer if isinstance(self._coco, CocoTokens) else ""


def check_inputs(references: Sequence[Reference], predictions: Sequence[str]) -> tuple[list[list[str]], list[str]]:
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



# --------------------------------------------------------------------------- lexical metrics

def rouge_scores(refs: list[list[str]], preds: list[str]) -> dict[str, list[float]]:
    """rouge-score's F-measures with Porter stemming, the best reference per ROUGE type (its ``score_multi``: the
    first reference with the highest F-measure).

    rouge-score's tokenizer keeps only a-z and 0-9, as in GeoLLaVA's evaluation. Its own tokenizer and n-gram
    scoring are used; what repeats is done once (each distinct word stemmed once, each distinct text tokenised and
    its n-grams counted once, each distinct (reference, prediction) pair scored once), and ROUGE-L's longest common
    subsequence is the bit-parallel ``lcs_length`` instead of rouge-score's table filled in Python: the same numbers
    (tested against rouge-score's ``score_multi``), a fraction of the time.
    """
    from nltk.stem import porter
    from rouge_score import scoring
    from rouge_score.rouge_scorer import _score_ngrams
    from rouge_score.tokenize import tokenize

    class OnceStemmed:
        """nltk's Porter stemmer, as rouge-score's tokenizer stems with it (``use_stemmer=True``), each distinct word
        stemmed once: stemming was most of ROUGE's time."""

        def __init__(self) -> None:
            self.stemmer, self.stems = porter.PorterStemmer(), {}

        def stem(self, word: str) -> str:
            if word not in self.stems:
                self.stems[word] = self.stemmer.stem(word)
            return self.stems[word]

    stemmer = OnceStemmed()
    tokens: dict[str, list[str]] = {}
    ngrams: dict[tuple[str, int], Counter] = {}

    def tokenised(text: str) -> list[str]:
        if text not in tokens:
            tokens[text] = tokenize(text, stemmer)
        return tokens[text]

    def counted(text: str, n: int) -> Counter:
        # rouge-score's _create_ngrams (a Counter of n-token tuples), counted by Counter's C loop
        if (text, n) not in ngrams:
            words = tokenised(text)
            ngrams[(text, n)] = Counter(zip(*(words[i:] for i in range(n))))
        return ngrams[(text, n)]

    def rouge_l(target: list[str], prediction: list[str]):
        # rouge-score's _score_lcs, with the LCS length computed bit-parallel
        if not target or not prediction:
            return scoring.Score(precision=0, recall=0, fmeasure=0)
        lcs = lcs_length(target, prediction)
        precision, recall = lcs / len(prediction), lcs / len(target)
        return scoring.Score(precision=precision, recall=recall, fmeasure=scoring.fmeasure(precision, recall))

    pairs: dict[tuple[str, str], dict] = {}

    def score(target: str, prediction: str) -> dict:
        if (target, prediction) not in pairs:
            pairs[(target, prediction)] = {
                "rouge1": _score_ngrams(counted(target, 1), counted(prediction, 1)),
                "rouge2": _score_ngrams(counted(target, 2), counted(prediction, 2)),
                "rougeL": rouge_l(tokenised(target), tokenised(prediction))}
        return pairs[(target, prediction)]

    out: dict[str, list[float]] = {"rouge1": [], "rouge2": [], "rougeL": []}
    for ref, pred in zip(refs, preds):
        scored = [score(target, pred) for target in ref]
        for rouge_type in out:
            out[rouge_type].append(float(max(s[rouge_type].fmeasure for s in scored)))
    return out


def geollava_bleu(refs: list[list[str]], preds: list[str]) -> list[float]:
    """GeoLLaVA's BLEU: NLTK sentence BLEU on whitespace tokens, weights (0.5, 0.5), smoothing method1."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    smooth = SmoothingFunction().method1
    # NLTK also gives 0 for an empty hypothesis; skipping the call only avoids its division warnings.
    return [float(sentence_bleu([r.split() for r in ref], pred.split(), weights=(0.5, 0.5), smoothing_function=smooth))
            if pred.split() else 0.0 for ref, pred in zip(refs, preds)]


def sacre_bleu(refs: list[list[str]], preds: list[str]) -> float:
    """sacreBLEU corpus BLEU (default settings) / 100: ``sacrebleu.corpus_bleu(preds, reference streams)``.

    sacreBLEU's own steps (``BLEU.corpus_score``: preprocess, reference n-grams, segment statistics, the corpus
    formula on their sums), with what repeats done once: each distinct reference text's n-grams counted once, each
    distinct reference set merged once, each distinct (prediction, reference set) matched once. The same integers
    reach the same formula: the same score (tested against ``corpus_bleu``).
    """
    from sacrebleu.metrics.bleu import BLEU

    bleu = BLEU()
    reference_sets: dict[tuple[str, ...], dict] = {}
    matched: dict[tuple[str, tuple[str, ...]], list[int]] = {}

    @lru_cache(maxsize=None)
    def counted(reference: str) -> tuple[int, dict]:
        # sacreBLEU's reference information of this text alone
        info = bleu._extract_reference_info([bleu._preprocess_segment(reference)])
        return info["ref_lens"][0], info["ref_ngrams"]

    stats = []
    for group, pred in zip(refs, preds):
        key = tuple(group)
        if key not in reference_sets:
            lengths, most = reference_counts(key, counted)  # BLEU._extract_reference_info over the set
            reference_sets[key] = {"ref_ngrams": most, "ref_lens": lengths}
        if (pred, key) not in matched:
            matched[(pred, key)] = bleu._compute_segment_statistics(bleu._preprocess_segment(pred),
                                                                    reference_sets[key])
        stats.append(matched[(pred, key)])
    return float(bleu._aggregate_and_compute(stats).score / 100)


# --------------------------------------------------------------------------- the one list

@dataclass(frozen=True)
class Metric:
    """One metric: its key in metrics files, its name in tables and plots, whether it has one value per sample
    (the mean is reported) or one for the corpus, and what computes it: a function of ``Texts`` returning
    ``{key: per-sample values or corpus value}`` (metrics sharing a function are computed together), and the
    libraries that function imports, loaded before any thread runs it. ``compute=None``: the embedding pass."""
    key: str
    name: str
    per_sample: bool
    compute: Callable[[Texts], dict] | None
    libraries: tuple[str, ...] = ()


def _rouge(texts: Texts) -> dict:
    return rouge_scores(texts.refs, texts.preds)


def _bleu(texts: Texts) -> dict:
    return {"bleu": geollava_bleu(texts.refs, texts.preds)}


def _sacrebleu(texts: Texts) -> dict:
    return {"sacrebleu": sacre_bleu(texts.refs, texts.preds)}


def _coco(texts: Texts) -> dict:
    return coco_scores(texts.coco_tokens())


def _meteor(texts: Texts) -> dict:
    return {"meteor": meteor_score(texts.coco_tokens())}


_ROUGE_LIBS = ("rouge_score.rouge_scorer", "rouge_score.tokenize", "rouge_score.scoring", "nltk.stem.porter")
_COCO_LIBS = ("pycocoevalcap.tokenizer.ptbtokenizer", "pycocoevalcap.bleu.bleu_scorer", "numpy", "scipy.sparse")
METRICS: tuple[Metric, ...] = (
    Metric("rouge1", "ROUGE-1", True, _rouge, _ROUGE_LIBS),
    Metric("rouge2", "ROUGE-2", True, _rouge, _ROUGE_LIBS),
    Metric("rougeL", "ROUGE-L", True, _rouge, _ROUGE_LIBS),
    Metric("bleu", "BLEU", True, _bleu, ("nltk.translate.bleu_score",)),
    Metric("sbert", "BERT (sbert)", True, None),
    Metric("bertscore_f1", "BERTScore F1", True, None),
    Metric("sacrebleu", "sacreBLEU", False, _sacrebleu, ("sacrebleu", "sacrebleu.tokenizers.tokenizer_13a")),
    Metric("bleu1", "BLEU-1", False, _coco, _COCO_LIBS),
    Metric("bleu2", "BLEU-2", False, _coco, _COCO_LIBS),
    Metric("bleu3", "BLEU-3", False, _coco, _COCO_LIBS),
    Metric("bleu4", "BLEU-4", False, _coco, _COCO_LIBS),
    Metric("meteor", "METEOR", False, _meteor, ("pycocoevalcap.tokenizer.ptbtokenizer", "pycocoevalcap.meteor.meteor")),
    Metric("rouge_l", "ROUGE-L (coco)", False, _coco, _COCO_LIBS),
    Metric("cider", "CIDEr", False, _coco, _COCO_LIBS),
)
METRIC_KEYS = tuple(metric.key for metric in METRICS)
METRIC_NAMES = {metric.key: metric.name for metric in METRICS}
PER_SAMPLE = tuple(metric.key for metric in METRICS if metric.per_sample)


# "sm": the mean of these four, as DeltaVLM's and CCExpert's tables report S_m (and pick their best checkpoint by)
SM_PARTS = ("bleu4", "meteor", "rouge_l", "cider")
SM = "sm"


def with_sm(metrics: dict[str, float]) -> dict[str, float]:
    """``metrics`` plus ``sm``, the mean of BLEU-4, METEOR, ROUGE-L (coco) and CIDEr, where all four are there."""
    if not all(key in metrics for key in SM_PARTS):
        return dict(metrics)
    return {**metrics, SM: sum(metrics[key] for key in SM_PARTS) / len(SM_PARTS)}


def meteor_available() -> bool:
    """Whether this machine can compute METEOR (pycocoevalcap runs its jar with Java); a setting that ranks by it
    is refused up front where it cannot."""
    return java_available()


def metric_groups() -> dict[Callable, tuple[Metric, ...]]:
    """The worker-side metrics grouped by the function that computes them, in the list's order."""
    groups: dict[Callable, tuple[Metric, ...]] = {}
    for metric in METRICS:
        if metric.compute is not None:
            groups[metric.compute] = groups.get(metric.compute, ()) + (metric,)
    return groups


def load_worker_libraries() -> None:
    """Import in this (the main) thread every library the worker's metrics use, so the worker thread never imports
    one: two threads importing the same module at once (rouge_score -> nltk -> sklearn on the worker,
    sentence_transformers -> sklearn here) can end in a _DeadlockError. A missing library is left for its metric
    to report."""
    for metric in METRICS:
        for library in metric.libraries:
            try:
                importlib.import_module(library)
            except ImportError:
                pass


# --------------------------------------------------------------------------- entry points

class _Worker(threading.Thread):
    """Runs ``work`` in a thread; ``join`` returns what it returned, or re-raises its exception in the caller."""

    def __init__(self, work: Callable[[], object]) -> None:
        super().__init__(daemon=True)
        self.work, self.result, self.error = work, None, None
        self.start()

    def run(self) -> None:
        try:
            self.result = self.work()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller by join()
            self.error = exc

    def join(self, timeout: float | None = None):
        super().join(timeout)
        if self.error is not None:
            raise self.error
        return self.result


def attempt(report: MetricsReport, name: str, keys: Sequence[str], run: Callable[[], object]):
    """``run()``, its wall time in ``report.seconds[name]``. A missing library or program costs only its own
    metrics (``keys``, in ``report.missing`` with the reason) and gives None; other errors are bugs and propagate."""
    started = time.perf_counter()
    try:
        return run()
    except ImportError as exc:
        report.missing.update({key: f"a library is missing: {first_line(exc)}" for key in keys})
    except OSError as exc:
        report.missing.update({key: first_line(exc) for key in keys})
    finally:
        report.seconds[name] = round(time.perf_counter() - started, 3)
    return None


def load_embedding_models(report: MetricsReport, *, bertscore_model: str | None, bertscore_layers: int | None,
                          sbert_model: str | None) -> dict[str, object]:
    """BERTScore's and sbert's models on ``report.device`` (``compute_metrics_report``'s arguments), by metric key;
    what each is goes in ``report.models`` (and ``report.fallbacks`` where sbert's is a stand-in)."""
    loaded: dict[str, object] = {}
    bertscore = attempt(report, "load_bertscore_model", ("bertscore_f1",), lambda: load_embedding_model(
        "bertscore_f1", bertscore_model, bertscore_layers, report.device))
    if bertscore is not None:
        name, layers = loaded["bertscore_f1"] = bertscore
        report.models["bertscore_f1"] = f"{name} (layer {layers})"
    sbert = attempt(report, "load_sbert_model", ("sbert",),
                    lambda: sbert_with_fallback(sbert_model or GEOLLAVA_SBERT_MODEL, report.device))
    if sbert is not None:
        name, reason = sbert
        loaded["sbert"] = report.models["sbert"] = name
        if reason:
            report.fallbacks["sbert"] = reason
    return loaded


def lexical_and_coco_scores(texts: Texts) -> tuple[dict[str, object], MetricsReport]:
    """Every metric that needs no embedding model (ROUGE, BLEU, METEOR, CIDEr...: Python, and Java processes), by
    key, with a report of its own (what is missing, how long each took, the coco tokenizer): the worker thread's
    share, which touches nothing the embedding pass beside it writes."""
    report = MetricsReport(metrics={})
    values: dict[str, object] = {}
    for compute, metrics in metric_groups().items():
        values.update(attempt(report, compute.__name__.lstrip("_"), [m.key for m in metrics], partial(compute, texts))
                      or {})
    report.coco_tokenizer = texts.coco_tokenizer
    return values, report


def record_scores(report: MetricsReport, values: dict[str, object]) -> None:
    """``values`` into ``report``, in ``METRICS``' order: a per-sample metric's mean (its values in
    ``report.per_sample``), a corpus metric as it is."""
    for metric in METRICS:
        if metric.key not in values:
            continue
        if metric.per_sample:
            report.per_sample[metric.key] = list(values[metric.key])
            report.metrics[metric.key] = float(sum(values[metric.key]) / len(values[metric.key]))
        else:
            report.metrics[metric.key] = float(values[metric.key])
    report.metrics = dict(sorted(report.metrics.items()))


def compute_metrics_report(references: Sequence[Reference], predictions: Sequence[str], *,
                           bertscore_model: str | None = None, sbert_model: str | None = None,
                           bertscore_layers: int | None = None, device: str = "auto") -> MetricsReport:
    """Every metric of ``METRICS``, with per-sample values, what is missing and why, and the models used.

    ``bertscore_model``: a Hugging Face name or folder (default: the offline all-MiniLM-L6-v2); ``bertscore_layers``:
    the layer BERTScore reads (default: 6 for MiniLM, else bert-score's tuned layer or the model's last one).
    ``sbert_model``: default GeoLLaVA's ``bert-base-nli-mean-tokens``, which falls back to the offline MiniLM (one
    warning line) where it cannot be loaded; the model used is in ``report.models`` and the reason in
    ``report.fallbacks``. ``device``: where the embedding models run (``auto`` = CUDA when available).
    """
    refs, preds = check_inputs(references, predictions)
    texts = Texts(refs, preds)
    report = MetricsReport(metrics={}, device=str(pick_device(device)))
    # Models and libraries load here, in this thread, before the worker starts (see load_worker_libraries).
    loaded = load_embedding_models(report, bertscore_model=bertscore_model, bertscore_layers=bertscore_layers,
                                   sbert_model=sbert_model)
    load_worker_libraries()
    # The lexical and coco metrics (Python, and Java processes) run beside the embedding pass, whose torch kernels
    # release the GIL: on a GPU the two overlap almost fully; on a CPU they share the cores, the pass computing on one
    # thread fewer while the worker runs.
    worker = _Worker(lambda: lexical_and_coco_scores(texts))
    values: dict[str, object] = {}
    if loaded:
        started = time.perf_counter()
        values.update(embedding_scores(refs, preds, bertscore=loaded.get("bertscore_f1"), sbert=loaded.get("sbert"),
                                       device=report.device, beside=worker))
        report.seconds["embeddings"] = round(time.perf_counter() - started, 3)
    lexical, lexical_report = worker.join()
    values.update(lexical)
    report.missing.update(lexical_report.missing)
    report.seconds.update(lexical_report.seconds)
    report.coco_tokenizer = lexical_report.coco_tokenizer
    record_scores(report, values)
    return report


def compute_metrics(references: Sequence[Reference], predictions: Sequence[str], *,
                    bertscore_model: str | None = None, sbert_model: str | None = None,
                    bertscore_layers: int | None = None, device: str = "auto") -> dict[str, float]:
    """``{metric: value}`` averaged over samples; metrics that could not be computed are left out (named on stderr)."""
    report = compute_metrics_report(references, predictions, bertscore_model=bertscore_model,
                                    sbert_model=sbert_model, bertscore_layers=bertscore_layers, device=device)
    for key, reason in report.missing.items():
        print(f"warning: {key} not computed: {reason}", file=sys.stderr)
    return report.metrics
