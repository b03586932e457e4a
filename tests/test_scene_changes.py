"""Whole scenes (scene_changes.py): two rasters of one place on one grid through rasterio's warper, the tiles, the
stretch, nodata and masks, bad inputs, memory that does not grow with the scene; then the tiny models mapping the
bundled example scene: GeoJSON against rasterio's own bounds transform, the picture, resume, no mixing, two
processes = one, plain PNGs in pixel coordinates."""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from conftest import run_script, script_args, torchrun
from PIL import Image
from rasterio.control import GroundControlPoint
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, Resampling
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import Affine, from_origin
from rasterio.vrt import WarpedVRT
from rasterio.warp import calculate_default_transform, reproject, transform_bounds
from rasterio.windows import Window
from rasterio.windows import bounds as window_bounds

from geochange.video_llm.families import FAMILIES
from geochange import change_maps, demo, map_outputs, rasters
from geochange.errors import UserError
from geochange.map_outputs import geojson, parse_answers, resolve_questions, summarize, tile_record
from geochange.overrides import script_constants
from geochange.rasters import Grid, open_pair, parse_bands
from geochange.sample.geotiffs import (AFTER_CRS, AFTER_PIXEL, BEFORE_CRS, BEFORE_PIXEL, ORIGIN,
                                       ensure_example_scene)
from geochange.sharding import Shard
from geochange.tiles import ALL_ZERO, NODATA, BackgroundReader, Tile, TileImages, plan_tiles, read_tile

UTM32 = "EPSG:32632"
# rasterio 1.4 itself still multiplies Affine transforms with "*", which affine 3 marks as pending deprecation
pytestmark = pytest.mark.filterwarnings("ignore:Use `@` matmul:PendingDeprecationWarning")
# the tests of the mapped example scene share one run of the tiny DeltaVLM (the module fixture), on one worker
SHARES_THE_MAP = pytest.mark.xdist_group("scene_map")


def write_raster(path: Path, data: np.ndarray, *, crs=UTM32, transform=None, nodata=None, colorinterp=None,
                 mask: np.ndarray | None = None) -> Path:
    """A GeoTIFF of ``data`` (bands, rows, cols); ``mask`` (255 = valid) goes to a ``.msk`` sidecar."""
    transform = transform or from_origin(*ORIGIN, 0.5, 0.5)
    profile = {"driver": "GTiff", "width": data.shape[2], "height": data.shape[1], "count": data.shape[0],
               "dtype": str(data.dtype), "crs": crs, "transform": transform, "nodata": nodata}
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=False):
        with rasterio.open(path, "w", **profile) as dataset:
            dataset.write(data)
            if colorinterp:
                dataset.colorinterp = colorinterp
            if mask is not None:
                dataset.write_mask(mask)
    return path


def warped(data: np.ndarray, transform, crs: str, resolution: float) -> tuple[np.ndarray, object]:
    """``data`` (on ``transform`` in UTM 32N) reprojected by rasterio into ``crs`` at ``resolution``: the
    reference a later date in another CRS is made with."""
    bounds = rasterio.transform.array_bounds(data.shape[1], data.shape[2], transform)
    target, width, height = calculate_default_transform(UTM32, crs, data.shape[2], data.shape[1], *bounds,
                                                        resolution=resolution)
    out = np.zeros((data.shape[0], height, width), data.dtype)
    reproject(data, out, src_transform=transform, src_crs=UTM32, src_nodata=0, dst_transform=target, dst_crs=crs,
              dst_nodata=0, resampling=Resampling.bilinear)
    return out, target


def after_wgs84(tmp_path: Path, path: Path) -> Path:
    """``path`` reprojected into longitude / latitude (degrees) by rasterio's warper."""
    with rasterio.open(path) as dataset:
        with WarpedVRT(dataset, crs="EPSG:4326") as vrt:
            return write_raster(tmp_path / "wgs84.tif", vrt.read(), crs="EPSG:4326", transform=vrt.transform, nodata=0)


@pytest.fixture
def bands16(scene_images) -> tuple[np.ndarray, np.ndarray]:
    """The scene pair as 3 bands of uint16 (values 100..2650, never 0), 256 x 256."""
    return tuple(np.moveaxis(image, 2, 0).astype(np.uint16) * 10 + 100 for image in scene_images)


