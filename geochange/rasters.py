"""Two rasters of one place on one grid, read window by window: anything rasterio opens (GeoTIFF / COG, JPEG2000, a
PNG with a world file), each date in its own CRS and pixel size, any number of bands of any type.

Opening checks what a user can get wrong, one ``error:`` line each, before any model loads: a file that is not a
raster, an unknown CRS, rasters that do not overlap, a band a raster lacks. The common grid is the BEFORE raster's
CRS at its own pixel size (or ``GSD`` metres), cut to the overlap of the two dates. Each date is read through GDAL's
warper onto that grid (a ``WarpedVRT``: reprojection and resampling happen per window, so nothing holds a whole
scene), with an alpha band saying which pixels hold data (nodata values, mask bands, ``.msk`` sidecars, alpha
bands, ground outside the raster). One percentile stretch per band, computed once from a decimated read of both
dates, maps both to 8 bits: the same values give the same colour in both dates, so a change is never a contrast
change.

Two rasters with no georeferencing at all (two plain PNGs) are read in pixel coordinates: the AFTER is scaled onto
the BEFORE's pixels, and nothing has a place on the ground (no GeoJSON).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import Affine, rowcol
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, Resampling
from rasterio.errors import CRSError, NotGeoreferencedWarning, RasterioError
from rasterio.vrt import WarpedVRT
from rasterio.warp import calculate_default_transform, transform_bounds
from rasterio.windows import Window
from rasterio.windows import bounds as window_bounds
from rasterio.windows import from_bounds

from .errors import UserError, first_line

WGS84 = CRS.from_epsg(4326)
# The warper's resampling methods (GDAL's; ``nearest`` is gdalwarp's default).
RESAMPLINGS = ("nearest", "bilinear", "cubic", "cubic_spline", "lanczos", "average", "mode", "min", "max", "med",
               "q1", "q3", "sum", "rms")
# Pixel coordinates (no georeferencing) still go through the warper, which needs a CRS: any planar one serves, and
# it is never shown.
PIXEL_CRS = CRS.from_epsg(3857)
# The stretch's sample and the overview picture are decimated reads with at most this many pixels a side.
SAMPLE_SIDE = 1024
# Colour interpretations that make the default bands, in order.
RGB = (ColorInterp.red, ColorInterp.green, ColorInterp.blue)


def _units(crs: CRS) -> str:
    return crs.linear_units if crs.is_projected else "degree"


def _short(crs: CRS | None) -> str:
    if crs is None:
        return "pixel coordinates"
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else (crs.to_string()[:60] or "a CRS without a name")


@dataclass(frozen=True)
class Grid:
    """The grid both dates are read on: the BEFORE's CRS (None: pixel coordinates), a north-up transform, a size."""
    crs: CRS | None
    transform: Affine
    width: int
    height: int

    @property
    def georeferenced(self) -> bool:
        return self.crs is not None

    @property
    def pixel_size(self) -> tuple[float, float]:
        return abs(self.transform.a), abs(self.transform.e)

    def bounds(self, window: Window) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) of ``window`` in the grid's CRS."""
        return window_bounds(window, self.transform)

    def describe(self) -> str:
        if not self.georeferenced:
            return f"{self.width} x {self.height} px in pixel coordinates"
        x, y = self.pixel_size
        size = f"{x:g} {_units(self.crs)}" if math.isclose(x, y) else f"{x:g} x {y:g} {_units(self.crs)}"
        return f"{self.width} x {self.height} px of {size} in {_short(self.crs)}"


@dataclass
class Raster:
    """One date: its file, the dataset open on it, where it lies (its CRS, None in pixel coordinates, and its
    transform) and the three bands read as red, green, blue."""
    setting: str
    path: Path
    dataset: rasterio.DatasetReader
    crs: CRS | None
    transform: Affine
    bands: tuple[int, int, int]

    @property
    def label(self) -> str:
        return f"{self.setting} ({self.path.name})"

    def describe(self) -> str:
        where = "no georeferencing"
        if self.crs is not None:
            where = (f"{_short(self.crs)}, pixels of {abs(self.transform.a):g} x {abs(self.transform.e):g} "
                     f"{_units(self.crs)}")
        return (f"{self.label}: {self.dataset.width} x {self.dataset.height} px, {self.dataset.count} band(s) of "
                f"{self.dataset.dtypes[0]}, bands {','.join(map(str, self.bands))} as RGB, {where}")


