"""Image pairs <-> 2-frame H.264 videos, decoded with decord and with the PyAV fallback."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import geochange.convert as convert
from geochange.convert import SheetOptions, fit_pair, locate_image, pairs_sheet_to_videos
from geochange.video import crop_to_even, read_image, read_video_frames, sample_indices, write_image, write_video


def pair_to_video(path_a: Path, path_b: Path, out: Path) -> Path:
    """Two image files -> a 2-frame clip, as the converters write one (odd sizes lose their last row/column)."""
    return write_video([crop_to_even(read_image(path_a)), crop_to_even(read_image(path_b))], out)


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(float) - b.astype(float)).mean())


def flat_frames(levels: list[int], size: int = 32) -> list[np.ndarray]:
    return [np.full((size, size, 3), level, np.uint8) for level in levels]


# --------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("backend", ["auto", "decord", "pyav"])
def test_pair_video_round_trip(tmp_path, image_pair, scene_images, backend):
    out = pair_to_video(*image_pair, tmp_path / "pair.mp4")
    assert out == tmp_path / "pair.mp4" and out.stat().st_size > 1000
    frames = read_video_frames(out, 2, backend=backend)
    assert frames.shape == (2, 256, 256, 3) and frames.dtype == np.uint8
    assert mean_abs_diff(frames[0], scene_images[0]) < 3
    assert mean_abs_diff(frames[1], scene_images[1]) < 3
    # Before and after stay in order and distinct: each frame is far closer to its own image.
    assert mean_abs_diff(frames[0], scene_images[1]) > 2 * mean_abs_diff(frames[0], scene_images[0])


def test_backends_agree_and_fallback_without_decord(tmp_path, image_pair, monkeypatch):
    out = pair_to_video(*image_pair, tmp_path / "pair.mp4")
    with_decord = read_video_frames(out, backend="decord")
    with_pyav = read_video_frames(out, backend="pyav")
    assert mean_abs_diff(with_decord, with_pyav) < 0.5
    monkeypatch.setitem(sys.modules, "decord", None)  # "import decord" now raises ImportError
    assert np.array_equal(read_video_frames(out), with_pyav)


def test_frames_are_sampled_uniformly_first_and_last_for_two(tmp_path):
    levels = [0, 60, 120, 180, 240]
    path = write_video(flat_frames(levels), tmp_path / "five.mp4")
    assert sample_indices(5, 2) == [0, 4] and sample_indices(5, 3) == [0, 2, 4] and sample_indices(2, 2) == [0, 1]
    for backend in ("decord", "pyav"):
        two = read_video_frames(path, 2, backend=backend)
        three = read_video_frames(path, 3, backend=backend)
        assert [round(f.mean()) for f in two] == pytest.approx([0, 240], abs=2)
        assert [round(f.mean()) for f in three] == pytest.approx([0, 120, 240], abs=2)


def test_write_video_is_atomic_and_checks_frames(tmp_path, monkeypatch, user_error):
    target = tmp_path / "v.mp4"
    user_error(lambda: write_video(flat_frames([0, 9], size=31), target), str(target), "even", "31x31")
    user_error(lambda: write_video([np.zeros((32, 32, 3), np.uint8), np.zeros((16, 32, 3), np.uint8)], target),
               str(target), "frame 1", "one size")
    user_error(lambda: write_video([np.zeros((32, 32, 3), np.float32)], target), "uint8")
    user_error(lambda: write_video([], target), "no frames")

    import av
    calls = []

    def crash_on_second(array, format):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(array, format=format)

    real = av.VideoFrame.from_ndarray
    monkeypatch.setattr(av.VideoFrame, "from_ndarray", crash_on_second)
    with pytest.raises(RuntimeError, match="disk full"):
        write_video(flat_frames([0, 9]), target)
    assert list(tmp_path.iterdir()) == []  # neither a half video nor a temporary file is left


# --------------------------------------------------------------------------- unreadable videos

def test_video_errors_name_the_file(tmp_path, user_error):
    one = write_video(flat_frames([77]), tmp_path / "one_frame.mp4")
    for backend in ("auto", "pyav"):
        user_error(lambda: read_video_frames(one, 2, backend=backend), str(one), "1 frame", "before/after")
    assert read_video_frames(one, 1).shape == (1, 32, 32, 3)
    user_error(lambda: read_video_frames(tmp_path / "nope.mp4"), str(tmp_path / "nope.mp4"), "does not exist")
    junk = tmp_path / "junk.mp4"
    junk.write_text("not a video")
    for backend in ("auto", "decord", "pyav"):
        user_error(lambda: read_video_frames(junk, backend=backend), str(junk), "cannot decode")
    user_error(lambda: read_video_frames(one, backend="opencv"), "unknown video backend")


# --------------------------------------------------------------------------- images

def test_image_pairs(tmp_path, image_pair, scene_images, user_error):
    before, after = read_image(image_pair[0]), read_image(image_pair[1])
    assert np.array_equal(before, scene_images[0]) and np.array_equal(after, scene_images[1])
    small = read_image(write_image(scene_images[1][:128, :100], tmp_path / "small.png"))
    user_error(lambda: fit_pair(before, small, SheetOptions(resize=False)), "256x256", "100x128", "--strict")
    fitted, resized, differed = fit_pair(before, small, SheetOptions())
    assert resized.shape == fitted.shape == (256, 256, 3) and differed
    user_error(lambda: read_image(tmp_path / "missing.png"), str(tmp_path / "missing.png"), "does not exist")
    text = tmp_path / "notes.png"
    text.write_text("hello")
    user_error(lambda: read_image(text), str(text), "not a readable image")
    gray = tmp_path / "gray.png"
    from PIL import Image
    Image.fromarray(np.full((10, 12), 50, np.uint8)).save(gray)
    assert read_image(gray).shape == (10, 12, 3)


def test_odd_sized_pair_is_cropped_to_even(tmp_path, scene_images):
    a = write_image(scene_images[0][:255, :253], tmp_path / "a.png")
    b = write_image(scene_images[1][:255, :253], tmp_path / "b.png")
    frames = read_video_frames(pair_to_video(a, b, tmp_path / "odd.mp4"))
    assert frames.shape == (2, 254, 252, 3)
    assert mean_abs_diff(frames[1], scene_images[1][:254, :252]) < 3


# --------------------------------------------------------------------------- pairs sheets

@pytest.fixture
def pair_folder(tmp_path, scene_images) -> Path:
    """images/ with three before/after pairs (the third pair swapped), for sheets to point at."""
    folder = tmp_path / "images"
    for i in range(3):
        first, second = scene_images if i < 2 else scene_images[::-1]
        write_image(first, folder / f"{i}_a.png")
        write_image(second, folder / f"{i}_b.png")
    return folder


def test_csv_sheet_to_videos_resumes(tmp_path, pair_folder, scene_images, capsys):
    sheet = tmp_path / "val_pairs_sheet.csv"
    pd.DataFrame({"image_path1": [f"{i}_a.png" for i in range(3)],
                  "image_path2": [f"{i}_b.png" for i in range(3)]}).to_csv(sheet, index=False)
    out = tmp_path / "videos"
    written = pairs_sheet_to_videos(sheet, out, pair_folder)
    assert [p.name for p in written] == ["0_a-0_b.mp4", "1_a-1_b.mp4", "2_a-2_b.mp4"]
    assert mean_abs_diff(read_video_frames(written[2])[0], scene_images[1]) < 3  # row order kept
    stamps = [p.stat().st_mtime_ns for p in written]
    written[1].unlink()
    again = pairs_sheet_to_videos(sheet, out, pair_folder)
    assert again == written and again[0].stat().st_mtime_ns == stamps[0] and written[1].exists()
    assert "2 of 3 videos already" in capsys.readouterr().out
    assert convert.pairs_to_videos_main([str(sheet), str(out), str(pair_folder)]) == 0


def test_xlsx_sheet_with_ids_and_absolute_paths(tmp_path, pair_folder):
    sheet = tmp_path / "train_pairs_sheet.xlsx"
    pd.DataFrame({"id": ["site_7", "site_9"],
                  "image_path1": [str(pair_folder / "0_a.png"), str(pair_folder / "1_a.png")],
                  "image_path2": [str(pair_folder / "0_b.png"), str(pair_folder / "1_b.png")]}).to_excel(sheet,
                                                                                                         index=False)
    written = pairs_sheet_to_videos(sheet, tmp_path / "out")
    assert [p.name for p in written] == ["site_7.mp4", "site_9.mp4"]
    assert read_video_frames(written[1]).shape == (2, 256, 256, 3)


def test_sheet_errors_name_sheet_and_row(tmp_path, pair_folder, user_error, capsys):
    sheet = tmp_path / "pairs.csv"
    sheet.write_text("image_path1,second\n0_a.png,0_b.png\n")
    user_error(lambda: pairs_sheet_to_videos(sheet, tmp_path / "out", pair_folder), str(sheet), "image_path2",
               "second")
    # Bad rows get one line each and are skipped; the good rows are converted, then the run stops with a count.
    sheet.write_text("image_path1,image_path2\n0_a.png,0_b.png\n1_a.png,gone.png\n2_a.png,\n")
    user_error(lambda: pairs_sheet_to_videos(sheet, tmp_path / "out", pair_folder), str(sheet),
               "2 of 3 rows could not be converted", "the 1 other videos")
    bad_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("bad row:")]
    assert len(bad_lines) == 2
    assert "row 1 (line 3)" in bad_lines[0] and str(pair_folder / "gone.png") in bad_lines[0]
    assert "row 2 (line 4)" in bad_lines[1] and "empty image_path2" in bad_lines[1]
    assert (tmp_path / "out" / "0_a-0_b.mp4").exists()
    sheet.write_text("video,image_path1,image_path2\nx,0_a.png,0_b.png\nx.mp4,1_a.png,1_b.png\n")
    user_error(lambda: pairs_sheet_to_videos(sheet, tmp_path / "out2", pair_folder), str(sheet), "row 1",
               "repeats row 0")
    (pair_folder / "bad.png").write_text("no image")
    sheet.write_text("image_path1,image_path2\nbad.png,0_b.png\n")
    user_error(lambda: pairs_sheet_to_videos(sheet, tmp_path / "out3", pair_folder), str(sheet), "row 0",
               str(pair_folder / "bad.png"))
    user_error(lambda: pairs_sheet_to_videos(tmp_path / "none.xlsx", tmp_path / "out"), "none.xlsx",
               "does not exist")
    user_error(lambda: convert.pairs_to_videos_main(["only-one-arg"]), "usage")
    user_error(lambda: convert.pairs_to_videos_main([str(sheet), "out", "--size", "12"]), "--size", "WIDTHxHEIGHT")
    user_error(lambda: convert.pairs_to_videos_main([str(sheet), "out", "--bogus"]), "unknown option")


def write_fmow_site(root: Path, scene_images, sizes: list[tuple[int, int]]) -> list[str]:
    """fMoW-like images under root/val/airport_hangar/airport_hangar_0/, one per size; their sheet paths."""
    from PIL import Image

    folder = root / "val" / "airport_hangar" / "airport_hangar_0"
    paths = []
    for index, (width, height) in enumerate(sizes):
        image = np.array(Image.fromarray(scene_images[min(index, 1)]).resize((width, height), Image.BILINEAR))
        write_image(image, folder / f"airport_hangar_0_{index}_rgb.jpg")
        paths.append(f"/Datasets/val/airport_hangar/airport_hangar_0/airport_hangar_0_{index}_rgb.jpg")
    return paths


def test_geollava_sheet_as_released(tmp_path, scene_images, capsys, user_error):
    """GeoLLaVA's exact columns, its authors' absolute paths, differently sized pairs, an image root."""
    root = tmp_path / "fmow"
    paths = write_fmow_site(root, scene_images, [(300, 260), (340, 290), (1200, 900)])
    sheet = tmp_path / "updated_val_pairs_sheet.xlsx"
    pd.DataFrame({"category": ["airport_hangar"] * 2, "location_id": ["airport_hangar_0"] * 2,
                  "image1": [Path(paths[0]).name, Path(paths[2]).name], "timestamp1": ["2015-01-01", "2016-01-01"],
                  "image_path1": [paths[0], paths[2]],
                  "image2": [Path(paths[1]).name, Path(paths[0]).name], "timestamp2": ["2017-06-01", "2014-01-01"],
                  "image_path2": [paths[1], paths[0]]}).to_excel(sheet, index=False)
    out = tmp_path / "videos"
    assert convert.pairs_to_videos_main([str(sheet), str(out), str(root)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["airport_hangar_0_0-airport_hangar_0_1.mp4", "airport_hangar_0_2-airport_hangar_0_0.mp4"]
    assert "2 of 2 pairs had images of different sizes" in capsys.readouterr().out
    small = read_video_frames(out / names[0])
    assert small.shape == (2, 260, 300, 3)  # the before image's size (below the 512 bound: not upscaled)
    large = read_video_frames(out / names[1])
    assert large.shape == (2, 384, 512, 3)  # 1200x900 bounded to a 512 longest side
    # Before frame first: the first frame matches the first image, the second the (resized) second image.
    expect_before = np.asarray(read_image(root / paths[2][len("/Datasets/"):]))
    from PIL import Image
    expect_before = np.array(Image.fromarray(expect_before).resize((512, 384), Image.LANCZOS))
    expect_after = np.array(Image.fromarray(read_image(root / paths[0][len("/Datasets/"):])).resize((512, 384),
                                                                                                 Image.LANCZOS))
    assert mean_abs_diff(large[0], expect_before) < 4 and mean_abs_diff(large[1], expect_after) < 4
    assert mean_abs_diff(large[0], expect_after) > 10

    # --size sets every video's size; --max-side 0 keeps the full size; --strict stops at a size difference.
    sized = pairs_sheet_to_videos(sheet, tmp_path / "sized", root, convert.SheetOptions(size=(128, 96)))
    assert all(read_video_frames(p).shape == (2, 96, 128, 3) for p in sized)
    assert convert.pairs_to_videos_main([str(sheet), str(tmp_path / "full"), str(root), "--max-side", "0"]) == 0
    assert read_video_frames(tmp_path / "full" / names[1]).shape == (2, 900, 1200, 3)
    user_error(lambda: convert.pairs_to_videos_main([str(sheet), str(tmp_path / "strict"), str(root), "--strict"]), "row 0",
               "image sizes differ", "300x260 and 340x290")

    # A miss says where it looked.
    message = user_error(lambda: locate_image("/Datasets/val/airport_hangar/gone_rgb.jpg", root), "gone_rgb.jpg",
                         str(root))
    assert str(root / "val" / "airport_hangar" / "gone_rgb.jpg") in message
    assert locate_image(paths[1], root) == root / "val/airport_hangar/airport_hangar_0/airport_hangar_0_1_rgb.jpg"
    assert locate_image(paths[1], root / "val") == root / "val/airport_hangar/airport_hangar_0/airport_hangar_0_1_rgb.jpg"


def test_atomic_path_leaves_the_old_file_when_the_write_fails(tmp_path):
    from geochange.fileio import atomic_path, atomic_write_text

    target = atomic_write_text(tmp_path / "a.json", "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            temporary.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
