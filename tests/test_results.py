"""Results files: resume, GeoLLaVA's formats, metrics files written and read back."""
import csv
import json

import pytest

from geochange.errors import UserError
from geochange.metrics import MetricsReport
from geochange.results import ResultsWriter, read_jsonl, read_results_file, strip_prompt, write_metrics


def test_writer_resumes_drops_a_cut_line_and_refuses_duplicates(tmp_path):
    path = tmp_path / "run.jsonl"
    writer = ResultsWriter(path)
    writer.append([{"id": "a", "true": "x", "generated": "y"}, {"id": "b", "true": "x", "generated": "z"}])
    with open(path, "a") as handle:
        handle.write('{"id": "c", "true": "x", "gene')  # a crash mid-line
    again = ResultsWriter(path)
    assert again.done_ids == {"a", "b"}
    assert path.read_text().endswith("\n") and len(read_jsonl(path)) == 2
    with pytest.raises(UserError, match="'a' is already there"):
        again.append([{"id": "a", "true": "x", "generated": "y"}])
    again.append([{"id": "c", "true": "x", "generated": "w"}])
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b", "c"]


def test_corrupt_middle_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(UserError, match=rf"{path}: line 2 is not valid JSON"):
        ResultsWriter(path)


def test_geollava_formats(tmp_path):
    objects = [{"true": "a road", "generated": "USER: <video> What changed? ASSISTANT: Answer: a new road"},
               {"true": "no change", "generated": "nothing"}]
    back_to_back = tmp_path / "b2b.json"
    back_to_back.write_text("".join(json.dumps(o, indent=1) for o in objects))
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(objects))
    for path in (back_to_back, listed):
        records = read_results_file(path)
        assert [r["generated"] for r in records] == ["a new road", "nothing"] and [r["id"] for r in records] == ["0", "1"]
    assert strip_prompt("Answer: x Answer: y ") == "y"
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps([{"true": "a"}, {"true": "b", "generated": "c"}]))
    with pytest.raises(UserError, match=rf"{broken}: record 0 has no 'generated' field"):
        read_results_file(broken)
    junk = tmp_path / "junk.json"
    junk.write_text('{"true": "a", "generated": "b"} oops')
    with pytest.raises(UserError, match=rf"{junk}: not valid JSON at line 1"):
        read_results_file(junk)


def test_metrics_files_read_back(tmp_path):
    records = [{"id": "1", "video": "v.mp4", "question": "q", "true": ["r1", "r2"], "generated": "g"}]
    report = MetricsReport(metrics={"rouge1": 0.5}, missing={"meteor": "no Java"}, models={"sbert": "m"},
                           per_sample={"rouge1": [0.5]})
    path = write_metrics(tmp_path / "run", records, report, model="tiny", settings={"A": 1}, seconds=1.5,
                         extra={"family": "videollava"})
    data = json.loads(path.read_text())
    assert path.name == "run.metrics.json" and data["metrics"] == {"rouge1": 0.5} and data["num_samples"] == 1
    assert data["missing"] == {"meteor": "no Java"} and data["family"] == "videollava" and data["settings"] == {"A": 1}
    rows = list(csv.DictReader(open(tmp_path / "run.csv")))
    assert rows == [{"id": "1", "video": "v.mp4", "question": "q", "true": "r1 | r2", "generated": "g", "rouge1": "0.5"}]
