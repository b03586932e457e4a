"""The steps of ``scene_changes.py``: two rasters of one place -> tiles -> any trained model -> a change map.

``check_settings``, ``open_scene`` (both dates on one grid, the stretch), ``plan`` (the tiles), ``start`` (this
process's share under torchrun), ``open_run`` (the run directory: one writer, resume, no mixing), ``load_model``,
``answer_tiles`` (read in the background, answered in batches, written as they come), ``write_outputs``
(``changes.geojson``, ``overview.png``, ``run.json``, the summary), ``stop``.

``<OUTPUT_DIR>/<run>/`` holds ``tiles.jsonl`` (one line per tile, appended batch by batch: a killed run resumes
where it stopped), ``tiles.settings.json`` (what produced them: the scene, the grid, the stretch, the model, the
questions; a rerun with other settings is refused, as for results files), and the outputs.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import demo
from .deltavlm import DISPLAY_NAME as DELTAVLM_NAME
from .deltavlm import FAMILY_ID as DELTAVLM_ID
from .devices import is_main_process, process_device
from .engines import dist_timeout
from .errors import UserError
from .fileio import atomic_write_text
from .locks import LockedOutput, WriterLock, lock_for_writing, released_on_error
from .map_outputs import (format_summary, resolve_questions, summarize, tile_record, write_geojson,
                          write_overview)
from .rasters import RasterPair, open_pair
from .results import ResultsWriter, check_run_settings, read_jsonl
from .runs import RUN_FILE, library_versions
from .sample.geotiffs import ensure_example_scene
from .sharding import Shard, answer_in_shards, from_main, share_of, start_shards, stop_shards
from .tiles import BackgroundReader, Tile, TileImages, plan_tiles, read_tile
from .video_llm.families import get_family
from .video_llm.weights import weights_fingerprint

TILES_FILE = "tiles.jsonl"
SETTINGS_FILE = "tiles.settings.json"
GEOJSON_FILE = "changes.geojson"
OVERVIEW_FILE = "overview.png"


def say(line: str) -> None:
    """A line from the first process only: under torchrun every process opens the scene, one line is enough."""
    if is_main_process():
        print(line, flush=True)


# ----------------------------------------------------------------------------------------------- 1. settings, scene

def check_settings(cfg) -> dict[str, str]:
    """Step 1a: the settings that need no file; returns the questions as {label: question}."""
    if cfg.MODEL not in demo.MODELS:
        raise UserError(f"MODEL={cfg.MODEL!r} is not one of {', '.join(demo.MODELS)}")
    if cfg.BATCH_SIZE < 1 or cfg.MAX_NEW_TOKENS < 1 or cfg.NUM_BEAMS < 1:
        raise UserError("BATCH_SIZE, MAX_NEW_TOKENS and NUM_BEAMS must be >= 1")
    if cfg.NUM_BEAMS > 1 and cfg.MODEL != DELTAVLM_ID:
        raise UserError(f"NUM_BEAMS={cfg.NUM_BEAMS}: the video models answer greedily, as their evaluation does "
                        f"(beam search is DeltaVLM's)")
    if not 0 <= cfg.MAX_NODATA <= 1:
        raise UserError(f"MAX_NODATA={cfg.MAX_NODATA}: a share of a tile's pixels, 0..1")
    dist_timeout(cfg.DIST_TIMEOUT_MINUTES)  # > 0, else one line
    return resolve_questions(cfg.QUESTIONS)


def scene_paths(cfg) -> tuple[Path, Path]:
    """BEFORE and AFTER; neither set = the bundled example scene (drawn on first use)."""
    if (cfg.BEFORE is None) != (cfg.AFTER is None):
        raise UserError("set both BEFORE and AFTER (or neither, for the bundled example scene)")
    if cfg.BEFORE is None:
        return ensure_example_scene()
    return Path(cfg.BEFORE), Path(cfg.AFTER)


def open_scene(cfg) -> RasterPair:
    """Step 1b: both dates opened, checked and put on one grid (one line per reprojection or resampling), the
    stretch fitted from a decimated read of both; a ``with`` block closes them."""
    before, after = scene_paths(cfg)
    pair = open_pair(before, after, bands=cfg.BANDS, gsd=cfg.GSD, percentiles=cfg.STRETCH_PERCENTILES,
                     resampling=cfg.RESAMPLING, say=say)
    stretch = pair.stretch
    if stretch.percentiles:
        say(f"stretch: {stretch.percentiles[0]:g}-{stretch.percentiles[1]:g} % of both dates per band -> 0-255 "
              f"(R {stretch.low[0]:g}-{stretch.high[0]:g}, G {stretch.low[1]:g}-{stretch.high[1]:g}, "
              f"B {stretch.low[2]:g}-{stretch.high[2]:g})")
    return pair


def plan(cfg, pair: RasterPair) -> list[Tile]:
    """Step 2: the tiles of the overlap (the last row and column shifted inward)."""
    tiles = plan_tiles(pair.grid, cfg.TILE_SIZE, cfg.OVERLAP)
    rows, cols = tiles[-1].row + 1, tiles[-1].col + 1
    say(f"{len(tiles)} tiles of {cfg.TILE_SIZE} px ({rows} rows x {cols} columns, {cfg.OVERLAP} px overlap)")
    return tiles


def start(cfg) -> Shard:
    """Step 3: under torchrun, join the other processes (each answers its share); else the one shard."""
    return start_shards(cfg.DIST_TIMEOUT_MINUTES)


# ----------------------------------------------------------------------------------------------- 2. the run

def model_label(cfg) -> str:
    """A short name of the model for run names: deltavlm, deltavlm-tiny, videollava-tiny, llavanext-<run>..."""
    if cfg.MODEL_PATH in ("base", "tiny"):
        return cfg.MODEL + ("-tiny" if cfg.MODEL_PATH == "tiny" else "")
    path = Path(cfg.MODEL_PATH)
    name = path.parent.name if path.suffix == ".pth" else path.name
    return f"{cfg.MODEL}-{name}" if path.exists() else f"{cfg.MODEL}-{name.replace('/', '-')}"


def model_title(cfg) -> str:
    """The model in words, for the picture's title."""
    family = DELTAVLM_NAME if cfg.MODEL == DELTAVLM_ID else get_family(cfg.MODEL).display_name
    return f"{family} ({cfg.MODEL_PATH})"


