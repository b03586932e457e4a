"""Caption metrics, each computed by its reference library, called directly.

(``evaluate.load()`` fetches metric code from the Hub and fails offline.) A
reference may be a string or a list of strings (LEVIR-CC has five); "best
reference" means the highest score over a sample's references. Scores are in
0..1, except CIDEr, which keeps coco-caption's scale (0..10).

Where our runs sit beside the papers' numbers, each metric is computed as the
paper computed it: ``rouge*`` and ``bleu`` as GeoLLaVA's ``Eval.ipynb``,
``sbert`` as its "BERT" column (cosine of ``bert-base-nli-mean-tokens``
sentence embeddings; offline the MiniLM stands in and the report says so), the
coco metrics after pycocoevalcap's ``PTBTokenizer`` (a fallback normaliser only
without Java; the report names the one used). BERTScore and sbert are in
``geochange.text_embeddings``.

A metric that cannot be computed here (no Java for METEOR, a library or an
embedding model that cannot be loaded) is reported in ``MetricsReport.missing``
with the reason; it is never reported as 0.
"""
from __future__ import annotations

import atexit
import shutil
import sys
import threading
import time
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Iterator, Sequence

from .devices import pick_device
from .errors import UserError
from .paths import minilm_dir
from .text_embeddings import (ENCODE_BATCH_SIZE, Encoder, bertscore_max_length, bertscore_pairs, best_per_sample,
                              encode, load_encoder, unique_texts)

# Metrics with one value per sample (their mean is the reported value).
PER_SAMPLE = ("rouge1", "rouge2", "rougeL", "bleu", "bertscore_f1", "sbert")
COCO_KEYS = ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider")
# all-MiniLM-L6-v2 has 6 layers; BERTScore uses the last one (bert-score has no tuned layer for it).
DEFAULT_BERTSCORE_LAYERS = 6
# The GeoLLaVA paper's "BERT" column: cosine of these sentence embeddings (its Eval.ipynb).
GEOLLAVA_SBERT_MODEL = "sentence-transformers/bert-base-nli-mean-tokens"

Reference = str | Sequence[str]


@dataclass
class MetricsReport:
    metrics: dict[str, float]
    missing: dict[str, str] = field(default_factory=dict)  # metric -> why it could not be computed
    models: dict[str, str] = field(default_factory=dict)  # embedding metric -> model used
    per_sample: dict[str, list[float]] = field(default_factory=dict)
    fallbacks: dict[str, str] = field(default_factory=dict)  # metric -> why its model is not the one asked for
    coco_tokenizer: str = ""  # PTB_TOKENIZER or FALLBACK_TOKENIZER
    device: str = ""  # where the embedding models ran
    seconds: dict[str, float] = field(default_factory=dict)  # metric family -> wall time


def coco_normalise(text: str) -> str:
    """Lower-case; every character that is not a letter, digit or white space becomes a space; collapse spaces.

    The stand-in for coco-caption's PTB tokenizer where Java is absent (PTB also
    splits "'s" and "n't" off and keeps hyphenated words whole). Letters and digits of every script are kept, and so
    are combining marks: they belong to the letter before them (decomposed
    accents, Indic vowel signs), so dropping them would split words.
    """
    kept = "".join(c if c.isalnum() or c.isspace() or unicodedata.category(c).startswith("M") else " "
                   for c in text.lower())
    return " ".join(kept.split())


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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


# --------------------------------------------------------------------------- lexical metrics

def rouge_scores(refs: list[list[str]], preds: list[str]) -> dict[str, list[float]]:
    """rouge-score F-measures with Porter stemming; ``score_multi`` keeps the best reference per ROUGE type.

    rouge-score's tokenizer keeps only a-z and 0-9, as in GeoLLaVA's evaluation.
    """
    from rouge_score import rouge_scorer
    from rouge_score.tokenizers import DefaultTokenizer

    class OncePerText:
        """rouge-score's own tokenizer (with stemming), run once per distinct text: texts repeat across samples
        and ``score_multi`` tokenises the prediction again for every reference."""

        def __init__(self) -> None:
            self.tokenizer, self.seen = DefaultTokenizer(use_stemmer=True), {}

        def tokenize(self, text: str) -> list[str]:
            if text not in self.seen:
                self.seen[text] = self.tokenizer.tokenize(text)
            return self.seen[text]

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=OncePerText())
    out: dict[str, list[float]] = {"rouge1": [], "rouge2": [], "rougeL": []}
    scored: dict[tuple, dict] = {}  # whole (references, prediction) pairs repeat too ("no change" pairs)
    for ref, pred in zip(refs, preds):
        key = (tuple(ref), pred)
        if key not in scored:
            scored[key] = scorer.score_multi(ref, pred)
        for rouge_type in out:
            out[rouge_type].append(float(scored[key][rouge_type].fmeasure))
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


