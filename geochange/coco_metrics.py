"""coco-caption's metrics as DeltaVLM reports them: BLEU-1..4, ROUGE-L, CIDEr and METEOR (pycocoevalcap), after its
Java PTB tokenizer (a fallback normaliser only without Java). METEOR's Java process starts once per process and its
lines are streamed, not sent one round trip each.

ROUGE-L and CIDEr-D are pycocoevalcap's definitions, computed here with the work that repeats done once: each
distinct caption's n-gram vector once, each distinct (candidate, reference) pair once, and the longest common
subsequence by bit-parallel comparison instead of a table filled in Python (the same numbers, tested against
pycocoevalcap's own ``Rouge`` and ``Cider``; together they were most of the metric set's CPU time beside the
encoder)."""
from __future__ import annotations

import atexit
import math
import shutil
import subprocess
import threading
import unicodedata
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Callable, Hashable, Iterable, Sequence

from .errors import first_line

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


# The PTB tokenizer's Java runs for a second or less: compiling with C1 alone (no C2 behind it) halves its CPU time
# (0.85 -> 0.45 s for 7,000 captions) and shortens it; its tokens do not depend on how the JVM compiles.
PTB_JVM_OPTIONS = ("-XX:TieredStopAtLevel=1",)


def ptb_tokenize(texts: Sequence[str]) -> list[str]:
    """Each text as pycocoevalcap's ``PTBTokenizer.tokenize`` gives it: Stanford's PTBTokenizer (the jar pycocoevalcap
    ships, ``-preserveLines -lowerCase``, one line per text, newlines inside a text made spaces), then its
    punctuation tokens dropped.

    The same program and flags on the same UTF-8 bytes, read from a pipe instead of a temporary file that the wrapper
    writes into the installed package (which fails where site-packages is read-only); the tokenizer's statistics
    line on stderr is kept back (it is shown only if the program fails). Raises OSError when Java fails."""
    from pycocoevalcap.tokenizer import ptbtokenizer

    if not texts:
        return []
    jar = Path(ptbtokenizer.__file__).with_name(ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    command = ["java", *PTB_JVM_OPTIONS, "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
               "-lowerCase"]
    sentences = "\n".join(text.replace("\n", " ") for text in texts)
    run = subprocess.run(command, input=sentences.encode(), capture_output=True)
    if run.returncode != 0:
        raise OSError(f"exit status {run.returncode}: {first_line(run.stderr.decode(errors='replace'))}")
    lines = run.stdout.decode().split("\n")
    lines += [""] * (len(texts) - len(lines))  # texts at the very end that tokenise to nothing yield no line
    return [" ".join(w for w in line.rstrip().split(" ") if w not in ptbtokenizer.PUNCTUATIONS)
            for line in lines[:len(texts)]]


def coco_tokenize(refs: list[list[str]], preds: list[str]) -> CocoTokens:
    """coco-caption's pipeline: the PTB tokenizer (``ptb_tokenize``) on references and predictions alike, or, without
    Java, the fallback normaliser. One Java run serves both, over each distinct text once (the tokenizer works line by
    line, so this is the same as tokenising ``gts`` and ``res`` separately, as coco's ``COCOEvalCap`` does)."""
    if not java_available():
        return CocoTokens({i: [coco_normalise(r) for r in ref] for i, ref in enumerate(refs)},
                          {i: [coco_normalise(p)] for i, p in enumerate(preds)}, FALLBACK_TOKENIZER)
    texts = list(dict.fromkeys([text for ref in refs for text in ref] + list(preds)))
    try:
        tokenised = dict(zip(texts, ptb_tokenize(texts)))
    except OSError as exc:  # java vanished, cannot start, or failed
        raise OSError(f"the PTBTokenizer Java program failed: {first_line(exc)}") from None
    return CocoTokens({i: [tokenised[r] for r in ref] for i, ref in enumerate(refs)},
                      {i: [tokenised[p]] for i, p in enumerate(preds)}, PTB_TOKENIZER)


def lcs_length(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """The length of the longest common subsequence of two token sequences, by bit-parallel comparison (Allison &
    Dix 1986; Hyyro 2004): one big-integer step per token of ``b`` instead of a ``len(a) x len(b)`` table."""
    if not a or not b:
        return 0
    matches: dict[Hashable, int] = {}
    for position, token in enumerate(a):
        matches[token] = matches.get(token, 0) | (1 << position)
    width = (1 << len(a)) - 1
    row = width
    for token in b:
        common = row & matches.get(token, 0)
        row = ((row + common) | (row - common)) & width
    return len(a) - row.bit_count()


# pycocoevalcap's ROUGE-L weighs recall by beta = 1.2 (its Rouge.beta)
ROUGE_L_BETA = 1.2


def coco_rouge_l(gts: dict[int, list[str]], res: dict[int, list[str]]) -> float:
    """pycocoevalcap's ``Rouge().compute_score(gts, res)[0]``: per sample, the best precision and the best recall of
    the candidate's LCS over the references (tokens split at single spaces), their F-measure with beta 1.2, and the
    mean over samples."""
    import numpy as np

    tokens: dict[str, list[str]] = {}
    pairs: dict[tuple[str, str], int] = {}

    def split(text: str) -> list[str]:
        if text not in tokens:
            tokens[text] = text.split(" ")
        return tokens[text]

    scores = []
    for key in gts:
        candidate = res[key][0]
        token_c = split(candidate)
        precisions, recalls = [], []
        for reference in gts[key]:
            if (candidate, reference) not in pairs:
                pairs[(candidate, reference)] = lcs_length(split(reference), token_c)
            lcs = pairs[(candidate, reference)]
            precisions.append(lcs / float(len(token_c)))
            recalls.append(lcs / float(len(split(reference))))
        precision, recall = max(precisions), max(recalls)
        if precision != 0 and recall != 0:
            scores.append(((1 + ROUGE_L_BETA ** 2) * precision * recall)
                          / float(recall + ROUGE_L_BETA ** 2 * precision))
        else:
            scores.append(0.0)
    return float(np.mean(np.array(scores)))


def _ngram_counts(text: str, n: int) -> dict[tuple[str, ...], int]:
    """pycocoevalcap's ``precook``: every 1..n-gram of the whitespace tokens, counted (in its order: the unigrams in
    the text's order, then the bigrams..., so that sums over them add up in the same order)."""
    words = text.split()
    counts: dict[tuple[str, ...], int] = {}
    for k in range(1, n + 1):
        counts.update(Counter(zip(*(words[i:] for i in range(k)))))
    return counts


def cider_d(gts: dict[int, list[str]], res: dict[int, list[str]], n: int = 4, sigma: float = 6.0) -> float:
    """pycocoevalcap's ``Cider().compute_score(gts, res)[0]`` (CIDEr-D: tf-idf n-gram vectors, document frequencies
    over the samples' reference sets, clipped cosine, a Gaussian length penalty, x10, mean over samples).

    Each distinct caption's n-grams are counted once, and the tf-idf vectors of the distinct captions become the rows
    of one sparse matrix, so every distinct (candidate, reference) similarity is a few sparse array operations
    instead of a dictionary walk in Python (equal to the library to rounding: sums run in another order).
    """
    import numpy as np
    from scipy import sparse

    keys = list(gts)
    texts: dict[str, int] = {}  # distinct caption -> its row
    for key in keys:
        for text in (res[key][0], *gts[key]):
            texts.setdefault(text, len(texts))
    counts = [_ngram_counts(text, n) for text in texts]
    columns: dict[tuple[str, ...], int] = {}  # n-gram -> its column
    entries = sum(map(len, counts))
    rows = np.repeat(np.arange(len(counts)), [len(c) for c in counts])
    cols = np.fromiter((columns.setdefault(ngram, len(columns)) for c in counts for ngram in c), np.int64, entries)
    term_freq = np.fromiter((f for c in counts for f in c.values()), np.float64, entries)
    order = np.fromiter(map(len, columns), np.int64, len(columns)) - 1  # each column's n-gram order - 1
    # document frequency: in how many samples' reference sets each n-gram occurs
    references = [(sample, texts[text]) for sample, key in enumerate(keys) for text in gts[key]]
    in_sample = sparse.csr_matrix((np.ones(len(references)), tuple(np.array(references).T)),
                                  shape=(len(keys), len(counts)))
    in_text = sparse.csr_matrix((np.ones(entries), (rows, cols)), shape=(len(counts), len(columns)))
    document_frequency = np.asarray(((in_sample @ in_text) > 0).sum(axis=0), dtype=np.float64).ravel()
    # numpy's log, as the library takes it; idf >= 0 (a frequency is at most the number of samples)
    idf = float(np.log(float(len(keys)))) - np.log(np.maximum(1.0, document_frequency))
    weights = sparse.csr_matrix((term_freq * idf[cols], (rows, cols)), shape=(len(counts), len(columns)))
    by_order = sparse.csr_matrix((np.ones(len(columns)), (np.arange(len(columns)), order)), shape=(len(columns), n))
    norms = np.sqrt((weights.multiply(weights) @ by_order).toarray())  # [texts, n]
    # the length CIDEr-D compares: the number of bigrams (the library's counts2vec)
    lengths = np.bincount(rows, weights=term_freq * (order[cols] == 1), minlength=len(counts))

    pairs: dict[tuple[int, int], int] = {}  # distinct (candidate row, reference row) -> its index
    sample_pairs = [[pairs.setdefault((texts[res[key][0]], texts[ref]), len(pairs)) for ref in gts[key]]
                    for key in keys]
    candidate = np.array([c for c, _ in pairs], dtype=np.int64)
    reference = np.array([r for _, r in pairs], dtype=np.int64)
    hyp, ref = weights[candidate], weights[reference]
    # sum over the candidate's n-grams of min(candidate weight, reference weight) * reference weight, per order
    clipped = (hyp.minimum(ref).multiply(ref) @ by_order).toarray()
    norm_product = norms[candidate] * norms[reference]
    clipped = np.where(norm_product != 0, clipped / np.where(norm_product != 0, norm_product, 1.0), clipped)
    delta = lengths[candidate] - lengths[reference]
    similarity = clipped * (math.e ** (-(delta ** 2) / (2 * sigma ** 2)))[:, None]
    scores = [similarity[indices].sum(0).mean() / len(indices) * 10.0 for indices in sample_pairs]
    return float(np.mean(np.array(scores)))


def reference_counts(references: Iterable[str],
                     counted: Callable[[str], tuple[int, dict]]) -> tuple[list[int], dict]:
    """BLEU's side of one sample's references, as pycocoevalcap's ``cook_refs`` and sacreBLEU's
    ``_extract_reference_info`` build it: each reference's length, and each n-gram's largest count over them
    (``counted``: a text's length and n-gram counts)."""
    lengths, most = [], {}
    for reference in references:
        length, counts = counted(reference)
        lengths.append(length)
        for ngram, count in counts.items():
            most[ngram] = max(most.get(ngram, 0), count)
    return lengths, most


def coco_bleu(gts: dict[int, list[str]], res: dict[int, list[str]], n: int = 4) -> list[float]:
    """pycocoevalcap's ``Bleu(n).compute_score(gts, res)[0]`` (BLEU-1..n, corpus level, closest reference length),
    by the library's own scorer, with what repeats prepared once: each distinct caption's n-grams counted once, each
    distinct reference set's clipping counts merged once, each distinct (candidate, references) cooked once. The
    scorer then sums the same integers in the same order: the same numbers."""
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer, cook_test, precook

    counted = lru_cache(maxsize=None)(partial(precook, n=n))
    cooked_refs: dict[tuple[str, ...], tuple[list[int], dict]] = {}
    cooked_tests: dict[tuple[str, tuple[str, ...]], dict] = {}
    scorer = BleuScorer(n=n)
    for key in gts:
        refs, test = tuple(gts[key]), res[key][0]
        if refs not in cooked_refs:  # the library's cook_refs
            cooked_refs[refs] = reference_counts(refs, counted)
        if (test, refs) not in cooked_tests:
            cooked_tests[(test, refs)] = cook_test(test, cooked_refs[refs], n=n)
        scorer.crefs.append(cooked_refs[refs])
        scorer.ctest.append(cooked_tests[(test, refs)])
    score, _ = scorer.compute_score(option="closest", verbose=0)
    return [float(value) for value in score]


def coco_scores(tokens: CocoTokens) -> dict[str, float]:
    """coco-caption BLEU-1..4, ROUGE-L and CIDEr-D (``coco_bleu``, ``coco_rouge_l``, ``cider_d``: pycocoevalcap's
    ``Bleu``, ``Rouge`` and ``Cider``) on tokenised text (corpus-level, as coco reports them)."""
    out = {f"bleu{n + 1}": value for n, value in enumerate(coco_bleu(tokens.gts, tokens.res))}
    out.update(rouge_l=coco_rouge_l(tokens.gts, tokens.res), cider=cider_d(tokens.gts, tokens.res))
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

    The same lines reach the same Java program (a ``SCORE ||| refs ||| hypothesis`` line per sample, then
    ``EVAL ||| stats...`` with every sample's statistics in order), so the score is the same; a writer thread keeps
    both pipes moving. A line that repeats (the same references and hypothesis) is sent once: its statistics are
    the same, and EVAL still gets one per sample.
    """
    lines = []
    for i in gts:
        hypothesis = res[i][0].replace("|||", "").replace("  ", " ")
        lines.append(" ||| ".join(("SCORE", " ||| ".join(gts[i]), hypothesis)) + "\n")
    distinct = list(dict.fromkeys(lines))
    process = meteor.meteor_p
    failure: list[BaseException] = []

    def write() -> None:
        try:
            process.stdin.write("".join(distinct).encode())
            process.stdin.flush()
        except OSError as exc:
            failure.append(exc)

    with meteor.lock:
        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        stats = {line: process.stdout.readline().decode().strip() for line in distinct}
        writer.join()
        if failure or not all(stats.values()):
            raise OSError(f"METEOR stopped answering ({failure[0] if failure else 'empty statistics line'})")
        process.stdin.write(("EVAL ||| " + " ||| ".join(stats[line] for line in lines) + "\n").encode())
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
        raise OSError(f"the METEOR Java program failed: {first_line(exc)} {stderr[:200]}".strip()) from None


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