def model_identity(cfg) -> dict[str, Any]:
    """The model that answers, with a fingerprint of its weights where they are local files."""
    path = Path(cfg.MODEL_PATH).expanduser()
    if cfg.MODEL_PATH in ("base", "tiny") or not path.exists():
        return {"model": cfg.MODEL, "model_path": cfg.MODEL_PATH, "weights": None}
    folder = path.parent if path.is_file() else path
    return {"model": cfg.MODEL, "model_path": str(path.resolve()), "weights": weights_fingerprint(str(folder))}


def run_identity(cfg, pair: RasterPair, questions: dict[str, str]) -> dict[str, Any]:
    """What produces a run's tiles: the two files, the grid, bands and stretch, the tiles, the model and the
    questions. Answers resume only under the same identity (JSON values, as written to the settings file)."""
    grid, stretch = pair.grid, pair.stretch
    identity = {
        "before": {"path": str(pair.before.path.resolve()), "bytes": pair.before.path.stat().st_size},
        "after": {"path": str(pair.after.path.resolve()), "bytes": pair.after.path.stat().st_size},
        "grid": {"crs": grid.crs.to_string() if grid.crs else None, "transform": list(grid.transform)[:6],
                 "width": grid.width, "height": grid.height},
        "bands": {"before": list(pair.before.bands), "after": list(pair.after.bands)},
        "resampling": pair.resampling.name,
        "stretch": dataclasses.asdict(stretch),
        "tiles": {"tile_size": cfg.TILE_SIZE, "overlap": cfg.OVERLAP, "max_nodata": cfg.MAX_NODATA},
        "model": model_identity(cfg), "questions": questions,
        "generation": {"max_new_tokens": cfg.MAX_NEW_TOKENS, "num_beams": cfg.NUM_BEAMS},
    }
    return json.loads(json.dumps(identity))