PTB_TOKENIZER = "PTBTokenizer (pycocoevalcap, Stanford CoreNLP 3.4.1, punctuation removed)"
FALLBACK_TOKENIZER = "fallback normaliser (no Java): lower-case, non-alphanumerics to spaces"


@dataclass
class CocoTokens:
    """coco-caption's inputs: ``gts`` {sample: [tokenised references]}, ``res`` {sample: [tokenised prediction]}."""

    gts: dict[int, list[str]]
    res: dict[int, list[str]]
    tokenizer: str


def java_available() -> bool:
    """pycocoevalcap's PTBTokenizer and METEOR run ``java`` found on PATH."""
    return shutil.which("java") is not None


def coco_tokenize(refs: list[list[str]], preds: list[str]) -> CocoTokens:
    """coco-caption's pipeline: ``PTBTokenizer`` on references and predictions alike, or, without Java, the
    fallback normaliser. One Java run serves both (the tokenizer works line by line, so this is the same as
    tokenising ``gts`` and ``res`` separately, as coco's ``COCOEvalCap`` does)."""
    if not java_available():
        return CocoTokens({i: [coco_normalise(r) for r in ref] for i, ref in enumerate(refs)},
                          {i: [coco_normalise(p)] for i, p in enumerate(preds)}, FALLBACK_TOKENIZER)
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    n = len(preds)
    captions = {i: [{"caption": r} for r in ref] for i, ref in enumerate(refs)}
    captions.update({n + i: [{"caption": p}] for i, p in enumerate(preds)})
    try:
        tokens = PTBTokenizer().tokenize(captions)
    except OSError as exc:  # java vanished or cannot start
        raise OSError(f"the PTBTokenizer Java program failed: {_first_line(exc)}") from None
    # The wrapper zips ids with output lines: empty captions at the very end yield no line, so no entry.
    gts = {i: tokens.get(i, []) + [""] * (len(ref) - len(tokens.get(i, []))) for i, ref in enumerate(refs)}
    res = {i: tokens.get(n + i, [""])[:1] for i in range(n)}
    return CocoTokens(gts, res, PTB_TOKENIZER)