# ----------------------------------------------------------------------------------------------- grid and tiles

def test_tiles_cover_the_overlap_and_the_last_row_and_column_shift_inward():
    grid = Grid(None, Affine.identity(), 700, 520)
    tiles = plan_tiles(grid, 256, 32)
    assert sorted({t.window.col_off for t in tiles}) == [0, 224, 444]  # 444 = 700 - 256: moved back, not beyond
    assert sorted({t.window.row_off for t in tiles}) == [0, 224, 264]
    covered = np.zeros((520, 700), int)
    for tile in tiles:
        w = tile.window
        assert w.col_off + w.width <= 700 and w.row_off + w.height <= 520
        covered[w.row_off:w.row_off + w.height, w.col_off:w.col_off + w.width] += 1
    assert covered.min() >= 1  # every pixel of the overlap is in a tile
    assert [t.number for t in tiles] == list(range(1, 10)) and len({t.id for t in tiles}) == 9
    assert (tiles[5].row, tiles[5].col, tiles[5].id) == (1, 2, "r001_c002")
    assert [t.window.col_off for t in plan_tiles(Grid(None, grid.transform, 512, 256), 256, 0)] == [0, 256]
    with pytest.raises(UserError, match="TILE_SIZE=600 is larger than the overlap of the two dates"):
        plan_tiles(grid, 600, 0)
    with pytest.raises(UserError, match="OVERLAP=256: must be >= 0 and smaller than TILE_SIZE=256"):
        plan_tiles(grid, 256, 256)