def run_name(cfg, pair: RasterPair) -> str:
    return cfg.RUN_NAME or f"{pair.before.path.stem}_{pair.after.path.stem}_{model_label(cfg)}"


@dataclass
class SceneRun(LockedOutput):
    """A run being written: its folder, tiles, the ones still to answer, what produced it; rank 0 holds the
    writer and its lock (a ``with`` block releases it)."""
    cfg: Any
    folder: Path
    questions: dict[str, str]
    tiles: list[Tile]
    todo: list[Tile]
    identity: dict[str, Any]
    writer: ResultsWriter | None = None
    lock: WriterLock | None = None
    started: float = field(default_factory=time.time)


def _open_on_main(cfg, folder: Path, identity: dict[str, Any]) -> tuple[ResultsWriter, WriterLock]:
    lock = lock_for_writing(folder, f"the run directory {folder}")
    with released_on_error(lock):
        if cfg.OVERWRITE and folder.exists():
            print(f"OVERWRITE: removed the earlier run in {folder}")
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        check_run_settings(folder / SETTINGS_FILE, identity, folder / TILES_FILE, redo="set OVERWRITE=True")
        return ResultsWriter(folder / TILES_FILE), lock


def open_run(cfg, pair: RasterPair, tiles: list[Tile], questions: dict[str, str], shard: Shard) -> SceneRun:
    """Step 4: ``<OUTPUT_DIR>/<run>/``, written by rank 0 alone (a second run on it stops with one line). Tiles
    already in ``tiles.jsonl`` are not answered again, if the same scene, grid, model and questions wrote them;
    anything else is refused in one line (``RUN_NAME`` for a new run, ``OVERWRITE=True`` to redo it)."""
    folder = Path(cfg.OUTPUT_DIR) / run_name(cfg, pair)
    identity = run_identity(cfg, pair, questions)
    writer = lock = None
    outcome: tuple[str, Any] | None = None
    if shard.main:
        try:
            writer, lock = _open_on_main(cfg, folder, identity)
            outcome = ("todo", [tile.id for tile in tiles if tile.id not in writer.done_ids])
        except UserError as exc:
            outcome = ("error", str(exc))
    kind, value = from_main(shard, outcome)  # every process learns what is left, or the one line why not
    if kind == "error":
        raise UserError(value)
    left = set(value)
    todo = [tile for tile in tiles if tile.id in left]
    if shard.main:
        done = len(tiles) - len(todo)
        print(f"{folder}: {len(todo)} of {len(tiles)} tiles to answer" + (f" ({done} already there)" if done else "")
              + (f", {shard.world_size} processes" if shard.world_size > 1 else ""))
    return SceneRun(cfg, folder, questions, tiles, todo, identity, writer, lock)


# ----------------------------------------------------------------------------------------------- 3. answers

def load_model(run: SceneRun, shard: Shard):
    """Step 5: the model, as the demo resolves ``MODEL`` / ``MODEL_PATH`` (each process on its own device under
    torchrun), or None when no tile is left to answer."""
    if not run.todo:
        return None
    cfg = run.cfg
    device = str(process_device()) if shard.world_size > 1 and cfg.DEVICE == "auto" else cfg.DEVICE
    return demo.load_chat(dataclasses.replace(cfg, DEVICE=device))


