"""Whole scenes: is the tile reader fast enough never to starve the model? Tiles read, reprojected and stretched
per second on one core, against tiles answered per second by the tiny model on the same core.

    python benchmarks/scene_read.py                     # a 4096 x 4096 pair, the later date in another CRS
    python benchmarks/scene_read.py SIDE=8192 MODEL=videollava

The pair is built once into ``benchmarks/results/scene_read/`` (git-ignored) from the synthetic scenes, window by
window, as ``sample-data``'s example scene is: the earlier date 4 bands of uint16 in UTM 32N at 0.5 m, the later
one reprojected by GDAL into UTM 33N at 0.6 m (about 4.5 degrees of rotation between the two grids). Reading goes
through the same code as ``scene_changes.py`` (``open_pair``, ``plan_tiles``, ``read_tile``); answering through the
same model (``demo.load_chat``, ``answer_pairs``) with ``scene_changes.py``'s own QUESTIONS and MAX_NEW_TOKENS.
Target: reading at least 10x faster than answering. Prints figures only.
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SIDE = 4096                 # pixels a side of the earlier date
TILE_SIZE = 256
RESAMPLING = "nearest"      # scene_changes.py's default; bilinear for its figure
MODEL = "deltavlm"          # the tiny twin of this family answers
ANSWERED_TILES = 16         # tiles the model answers for its figure (it is slow: a sample suffices)
BATCH_SIZE = 8
FOLDER = "benchmarks/results/scene_read"

if __name__ == "__main__":
    import rasterio
    import torch
    from rasterio.enums import Resampling
    from rasterio.transform import from_origin
    from rasterio.warp import calculate_default_transform
    from rasterio.vrt import WarpedVRT
    from rasterio.windows import Window

    from geochange import demo
    from geochange.map_outputs import resolve_questions
    from geochange.overrides import load_settings, script_constants
    from geochange.paths import REPO_ROOT
    from geochange.rasters import open_pair
    from geochange.sample import geotiffs as example  # the example scene's CRS, pixel sizes, bands
    from geochange.sample.scenes import SIZE, make_scene_pair, render_pair
    from geochange.tiles import plan_tiles, read_tile

    cfg = load_settings(globals())
    torch.set_num_threads(1)  # the same one core for reading and answering
    folder = REPO_ROOT / cfg.FOLDER
    before_path, after_path = folder / f"before_{cfg.SIDE}.tif", folder / f"after_{cfg.SIDE}.tif"

    # 1. the pair, once: the scenes' dates side by side (cycling through the example scene's nine), window by window
    if not (before_path.is_file() and after_path.is_file()):
        folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        pairs = [[example.to_bands(picture) for picture in render_pair(make_scene_pair(seed))]
                 for seed in example.SCENE_SEEDS]
        transform = from_origin(*example.ORIGIN, example.BEFORE_PIXEL, example.BEFORE_PIXEL)
        profile = {"driver": "GTiff", "width": cfg.SIDE, "height": cfg.SIDE, "count": 4, "dtype": "uint16",
                   "crs": example.BEFORE_CRS, "transform": transform, "nodata": example.NODATA, "tiled": True,
                   "blockxsize": 256, "blockysize": 256, "compress": "deflate"}
        later_utm32 = folder / "after_utm32.tif"
        for path, which in ((before_path, 0), (later_utm32, 1)):
            with rasterio.open(path, "w", **profile) as dataset:
                for row in range(0, cfg.SIDE, SIZE):
                    for col in range(0, cfg.SIDE, SIZE):
                        block = pairs[(row // SIZE * 7 + col // SIZE) % len(pairs)][which]
                        window = Window(col, row, min(SIZE, cfg.SIDE - col), min(SIZE, cfg.SIDE - row))
                        dataset.write(block[:, :window.height, :window.width], window=window)
                dataset.colorinterp = example.BANDS
                for band, name in enumerate(example.BAND_NAMES, start=1):
                    dataset.set_band_description(band, name)
        with rasterio.open(later_utm32) as source:
            target, width, height = calculate_default_transform(source.crs, example.AFTER_CRS, source.width,
                                                                source.height, *source.bounds,
                                                                resolution=example.AFTER_PIXEL)
            vrt = WarpedVRT(source, crs=example.AFTER_CRS, transform=target, width=width, height=height,
                            resampling=Resampling.bilinear)
            with rasterio.open(after_path, "w", **{**profile, "crs": example.AFTER_CRS, "transform": vrt.transform,
                                                   "width": vrt.width, "height": vrt.height}) as dataset:
                for _, window in dataset.block_windows(1):
                    dataset.write(vrt.read(window=window), window=window)
                dataset.colorinterp = example.BANDS
            vrt.close()
        later_utm32.unlink()
        print(f"built the {cfg.SIDE} x {cfg.SIDE} pair in {time.perf_counter() - started:.1f} s: {before_path}, "
              f"{after_path}")

    # 2. reading: open (with the stretch's decimated read of both dates), then every tile read, warped, stretched
    started = time.perf_counter()
    pair = open_pair(before_path, after_path, resampling=cfg.RESAMPLING)
    opened = time.perf_counter() - started
    tiles = plan_tiles(pair.grid, cfg.TILE_SIZE, 0)
    started = time.perf_counter()
    kept = sum(read_tile(pair, tile, 0.5).skipped is None for tile in tiles)
    reading = time.perf_counter() - started
    read_rate = len(tiles) / reading
    print(f"opening and the stretch: {opened:.1f} s; {len(tiles)} tiles of {cfg.TILE_SIZE} px read, reprojected and "
          f"stretched in {reading:.1f} s on one core: {read_rate:.1f} tiles/s ({kept} kept)")

    # 3. answering: the tiny model on the same core, scene_changes.py's questions and answer length
    scene = script_constants("scene_changes.py", MODEL=cfg.MODEL, MODEL_PATH="tiny", DEVICE="cpu")
    asked = list(resolve_questions(scene.QUESTIONS).values())
    model = demo.load_chat(scene)
    torch.set_num_threads(1)
    sample = [read_tile(pair, tile, 1.0) for tile in tiles[:cfg.ANSWERED_TILES]]
    pictures = [(image.before, image.after) for image in sample if image.skipped is None]
    model.answer_pairs(pictures[:1], asked[0], scene.MAX_NEW_TOKENS)  # warm-up
    started = time.perf_counter()
    for start in range(0, len(pictures), cfg.BATCH_SIZE):
        for question in asked:
            model.answer_pairs(pictures[start:start + cfg.BATCH_SIZE], question, scene.MAX_NEW_TOKENS)
    answering = time.perf_counter() - started
    answer_rate = len(pictures) / answering
    print(f"tiny {cfg.MODEL}: {len(pictures)} tiles x {len(asked)} questions, up to {scene.MAX_NEW_TOKENS} tokens, "
          f"batches of {cfg.BATCH_SIZE}, in {answering:.1f} s: {answer_rate:.2f} tiles/s")
    verdict = "meets" if read_rate >= 10 * answer_rate else "misses"
    print(f"reading is {read_rate / answer_rate:.0f}x faster than answering ({verdict} the 10x target)")
    pair.close()
