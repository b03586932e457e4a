"""Each model family eats the other's data: ChangeChat / LEVIR-CC -> videos, GeoLLaVA videos -> image pairs."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import common
from geochange.annotations import describe_test_set, load_annotations, load_changechat, source_note_path
from geochange.convert import changechat_to_videos, videos_to_pairs
from geochange.trainer import data_loader_workers
from geochange.sample.data import SAMPLE_CHANGECHAT_CAPTIONS, SAMPLE_CHANGECHAT_INSTRUCTIONS, SAMPLE_CHANGECHAT_ROOT
from geochange.video import read_image, read_video_frames, write_image

REPO = Path(__file__).resolve().parent.parent

# Measured on the bundled sample (60 pairs of 256x256 scenes, H.264 CRF 12, yuv420p): the mean absolute difference
# per image is at most 2.65 grey levels, the 99th percentile at most 20; single pixels at sharp colour edges reach
# ~113, chroma subsampling's doing.
ROUND_TRIP_MEAN_BOUND = 3.0
ROUND_TRIP_P99_BOUND = 24


def what(samples) -> list[tuple]:
    return [(s.id, s.turns, s.references, s.changeflag) for s in samples]


@pytest.fixture(scope="module")
def converted(sample_dir, tmp_path_factory):
    """The sample's captions and instructions -> videos (one folder, shared) -> image pairs."""
    out = tmp_path_factory.mktemp("converted")
    captions = changechat_to_videos(SAMPLE_CHANGECHAT_CAPTIONS, SAMPLE_CHANGECHAT_ROOT, out / "videos")
    instructions = changechat_to_videos(SAMPLE_CHANGECHAT_INSTRUCTIONS, SAMPLE_CHANGECHAT_ROOT, out / "videos")
    back = [videos_to_pairs(path, out / "videos" / "videos", out / "pairs") for path in (captions, instructions)]
    return {"out": out, "captions": captions, "instructions": instructions, "back": back}


def test_round_trip_keeps_ids_questions_references_and_pixels(converted):
    videos = sorted((converted["out"] / "videos" / "videos").iterdir())
    assert len(videos) == 60 and videos[0].name == "val_00000.mp4"  # the instructions reused the caption videos
    records = json.loads(converted["captions"].read_text())
    assert records[0]["references"] == json.loads(SAMPLE_CHANGECHAT_CAPTIONS.read_text())[0]["captions"]
    assert len(records[0]["references"]) == 5
    for original, back in zip((SAMPLE_CHANGECHAT_CAPTIONS, SAMPLE_CHANGECHAT_INSTRUCTIONS), converted["back"]):
        before, after = load_changechat(original, SAMPLE_CHANGECHAT_ROOT), load_changechat(back)
        assert what(after) == what(before)
    means, p99s = [], []
    for sample, returned in zip(load_changechat(SAMPLE_CHANGECHAT_CAPTIONS, SAMPLE_CHANGECHAT_ROOT),
                                load_changechat(converted["back"][0])):
        for original, decoded in ((sample.image_a, returned.image_a), (sample.image_b, returned.image_b)):
            difference = np.abs(read_image(original).astype(int) - read_image(decoded).astype(int))
            means.append(difference.mean())
            p99s.append(np.percentile(difference, 99))
    assert max(means) < ROUND_TRIP_MEAN_BOUND and max(p99s) <= ROUND_TRIP_P99_BOUND
    assert min(means) > 0  # decoded from the videos, not copied


def test_converted_files_name_their_source_as_test_set(converted, tmp_path):
    source = {"file": SAMPLE_CHANGECHAT_CAPTIONS.name,
              "sha256": hashlib.sha256(SAMPLE_CHANGECHAT_CAPTIONS.read_bytes()).hexdigest(), "split": None}
    assert describe_test_set(converted["captions"], "test") == source
    assert describe_test_set(converted["back"][0], None) == source  # through both conversions
    # An edited copy is a test set of its own.
    edited = tmp_path / converted["captions"].name
    edited.write_text(converted["captions"].read_text().replace("no significant change", "nothing"))
    shutil.copy(source_note_path(converted["captions"]), source_note_path(edited))
    assert describe_test_set(edited, None)["sha256"] == hashlib.sha256(edited.read_bytes()).hexdigest()


def test_the_video_frames_are_before_then_after(converted):
    sample = load_changechat(SAMPLE_CHANGECHAT_CAPTIONS, SAMPLE_CHANGECHAT_ROOT)[2]
    frames = read_video_frames(converted["out"] / "videos" / "videos" / f"{sample.image_a.stem}.mp4")
    before, after = read_image(sample.image_a).astype(int), read_image(sample.image_b).astype(int)
    assert np.abs(frames[0] - before).mean() < 3 < np.abs(frames[0] - after).mean()
    assert np.abs(frames[1] - after).mean() < 3