def coco_scores(tokens: CocoTokens) -> dict[str, float]:
    """coco-caption BLEU-1..4, ROUGE-L and CIDEr-D on tokenised text (corpus-level, as coco reports them)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    # verbose=0: no printed counts, and no redirect of the process-wide stdout, which would swallow what the
    # main thread prints while this runs beside the embedding pass
    bleu, _ = Bleu(4).compute_score(tokens.gts, tokens.res, verbose=0)
    rouge_l, _ = Rouge().compute_score(tokens.gts, tokens.res)
    cider, _ = Cider().compute_score(tokens.gts, tokens.res)
    out = {f"bleu{n + 1}": float(value) for n, value in enumerate(bleu)}
    out.update(rouge_l=float(rouge_l), cider=float(cider))
    return out


# One METEOR Java process per Python process, reused: starting it (the JVM, then METEOR's paraphrase
# table) takes 5-15 s, scoring a few hundred captions a fraction of that.
_meteor_process = None


def _meteor():
    global _meteor_process
    if _meteor_process is None or _meteor_process.meteor_p.poll() is not None:
        from pycocoevalcap.meteor.meteor import Meteor

        _meteor_process = Meteor()
    return _meteor_process


def _meteor_corpus_score(meteor, gts: dict[int, list[str]], res: dict[int, list[str]]) -> float:
    """pycocoevalcap's ``Meteor.compute_score`` with the SCORE lines streamed instead of one round trip each.

    The same lines in the same order reach the same Java program (a ``SCORE ||| refs ||| hypothesis`` line per
    sample, then ``EVAL ||| stats...``), so the score is the same; a writer thread keeps both pipes moving.
    """
    lines = []
    for i in gts:
        hypothesis = res[i][0].replace("|||", "").replace("  ", " ")
        lines.append(" ||| ".join(("SCORE", " ||| ".join(gts[i]), hypothesis)) + "\n")
    process = meteor.meteor_p
    failure: list[BaseException] = []

    def write() -> None:
        try:
            process.stdin.write("".join(lines).encode())
            process.stdin.flush()
        except OSError as exc:
            failure.append(exc)

    with meteor.lock:
        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        stats = [process.stdout.readline().decode().strip() for _ in lines]
        writer.join()
        if failure or not all(stats):
            raise OSError(f"METEOR stopped answering ({failure[0] if failure else 'empty statistics line'})")
        process.stdin.write(("EVAL ||| " + " ||| ".join(stats) + "\n").encode())
        process.stdin.flush()
        for _ in lines:  # the per-sample scores, then the corpus score
            process.stdout.readline()
        return float(process.stdout.readline().strip())


def meteor_score(tokens: CocoTokens) -> float:
    """coco-caption METEOR 1.5 on tokenised text. Raises OSError when Java is absent or fails."""
    global _meteor_process
    if not java_available():
        raise OSError("Java is not installed (pycocoevalcap's METEOR runs a Java program)")
    meteor = _meteor()
    try:
        return _meteor_corpus_score(meteor, tokens.gts, tokens.res)
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


@lru_cache(maxsize=4)
def _sentence_model(model: str, device: str):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(model, device=device)


def mean_pooling_pipeline(sentence_model) -> bool:
    """Whether a SentenceTransformer is transformer -> mean pooling (-> normalise): then its sentence embedding
    (up to scale, which a cosine ignores) is the masked mean of the transformer's last layer."""
    modules = list(sentence_model)
    names = [type(m).__name__ for m in modules]
    if names[:2] != ["Transformer", "Pooling"] or names[2:] not in ([], ["Normalize"]):
        return False
    config = modules[1].get_config_dict()
    return config.get("pooling_mode") == "mean" and config.get("include_prompt", True)


def _load_embedding_model(key: str, model: str | None, layers: int | None, device: str) -> tuple[str, int | None]:
    """(model, layers) after loading it once (cached); raises OSError with the reason when it cannot be loaded."""
    name = model
    try:
        if name is None:
            name = str(minilm_dir())
        with _quiet_loading():
            if key == "sbert":
                _sentence_model(name, device)
                return name, None
            if layers is None:
                layers = DEFAULT_BERTSCORE_LAYERS if model is None else bertscore_layers_for(name)
            encoder = load_encoder(name, device)
            if not 1 <= layers <= encoder.model.config.num_hidden_layers:
                raise OSError(f"layer {layers} is not one of the model's 1..{encoder.model.config.num_hidden_layers}")
        return name, layers
    except ImportError as exc:
        raise OSError(f"a library is missing: {_first_line(exc)}") from None
    except Exception as exc:  # offline with no local copy, no such folder, unknown architecture...
        raise OSError(f"model {name!r} could not be loaded: {_first_line(exc)}") from None


@lru_cache(maxsize=8)
def _sbert_with_fallback(requested: str, device: str) -> tuple[str, str]:
    """(the sbert model used, why it is not the requested one or ""). GeoLLaVA's model falls back to the offline
    MiniLM, with one warning line per process; any other model that cannot be loaded raises OSError."""
    try:
        return _load_embedding_model("sbert", requested, None, device)[0], ""
    except OSError as exc:
        if requested != GEOLLAVA_SBERT_MODEL:
            raise
        reason = str(exc)
    fallback = _load_embedding_model("sbert", str(minilm_dir()), None, device)[0]
    print(f"warning: sbert: {reason}; using the offline all-MiniLM-L6-v2 instead, so sbert is not comparable "
          f"with GeoLLaVA's BERT column", file=sys.stderr)
    return fallback, reason


