"""A grid cut into the tiles a model answers about, and tiles read in the background while it answers.

Tiles are ``tile_size`` pixels of the common grid, ``overlap`` pixels shared between neighbours. The last row and
column are shifted inward (overlapping their neighbours more), so no tile reaches beyond the grid, which is the ground
both dates cover. A tile that is more than ``max_nodata`` nodata (masked, or outside a raster) in either date, or all
zero in either date, is skipped, and the reason recorded; in the others a pixel that is invalid in either date is
black in both, so a gap in one date never looks like a change.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Callable, Generic, Sequence, TypeVar

import numpy as np
from rasterio.windows import Window

from .errors import UserError
from .rasters import Grid, RasterPair

Batch = TypeVar("Batch")
Read = TypeVar("Read")

NODATA = "nodata"
ALL_ZERO = "all zero"


@dataclass(frozen=True)
class Tile:
    """One tile: its row and column in the tile grid, its number on the map (1, 2, ... row by row) and its window
    of grid pixels."""
    row: int
    col: int
    number: int
    window: Window

    @property
    def id(self) -> str:
        return f"r{self.row:03d}_c{self.col:03d}"


def tile_starts(length: int, size: int, overlap: int) -> list[int]:
    """Where tiles start along one side of ``length`` pixels: every ``size - overlap``, the last one moved back to end
    exactly at ``length`` (never beyond it)."""
    starts = list(range(0, length - size + 1, size - overlap))
    if starts[-1] + size < length:
        starts.append(length - size)
    return starts


def plan_tiles(grid: Grid, tile_size: int, overlap: int) -> list[Tile]:
    """Every tile of the grid, row by row; a tile larger than the grid (the overlap of the dates) is one line."""
    if tile_size < 1:
        raise UserError(f"TILE_SIZE={tile_size}: must be >= 1 pixel")
    if not 0 <= overlap < tile_size:
        raise UserError(f"OVERLAP={overlap}: must be >= 0 and smaller than TILE_SIZE={tile_size}")
    if tile_size > min(grid.width, grid.height):
        raise UserError(f"TILE_SIZE={tile_size} is larger than the overlap of the two dates ({grid.describe()}): "
                        f"give a smaller TILE_SIZE, or a larger GSD")
    rows, cols = tile_starts(grid.height, tile_size, overlap), tile_starts(grid.width, tile_size, overlap)
    return [Tile(r, c, r * len(cols) + c + 1, Window(col, row, tile_size, tile_size))
            for r, row in enumerate(rows) for c, col in enumerate(cols)]


@dataclass
class TileImages:
    """A tile as the model sees it: both dates as (h, w, 3) uint8 RGB, or why it is skipped (``None`` pictures)."""
    tile: Tile
    before: np.ndarray | None
    after: np.ndarray | None
    nodata: float  # the share of its pixels invalid in either date
    skipped: str | None = None


def read_tile(pair: RasterPair, tile: Tile, max_nodata: float) -> TileImages:
    """Both dates of ``tile``, stretched to 8 bits; skipped when either date is more than ``max_nodata`` invalid or
    all zero."""
    (before, before_valid), (after, after_valid) = pair.read(tile.window)
    valid = before_valid & after_valid
    nodata = float(1.0 - valid.mean())
    worst = max(1.0 - before_valid.mean(), 1.0 - after_valid.mean())
    if worst > max_nodata or not valid.any():
        return TileImages(tile, None, None, round(nodata, 4), NODATA)
    if not (before.any(axis=0) & before_valid).any() or not (after.any(axis=0) & after_valid).any():
        return TileImages(tile, None, None, round(nodata, 4), ALL_ZERO)
    return TileImages(tile, pair.stretch.apply(before, valid), pair.stretch.apply(after, valid), round(nodata, 4))


class BackgroundReader(Generic[Batch, Read]):
    """``read(batch)`` for each of ``batches`` in order, in a thread, ``ahead`` batches ahead of the caller: the
    next tiles are read (GDAL releases the GIL) while the model answers the current ones. ``next()`` returns the
    next batch's result (re-raising the reader's error); ``close()`` stops the thread."""

    def __init__(self, batches: Sequence[Batch], read: Callable[[Batch], Read], ahead: int = 1):
        self._queue: queue.Queue = queue.Queue(maxsize=ahead)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(list(batches), read), name="tile reader",
                                        daemon=True)
        self._thread.start()

    def _work(self, batches: list[Batch], read: Callable[[Batch], Read]) -> None:
        for batch in batches:
            try:
                item = (True, read(batch))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller by next()
                item = (False, exc)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if self._stop.is_set() or not item[0]:
                return

    def next(self) -> Read:
        ok, value = self._queue.get()
        if not ok:
            raise value
        return value

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> "BackgroundReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
