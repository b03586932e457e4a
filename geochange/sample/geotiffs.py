"""The bundled example scene: a two-date GeoTIFF pair of one place, as a satellite provider delivers it, for
``scene_changes.py`` to map offline.

Nine synthetic scene pairs (the sample's val pairs 0-8, 256 px each) side by side make a 768 x 768 px place at
0.5 m. Each date is 4 bands of uint16 (blue, green, red, near infrared, colour interpretation set), with nodata 0:

* the earlier date (``example_2019.tif``) in UTM zone 32N (EPSG:32632) at 0.5 m, with a nodata border where a
  satellite strip's edge cuts off two corners of the place;
* the later date (``example_2023.tif``) reprojected by GDAL into the neighbouring UTM zone 33N (EPSG:32633) at
  0.6 m, so its pixels are rotated by about 4.5 degrees against the earlier date's, with nodata around them.

Drawn on first use into ``data/sample/scene/`` (git-ignored; ``python common.py sample-data`` redraws it).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import ColorInterp, Resampling
from rasterio.features import geometry_mask
from rasterio.transform import from_origin, xy
from rasterio.warp import calculate_default_transform, reproject

from ..fileio import atomic_path
from ..locks import wait_for_lock
from ..paths import SAMPLE_DIR
from .scenes import SIZE, make_scene_pair, render_pair

EXAMPLE_SCENE_DIR = SAMPLE_DIR / "scene"
EXAMPLE_BEFORE = EXAMPLE_SCENE_DIR / "example_2019.tif"
EXAMPLE_AFTER = EXAMPLE_SCENE_DIR / "example_2023.tif"
# The val scene pairs the place is made of, row by row (seeds as in sample/data.py: 200_000 + index).
SCENE_SEEDS = tuple(200_000 + index for index in range(9))
SCENES_PER_SIDE = 3
BEFORE_CRS, AFTER_CRS = "EPSG:32632", "EPSG:32633"
# The place's top-left corner in UTM 32N (east of Munich, near the zone's edge at 12 E) and the pixel sizes.
ORIGIN = (689_000.0, 5_335_000.0)
BEFORE_PIXEL, AFTER_PIXEL = 0.5, 0.6
NODATA = 0
BANDS = (ColorInterp.blue, ColorInterp.green, ColorInterp.red, ColorInterp.undefined)
BAND_NAMES = ("blue", "green", "red", "nir")
# Corner triangles (legs in pixels) outside the earlier date's strip: the top-left one covers most of its tile.
CUT_CORNERS = {"top-left": 300, "bottom-right": 160}


def to_bands(rgb: np.ndarray) -> np.ndarray:
    """An 8-bit RGB picture as 4 bands of uint16 digital numbers (blue, green, red, and a near infrared that is
    bright where the picture is green, as vegetation is), never 0 (the nodata value)."""
    rgb = rgb.astype(np.float32)
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    nir = np.clip(0.5 * rgb.mean(axis=2) + 2.5 * np.maximum(green - (red + blue) / 2, 0), 0, 255)
    return np.rint(300 + 14 * np.stack([blue, green, red, nir])).astype(np.uint16)


def mosaic(which: int) -> np.ndarray:
    """Date ``which`` (0 before, 1 after) of the scene pairs, side by side: (4, 768, 768) uint16."""
    side = SCENES_PER_SIDE * SIZE
    place = np.zeros((4, side, side), np.uint16)
    for index, seed in enumerate(SCENE_SEEDS):
        row, col = divmod(index, SCENES_PER_SIDE)
        picture = render_pair(make_scene_pair(seed))[which]
        place[:, row * SIZE:(row + 1) * SIZE, col * SIZE:(col + 1) * SIZE] = to_bands(picture)
    return place


def _strip_mask(transform, side: int) -> np.ndarray:
    """True outside the earlier date's satellite strip (the two cut corners)."""
    top_left, bottom_right = CUT_CORNERS["top-left"], CUT_CORNERS["bottom-right"]
    corners = [[(0, 0), (0, top_left), (top_left, 0)],  # (row, col) of each triangle's corners
               [(side, side), (side, side - bottom_right), (side - bottom_right, side)]]
    shapes = []
    for corner in corners:
        rows, cols = zip(*(corner + corner[:1]))
        xs, ys = xy(transform, rows, cols, offset="ul")
        shapes.append({"type": "Polygon", "coordinates": [list(zip(xs, ys))]})
    return geometry_mask(shapes, out_shape=(side, side), transform=transform, invert=True)


def _write(path: Path, data: np.ndarray, crs: str, transform) -> None:
    profile = {"driver": "GTiff", "width": data.shape[2], "height": data.shape[1], "count": 4, "dtype": "uint16",
               "crs": crs, "transform": transform, "nodata": NODATA, "tiled": True, "blockxsize": 256,
               "blockysize": 256, "compress": "deflate"}
    with atomic_path(path) as temporary:
        with rasterio.open(temporary, "w", **profile) as dataset:
            dataset.write(data)
            dataset.colorinterp = BANDS
            for band, name in enumerate(BAND_NAMES, start=1):
                dataset.set_band_description(band, name)


def write_example_scene(before_path: Path = EXAMPLE_BEFORE, after_path: Path = EXAMPLE_AFTER) -> tuple[Path, Path]:
    """Draw both dates (deterministic) and write them as GeoTIFFs; returns their paths."""
    side = SCENES_PER_SIDE * SIZE
    transform = from_origin(*ORIGIN, BEFORE_PIXEL, BEFORE_PIXEL)
    before = mosaic(0)
    before[:, _strip_mask(transform, side)] = NODATA
    _write(before_path, before, BEFORE_CRS, transform)
    bounds = rasterio.transform.array_bounds(side, side, transform)
    after_transform, width, height = calculate_default_transform(BEFORE_CRS, AFTER_CRS, side, side, *bounds,
                                                                 resolution=AFTER_PIXEL)
    after = np.full((4, height, width), NODATA, np.uint16)
    reproject(mosaic(1), after, src_transform=transform, src_crs=BEFORE_CRS, src_nodata=NODATA,
              dst_transform=after_transform, dst_crs=AFTER_CRS, dst_nodata=NODATA, resampling=Resampling.bilinear)
    _write(after_path, after, AFTER_CRS, after_transform)
    return before_path, after_path


def ensure_example_scene(force: bool = False) -> tuple[Path, Path]:
    """The example pair's paths, drawn first if either file is missing (or ``force``)."""
    drawn = lambda: EXAMPLE_BEFORE.is_file() and EXAMPLE_AFTER.is_file()  # noqa: E731
    if force or not drawn():
        with wait_for_lock(EXAMPLE_SCENE_DIR):  # two processes at once: one draws, the other waits for it
            if force or not drawn():
                print(f"drawing the example scene (a two-date GeoTIFF pair) into {EXAMPLE_SCENE_DIR}")
                write_example_scene()
    return EXAMPLE_BEFORE, EXAMPLE_AFTER
