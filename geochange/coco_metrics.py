"""coco-caption's metrics as DeltaVLM reports them: BLEU-1..4, ROUGE-L, CIDEr and METEOR (pycocoevalcap), after its
Java PTB tokenizer (a fallback normaliser only without Java). METEOR's Java process starts once per process and its
lines are streamed, not sent one round trip each."""
from __future__ import annotations

import atexit
import shutil
import threading
import unicodedata
from dataclasses import dataclass

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
        raise OSError(f"the PTBTokenizer Java program failed: {first_line(exc)}") from None
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