def levir_cc_layout(root: Path, scene_images) -> Path:
    """LEVIR-CC's folders (root/<split>/A|B/<name>.png) and its one caption file for every split."""
    images = []
    for split, count in (("train", 2), ("val", 1), ("test", 2)):
        for i in range(count):
            name = f"{split}_{i:06d}.png"
            write_image(scene_images[0], root / split / "A" / name)
            write_image(scene_images[1], root / split / "B" / name)
            images.append({"filepath": split, "filename": name, "split": split, "changeflag": 1,
                           "sentences": [{"raw": f"{split} {i} caption {k}"} for k in range(5)]})
    path = root / "LevirCCcaptions.json"
    path.write_text(json.dumps({"images": images}))
    return path


def test_levir_cc_to_videos_keeps_splits_for_the_video_scripts(tmp_path, scene_images, user_error, capsys):
    annotations = levir_cc_layout(tmp_path / "levir", scene_images)
    assert common.main(["changechat-to-videos", str(annotations), str(tmp_path / "levir"), str(tmp_path / "out"),
                        "--max-side", "128"]) == 0
    converted = tmp_path / "out" / "LevirCCcaptions.json"
    assert "SPLIT=... picks one" in capsys.readouterr().out
    test = load_annotations(converted, tmp_path / "out" / "videos", split="test")
    assert [s.id for s in test] == ["test_000000", "test_000001"]
    assert test[1].references == [f"test 1 caption {k}" for k in range(5)]
    assert read_video_frames(test[0].video).shape == (2, 128, 128, 3)  # bounded by --max-side
    assert len(load_annotations(converted, tmp_path / "out" / "videos", split="train")) == 2
    # --split converts one split only
    common.main(["changechat-to-videos", str(annotations), str(tmp_path / "levir"), str(tmp_path / "val"),
                 "--split", "val"])
    assert [r["id"] for r in json.loads((tmp_path / "val" / "LevirCCcaptions_val.json").read_text())] == ["val_000000"]
    user_error(lambda: common.main(["changechat-to-videos", str(annotations), str(tmp_path / "levir"),
                                    str(tmp_path / "x"), "--split", "dev"]), "no entry of split 'dev'")
    user_error(lambda: common.main(["videos-to-pairs", str(converted)]), "usage", "videos-to-pairs")
    # The way back, one split, into DeltaVLM's format
    assert common.main(["videos-to-pairs", str(converted), str(tmp_path / "out" / "videos"), str(tmp_path / "back"),
                        "--split=test"]) == 0
    back = load_changechat(tmp_path / "back" / "LevirCCcaptions_test.json")
    assert [(s.id, s.split, len(s.references)) for s in back] == [("test_000000", "test", 5), ("test_000001", "test", 5)]
    assert read_image(back[0].image_a).shape == (128, 128, 3)


def test_a_missing_pair_gets_one_line_and_the_others_convert(tmp_path, scene_images, user_error, capsys):
    annotations = levir_cc_layout(tmp_path / "levir", scene_images)
    (tmp_path / "levir" / "test" / "B" / "test_000001.png").write_text("not an image")
    user_error(lambda: changechat_to_videos(annotations, tmp_path / "levir", tmp_path / "out", split="test"),
               "1 of 2 image pairs could not be converted", "test_000001.png")
    assert "bad row:" in capsys.readouterr().err
    assert (tmp_path / "out" / "videos" / "test_000000.mp4").exists()
    assert not (tmp_path / "out" / "LevirCCcaptions_test.json").exists()


def test_data_loader_workers_default_to_the_cores_on_a_gpu(monkeypatch, user_error):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert data_loader_workers(None, cuda=False) == 0
    assert data_loader_workers(None, cuda=True) == 8  # 15 free cores, capped at 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert data_loader_workers(None, cuda=True) == 3  # 16 cores shared by 4 processes, one kept for training
    assert data_loader_workers(2, cuda=True) == 2
    user_error(lambda: data_loader_workers(-1, cuda=True), "NUM_WORKERS")


def test_deltavlm_batch_reads_only_the_asked_split(tmp_path, scene_images, user_error):
    from geochange.deltavlm.run import batch_items, run_name

    annotations = levir_cc_layout(tmp_path / "levir", scene_images)
    items = batch_items(str(annotations), str(tmp_path / "levir"), None, "test")
    assert [item.id for item in items] == ["test_000000", "test_000001"] and len(items[0].true) == 5
    assert [item.id for item in batch_items(str(annotations), str(tmp_path / "levir"), None, "val")] == ["val_000000"]
    user_error(lambda: batch_items(str(annotations), str(tmp_path / "levir"), None, "dev"), "LevirCCcaptions.json",
               "no entry of split 'dev'")
    from geochange.overrides import make_settings

    settings = {"RUN_NAME": None, "CHECKPOINT": "tiny", "USE_CSRM": True, "TEST_ANNOTATIONS": str(annotations)}
    assert run_name(make_settings({**settings, "SPLIT": "test"})) == "deltavlm-tiny_LevirCCcaptions_test"  # splits never mix
    assert run_name(make_settings({**settings, "SPLIT": "val"})) == "deltavlm-tiny_LevirCCcaptions_val"
    assert run_name(make_settings({**settings, "TEST_ANNOTATIONS": str(SAMPLE_CHANGECHAT_CAPTIONS), "SPLIT": "test"})) == \
        "deltavlm-tiny_sample_changechat_captions"