def answer_batch(model, images: list[TileImages], run: SceneRun, grid) -> list[dict]:
    """The records of one batch of tiles: each question asked of every tile not skipped, in one batch."""
    kept = [image for image in images if image.skipped is None]
    answers: dict[str, dict[str, str]] = {image.tile.id: {} for image in kept}
    if kept:
        pairs = [(image.before, image.after) for image in kept]
        for label, question in run.questions.items():
            for image, text in zip(kept, model.answer_pairs(pairs, question, run.cfg.MAX_NEW_TOKENS)):
                answers[image.tile.id][label] = text
    return [tile_record(grid, image, answers.get(image.tile.id), run.questions) for image in images]


def answer_tiles(run: SceneRun, pair: RasterPair, model, shard: Shard) -> None:
    """Step 6: each process answers its share of the tiles left, in batches of ``BATCH_SIZE``; the next batch is
    read in the background while the model answers this one; after every batch rank 0 appends every process's
    records to ``tiles.jsonl``."""
    if not run.todo:
        return
    cfg = run.cfg
    share = share_of(run.todo, shard)  # the share answer_in_shards deals this process, in its order
    batches = [share[start:start + cfg.BATCH_SIZE] for start in range(0, len(share), cfg.BATCH_SIZE)]

    def read(batch: list[Tile]) -> list[TileImages]:
        return [read_tile(pair, tile, cfg.MAX_NODATA) for tile in batch]

    with BackgroundReader(batches, read) as reader:
        def answer(batch: list[Tile]) -> list[dict]:
            images = reader.next()
            if [image.tile.id for image in images] != [tile.id for tile in batch]:
                raise RuntimeError("the tile reader fell out of step with the batches answered")
            return answer_batch(model, images, run, pair.grid)

        answer_in_shards(shard, run.todo, cfg.BATCH_SIZE, answer,
                         run.writer.append if shard.main else (lambda records: None), desc="tiles", unit="batch")


# ----------------------------------------------------------------------------------------------- 4. outputs

def write_outputs(run: SceneRun, pair: RasterPair, shard: Shard) -> dict[str, Any] | None:
    """Step 7 (rank 0): ``changes.geojson`` (when the rasters are georeferenced), ``overview.png``, ``run.json``
    with the summary, and the summary printed; returns it."""
    if not shard.main:
        return None
    records = {record["id"]: record for record in read_jsonl(run.folder / TILES_FILE)}
    missing = [tile.id for tile in run.tiles if tile.id not in records]
    if missing:
        raise RuntimeError(f"{run.folder / TILES_FILE} lacks {len(missing)} tiles after answering ({missing[:3]}...)")
    ordered = [records[tile.id] for tile in run.tiles]
    summary = summarize(ordered)
    outputs = [TILES_FILE]
    if pair.grid.georeferenced:
        write_geojson(run.folder / GEOJSON_FILE, pair.grid, ordered, run.questions)
        outputs.append(GEOJSON_FILE)
    else:
        print(f"no {GEOJSON_FILE}: neither raster is georeferenced, so the tiles have no place on the earth "
              f"(tiles.jsonl and {OVERVIEW_FILE} are in pixel coordinates)")
    line = format_summary(summary)
    write_overview(run.folder / OVERVIEW_FILE, pair, ordered, title=model_title(run.cfg),
                   subtitle=f"{pair.before.path.name} -> {pair.after.path.name}: {line}")
    outputs.append(OVERVIEW_FILE)
    record = {"run": run.folder.name, "settings": run.cfg.as_dict(), "identity": run.identity,
              "grid": pair.grid.describe(), "processes": shard.world_size, "summary": summary, "outputs": outputs,
              "seconds": round(time.time() - run.started, 1), "versions": library_versions()}
    atomic_write_text(run.folder / RUN_FILE, json.dumps(record, indent=2, default=str) + "\n")
    print(f"{line}\n" + "\n".join(f"{name}: {run.folder / name}" for name in outputs))
    return summary


def stop(shard: Shard) -> None:
    """Step 8: wait for every process (the writer's outputs included), then leave the process group."""
    stop_shards(shard)
