"""Loading GeoLLaVA and ChangeChat annotation files; every mistake names the file and the record."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from geochange.annotations import (ChangeChatSample, Sample, describe_test_set, load_annotations, load_changechat,
                                   strip_placeholders)
from geochange.changechat_format import CAPTION_PROMPT, COUNT_PROMPT
from geochange.sample.data import (SAMPLE_CHANGECHAT_CAPTIONS, SAMPLE_CHANGECHAT_INSTRUCTIONS, SAMPLE_CHANGECHAT_ROOT,
                                   SAMPLE_TRAIN, SAMPLE_VAL, SAMPLE_VIDEO_DIR)
from geochange.video import read_video_frames, write_video


def record(id_: str = "a", video: str = "a.mp4", question: str = "<video>\nWhat changed?", answer: str = "a road."):
    return {"id": id_, "video": video, "conversations": [{"from": "human", "value": question},
                                                         {"from": "gpt", "value": answer}]}


@pytest.fixture
def videos(tmp_path):
    """tmp_path/videos holding two tiny 2-frame videos a.mp4 and b.mp4."""
    import numpy as np

    folder = tmp_path / "videos"
    for name in ("a", "b"):
        write_video([np.zeros((16, 16, 3), np.uint8), np.full((16, 16, 3), 200, np.uint8)], folder / f"{name}.mp4")
    return folder


# --------------------------------------------------------------------------- GeoLLaVA

def test_bundled_sample_loads(sample_dir):
    val = load_annotations(SAMPLE_VAL, SAMPLE_VIDEO_DIR)
    raw = json.loads(SAMPLE_VAL.read_text())
    assert len(val) == 60 and all(isinstance(s, Sample) for s in val)
    first = val[0]
    assert first.id == raw[0]["id"] and first.video == SAMPLE_VIDEO_DIR / raw[0]["video"]
    assert first.question == raw[0]["conversations"][0]["value"].replace("<video>\n", "")
    assert "<video>" not in first.question and first.question == first.question.strip()
    assert [s.answer for s in val] == [r["conversations"][1]["value"] for r in raw]
    assert [s.id for s in load_annotations(SAMPLE_TRAIN, SAMPLE_VIDEO_DIR, limit=5)] == [f"train_{i:05d}"
                                                                                          for i in range(5)]
    assert read_video_frames(val[3].video).shape == (2, 256, 256, 3)


def test_video_dir_defaults_to_the_json_folder_and_placeholders_go(write_json, videos):
    path = write_json([record(question="  <video>\n  What changed here?  "), record("b", "b.mp4", "<image>Why?")],
                      "videos/ann.json")
    samples = load_annotations(path)
    assert samples == [Sample("a", videos / "a.mp4", "What changed here?", "a road."),
                       Sample("b", videos / "b.mp4", "Why?", "a road.")]
    assert strip_placeholders("<video>\n<image> x <video>") == "x"


def test_missing_answer_is_an_error_unless_not_required(write_json, videos, user_error):
    unanswered = record("b", "b.mp4")
    unanswered["conversations"] = unanswered["conversations"][:1]
    path = write_json([record(), unanswered])
    user_error(lambda: load_annotations(path, videos), str(path), "record 1 (id 'b')", "no answer")
    assert load_annotations(path, videos, require_answer=False)[1].answer is None


BROKEN = {
    "not a list": ({"id": "a"}, "expected a JSON list", "found a JSON dict"),
    "record not a dict": ([record(), ["a.mp4"]], "record 1:", "expected a JSON object"),
    "missing video": ([{"id": "x", "conversations": record()["conversations"]}], "record 0 (id 'x')", "'video'"),
    "missing conversations": ([{"id": "x", "video": "a.mp4"}], "record 0 (id 'x')", "'conversations'"),
    "bad turn": ([{**record("x"), "conversations": [{"from": "human"}]}], "record 0 (id 'x')", "turn 0"),
    "no human turn": ([{**record("x"), "conversations": [{"from": "gpt", "value": "y"}]}], "record 0 (id 'x')",
                      "no human turn"),
    "only a placeholder": ([record("x", question="<video>\n")], "record 0 (id 'x')", "no question"),
    "duplicate ids": ([record(), record("b", "b.mp4"), record("a", "b.mp4")], "record 2 (id 'a')",
                      "duplicate id, already used by record 0"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_records_name_file_and_record(case, write_json, videos, user_error):
    data, *parts = BROKEN[case]
    path = write_json(data)
    user_error(lambda: load_annotations(path, videos), str(path), *parts)


def test_file_level_errors(tmp_path, write_json, user_error):
    missing = tmp_path / "nope.json"
    user_error(lambda: load_annotations(missing), f"annotation file {missing} does not exist")
    bad = write_json('[\n  {"id": "a", "video": "a.mp4",}\n]')
    user_error(lambda: load_annotations(bad), str(bad), "malformed JSON at line 2, column 32")
    user_error(lambda: load_annotations(bad, limit=0), "limit")


def test_missing_videos_are_listed_with_a_count(write_json, videos, user_error):
    records = [record(f"r{i}", f"v{i}.mp4") for i in range(8)] + [record("ok", "a.mp4")]
    path = write_json(records)
    message = user_error(lambda: load_annotations(path, videos), str(path), f"8 of 9 clips cannot be used (under {videos})",
                         "SKIP_BAD_CLIPS=True")
    # every one listed, one line each under the message's first line
    assert message.splitlines()[1:] == [f"  record {i} (id 'r{i}'): v{i}.mp4 does not exist" for i in range(8)]
    assert len(load_annotations(path, videos, check_videos=False)) == 9
    kept = load_annotations(path, videos, skip_bad_clips=True)
    assert [s.id for s in kept] == ["ok"] and len(kept.skipped) == 8
    # Only the videos of the records kept by ``limit`` need to exist.
    assert [s.id for s in load_annotations(write_json([record("ok", "a.mp4")] + records[:2]), videos, limit=1)] == \
        ["ok"]


def test_a_one_frame_clip_is_found_when_the_annotations_load(write_json, tmp_path, user_error):
    import numpy as np

    single = write_video([np.zeros((16, 16, 3), np.uint8)], tmp_path / "single.mp4")
    path = write_json([record("s", "single.mp4")])
    user_error(lambda: load_annotations(path, tmp_path), str(path), "1 of 1 clips cannot be used",
               "record 0 (id 's'): single.mp4 has 1 frame(s), 2 needed (a before/after pair needs 2)")
    sample = load_annotations(path, tmp_path, num_frames=1)[0]  # one frame is all a 1-frame setting asks
    user_error(lambda: read_video_frames(sample.video, 2), str(single), "1 frame(s)", "num_frames=2")


# --------------------------------------------------------------------------- ChangeChat

def test_bundled_changechat_instructions_and_captions(sample_dir):
    instructions = load_changechat(SAMPLE_CHANGECHAT_INSTRUCTIONS, SAMPLE_CHANGECHAT_ROOT)
    assert len(instructions) == 240 and all(isinstance(s, ChangeChatSample) for s in instructions)
    count = instructions[2]
    assert count.id == "val_00000_count" and count.turns[0][0] == COUNT_PROMPT
    assert count.image_a == SAMPLE_CHANGECHAT_ROOT / "A" / "val_00000.png" and count.image_a.exists()
    assert count.image_b == SAMPLE_CHANGECHAT_ROOT / "B" / "val_00000.png" and count.references == []
    assert {s.changeflag for s in instructions} == {0, 1}

    captions = load_changechat(SAMPLE_CHANGECHAT_CAPTIONS, SAMPLE_CHANGECHAT_ROOT)
    raw = json.loads(SAMPLE_CHANGECHAT_CAPTIONS.read_text())
    assert [s.id for s in captions] == [f"val_{i:05d}" for i in range(60)]
    assert captions[4].references == raw[4]["captions"] and len(captions[4].references) == 5
    assert captions[4].turns == [(CAPTION_PROMPT, raw[4]["captions"][0])]
    assert captions[4].changeflag == raw[4]["changeflag"]


def test_multi_turn_and_levir_cc_shapes(write_json, tmp_path, user_error):
    multi = {"id": "m", "image": ["A/x.png", "B/x.png"], "conversations": [
        {"from": "human", "value": "<image>Describe the changes."}, {"from": "gpt", "value": "a road."},
        {"from": "human", "value": "How many roads?"}, {"from": "gpt", "value": "one"}]}
    sample = load_changechat(write_json([multi]), tmp_path, check_images=False)[0]
    assert sample.turns == [("Describe the changes.", "a road."), ("How many roads?", "one")]
    assert sample.changeflag is None and sample.image_a == tmp_path / "A" / "x.png"

    levir = {"images": [{"filepath": "test", "filename": "test_000001.png", "changeflag": 1,
                         "sentences": [{"raw": " a house is built . "}, {"raw": "one new house ."}]}]}
    sample = load_changechat(write_json(levir, "LevirCCcaptions.json"), tmp_path, check_images=False)[0]
    assert sample.id == "test_000001" and sample.image_b == tmp_path / "test" / "B" / "test_000001.png"
    assert sample.references == ["a house is built .", "one new house ."] and sample.changeflag == 1


CHANGECHAT_BROKEN = {
    "one image": ({"id": "p", "image": "A/x.png", "conversations": []}, "record 0 (id 'p')", "two paths"),
    "no answer": ({"id": "p", "image": ["A/x.png", "B/x.png"],
                   "conversations": [{"from": "human", "value": "<image>q"}]}, "record 0 (id 'p')", "no answer"),
    "bad flag": ({"image_A": "A/x.png", "image_B": "B/x.png", "captions": ["c"], "changeflag": "yes"}, "record 0",
                 "'changeflag' must be 0 or 1"),
    "no captions": ({"image_A": "A/x.png", "image_B": "B/x.png", "captions": []}, "record 0", "'captions'"),
    "unknown shape": ({"id": "p", "image": ["A/x.png", "B/x.png"]}, "record 0 (id 'p')", "neither"),
}


@pytest.mark.parametrize("case", list(CHANGECHAT_BROKEN))
def test_changechat_errors_name_file_and_record(case, write_json, tmp_path, user_error):
    data, *parts = CHANGECHAT_BROKEN[case]
    path = write_json([data])
    user_error(lambda: load_changechat(path, tmp_path, check_images=False), str(path), *parts)


def test_changechat_missing_images_and_duplicates(write_json, tmp_path, user_error):
    caption = {"image_A": "A/x.png", "image_B": "B/x.png", "captions": ["c"]}
    path = write_json([caption])
    user_error(lambda: load_changechat(path, tmp_path), str(path), "2 of 2 image(s) missing", "record 0 (id 'x')",
               "A/x.png")
    path = write_json([caption, dict(caption)])
    user_error(lambda: load_changechat(path, tmp_path, check_images=False), str(path), "record 1 (id 'x')",
               "duplicate id")


def levir_cc_file(write_json, counts: dict[str, int]) -> Path:
    """A file in LEVIR-CC's own layout (LevirCCcaptions.json): one list of images of every split, 5 sentences each."""
    images = [{"filepath": split, "filename": f"{split}_{i:06d}.png", "split": split, "changeflag": i % 2,
               "sentences": [{"raw": f" {split} caption {i} number {k} ", "tokens": []} for k in range(5)]}
              for split, count in counts.items() for i in range(count)]
    return write_json({"images": images}, "LevirCCcaptions.json")


