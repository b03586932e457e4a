"""Map what changed over a whole scene: two geo-referenced rasters of one place -> tiles -> any trained model -> a
change map (GeoJSON for QGIS or a browser, a picture), on one GPU or many.

Anything rasterio opens (GeoTIFF / COG, JPEG2000, a PNG with a world file), each date in its own CRS and pixel size,
4+ bands of uint16 with a nodata border: the AFTER is reprojected onto the BEFORE's grid, only their overlap is
tiled, tiles that are nodata or masked are skipped, and one percentile stretch maps both dates to 8 bits. Each tile
is asked QUESTIONS as DeltaVLM's predictor or the video models' evaluation would ask a pair; answers are written
as they come (a killed run resumes), and ChangeChat's answers are read back (changed, counts, 3x3 cells) onto the map.

    python scene_changes.py MODEL_PATH=tiny                               # the bundled example scene, offline
    python scene_changes.py BEFORE=2019.tif AFTER=2023.tif                # the released DeltaVLM (GPU)
    python scene_changes.py BEFORE=a.tif AFTER=b.tif BANDS=4,3,2 GSD=0.5 MODEL=videollava MODEL_PATH=runs/<run>
    torchrun --nproc_per_node 4 scene_changes.py BEFORE=a.tif AFTER=b.tif # 4 GPUs, each its share of the tiles
"""
# --- the scene
BEFORE = None               # the earlier date: GeoTIFF / COG, JPEG2000, a PNG with a world file (+ .prj)...;
                            # None = the bundled example scene (a GeoTIFF pair, drawn on first use)
AFTER = None                # the later date, in any CRS and pixel size (reprojected onto BEFORE's grid)
BANDS = None                # None = each raster's red, green, blue by colour interpretation, else bands 1,2,3;
                            # e.g. 4,3,2 for Sentinel-2, or one band (grey)
GSD = None                  # metres per pixel to resample both dates to (None = BEFORE's own pixel size)
RESAMPLING = "nearest"      # how GDAL's warper resamples: nearest (gdalwarp's default: real values, sharp, fastest);
                            # bilinear / cubic: smoother, ~4x slower on masked rasters; average: for a much coarser GSD
STRETCH_PERCENTILES = (2.0, 98.0)  # per band, these percentiles of both dates become 0 and 255 (the same for both
                            # dates, so a change is never a contrast change); () = 8-bit values as they are
# --- the tiles
TILE_SIZE = 256             # grid pixels per tile side: the model's input (256 px at 0.5 m, as LEVIR-CC)
OVERLAP = 0                 # pixels neighbouring tiles share (the last row and column always overlap inward)
MAX_NODATA = 0.5            # a tile more than this share nodata / masked in either date is skipped (counted)
# --- the model and the questions
MODEL = "deltavlm"          # "deltavlm", "videollava", "llavanext" or "qwen25vl"
MODEL_PATH = "base"         # as demo.py: base (DeltaVLM's released checkpoint / the family's 7B model), tiny,
                            # a fine-tuning run directory or a DeltaVLM checkpoint_best.pth
QUESTIONS = ("caption", "changed?", "how many?", "where?")  # ChangeChat's tasks by label, or any question text
MAX_NEW_TOKENS = 64         # per answer
NUM_BEAMS = 1               # DeltaVLM: 1 = greedy (its sub-task evaluation); the video models are always greedy
BATCH_SIZE = 8              # tiles per batch (each question is one batched generation over them)
DEVICE = "auto"             # "auto" = the GPU if there is one (under torchrun: each process its own GPU)
DIST_TIMEOUT_MINUTES = 60   # under torchrun: how long a process waits for the slowest one
# --- where the map goes
OUTPUT_DIR = "change_maps"  # <OUTPUT_DIR>/<run>/: tiles.jsonl, changes.geojson, overview.png, run.json
RUN_NAME = None             # None = <before>_<after>_<model>
OVERWRITE = False           # True = discard this run's earlier tiles (else they resume, if the same scene, grid,
                            # model and questions wrote them; any other mix is refused)

if __name__ == "__main__":
    from geochange import change_maps
    from geochange.overrides import load_settings

    cfg = load_settings(globals())
    # 1. the settings, then both dates opened and put on one grid and the stretch fitted: every mistake in the
    #    input is one line here, before any model loads
    questions = change_maps.check_settings(cfg)
    with change_maps.open_scene(cfg) as pair:
        # 2. the tiles of the overlap
        tiles = change_maps.plan(cfg, pair)
        # 3. under torchrun, this process's place among the processes (each answers its share)
        shard = change_maps.start(cfg)
        # 4. the run directory: one writer; tiles already answered resume only under the same settings
        with change_maps.open_run(cfg, pair, tiles, questions, shard) as run:
            # 5. the model, if any tile is left to answer
            model = change_maps.load_model(run, shard)
            # 6. the tiles, read in the background, answered in batches, written as they come
            change_maps.answer_tiles(run, pair, model, shard)
            # 7. changes.geojson, overview.png, run.json and the summary
            change_maps.write_outputs(run, pair, shard)
        change_maps.stop(shard)
