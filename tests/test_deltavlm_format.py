"""ChangeChat answer formats, DeltaVLM's prompt normalisation and the sub-task scorers (no model needed)."""
from __future__ import annotations

import ast
import math
import re
import warnings

import numpy as np
import pytest

import geochange.changechat_format as cc
from geochange.deltavlm.predictor import Decoding, Predictor, Prompting
from geochange.deltavlm.scoring import (NO_CHANGE_SENTENCES, score_count, score_localization, score_records,
                                       score_released_classification, score_yesno)


# Independent re-statements of the released notebooks' parsers (hanlinwu/DeltaVLM scripts/).
def released_count_parser(caption: str) -> tuple[int, int]:
    """test-count.ipynb: zero phrases, else roads before the first 'new', buildings after; 'no' = 0."""
    if "there are no changes in roads or buildings" in caption or "no new roads or buildings" in caption:
        return 0, 0
    parts = caption.split("new")
    counts = []
    for text in (parts[0], parts[1]):
        counts.append(0 if "no" in text else int(re.findall(r"\d+", text)[0]))
    return counts[0], counts[1]


def released_localization_parser(caption: str) -> tuple[list, list]:
    """test-loc.ipynb: 'roads [...]' and 'buildings [...]' read with ast.literal_eval."""
    if "roads [] buildings []" in caption:
        return [], []
    roads = ast.literal_eval(re.findall(r"roads\s*(\[[^\]]*\])", caption)[0])
    buildings = ast.literal_eval(re.findall(r"buildings\s*(\[[^\]]*\])", caption)[0])
    return roads, buildings


@pytest.mark.parametrize("roads,buildings", [(0, 0), (1, 0), (0, 1), (2, 3), (1, 1), (12, 0)])
def test_count_answers_are_read_by_the_released_parser_and_ours(roads, buildings):
    answer = cc.count_answer(roads, buildings)
    assert released_count_parser(answer) == (roads, buildings)
    assert cc.parse_count_answer(answer) == (roads, buildings)
    # Training text is normalised (lower-case, no .:;); the answer must survive it unchanged.
    assert cc.normalise_text(answer) == answer


@pytest.mark.parametrize("text,expected", [
    ("No roads has changed, and no buildings has changed.", (0, 0)),   # a released dialog answer
    ("there are no changes in roads or buildings", (0, 0)),
    ("Two roads and three buildings have changed.", (2, 3)),
    ("roads: 1, buildings: 4", (1, 4)),
    ("a new road and 2 new buildings", (1, 2)),
    ("there is 1 new road", (1, None)),
    ("i cannot tell", (None, None)),
])
def test_count_parser_reads_digits_and_words(text, expected):
    assert cc.parse_count_answer(text) == expected


def test_localization_answers_are_read_by_the_released_parser_and_ours():
    roads, buildings = [(0, 0), (0, 1), (0, 0)], [(1, 1), (2, 2)]
    answer = cc.localization_answer(roads, buildings)
    assert answer == "roads ['top-left', 'top-center'] buildings ['center-center', 'bottom-right']"
    assert released_localization_parser(answer) == (["top-left", "top-center"], ["center-center", "bottom-right"])
    assert cc.parse_localization_answer(answer) == ({"top-left", "top-center"}, {"center-center", "bottom-right"})
    empty = cc.localization_answer([], [])
    assert released_localization_parser(empty) == ([], []) and cc.parse_localization_answer(empty) == (set(), set())
    assert cc.normalise_text(answer) == answer
    # Loose spellings a model may produce.
    assert cc.parse_localization_answer("Roads: [Top Left, center] buildings [upper-right]") == (
        {"top-left", "center-center"}, {"top-right"})
    assert cc.parse_localization_answer("nothing to see") == (None, None)


def test_grid_labels_are_the_released_label_list():
    assert cc.GRID_LABELS == ("top-left", "top-center", "top-right", "center-left", "center-center", "center-right",
                              "bottom-left", "bottom-center", "bottom-right")
    assert [cc.grid_label(r, c) for r in range(3) for c in range(3)] == list(cc.GRID_LABELS)


def test_yesno_parser():
    assert [cc.parse_yesno_answer(t) for t in ("yes", "No.", "yes, a road was built", "maybe")] == [
        True, False, True, None]


def test_normalise_text_is_lavis_pre_caption():
    # lower-case; . ! " ( ) * # : ; ~ become spaces; runs of spaces collapse; commas, ? and ' stay.
    assert cc.normalise_text('Q: Is it (really) "new"?  Yes; it is!') == "q is it really new ? yes it is"
    assert cc.normalise_text(cc.YESNO_PROMPT) == (
        "please judge whether these two images have changed please answer yes or no")
    assert cc.normalise_text(" ".join(["word"] * 60)) == " ".join(["word"] * 50)
    assert cc.normalise_text(" ".join(["word"] * 60), None).count("word") == 60