def test_levir_cc_caption_file_split_by_split(write_json, tmp_path, user_error, capsys):
    path = levir_cc_file(write_json, {"train": 4, "val": 2, "test": 3})
    test = load_changechat(path, tmp_path, check_images=False, split="test")
    assert [s.id for s in test] == ["test_000000", "test_000001", "test_000002"]
    assert {s.split for s in test} == {"test"} and test[1].image_a == tmp_path / "test" / "A" / "test_000001.png"
    assert test[2].references == [f"test caption 2 number {k}" for k in range(5)]
    assert "3 of 9 entries, split 'test' (the file holds: train 4, val 2, test 3)" in capsys.readouterr().out
    assert [s.id for s in load_changechat(path, tmp_path, check_images=False, split="val")] == ["val_000000",
                                                                                                   "val_000001"]
    assert len(load_changechat(path, tmp_path, check_images=False, split=None)) == 9
    assert len(load_changechat(path, tmp_path, check_images=False, split="train", limit=2)) == 2
    user_error(lambda: load_changechat(path, tmp_path, check_images=False, split="testing"), str(path),
               "no entry of split 'testing'", "train 4, val 2, test 3")
    # A file without splits is used whole, whatever the split asked.
    plain = write_json([{"image_A": "A/x.png", "image_B": "B/x.png", "captions": ["c"]}], "plain.json")
    assert len(load_changechat(plain, tmp_path, check_images=False, split="test")) == 1
    identity = describe_test_set(path, "test")
    assert identity == {"file": "LevirCCcaptions.json", "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                        "split": "test"}
    assert describe_test_set(plain, "test")["split"] is None


def test_geollava_records_with_splits_and_references(write_json, videos, user_error):
    records = [dict(record("a", "a.mp4"), split="train"),
               dict(record("b", "b.mp4"), split="test", references=["r one", " r two "]),
               dict(record("c", "a.mp4"), split="test")]
    path = write_json(records)
    samples = load_annotations(path, videos, split="test")
    assert [s.id for s in samples] == ["b", "c"]
    assert samples[0].references == ["r one", "r two"] and samples[0].scoring_references() == ["r one", "r two"]
    assert samples[1].scoring_references() == "a road."
    assert [s.id for s in load_annotations(path, videos, split=None)] == ["a", "b", "c"]
    user_error(lambda: load_annotations(path, videos, split="val"), "no entry of split 'val'", "train 1, test 2")
    records[1]["references"] = ["ok", ""]
    user_error(lambda: load_annotations(write_json(records), videos), "record 1 (id 'b')", "'references'")