def embedding_scores(refs: list[list[str]], preds: list[str], *, bertscore: tuple[str, int] | None,
                     sbert: str | None, device: str) -> dict[str, list[float]]:
    """Per-sample ``bertscore_f1`` and/or ``sbert`` (models already loaded), each unique text encoded once per model.

    BERTScore: best reference by F1; an empty prediction scores 0 and empty
    references are skipped (bert-score's rule for empty sentences, whose own
    handling crashes with transformers 5). sbert: GeoLLaVA's plain cosine of the
    two sentence embeddings, best reference, empty texts included.
    """
    import torch

    texts, index = unique_texts(preds, *refs)
    out: dict[str, list[float]] = {}
    sentence_model = _sentence_model(sbert, device) if sbert else None
    shared = (bertscore is not None and sentence_model is not None and bertscore[0] == sbert
              and mean_pooling_pipeline(sentence_model))
    token_embeddings, sentence_embeddings = None, None
    if shared:
        # The sentence model's own transformer serves both metrics in one pass.
        model = sentence_model[0].auto_model
        encoder = Encoder(sbert, model, sentence_model.tokenizer, torch.device(device),
                          bertscore_max_length(sentence_model.tokenizer, model.config))
        token_embeddings, sentence_embeddings = encode(encoder, texts, bertscore[1], pooled=True)
        # sentence-transformers cuts texts at its own max_seq_length: those few get their own pass.
        lengths = token_embeddings.lengths.tolist()
        longer = [k for k, n in enumerate(lengths) if n > sentence_model.max_seq_length]
        if longer:
            sentence_embeddings[longer] = sentence_model.encode([texts[k] for k in longer], convert_to_tensor=True,
                                                                show_progress_bar=False).to(sentence_embeddings)
    else:
        if bertscore is not None:
            token_embeddings, _ = encode(load_encoder(bertscore[0], device), texts, bertscore[1], pooled=False)
        if sentence_model is not None:
            sentence_embeddings = sentence_model.encode(texts, batch_size=ENCODE_BATCH_SIZE, convert_to_tensor=True,
                                                        show_progress_bar=False)
    if token_embeddings is not None:
        pairs = sorted({(index[p], index[r], i) for i, (group, p) in enumerate(zip(refs, preds)) if p.strip()
                        for r in group if r.strip()})
        distinct = sorted({(c, r) for c, r, _ in pairs})
        f1 = bertscore_pairs(token_embeddings, torch.tensor([c for c, _ in distinct], dtype=torch.long,
                                                            device=token_embeddings.flat.device),
                             torch.tensor([r for _, r in distinct], dtype=torch.long,
                                          device=token_embeddings.flat.device))
        where = {pair: k for k, pair in enumerate(distinct)}
        values = f1[[where[(c, r)] for c, r, _ in pairs]] if pairs else torch.zeros(0)
        out["bertscore_f1"] = best_per_sample(values, torch.tensor([i for _, _, i in pairs], dtype=torch.long),
                                              len(preds))
    if sentence_embeddings is not None:
        unit = torch.nn.functional.normalize(sentence_embeddings.float(), dim=-1).cpu()
        cand = torch.tensor([index[p] for group, p in zip(refs, preds) for _ in group], dtype=torch.long)
        ref = torch.tensor([index[r] for group in refs for r in group], dtype=torch.long)
        samples = torch.tensor([i for i, group in enumerate(refs) for _ in group], dtype=torch.long)
        cosine = (unit[cand] * unit[ref]).sum(-1)
        # Cosines can be negative: start from -inf, not 0, so the best reference is the true maximum.
        best = torch.full((len(preds),), float("-inf"))
        best.scatter_reduce_(0, samples, cosine, reduce="amax", include_self=True)
        out["sbert"] = best.tolist()
    return out


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

class _Worker(threading.Thread):
    """Runs ``work`` in a thread; ``join`` re-raises its exception in the caller."""

    def __init__(self, work: Callable[[], None]) -> None:
        super().__init__(daemon=True)
        self.work, self.error = work, None
        self.start()

    def run(self) -> None:
        try:
            self.work()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller by join()
            self.error = exc

    def join(self, timeout: float | None = None) -> None:
        super().join(timeout)
        if self.error is not None:
            raise self.error