def test_dialog_prompt_is_the_training_layout():
    assert cc.dialog_prompt([], "Has it changed?") == "q: Has it changed?"
    text = cc.dialog_prompt([("Has it changed?", "Yes"), ("How many?", "2")], "Where?")
    assert text == "q: Has it changed? a: Yes  q: How many? a: 2  q: Where?"
    assert cc.normalise_text(text) == "q has it changed? a yes q how many? a 2 q where?"


def test_task_of_recognises_the_changechat_prompts():
    assert [cc.task_of(p) for p in (cc.CAPTION_PROMPT, cc.YESNO_PROMPT, cc.COUNT_PROMPT, cc.LOCALIZATION_PROMPT)] == [
        "caption", "yesno", "count", "localization"]
    assert cc.task_of(cc.normalise_text(cc.COUNT_PROMPT)) == "count"
    assert cc.task_of("What color are the new roofs?") == "open"


def test_prompt_building():
    bare = Predictor(None, None, None, Decoding(), Prompting())
    assert bare.prompt(cc.CAPTION_PROMPT) == "please briefly describe the changes in these two images"
    assert Predictor(None, None, None, Decoding(), Prompting(normalise=False)).prompt("Hi.") == "Hi."
    trained = Predictor(None, None, None, Decoding(), Prompting(training_format=True))
    assert trained.prompt("Has it changed?") == "q has it changed?"
    # A long history loses its oldest turns so the question itself stays (training kept the first 50 words).
    history = [(f"question number {i} about the scene", f"answer number {i}") for i in range(10)]
    prompt = bare.prompt("Where are the new buildings?", history)
    assert prompt.endswith("q where are the new buildings?") and len(prompt.split()) <= 50
    assert "question number 9" in prompt and "question number 0" not in prompt


def test_decoding_settings_are_checked(user_error):
    user_error(lambda: Decoding(num_beams=0).check(), "NUM_BEAMS")
    user_error(lambda: Decoding(max_new_tokens=4, min_new_tokens=5).check(), "MIN_NEW_TOKENS")


# --------------------------------------------------------------------------- scorers on hand-made cases

def test_yesno_scores_by_hand():
    truths = [True, True, False, False, True]
    scores = score_yesno(truths, ["yes", "no", "no", "yes", "maybe"])
    # tp: #0; fp: #3; fn: #1 and the unparsed #4 -> precision 1/2, recall 1/3.
    assert scores["accuracy"] == pytest.approx(2 / 5)
    assert scores["precision"] == pytest.approx(1 / 2)
    assert scores["recall"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))
    assert scores["unparsed"] == pytest.approx(1 / 5)


def test_count_scores_by_hand():
    truths = [(1, 2), (0, 0), (3, 1)]
    scores = score_count(truths, ["there is 1 new road and 2 new buildings", "two roads and no buildings changed",
                                  "gibberish"])
    # predictions (1, 2), (2, 0), (0, 0): road errors 0, 2, 3; building errors 0, 0, 1.
    assert scores["roads_mae"] == pytest.approx(5 / 3)
    assert scores["roads_rmse"] == pytest.approx(math.sqrt(13 / 3))
    assert scores["buildings_mae"] == pytest.approx(1 / 3)
    assert scores["buildings_rmse"] == pytest.approx(math.sqrt(1 / 3))
    assert scores["mae"] == pytest.approx(1.0) and scores["rmse"] == pytest.approx(math.sqrt(14 / 6))
    assert scores["exact_accuracy"] == pytest.approx(1 / 3) and scores["unparsed"] == pytest.approx(1 / 3)


def test_localization_scores_by_hand():
    truths = [(frozenset({"top-left"}), frozenset()),
              (frozenset({"top-left", "center-center"}), frozenset({"bottom-right"}))]
    answers = ["roads ['top-left'] buildings []", "roads ['top-left', 'top-right'] buildings []"]
    scores = score_localization(truths, answers)
    # roads: tp 2, predicted 3, true 3; Jaccard 1 and 1/3; one exact set of two.
    assert scores["roads_precision"] == pytest.approx(2 / 3) and scores["roads_recall"] == pytest.approx(2 / 3)
    assert scores["roads_jaccard"] == pytest.approx((1 + 1 / 3) / 2)
    assert scores["roads_subset_accuracy"] == pytest.approx(1 / 2)
    assert scores["roads_hamming_loss"] == pytest.approx(2 / 18)
    # buildings: nothing predicted -> precision 0 (sklearn's zero_division), recall 0; pair 1 is empty/empty.
    assert scores["buildings_precision"] == 0 and scores["buildings_recall"] == 0
    assert scores["buildings_jaccard"] == 0  # empty vs empty scores 0, as sklearn's default
    assert scores["buildings_subset_accuracy"] == pytest.approx(1 / 2)
    # both categories: tp 2, predicted 3, true 4 -> F1 = 2PR/(P+R); exact match only for pair 0.
    p, r = 2 / 3, 2 / 4
    assert scores["f1"] == pytest.approx(2 * p * r / (p + r)) and scores["exact_match"] == pytest.approx(1 / 2)