def open_raster(setting: str, path: str | Path) -> rasterio.DatasetReader:
    """The dataset rasterio opens on ``path``, or one line saying why it is not a raster."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{setting}={path}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)  # plain images are allowed: said later
            return rasterio.open(path)
    except RasterioError as exc:
        raise UserError(f"{setting}={path} is not a raster rasterio can read ({first_line(exc)})") from None


def _sidecar_crs(path: Path) -> CRS | None:
    """The CRS of a ``.prj`` beside an image with a world file (GDAL reads a PNG's CRS only from ``.aux.xml``)."""
    prj = path.with_suffix(".prj")
    if not prj.is_file():
        return None
    try:
        return CRS.from_user_input(prj.read_text(encoding="utf-8", errors="replace").strip())
    except CRSError as exc:
        raise UserError(f"{prj}: an unknown CRS ({first_line(exc)})") from None


def _crs_of(setting: str, path: Path, dataset) -> CRS | None:
    """Where the raster lies: its CRS; None for an image with no georeferencing at all (pixel coordinates). A
    transform without a CRS (a world file and no ``.prj``) or a CRS that cannot be placed on the earth (a local
    engineering CRS) is an unknown CRS."""
    gcps, gcp_crs = dataset.gcps
    if gcps and dataset.transform == Affine.identity():
        raise UserError(f"{setting}={path} is georeferenced by {len(gcps)} ground control points only: warp it onto "
                        f"a map grid first (gdalwarp -t_srs {_short(gcp_crs) if gcp_crs else '<CRS>'} ...)")
    crs = dataset.crs or _sidecar_crs(path)
    if crs is None:
        if dataset.transform == Affine.identity():
            return None
        raise UserError(f"{setting}={path}: georeferenced (a transform or world file) but its CRS is unknown; put a "
                        f".prj (or .aux.xml) with the CRS beside it")
    try:
        transform_bounds(crs, WGS84, *dataset.bounds)
    except Exception as exc:  # noqa: BLE001 - PROJ's refusal comes as rasterio's private CPLE_* errors
        raise UserError(f"{setting}={path}: unknown CRS {_short(crs)!r}: it cannot be placed on the earth "
                        f"({first_line(exc, 120)})") from None
    return crs


def parse_resampling(name: str) -> Resampling:
    """``RESAMPLING`` as rasterio's Resampling."""
    if name not in RESAMPLINGS:
        raise UserError(f"RESAMPLING={name!r} is not one of the warper's methods: {', '.join(RESAMPLINGS)}")
    return Resampling[name]


def parse_bands(value) -> tuple[int, ...] | None:
    """``BANDS`` as band numbers: None (the default), ``(4, 3, 2)``, ``"4,3,2"`` or one band ``2`` (grey)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [part for part in value.replace(" ", ",").split(",") if part]
    parts = list(value) if isinstance(value, (list, tuple)) else [value]
    if any(isinstance(part, float) and not part.is_integer() for part in parts):
        raise UserError(f"BANDS={value!r}: band numbers are whole numbers, e.g. 4,3,2")
    try:
        bands = tuple(int(part) for part in parts)
    except (TypeError, ValueError):
        raise UserError(f"BANDS={value!r}: expected band numbers, e.g. 4,3,2") from None
    if len(bands) not in (1, 3):
        raise UserError(f"BANDS={value!r}: give three band numbers (red, green, blue), or one for grey")
    return bands * 3 if len(bands) == 1 else bands


def pick_bands(setting: str, path: Path, dataset, bands: tuple[int, ...] | None) -> tuple[int, int, int]:
    """``bands`` checked against the raster; by default its red, green and blue by colour interpretation, else
    bands 1, 2, 3 (band 1 three times for a single band)."""
    if bands is None:
        interp = list(dataset.colorinterp)
        if all(colour in interp for colour in RGB):
            return tuple(interp.index(colour) + 1 for colour in RGB)
        return (1, 2, 3) if dataset.count >= 3 else (1, 1, 1)
    missing = [band for band in bands if not 1 <= band <= dataset.count]
    if missing:
        raise UserError(f"BANDS={','.join(map(str, bands))}: {setting}={path} has {dataset.count} band(s) "
                        f"(1..{dataset.count}), so no band {', '.join(map(str, missing))}")
    return tuple(bands)


def open_date(setting: str, path: str | Path, bands: tuple[int, ...] | None) -> Raster:
    """One date opened and checked: a raster, a known CRS (or none at all), the bands it has."""
    path = Path(path)
    dataset = open_raster(setting, path)
    try:
        crs = _crs_of(setting, path, dataset)
        return Raster(setting, path, dataset, crs, dataset.transform, pick_bands(setting, path, dataset, bands))
    except BaseException:
        dataset.close()
        raise


# ----------------------------------------------------------------------------------------------- the stretch

@dataclass(frozen=True)
class Stretch:
    """Per band, the values mapped to 0 and 255 (linear between, clipped outside); the same for both dates."""
    percentiles: tuple[float, float] | None
    low: tuple[float, float, float]
    high: tuple[float, float, float]

    def scale(self, values: np.ndarray, band: int) -> np.ndarray:
        """Values of one band -> uint8: (v - low) * 255 / (high - low), rounded, clipped to 0..255."""
        low, high = self.low[band], self.high[band]
        return np.rint(np.clip((values.astype(np.float32) - low) * (255.0 / (high - low)), 0, 255)).astype(np.uint8)

    def apply(self, values: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """(3, h, w) raster values -> (h, w, 3) uint8 RGB; pixels not ``valid`` are black."""
        picture = np.empty((*values.shape[1:], 3), np.uint8)
        for band in range(3):
            if values.dtype in (np.uint8, np.uint16):  # every value of the type looked up: a table is faster
                picture[..., band] = _table(self, band, values.dtype.str)[values[band]]
            else:
                picture[..., band] = self.scale(values[band], band)
        picture[~valid] = 0
        return picture


@lru_cache(maxsize=16)
def _table(stretch: Stretch, band: int, dtype: str) -> np.ndarray:
    """``stretch.scale`` of every value an 8- or 16-bit band can hold."""
    return stretch.scale(np.arange(np.iinfo(np.dtype(dtype)).max + 1), band)


def fit_stretch(samples: list[tuple[np.ndarray, np.ndarray]], percentiles: tuple[float, float] | None,
                dtypes: list[str]) -> Stretch:
    """The stretch from samples (``(values (3, h, w), valid (h, w))`` of each date): per band, the ``percentiles``
    of the valid values of all dates together. ``percentiles`` None or ``()``: 8-bit values as they are."""
    if not percentiles:
        if any(dtype != "uint8" for dtype in dtypes):
            raise UserError(f"STRETCH_PERCENTILES={percentiles}: values as they are needs 8-bit rasters; these are "
                            f"{' and '.join(sorted(set(dtypes)))}: give percentiles, e.g. (2, 98)")
        return Stretch(None, (0.0, 0.0, 0.0), (255.0, 255.0, 255.0))
    if len(percentiles) != 2:
        raise UserError(f"STRETCH_PERCENTILES={tuple(percentiles)}: expected two percentiles, e.g. (2, 98)")
    low_pct, high_pct = (float(p) for p in percentiles)
    if not 0 <= low_pct < high_pct <= 100:
        raise UserError(f"STRETCH_PERCENTILES={tuple(percentiles)}: expected two percentiles, 0 <= low < high <= 100")
    pooled = np.concatenate([values[:, valid] for values, valid in samples], axis=1).astype(np.float32)
    if pooled.shape[1] == 0:
        raise UserError("the overlap of BEFORE and AFTER holds no valid pixel in either date (all nodata or masked)")
    low, high = np.percentile(pooled, [low_pct, high_pct], axis=1)
    high = np.maximum(high, low + 1e-6)  # a constant band: one grey, no division by zero
    return Stretch((low_pct, high_pct), tuple(map(float, low)), tuple(map(float, high)))


# ----------------------------------------------------------------------------------------------- the pair

def _overlap(before: Raster, after: Raster) -> tuple[float, float, float, float]:
    """The ground both rasters cover, in the BEFORE's CRS (the AFTER's bounds carried over, edges densified)."""
    b_left, b_bottom, b_right, b_top = before.dataset.bounds
    a_left, a_bottom, a_right, a_top = transform_bounds(after.crs, before.crs, *after.dataset.bounds, densify_pts=21)
    left, bottom, right, top = max(b_left, a_left), max(b_bottom, a_bottom), min(b_right, a_right), min(b_top, a_top)
    if left >= right or bottom >= top:
        raise UserError(f"{before.label} and {after.label} do not overlap: in {_short(before.crs)} BEFORE covers "
                        f"{_fmt_bounds(before.dataset.bounds)}, AFTER "
                        f"{_fmt_bounds((a_left, a_bottom, a_right, a_top))}")
    return left, bottom, right, top


def _fmt_bounds(bounds) -> str:
    return "x {:.6g}..{:.6g}, y {:.6g}..{:.6g}".format(bounds[0], bounds[2], bounds[1], bounds[3])


def _inside(window: Window) -> Window:
    """The whole pixels of ``window`` (edges rounded inward, a rounding error of a millionth of a pixel forgiven)."""
    col0, row0 = math.ceil(window.col_off - 1e-6), math.ceil(window.row_off - 1e-6)
    col1 = math.floor(window.col_off + window.width + 1e-6)
    row1 = math.floor(window.row_off + window.height + 1e-6)
    return Window(col0, row0, max(col1 - col0, 0), max(row1 - row0, 0))


def common_grid(before: Raster, after: Raster, gsd: float | None) -> Grid:
    """The BEFORE's pixels (or ``gsd`` metre pixels from the same corner) over the ground both dates cover."""
    if before.crs is None:  # pixel coordinates: the AFTER is scaled onto the BEFORE's pixels
        if gsd is not None:
            raise UserError(f"GSD={gsd}: the rasters have no georeferencing, so no metres to resample to")
        return Grid(None, Affine.identity(), before.dataset.width, before.dataset.height)
    if before.transform.is_rectilinear:
        base, columns, rows = before.transform, before.dataset.width, before.dataset.height
    else:  # a rotated geotransform: the grid is the north-up one GDAL would choose for it
        base, columns, rows = calculate_default_transform(before.crs, before.crs, before.dataset.width,
                                                          before.dataset.height, *before.dataset.bounds)
    inside = _inside(from_bounds(*_overlap(before, after), transform=base))
    col0, row0 = max(inside.col_off, 0), max(inside.row_off, 0)  # never beyond the BEFORE's own pixels
    col1, row1 = min(inside.col_off + inside.width, columns), min(inside.row_off + inside.height, rows)
    window = Window(col0, row0, col1 - col0, row1 - row0)
    if window.width < 1 or window.height < 1:
        raise UserError(f"{before.label} and {after.label} overlap by less than a pixel")
    transform = rasterio.windows.transform(window, base)
    width, height = window.width, window.height
    if gsd is not None:
        if gsd <= 0:
            raise UserError(f"GSD={gsd}: metres per pixel must be > 0")
        if not before.crs.is_projected or before.crs.linear_units_factor[1] != 1.0:
            raise UserError(f"GSD={gsd} metres needs BEFORE in a projected CRS in metres; {before.label} is in "
                            f"{_short(before.crs)} ({_units(before.crs)})")
        x, y = abs(transform.a), abs(transform.e)
        width, height = math.floor(width * x / gsd + 1e-6), math.floor(height * y / gsd + 1e-6)
        transform = transform * Affine.scale(gsd / x, gsd / y)
    return Grid(before.crs, transform, int(width), int(height))