def compute_metrics_report(references: Sequence[Reference], predictions: Sequence[str], *,
                           bertscore_model: str | None = None, sbert_model: str | None = None,
                           bertscore_layers: int | None = None, device: str = "auto") -> MetricsReport:
    """Every metric of the suite, with per-sample values, what is missing and why, and the models used.

    ``bertscore_model``: a Hugging Face name or folder (default: the offline
    all-MiniLM-L6-v2); ``bertscore_layers``: the layer BERTScore reads (default:
    6 for MiniLM, else bert-score's tuned layer or the model's last one).
    ``sbert_model``: default GeoLLaVA's ``bert-base-nli-mean-tokens``, which
    falls back to the offline MiniLM (one warning line) where it cannot be
    loaded; the model used is in ``report.models`` and the reason in
    ``report.fallbacks``. ``device``: where the embedding models run
    (``auto`` = CUDA when available).
    """
    refs, preds = check_inputs(references, predictions)
    report = MetricsReport(metrics={})
    per = report.per_sample
    device = str(pick_device(device))
    report.device = device

    def attempt(family: str, keys: Sequence[str], run: Callable[[], None]) -> None:
        # A missing library or program costs only its own metrics; other errors are bugs and propagate.
        started = time.perf_counter()
        try:
            run()
        except ImportError as exc:
            for key in keys:
                report.missing[key] = f"a library is missing: {_first_line(exc)}"
        except OSError as exc:
            for key in keys:
                report.missing[key] = _first_line(exc)
        report.seconds[family] = round(time.perf_counter() - started, 3)

    def lexical_and_coco() -> None:
        attempt("rouge", ("rouge1", "rouge2", "rougeL"), lambda: per.update(rouge_scores(refs, preds)))
        attempt("bleu", ("bleu",), lambda: per.update(bleu=geollava_bleu(refs, preds)))
        attempt("sacrebleu", ("sacrebleu",), lambda: report.metrics.update(sacrebleu=sacre_bleu(refs, preds)))
        coco: list[CocoTokens] = []

        def tokenize() -> None:
            coco.append(coco_tokenize(refs, preds))
            report.coco_tokenizer = coco[0].tokenizer

        attempt("coco_tokenize", COCO_KEYS + ("meteor",), tokenize)
        if coco:
            attempt("coco", COCO_KEYS, lambda: report.metrics.update(coco_scores(coco[0])))
            attempt("meteor", ("meteor",), lambda: report.metrics.update(meteor=meteor_score(coco[0])))

    # The lexical and coco metrics (Python, and Java processes) run beside the embedding pass, whose
    # torch kernels release the GIL: on a GPU the two overlap almost fully, on a CPU they share the cores.
    worker = _Worker(lexical_and_coco)

    loaded: dict[str, tuple] = {}

    def load_bertscore() -> None:
        name, layers = _load_embedding_model("bertscore_f1", bertscore_model, bertscore_layers, device)
        loaded["bertscore_f1"] = (name, layers)
        report.models["bertscore_f1"] = f"{name} (layer {layers})"

    def load_sbert() -> None:
        name, reason = _sbert_with_fallback(sbert_model or GEOLLAVA_SBERT_MODEL, device)
        loaded["sbert"] = name
        report.models["sbert"] = name
        if reason:
            report.fallbacks["sbert"] = reason

    attempt("load_bertscore_model", ("bertscore_f1",), load_bertscore)
    attempt("load_sbert_model", ("sbert",), load_sbert)
    if loaded:
        started = time.perf_counter()
        per.update(embedding_scores(refs, preds, bertscore=loaded.get("bertscore_f1"), sbert=loaded.get("sbert"),
                                    device=device))
        report.seconds["embeddings"] = round(time.perf_counter() - started, 3)
    worker.join()
    for key in PER_SAMPLE:
        if key in per:
            report.metrics[key] = float(sum(per[key]) / len(per[key]))
    report.metrics = dict(sorted(report.metrics.items()))
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