def test_localization_scores_match_scikit_learn():
    from sklearn.metrics import accuracy_score, f1_score, hamming_loss, jaccard_score, precision_score, recall_score

    rng = np.random.default_rng(7)
    labels = list(cc.GRID_LABELS)
    truths, answers, true_bins, pred_bins = [], [], [], []
    for _ in range(40):
        true = {label for label in labels if rng.random() < 0.2}
        pred = {label for label in labels if rng.random() < 0.2}
        truths.append((frozenset(true), frozenset()))
        answers.append(f"roads {sorted(pred)} buildings []")
        true_bins.append([int(label in true) for label in labels])
        pred_bins.append([int(label in pred) for label in labels])
    scores = score_localization(truths, answers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about the empty/empty pairs it scores 0
        expected = {"precision": precision_score(true_bins, pred_bins, average="micro"),
                    "recall": recall_score(true_bins, pred_bins, average="micro"),
                    "f1": f1_score(true_bins, pred_bins, average="micro"),
                    "jaccard": jaccard_score(true_bins, pred_bins, average="samples"),
                    "subset_accuracy": accuracy_score(true_bins, pred_bins),
                    "hamming_loss": hamming_loss(true_bins, pred_bins)}
    for key, value in expected.items():
        assert scores[f"roads_{key}"] == pytest.approx(value), key


# --------------------------------------------------------------------------- DeltaVLM's released classification

CLS_CAPTIONS = ["there is no difference", "a new road appears", "almost nothing has changed",
                "the scene is the same as before", "no change has occurred.", "two buildings were built",
                "the two scenes seem identical", "there is no difference "]
CLS_FLAGS = [0, 1, 1, 0, 0, 1, 1, 0]


def released_notebook_scores(captions, flags):
    """scripts/test-cls.ipynb, restated: its counting loops, written out."""
    nochange_caps = ["there is no difference", "the two scenes seem identical", "the scene is the same as before",
                     "no change has occurred", "almost nothing has changed"]
    pre = [0 if cap in nochange_caps else 1 for cap in captions]
    tp = sum(p == 1 and t == 1 for p, t in zip(pre, flags))
    fp = sum(p == 1 and t == 0 for p, t in zip(pre, flags))
    fn = sum(p == 0 and t == 1 for p, t in zip(pre, flags))
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    test_nochange = sum(cap in nochange_caps for cap in captions)
    t_nochange = sum(cap in nochange_caps and t == 0 for cap, t in zip(captions, flags))
    nochange_total = sum(t == 0 for t in flags)
    return {"accuracy": sum(p == t for p, t in zip(pre, flags)) / len(flags), "precision": precision,
            "recall": recall, "f1": 2 * precision * recall / (precision + recall),
            "f0_5": 1.25 * precision * recall / (0.25 * precision + recall),
            "nochange_precision": t_nochange / test_nochange, "change_precision": tp / (len(flags) - test_nochange),
            "nochange_recall": t_nochange / nochange_total, "change_recall": tp / (len(flags) - nochange_total)}


def test_released_classification_is_the_notebooks_rule():
    assert NO_CHANGE_SENTENCES[0] == "there is no difference" and len(NO_CHANGE_SENTENCES) == 5
    scores = score_released_classification(CLS_FLAGS, CLS_CAPTIONS)
    expected = released_notebook_scores(CLS_CAPTIONS, CLS_FLAGS)
    assert scores == pytest.approx(expected)
    # exact sentences only: the full stop and the trailing space make "changed" predictions
    assert scores["nochange_recall"] == pytest.approx(2 / 4) and scores["accuracy"] == pytest.approx(4 / 8)


def test_released_classification_comes_from_the_caption_task():
    records = [{"id": str(i), "task": "caption", "true": ["no change has occurred"], "generated": caption,
                "changeflag": flag} for i, (caption, flag) in enumerate(zip(CLS_CAPTIONS, CLS_FLAGS))]
    records.append({"id": "x", "task": "caption", "true": ["a road"], "generated": "a road", "changeflag": None})
    records.append({"id": "y", "task": "yesno", "true": "yes", "generated": "yes", "changeflag": 1})
    scores = score_records(records)
    released = scores["cls_from_captions"]
    assert released.samples == len(CLS_CAPTIONS) and released.skipped == 1  # the record without a changeflag
    assert released.metrics == pytest.approx(released_notebook_scores(CLS_CAPTIONS, CLS_FLAGS))
    assert scores["yesno"].metrics["accuracy"] == 1.0 and "f0_5" not in scores["yesno"].metrics