class RasterPair:
    """Both dates open on one grid: ``read(window)`` gives each date's values and valid pixels there. A ``with``
    block (or ``close()``) closes the files."""

    def __init__(self, before: Raster, after: Raster, grid: Grid, resampling: Resampling = Resampling.nearest):
        self.before, self.after, self.grid, self.resampling = before, after, grid, resampling
        self.stretch: Stretch | None = None
        self._readers = [self._warped(date, grid, resampling) for date in (before, after)]

    def _warped(self, date: Raster, grid: Grid, resampling: Resampling) -> tuple[WarpedVRT, int]:
        """The date seen through GDAL's warper on ``grid``, and the band of the VRT that says where data is."""
        source = ({} if date.crs is not None else
                  {"src_crs": PIXEL_CRS, "src_transform": Affine.scale(self.grid.width / date.dataset.width,
                                                                       self.grid.height / date.dataset.height)})
        interp = list(date.dataset.colorinterp)
        has_alpha = ColorInterp.alpha in interp
        vrt = WarpedVRT(date.dataset, crs=grid.crs or PIXEL_CRS, transform=grid.transform, width=grid.width,
                        height=grid.height, resampling=resampling, add_alpha=not has_alpha, **source)
        return vrt, (interp.index(ColorInterp.alpha) + 1 if has_alpha else vrt.count)

    @staticmethod
    def _read(readers, dates: tuple[Raster, Raster], window: Window | None) -> list[tuple[np.ndarray, np.ndarray]]:
        read = []
        for (vrt, alpha), date in zip(readers, dates):
            pixels = vrt.read([*date.bands, alpha], window=window)
            read.append((pixels[:3], pixels[3] > 0))
        return read

    def read(self, window: Window) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per date, ``(values (3, h, w) in the raster's type, valid (h, w) bool)`` over ``window`` of the grid."""
        return self._read(self._readers, (self.before, self.after), window)

    def sample(self, side: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Both dates over the whole grid at most ``side`` (default ``SAMPLE_SIDE``) pixels on the longer side: the
        warper samples each source onto a coarser grid of the same ground (GDAL reads a source's overviews where it
        has them), nearest neighbour: real values, not averages, which would squeeze the stretch's tails."""
        side = side or SAMPLE_SIDE
        grid = self.grid
        scale = max(1.0, max(grid.width, grid.height) / side)
        width, height = max(1, round(grid.width / scale)), max(1, round(grid.height / scale))
        coarse = Grid(grid.crs, grid.transform * Affine.scale(grid.width / width, grid.height / height), width, height)
        readers = [self._warped(date, coarse, Resampling.nearest) for date in (self.before, self.after)]
        try:
            return self._read(readers, (self.before, self.after), None)
        finally:
            for vrt, _ in readers:
                vrt.close()

    def fit_stretch(self, percentiles: tuple[float, float] | None) -> Stretch:
        self.stretch = fit_stretch(self.sample(), percentiles,
                                   [self.before.dataset.dtypes[0], self.after.dataset.dtypes[0]])
        return self.stretch

    def close(self) -> None:
        for vrt, _ in self._readers:
            vrt.close()
        self.before.dataset.close()
        self.after.dataset.close()

    def __enter__(self) -> "RasterPair":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_pair(before: str | Path, after: str | Path, *, bands=None, gsd: float | None = None,
              percentiles: tuple[float, float] | None = (2.0, 98.0), resampling: str = "nearest",
              say=print) -> RasterPair:
    """Both dates opened, checked and put on one grid (warped with ``resampling``), the stretch fitted; ``say`` gets
    one line per thing done to the data (a reprojection, a resampling, pixel coordinates)."""
    wanted, method = parse_bands(bands), parse_resampling(resampling)
    first = open_date("BEFORE", before, wanted)
    try:
        second = open_date("AFTER", after, wanted)
    except BaseException:
        first.dataset.close()
        raise
    try:
        if (first.crs is None) != (second.crs is None):
            plain = first if first.crs is None else second
            raise UserError(f"{plain.label} has no georeferencing but the other date has: give both with a CRS "
                            f"(GeoTIFF, or a world file and .prj), or neither (pixel coordinates)")
        grid = common_grid(first, second, gsd)
        pair = RasterPair(first, second, grid, method)
    except BaseException:
        first.dataset.close()
        second.dataset.close()
        raise
    try:
        for line in describe_pair(pair):
            say(line)
        pair.fit_stretch(percentiles)
    except BaseException:
        pair.close()
        raise
    return pair


def describe_pair(pair: RasterPair) -> list[str]:
    """What was opened and what is done to it to share one grid, a line each."""
    before, after, grid, method = pair.before, pair.after, pair.grid, pair.resampling.name
    lines = [before.describe(), after.describe()]
    if not grid.georeferenced:
        lines.append("neither date is georeferenced: tiles and the picture are in pixel coordinates, no GeoJSON")
        if (after.dataset.width, after.dataset.height) != (grid.width, grid.height):
            lines.append(f"{after.label} is resampled from {after.dataset.width} x {after.dataset.height} px onto "
                         f"BEFORE's {grid.width} x {grid.height} px ({method})")
        return lines
    pixels = f"{grid.pixel_size[0]:g} {_units(grid.crs)} pixels"
    if after.crs != grid.crs:
        lines.append(f"{after.label} is reprojected onto BEFORE's grid ({_short(after.crs)} -> {_short(grid.crs)}, "
                     f"{abs(after.transform.a):g} {_units(after.crs)} -> {pixels}, {method})")
    elif not _same_pixels(after.transform, grid.transform):
        lines.append(f"{after.label} is resampled onto BEFORE's grid ({abs(after.transform.a):g} -> {pixels}, "
                     f"{method})")
    if not _same_pixels(before.transform, grid.transform):
        lines.append(f"{before.label} is resampled to {pixels} ({method})")
    lines.append(f"the overlap of the two dates: {grid.describe()}")
    return lines


def _same_pixels(transform: Affine, grid: Affine) -> bool:
    """Whether a raster's pixels are the grid's (the same size and rotation, corners a whole number of pixels
    apart), so the warper only copies them."""
    if not all(math.isclose(getattr(transform, k), getattr(grid, k), rel_tol=1e-9, abs_tol=1e-12) for k in "abde"):
        return False
    row, col = rowcol(grid, transform.c, transform.f, op=float)
    return abs(col - round(col)) < 1e-6 and abs(row - round(row)) < 1e-6