def test_the_after_in_another_crs_and_pixel_size_is_reprojected_onto_the_before_grid(tmp_path, bands16):
    transform = from_origin(*ORIGIN, 0.5, 0.5)
    before = write_raster(tmp_path / "before.tif", bands16[0], transform=transform, nodata=0)
    # the same ground in Web Mercator at 0.8 m, without the before's last 56 columns
    after_data, after_transform = warped(bands16[0][:, :, :200], transform, "EPSG:3857", 0.8)
    after = write_raster(tmp_path / "after.tif", after_data, crs="EPSG:3857", transform=after_transform, nodata=0)
    said = []
    with open_pair(before, after, resampling="bilinear", say=said.append) as pair:
        grid = pair.grid
        assert "AFTER (after.tif) is reprojected onto BEFORE's grid (EPSG:3857 -> EPSG:32632, 0.8 metre -> 0.5 " \
               "metre pixels, bilinear)" in said
        # the grid: the before's own pixels, from its corner, as far as rasterio's bounds of the after reach
        with rasterio.open(after) as dataset:
            after_right = transform_bounds("EPSG:3857", UTM32, *dataset.bounds, densify_pts=21)[2]
        assert (grid.crs, grid.transform) == (CRS.from_string(UTM32), transform)
        assert (grid.width, grid.height) == (math.floor((after_right - ORIGIN[0]) / 0.5), 256)
        assert 200 <= grid.width < 256
        # the after's pixels sit where the before's are: no shift by a pixel fits them better (bilinear, and the
        # default nearest neighbour, which gives the after's own values, never blends)
        (b, b_valid), (a, a_valid) = pair.read(Window(0, 0, 190, 256))
        with open_pair(before, after, say=lambda line: None) as nearest:
            (_, _), (a_nearest, _) = nearest.read(Window(0, 0, 190, 256))
        assert set(np.unique(a_nearest)) <= set(np.unique(after_data))
        both = (b_valid & a_valid)[2:-2, 2:-2]
        assert both.mean() > 0.95

        def misfit(after_values: np.ndarray, dy: int, dx: int) -> float:  # mean |after moved by (dy, dx) - before|
            moved = after_values[:, 2 + dy:a.shape[1] - 2 + dy, 2 + dx:a.shape[2] - 2 + dx].astype(float)
            return float(np.abs(moved - b[:, 2:-2, 2:-2])[:, both].mean())

        for values in (a, a_nearest):
            misfits = {(dy, dx): misfit(values, dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
            assert min(misfits, key=misfits.get) == (0, 0), misfits
        # beyond the after's ground (its last columns in the overlap's bounding box) there is no data
        (_, _), (_, edge_valid) = pair.read(Window(grid.width - 4, 0, 4, 256))
        assert not edge_valid[:, -1].all()
    # GSD: both dates resampled to 1 m pixels from the same corner, still inside the overlap
    said.clear()
    with open_pair(before, after, gsd=1.0, say=said.append) as pair:
        assert pair.grid.transform == from_origin(*ORIGIN, 1.0, 1.0)
        assert (pair.grid.width, pair.grid.height) == (math.floor((after_right - ORIGIN[0]) / 1.0), 128)
        assert "BEFORE (before.tif) is resampled to 1 metre pixels (nearest)" in said
    with pytest.raises(UserError, match=r"GSD=1.0 metres needs BEFORE in a projected CRS in metres; .* \(degree\)"):
        open_pair(after_wgs84(tmp_path, after), before, gsd=1.0)


def test_one_stretch_per_band_for_both_dates_so_unchanged_ground_looks_the_same(tmp_path, bands16):
    first = bands16[0].copy()
    second = first.copy()
    second[:, 100:160, 100:160] = 3000  # a bright new roof: a change, which a per-date stretch would flatten
    before = write_raster(tmp_path / "before.tif", first)
    after = write_raster(tmp_path / "after.tif", second)
    with open_pair(before, after, say=lambda line: None) as pair:
        pooled = np.concatenate([first.reshape(3, -1), second.reshape(3, -1)], axis=1).astype(np.float64)
        low, high = np.percentile(pooled, [2, 98], axis=1)
        np.testing.assert_allclose(pair.stretch.low, low, rtol=1e-6)
        np.testing.assert_allclose(pair.stretch.high, high, rtol=1e-6)
        tile = read_tile(pair, plan_tiles(pair.grid, 256, 0)[0], 0.5)
    unchanged = np.ones((256, 256), bool)
    unchanged[100:160, 100:160] = False
    assert np.array_equal(tile.before[unchanged], tile.after[unchanged])  # the same values, the same 8-bit colour
    assert (tile.after[~unchanged] == 255).all() and tile.before[~unchanged].mean() < 200
    reference = np.clip((first[0].astype(np.float32) - low[0]) * (255.0 / (high[0] - low[0])), 0, 255)
    assert np.abs(tile.before[..., 0].astype(int) - np.rint(reference)).max() <= 1


def test_nodata_masked_and_all_zero_tiles_are_skipped_and_invalid_pixels_are_black_in_both_dates(tmp_path, bands16):
    data = np.tile(bands16[0], (1, 2, 2))  # 512 x 512: four 256-px tiles
    first, second = data.copy(), data.copy()
    first[:, :200, :256] = 0                # tile 1: 78 % nodata in the earlier date (nodata value 0)
    mask = np.full((512, 512), 255, np.uint8)
    mask[:, 300:] = 0                       # tiles 2 and 4: 83 % masked in the later date (a .msk sidecar)
    second[:, 256:, :256] = 0               # tile 3: the later date all zero (no nodata value there)
    before = write_raster(tmp_path / "before.tif", first, nodata=0)
    after = write_raster(tmp_path / "after.tif", second, mask=mask)
    assert (tmp_path / "after.tif.msk").is_file()
    with open_pair(before, after, say=lambda line: None) as pair:
        images = [read_tile(pair, tile, 0.5) for tile in plan_tiles(pair.grid, 256, 0)]
        assert [image.skipped for image in images] == [NODATA, NODATA, ALL_ZERO, NODATA]
        assert images[0].nodata == pytest.approx(200 / 256, abs=1e-3) and images[0].before is None
        # a tile with 20 rows of nodata in the earlier date only: kept, and those rows black in both dates
        sliver = read_tile(pair, Tile(0, 0, 1, Window(0, 180, 256, 256)), 0.5)
    assert sliver.skipped is None and sliver.nodata == pytest.approx(20 / 256, abs=1e-3)
    assert not sliver.before[:20].any() and not sliver.after[:20].any()  # the later date has data there: blacked
    assert sliver.before[20:76].all(axis=2).mean() > 0.5 and sliver.after[20:76].any(axis=2).all()


def test_default_bands_follow_colour_interpretation_and_bands_picks_others(tmp_path, bands16):
    four = np.concatenate([bands16[0][::-1], bands16[0][1:2]])  # blue, green, red, "nir"
    interp = [ColorInterp.blue, ColorInterp.green, ColorInterp.red, ColorInterp.undefined]
    path = write_raster(tmp_path / "bgrn.tif", four, colorinterp=interp)
    plain = write_raster(tmp_path / "plain.tif", four)
    with open_pair(path, plain, say=lambda line: None) as pair:
        assert pair.before.bands == (3, 2, 1)  # red, green, blue by colour interpretation
        assert pair.after.bands == (1, 2, 3)   # no colour interpretation beyond grey: bands 1, 2, 3
    with open_pair(path, plain, bands="4,3,2", say=lambda line: None) as pair:
        assert pair.before.bands == pair.after.bands == (4, 3, 2)
        (values, _), _ = pair.read(Window(0, 0, 8, 8))
        np.testing.assert_array_equal(values, four[[3, 2, 1], :8, :8])
    assert parse_bands(2) == (2, 2, 2) and parse_bands((4, 3, 2)) == (4, 3, 2) and parse_bands(None) is None


def test_plain_images_of_two_sizes_share_the_before_pixels(tmp_path, scene_images):
    before, after = tmp_path / "before.png", tmp_path / "after.png"
    Image.fromarray(scene_images[0]).save(before)
    Image.fromarray(scene_images[1]).resize((512, 512), Image.NEAREST).save(after)  # twice the pixels, same ground
    said = []
    with open_pair(before, after, say=said.append) as pair:
        assert (pair.grid.crs, pair.grid.width, pair.grid.height) == (None, 256, 256)
        assert "AFTER (after.png) is resampled from 512 x 512 px onto BEFORE's 256 x 256 px (nearest)" in said
        (_, _), (values, valid) = pair.read(Window(0, 0, 256, 256))
    assert valid.all() and np.array_equal(np.moveaxis(values, 0, 2), scene_images[1])  # every 2nd pixel: the original


def test_tiles_are_read_in_the_background_while_the_previous_batch_is_answered():
    reading_second = threading.Event()
    threads = []

    def read(batch):
        threads.append(threading.current_thread().name)
        if batch == [2]:
            reading_second.set()
        return [item * 10 for item in batch]

    with BackgroundReader([[1], [2], [3]], read) as reader:
        assert reader.next() == [10]
        # while "answering" batch 1, the reader is already on batch 2
        assert reading_second.wait(timeout=60), "the next batch was not read ahead"
        assert [reader.next(), reader.next()] == [[20], [30]]
    assert set(threads) == {"tile reader"}

    def broken(batch):
        raise OSError("a bad block")

    with BackgroundReader([[1]], broken) as reader, pytest.raises(OSError, match="a bad block"):
        reader.next()


# ----------------------------------------------------------------------------------------------- bad input

@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if any model is loaded."""
    def refuse(cfg):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(demo, "load_chat", refuse)


def test_each_bad_input_stops_in_one_line_before_any_model_loads(tmp_path, bands16, no_model, user_error):
    good = write_raster(tmp_path / "good.tif", np.concatenate([bands16[0], bands16[0][:1]]))
    far = write_raster(tmp_path / "far.tif", bands16[1], transform=from_origin(ORIGIN[0] + 10_000, ORIGIN[1], 0.5, 0.5))
    text = tmp_path / "notes.tif"
    text.write_text("not a raster")
    local = write_raster(tmp_path / "local.tif", bands16[1], crs=CRS.from_wkt('LOCAL_CS["site grid",UNIT["metre",1]]'))
    png = tmp_path / "world.png"
    Image.fromarray(np.moveaxis(bands16[1] // 11, 0, 2).astype(np.uint8)).save(png)
    png.with_suffix(".pgw").write_text(f"0.5\n0\n0\n-0.5\n{ORIGIN[0] + 0.25}\n{ORIGIN[1] - 0.25}\n")

    def run(after, **settings):
        return lambda: run_script("scene_changes.py", *script_args(
            BEFORE=good, AFTER=after, OUTPUT_DIR=tmp_path / "out", MODEL_PATH="tiny", **settings))

    user_error(run(text), f"AFTER={text} is not a raster rasterio can read")
    user_error(run(far), "BEFORE (good.tif) and AFTER (far.tif) do not overlap")
    user_error(run(good, BANDS=5), "BANDS=5,5,5: BEFORE=", "has 4 band(s) (1..4), so no band 5")
    user_error(run(good, TILE_SIZE=300), "TILE_SIZE=300 is larger than the overlap of the two dates (256 x 256 px")
    user_error(run(local), "AFTER=", "unknown CRS", "cannot be placed on the earth")
    user_error(run(png), "AFTER=", "its CRS is unknown; put a .prj")
    with pytest.warns(NotGeoreferencedWarning):  # no geotransform: the points are its only georeferencing
        scanned = write_raster(tmp_path / "scanned.tif", bands16[1], crs=None, transform=Affine.identity())
    points = [(0, 0, 0, 0), (256, 256, 128, -128), (0, 256, 128, 0)]  # row, col; metres east, north of the origin
    with rasterio.open(scanned, "r+") as dataset:
        dataset.gcps = ([GroundControlPoint(row, col, ORIGIN[0] + east, ORIGIN[1] + north)
                         for row, col, east, north in points], CRS.from_string(UTM32))
    user_error(run(scanned), "is georeferenced by 3 ground control points only", "gdalwarp -t_srs EPSG:32632")
    # the same PNG with its CRS beside it is a georeferenced date like any other
    png.with_suffix(".prj").write_text(CRS.from_string(UTM32).to_wkt())
    user_error(run(png, TILE_SIZE=300), "TILE_SIZE=300 is larger than the overlap")
    assert not (tmp_path / "out").exists()


def test_memory_does_not_grow_with_the_scene(tmp_path, bands16, monkeypatch):
    """Opening a 512 px and a 1280 px scene (the later date in another CRS; the stretch from a decimated read of
    both) and reading every tile: the peak of the arrays each step allocates is the same for both scenes, far below
    one date of the larger one. (The overview is drawn from the same decimated read, at a fixed size.)"""
    monkeypatch.setattr(rasters, "SAMPLE_SIDE", 256)  # both scenes are decimated for the stretch
    peaks = {}
    for side in (512, 1280):
        repeats = -(-side // 256)
        data = np.tile(bands16[0], (1, repeats, repeats))[:, :side, :side]
        transform = from_origin(*ORIGIN, 0.5, 0.5)
        before = write_raster(tmp_path / f"before{side}.tif", data, transform=transform, nodata=0)
        after_data, after_transform = warped(data, transform, "EPSG:3857", 0.75)
        after = write_raster(tmp_path / f"after{side}.tif", after_data, crs="EPSG:3857", transform=after_transform,
                             nodata=0)
        del data, after_data
        tracemalloc.start()
        with open_pair(before, after, say=lambda line: None) as pair:
            opened = tracemalloc.get_traced_memory()[1]
            tracemalloc.reset_peak()
            skipped = [read_tile(pair, tile, 0.5).skipped for tile in plan_tiles(pair.grid, 256, 0)]
            tiles = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        peaks[side] = (opened, tiles)
        assert len(skipped) == (side // 256) ** 2 and skipped[:-1] == [None] * (len(skipped) - 1)
    one_date = 1280 * 1280 * 3 * 2  # the larger scene's three bands of uint16: 9.8 MB
    for small, large in zip(peaks[512], peaks[1280]):
        assert large < 1.2 * small + 2 ** 20, peaks
    assert max(peaks[1280]) < one_date / 2, peaks


# ----------------------------------------------------------------------------------------------- answers -> map

def test_answers_are_parsed_into_the_map_and_cells_become_polygons_of_their_thirds():
    questions = resolve_questions(("caption", "changed?", "how many?", "where?", "Is there a new pool?"))
    assert questions["where?"].startswith("Please indicate the locations") and questions["Is there a new pool?"]
    answers = {"caption": "there is no difference", "changed?": "yes", "how many?": "there are 2 new roads and 1 new "
               "building", "where?": "roads ['top-left', 'center-center'] buildings ['bottom-right']",
               "Is there a new pool?": "no"}
    parsed = parse_answers(questions, answers)
    assert parsed == {"changed": True, "changed_from": "yes/no", "roads": 2, "buildings": 1,
                      "road_cells": ["top-left", "center-center"], "building_cells": ["bottom-right"]}
    caption_only = parse_answers(resolve_questions(("caption",)), {"caption": "The scene is the same as before."})
    assert (caption_only["changed"], caption_only["changed_from"]) == (False, "caption")

    transform = from_origin(*ORIGIN, 0.5, 0.5)
    grid = Grid(CRS.from_string(UTM32), transform, 512, 512)
    image = TileImages(Tile(0, 1, 2, Window(256, 0, 256, 256)), None, None, 0.0)
    record = tile_record(grid, image, answers, questions)
    collection = geojson(grid, [record], questions)
    tile, *cells = collection["features"]
    assert tile["properties"]["answer: how many?"] == answers["how many?"] and tile["properties"]["roads"] == 2
    assert [c["properties"]["cell"] for c in cells] == ["top-left", "center-center", "bottom-right"]
    assert [c["properties"]["kind"] for c in cells] == ["road cell", "road cell", "building cell"]
    # the bottom-right cell: the tile's last third each way, in WGS84 by rasterio's own transform
    cell = window_bounds(Window(256 + 512 / 3, 512 / 3, 256 / 3, 256 / 3), transform)
    expected = transform_bounds(UTM32, "EPSG:4326", *cell)
    lons, lats = zip(*cells[2]["geometry"]["coordinates"][0])
    assert (min(lons), min(lats), max(lons), max(lats)) == pytest.approx(expected, abs=2e-7)
    assert summarize([record])["roads"] == 2


# ----------------------------------------------------------------------------------------------- the tiny models

SETTINGS = {"MODEL_PATH": "tiny", "QUESTIONS": "('changed?','where?')", "MAX_NEW_TOKENS": 3, "BATCH_SIZE": 3}
RUN = "example_2019_example_2023_deltavlm-tiny"


@pytest.fixture(scope="module")
def mapped(tmp_path_factory):
    """The bundled example scene mapped by the tiny DeltaVLM (two questions, 3 tokens each): the run folder."""
    output = tmp_path_factory.mktemp("maps")
    run_script("scene_changes.py", *script_args(OUTPUT_DIR=output, **SETTINGS))
    return output / RUN


def read_records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "tiles.jsonl").read_text().splitlines()]


def test_the_example_scene_is_a_two_date_geotiff_pair_in_two_crs():
    before, after = ensure_example_scene()
    with rasterio.open(before) as first, rasterio.open(after) as second:
        for dataset in (first, second):
            assert dataset.count == 4 and set(dataset.dtypes) == {"uint16"} and dataset.nodata == 0
            assert tuple(dataset.colorinterp[:3]) == (ColorInterp.blue, ColorInterp.green, ColorInterp.red)
            assert 0.05 < (dataset.dataset_mask() == 0).mean() < 0.3  # a nodata border
        assert (first.crs, second.crs) == (CRS.from_string(BEFORE_CRS), CRS.from_string(AFTER_CRS))
        assert (first.res, second.res) == ((BEFORE_PIXEL, BEFORE_PIXEL), (AFTER_PIXEL, AFTER_PIXEL))


@SHARES_THE_MAP
def test_the_example_scene_is_mapped_tile_by_tile(mapped):
    records = read_records(mapped)
    assert len({r["id"] for r in records}) == len(records) == 9
    by_number = {r["number"]: r for r in sorted(records, key=lambda r: r["number"])}
    assert by_number[1]["skipped"] == NODATA and by_number[1]["answers"] is None  # the cut corner: 66 % nodata
    answered = [r for r in records if r["answers"] is not None]
    assert len(answered) == 8 and all(set(r["answers"]) == {"changed?", "where?"} for r in answered)
    assert all(set(r["parsed"]) >= {"changed", "road_cells", "building_cells"} for r in answered)
    run = json.loads((mapped / "run.json").read_text())
    assert run["summary"] == summarize(records) and run["summary"]["answered"] == 8
    assert run["summary"]["skipped_by_reason"] == {NODATA: 1}
    assert run["settings"]["MODEL_PATH"] == "tiny" and run["outputs"] == ["tiles.jsonl", "changes.geojson",
                                                                          "overview.png"]


@SHARES_THE_MAP
def test_geojson_polygons_are_rasterios_bounds_of_each_tile_in_wgs84(mapped):
    collection = json.loads((mapped / "changes.geojson").read_text())
    assert collection["type"] == "FeatureCollection" and "crs" not in collection  # RFC 7946: WGS84, no crs member
    tiles = [f for f in collection["features"] if f["properties"]["kind"] == "tile"]
    assert len(tiles) == 9
    before, _ = ensure_example_scene()
    with rasterio.open(before) as dataset:
        transform = dataset.transform  # the overlap is the whole earlier date, so the grid is its pixels
    records = {r["number"]: r for r in read_records(mapped)}
    for feature in tiles:
        record = records[feature["properties"]["tile"]]
        ring = feature["geometry"]["coordinates"][0]
        lons, lats = zip(*ring)
        expected = transform_bounds(BEFORE_CRS, "EPSG:4326", *window_bounds(Window(*record["window"]), transform))
        assert (min(lons), min(lats), max(lons), max(lats)) == pytest.approx(expected, abs=2e-7)
        area = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring, ring[1:]))
        assert ring[0] == ring[-1] and area > 0  # closed, counter-clockwise
        assert feature["properties"]["answer: changed?"] == (record["answers"] or {}).get("changed?")
        assert (feature["properties"]["row"], feature["properties"]["col"]) == (record["row"], record["col"])
    assert 11.5 < lons[0] < 11.6 and 48.1 < lats[0] < 48.2  # east of Munich


@SHARES_THE_MAP
def test_the_overview_shows_before_after_and_the_change_map(mapped):
    picture = np.array(Image.open(mapped / "overview.png").convert("RGB"))
    height, width, _ = picture.shape
    assert (width, height) == (round(3 * map_outputs.PANEL_INCHES * map_outputs.OVERVIEW_DPI),
                               round((map_outputs.PANEL_INCHES + 1.6) * map_outputs.OVERVIEW_DPI))
    row = picture[height // 2]
    panels = [row[i * width // 3:(i + 1) * width // 3] for i in range(3)]
    assert all((panel != 255).any() for panel in panels)
    assert not np.array_equal(panels[0], panels[1])
    records = read_records(mapped)
    if any(r["parsed"] and r["parsed"]["changed"] for r in records):  # changed tiles are outlined in red
        red = (picture[..., 0] > 200) & (picture[..., 1] < 60) & (picture[..., 2] < 60)
        assert red.sum() > 100


@SHARES_THE_MAP
def test_a_killed_run_resumes_without_answering_a_tile_twice(mapped, tmp_path, monkeypatch):
    folder = tmp_path / RUN
    shutil.copytree(mapped, folder)
    complete = (folder / "tiles.jsonl").read_text().splitlines(keepends=True)
    # killed after three tiles, in the middle of writing the fourth
    (folder / "tiles.jsonl").write_text("".join(complete[:3]) + complete[3][:40])
    asked = []
    original = demo.DeltaVLMChat.answer_pairs
    monkeypatch.setattr(demo.DeltaVLMChat, "answer_pairs",
                        lambda self, pairs, question, tokens: asked.append(len(pairs)) or original(self, pairs,
                                                                                                 question, tokens))
    run_script("scene_changes.py", *script_args(OUTPUT_DIR=tmp_path, **SETTINGS))
    again = read_records(folder)
    assert len(again) == 9 and len({r["id"] for r in again}) == 9
    assert (folder / "tiles.jsonl").read_text().splitlines(keepends=True)[:3] == complete[:3]
    left = [json.loads(line) for line in complete[3:]]
    assert sum(asked) == 2 * sum(r["answers"] is not None for r in left)  # two questions per tile left, no more
    assert {r["id"]: r for r in again} == {r["id"]: r for r in map(json.loads, complete)}  # greedy: the same answers


@SHARES_THE_MAP
def test_a_rerun_with_other_settings_is_refused(mapped, tmp_path, no_model, user_error):
    shutil.copytree(mapped, tmp_path / RUN)
    before = (tmp_path / RUN / "tiles.jsonl").read_text()
    user_error(lambda: run_script("scene_changes.py", *script_args(OUTPUT_DIR=tmp_path, **{**SETTINGS,
                                                                                          "MAX_NEW_TOKENS": 5})),
               "was written with other settings (generation)", "set RUN_NAME", "OVERWRITE=True")
    user_error(lambda: run_script("scene_changes.py", *script_args(OUTPUT_DIR=tmp_path, TILE_SIZE=200, **SETTINGS)),
               "was written with other settings (tiles)")
    assert (tmp_path / RUN / "tiles.jsonl").read_text() == before


@pytest.mark.slow
@SHARES_THE_MAP
def test_two_processes_map_the_scene_as_one_does(mapped, tmp_path, free_port):
    run = torchrun(free_port, "scene_changes.py", *script_args(OUTPUT_DIR=tmp_path, **SETTINGS))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 processes" in run.stdout
    two = {r["id"]: r for r in read_records(tmp_path / RUN)}
    one = {r["id"]: r for r in read_records(mapped)}
    assert two == one  # tile for tile: the same answers, parsed the same
    assert (tmp_path / RUN / "changes.geojson").read_text() == (mapped / "changes.geojson").read_text()
    assert json.loads((tmp_path / RUN / "run.json").read_text())["processes"] == 2


@pytest.mark.parametrize("family", list(FAMILIES))
def test_plain_pngs_are_mapped_in_pixel_coordinates_by_a_video_model(image_pair, tmp_path, capsys, family):
    before, after = image_pair
    run_script("scene_changes.py", *script_args(BEFORE=before, AFTER=after, MODEL=family, MODEL_PATH="tiny",
                                                TILE_SIZE=128, QUESTIONS="('changed?',)", MAX_NEW_TOKENS=2,
                                                OUTPUT_DIR=tmp_path))
    folder = tmp_path / f"before_after_{family}-tiny"
    records = read_records(folder)
    assert [r["window"] for r in records] == [[0, 0, 128, 128], [128, 0, 128, 128], [0, 128, 128, 128],
                                              [128, 128, 128, 128]]
    assert all(r["bounds"] is None and set(r["answers"]) == {"changed?"} for r in records)
    assert (folder / "overview.png").is_file() and not (folder / "changes.geojson").exists()
    printed = capsys.readouterr().out
    assert "no changes.geojson: neither raster is georeferenced" in printed
    assert "neither date is georeferenced: tiles and the picture are in pixel coordinates" in printed


def test_under_torchrun_each_process_loads_the_model_on_its_own_gpu(monkeypatch):
    """DEVICE=auto under torchrun: process 1 of 2 answers on cuda:1 (LOCAL_RANK), never all of them on cuda:0."""
    loaded = []
    monkeypatch.setattr(demo, "load_chat", lambda cfg: loaded.append(cfg.DEVICE) or "model")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    cfg = script_constants("scene_changes.py", MODEL_PATH="tiny")
    run = change_maps.SceneRun(cfg, Path("unused"), {}, [], [Tile(0, 0, 1, Window(0, 0, 1, 1))], {})
    assert change_maps.load_model(run, Shard(1, 2)) == "model" and loaded == ["cuda:1"]
    change_maps.load_model(dataclasses.replace(run, cfg=dataclasses.replace(cfg, DEVICE="cpu")), Shard(1, 2))
    change_maps.load_model(run, Shard(0, 1))  # one process: DEVICE as set (auto: the first GPU)
    assert loaded == ["cuda:1", "cpu", "auto"]
    assert change_maps.load_model(dataclasses.replace(run, todo=[]), Shard()) is None  # nothing left: no model
