"""Synthetic top-down before/after scenes with known changes (the bundled sample data's pictures).

A scene pair is planned from one integer seed (its own numpy Generator, no global
state): a land-cover background, static objects (buildings, roads, trees, water,
parking lots, solar rows) and 0-3 *changes*. The after image shows the changes
plus nuisance differences a real change detector must ignore: illumination,
season tint, 0-3 px misregistration and sensor noise.

Every object keeps its own texture seed, so an object that did not change is
painted identically in both images; only the changes and the nuisance differ.
Each change records its type, category (road / building / other), count and the
3x3 grid cells its pixels cover, which the captions and ChangeChat answers use.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SIZE = 256
# Painted beyond the visible frame so a misregistered crop never shows an empty edge.
MARGIN = 4
CANVAS = SIZE + 2 * MARGIN
GRID_EDGES = (0, 85, 171, 256)
# A cell counts as changed only if the object covers this many of its pixels (not a stray edge pixel).
MIN_CELL_PIXELS = 12
# Room left between objects, and the shadow length (shadows fall to the lower right).
GAP = 6
SHADOW = 4

LAND_COVERS = {"grass": (92, 124, 62), "soil": (132, 106, 78), "desert": (196, 176, 136)}
ROOF_COLORS = ((186, 186, 182), (168, 82, 62), (96, 98, 104), (214, 200, 168), (132, 150, 170), (150, 120, 96))
CAR_COLORS = ((200, 30, 30), (230, 230, 230), (30, 30, 30), (40, 70, 160), (150, 150, 150), (210, 190, 40))

CHANGE_KINDS = ("construction", "demolition", "new_road", "cleared_trees", "water_level", "new_parking_lot",
                "new_solar_rows")
CHANGE_CATEGORY = {"construction": "building", "demolition": "building", "new_road": "road"}


# --------------------------------------------------------------------------- objects

@dataclass(frozen=True)
class Rect:
    """Half-open box in scene pixels: rows y0..y1, columns x0..x1."""
    y0: int
    x0: int
    y1: int
    x1: int

    def grown(self, by: int) -> "Rect":
        return Rect(self.y0 - by, self.x0 - by, self.y1 + by, self.x1 + by)


@dataclass(frozen=True)
class SceneObject:
    """One drawable thing in its bounding ``rect``; trees are disks (cy, cx, r), a pond an ellipse."""
    kind: str  # building | road | trees | water | parking | solar | rubble | cleared
    seed: int
    rect: Rect
    disks: tuple[tuple[int, int, int], ...] = ()
    ellipse: tuple[int, int, int, int] | None = None  # cy, cx, ry, rx
    color: tuple[int, int, int] = (0, 0, 0)
    orientation: str = ""  # roads: "h" (east-west) or "v" (north-south)
    rows: int = 0  # solar arrays: rows of panels

    def mask(self) -> tuple[tuple[slice, slice], np.ndarray]:
        """(canvas slices of the bounding box, boolean footprint inside it)."""
        y0, y1 = max(self.rect.y0 + MARGIN, 0), min(self.rect.y1 + MARGIN, CANVAS)
        x0, x1 = max(self.rect.x0 + MARGIN, 0), min(self.rect.x1 + MARGIN, CANVAS)
        ys = np.arange(y0, y1)[:, None] - MARGIN
        xs = np.arange(x0, x1)[None, :] - MARGIN
        if self.disks:
            footprint = np.zeros((y1 - y0, x1 - x0), bool)
            for cy, cx, r in self.disks:
                footprint |= (ys - cy) ** 2 + (xs - cx) ** 2 <= r * r
        elif self.ellipse is not None:
            cy, cx, ry, rx = self.ellipse
            footprint = ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1.0
        else:
            footprint = np.ones((y1 - y0, x1 - x0), bool)
        return (slice(y0, y1), slice(x0, x1)), footprint


# Painting order, bottom to top.
LAYER = {"water": 0, "road": 1, "parking": 2, "solar": 3, "rubble": 4, "cleared": 4, "trees": 5, "building": 6}


@dataclass(frozen=True)
class Change:
    """Ground truth of one change: what, which category, how many, and where (3x3 grid cells, row/col 0-2)."""
    type: str
    category: str  # building | road | other
    count: int
    cells: tuple[tuple[int, int], ...]
    detail: str | None = None  # water level: "rose" or "fell"

    def to_json(self) -> dict:
        record = {"type": self.type, "category": self.category, "count": self.count,
                  "cells": [list(cell) for cell in self.cells]}
        if self.detail is not None:
            record["detail"] = self.detail
        return record


@dataclass(frozen=True)
class Nuisance:
    """Differences of the after image that are not changes."""
    gain: float
    tint: tuple[float, float, float]
    shift: tuple[int, int]
    noise_sigma: float


@dataclass(frozen=True)
class ScenePair:
    seed: int
    land_cover: str
    background_seed: int
    before: tuple[SceneObject, ...]
    after: tuple[SceneObject, ...]
    changes: tuple[Change, ...]
    nuisance: Nuisance = field(compare=False)


# --------------------------------------------------------------------------- planning

def grid_cell_bounds(row: int, col: int) -> Rect:
    return Rect(GRID_EDGES[row], GRID_EDGES[col], GRID_EDGES[row + 1], GRID_EDGES[col + 1])


def covered_cells(objects: list[SceneObject]) -> tuple[tuple[int, int], ...]:
    """Grid cells holding at least MIN_CELL_PIXELS of the objects' visible (in-frame) footprint."""
    footprint = np.zeros((SIZE, SIZE), bool)
    for obj in objects:
        (ys, xs), mask = obj.mask()
        canvas = np.zeros((CANVAS, CANVAS), bool)
        canvas[ys, xs] = mask
        footprint |= canvas[MARGIN:MARGIN + SIZE, MARGIN:MARGIN + SIZE]
    cells = []
    for row in range(3):
        for col in range(3):
            box = grid_cell_bounds(row, col)
            if footprint[box.y0:box.y1, box.x0:box.x1].sum() >= MIN_CELL_PIXELS:
                cells.append((row, col))
    return tuple(cells)


class _Planner:
    """Places objects on free ground; ``taken`` marks footprints (plus gaps) already used."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.taken = np.zeros((SIZE, SIZE), bool)

    def new_seed(self) -> int:
        return int(self.rng.integers(0, 2**31 - 1))

    def is_free(self, rect: Rect) -> bool:
        box = rect.grown(GAP)
        return not self.taken[max(box.y0, 0):max(box.y1, 0), max(box.x0, 0):max(box.x1, 0)].any()

    def take(self, rect: Rect) -> None:
        self.taken[max(rect.y0, 0):max(rect.y1, 0), max(rect.x0, 0):max(rect.x1, 0)] = True

    def random_rect(self, area: Rect, height: int, width: int, tries: int = 40) -> Rect | None:
        """A free height x width box inside ``area`` (shadow room included), or None."""
        for _ in range(tries):
            if area.y1 - area.y0 - height - SHADOW <= 0 or area.x1 - area.x0 - width - SHADOW <= 0:
                return None
            y0 = int(self.rng.integers(area.y0, area.y1 - height - SHADOW))
            x0 = int(self.rng.integers(area.x0, area.x1 - width - SHADOW))
            rect = Rect(y0, x0, y0 + height, x0 + width)
            if self.is_free(Rect(y0, x0, y0 + height + SHADOW, x0 + width + SHADOW)):
                return rect
        return None

    def buildings(self, area: Rect, how_many: int) -> list[SceneObject]:
        placed = []
        for _ in range(how_many):
            height, width = (int(v) for v in self.rng.integers(12, 29, size=2))
            rect = self.random_rect(area, height, width)
            if rect is None:
                continue
            self.take(Rect(rect.y0, rect.x0, rect.y1 + SHADOW, rect.x1 + SHADOW))
            color = ROOF_COLORS[int(self.rng.integers(len(ROOF_COLORS)))]
            placed.append(SceneObject("building", self.new_seed(), rect, color=color))
        return placed

    def road(self, orientation: str, center: int, width: int) -> SceneObject:
        half = width // 2
        if orientation == "h":
            rect = Rect(center - half, -MARGIN, center - half + width, SIZE + MARGIN)
        else:
            rect = Rect(-MARGIN, center - half, SIZE + MARGIN, center - half + width)
        return SceneObject("road", self.new_seed(), rect, orientation=orientation)

    def grove(self, area: Rect, how_many: int) -> SceneObject | None:
        height, width = (int(v) for v in self.rng.integers(22, 40, size=2))
        rect = self.random_rect(area, height, width)
        if rect is None:
            return None
        self.take(rect)
        disks = []
        for _ in range(how_many):
            r = int(self.rng.integers(4, 8))
            cy = int(self.rng.integers(rect.y0 + r, max(rect.y1 - r, rect.y0 + r + 1)))
            cx = int(self.rng.integers(rect.x0 + r, max(rect.x1 - r, rect.x0 + r + 1)))
            disks.append((cy, cx, r))
        return SceneObject("trees", self.new_seed(), rect, disks=tuple(disks))

    def pond(self, area: Rect, ry: int, rx: int) -> SceneObject | None:
        rect = self.random_rect(area, 2 * ry + 1, 2 * rx + 1)
        if rect is None:
            return None
        self.take(rect)
        return SceneObject("water", self.new_seed(), rect, ellipse=(rect.y0 + ry, rect.x0 + rx, ry, rx))

    def parking(self, area: Rect) -> SceneObject | None:
        height, width = int(self.rng.integers(26, 42)), int(self.rng.integers(30, 52))
        rect = self.random_rect(area, height, width)
        if rect is None:
            return None
        self.take(rect)
        return SceneObject("parking", self.new_seed(), rect)

    def solar(self, area: Rect, rows: int) -> SceneObject | None:
        height, width = rows * 7 - 2, int(self.rng.integers(28, 56))
        rect = self.random_rect(area, height, width)
        if rect is None:
            return None
        self.take(rect)
        return SceneObject("solar", self.new_seed(), rect, rows=rows)


def _cell_area(row: int, col: int) -> Rect:
    # Objects of a change stay inside their cell, so the caption's one place is exact.
    return grid_cell_bounds(row, col).grown(-3)


def _band_center(index: int, rng: np.random.Generator) -> int:
    low, high = GRID_EDGES[index], GRID_EDGES[index + 1]
    middle = (low + high) // 2
    return middle + int(rng.integers(-14, 15))


@dataclass
class _PlannedChange:
    """A change being planned: objects only in the before / after scene, and those whose pixels changed."""
    before_only: list[SceneObject] = field(default_factory=list)
    after_only: list[SceneObject] = field(default_factory=list)
    changed: list[SceneObject] = field(default_factory=list)
    count: int = 0
    detail: str | None = None


def _plan_buildings(planner: _Planner, area: Rect, demolish: bool) -> _PlannedChange:
    made = planner.buildings(area, int(planner.rng.integers(1, 4 if demolish else 5)))
    if demolish:  # the footprint stays visible as bare rubble
        rubble = [SceneObject("rubble", planner.new_seed(), b.rect) for b in made]
        return _PlannedChange(made, rubble, made, len(made))
    return _PlannedChange([], made, made, len(made))


def _plan_cleared_trees(planner: _Planner, area: Rect) -> _PlannedChange:
    grove = planner.grove(area, int(planner.rng.integers(6, 15)))
    if grove is None:
        return _PlannedChange()
    cleared = SceneObject("cleared", planner.new_seed(), grove.rect, disks=grove.disks)
    return _PlannedChange([grove], [cleared], [grove], len(grove.disks))


def _plan_water_level(planner: _Planner, area: Rect) -> _PlannedChange:
    rng = planner.rng
    ry, rx = (int(v) for v in rng.integers(11, 17, size=2))
    rose = bool(rng.random() < 0.5)
    scale = rng.uniform(1.5, 1.9) if rose else rng.uniform(0.45, 0.65)
    small_ry, small_rx = (ry, rx) if rose else (max(4, round(ry * scale)), max(4, round(rx * scale)))
    big_ry, big_rx = (min(26, round(ry * scale)), min(26, round(rx * scale))) if rose else (ry, rx)
    big = planner.pond(area, big_ry, big_rx)
    if big is None:
        return _PlannedChange()
    # Same pond (same seed and centre), another shoreline.
    small = SceneObject("water", big.seed, big.rect, ellipse=(big.ellipse[0], big.ellipse[1], small_ry, small_rx))
    before, after = (small, big) if rose else (big, small)
    return _PlannedChange([before], [after], [big], 1, "rose" if rose else "fell")


def _plan_new(made: SceneObject | None, count: int) -> _PlannedChange:
    return _PlannedChange([], [made], [made], count) if made is not None else _PlannedChange()


def _plan_change(planner: _Planner, kind: str, area: Rect) -> _PlannedChange:
    """The objects of one change kept inside ``area`` (one grid cell)."""
    if kind in ("construction", "demolition"):
        return _plan_buildings(planner, area, demolish=kind == "demolition")
    if kind == "cleared_trees":
        return _plan_cleared_trees(planner, area)
    if kind == "water_level":
        return _plan_water_level(planner, area)
    if kind == "new_parking_lot":
        return _plan_new(planner.parking(area), 1)
    rows = int(planner.rng.integers(2, 6))  # new_solar_rows
    return _plan_new(planner.solar(area, rows), rows)


def make_scene_pair(seed: int) -> ScenePair:
    """Plan one before/after pair from ``seed`` (same seed -> same pair, on any run)."""
    rng = np.random.default_rng(seed)
    planner = _Planner(rng)
    land_cover = list(LAND_COVERS)[int(rng.integers(len(LAND_COVERS)))]
    background_seed = planner.new_seed()

    num_changes = int(rng.choice(4, p=[0.2, 0.4, 0.3, 0.1]))
    kinds = [CHANGE_KINDS[i] for i in rng.choice(len(CHANGE_KINDS), size=num_changes, replace=False)]
    # A new road takes a whole band of cells; plan it first so the other changes avoid that band.
    if "new_road" in kinds:
        kinds.remove("new_road")
        kinds.insert(0, "new_road")
    free_cells = [(r, c) for r in range(3) for c in range(3)]
    before_only: list[SceneObject] = []
    after_only: list[SceneObject] = []
    changes: list[Change] = []
    for kind in kinds:
        if kind == "new_road":
            orientation = "h" if rng.random() < 0.5 else "v"
            band = int(rng.integers(3))
            road = planner.road(orientation, _band_center(band, rng), int(rng.integers(8, 13)))
            planner.take(road.rect)
            free_cells = [(r, c) for r, c in free_cells if (r if orientation == "h" else c) != band]
            planned = _PlannedChange([], [road], [road], 1)
        else:
            row, col = free_cells.pop(int(rng.integers(len(free_cells))))
            planned = _plan_change(planner, kind, _cell_area(row, col))
        if planned.count:  # a change that found no room is simply not made
            before_only += planned.before_only
            after_only += planned.after_only
            changes.append(Change(kind, CHANGE_CATEGORY.get(kind, "other"), planned.count,
                                  covered_cells(planned.changed), planned.detail))

    static = _static_objects(planner, rng)
    before = tuple(sorted(static + before_only, key=lambda o: LAYER[o.kind]))
    after = tuple(sorted(static + after_only, key=lambda o: LAYER[o.kind]))
    nuisance = Nuisance(
        gain=float(rng.uniform(0.85, 1.15)),
        tint=tuple(float(v) for v in rng.uniform(0.93, 1.07, size=3)),
        shift=(int(rng.integers(-3, 4)), int(rng.integers(-3, 4))),
        noise_sigma=float(rng.uniform(1.0, 3.0)),
    )
    return ScenePair(seed, land_cover, background_seed, before, after, tuple(changes), nuisance)


def _static_objects(planner: _Planner, rng: np.random.Generator) -> list[SceneObject]:
    """What both images show, placed around the changes."""
    whole = Rect(2, 2, SIZE - 2, SIZE - 2)
    placed: list[SceneObject] = []
    for _ in range(int(rng.integers(0, 3))):
        orientation = "h" if rng.random() < 0.5 else "v"
        road = planner.road(orientation, int(rng.integers(20, SIZE - 20)), int(rng.integers(7, 11)))
        clipped = Rect(max(road.rect.y0, 0), max(road.rect.x0, 0), min(road.rect.y1, SIZE), min(road.rect.x1, SIZE))
        if planner.is_free(clipped):
            planner.take(clipped)
            placed.append(road)
    if rng.random() < 0.35:
        ry, rx = (int(v) for v in rng.integers(10, 22, size=2))
        placed += [p for p in [planner.pond(whole, ry, rx)] if p]
    if rng.random() < 0.3:
        placed += [p for p in [planner.parking(whole)] if p]
    if rng.random() < 0.2:
        placed += [p for p in [planner.solar(whole, int(rng.integers(2, 5)))] if p]
    for _ in range(int(rng.integers(0, 4))):
        placed += [g for g in [planner.grove(whole, int(rng.integers(4, 12)))] if g]
    placed += planner.buildings(whole, int(rng.integers(3, 11)))
    return placed


# --------------------------------------------------------------------------- rendering

def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a coarse random grid, bilinearly upsampled."""
    coarse = rng.uniform(-1, 1, size=(cells + 1, cells + 1))
    ys = np.linspace(0, cells, shape[0])
    xs = np.linspace(0, cells, shape[1])
    y0 = np.minimum(ys.astype(int), cells - 1)
    x0 = np.minimum(xs.astype(int), cells - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = coarse[y0][:, x0] * (1 - fx) + coarse[y0][:, x0 + 1] * fx
    bottom = coarse[y0 + 1][:, x0] * (1 - fx) + coarse[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _background(land_cover: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.array(LAND_COVERS[land_cover], np.float32)
    patches = _smooth_noise(rng, (CANVAS, CANVAS), 6).astype(np.float32)[..., None] * 18
    grain = rng.standard_normal(size=(CANVAS, CANVAS, 1), dtype=np.float32) * 5
    return base + patches + grain * np.array([1.0, 1.0, 0.9], np.float32)


def _paint(canvas: np.ndarray, obj: SceneObject) -> None:
    rng = np.random.default_rng(obj.seed)
    (ys, xs), mask = obj.mask()
    h, w = mask.shape
    region = canvas[ys, xs]
    grain = rng.standard_normal(size=(h, w, 1), dtype=np.float32)
    if obj.kind == "building":
        # Shadow first, to the lower right, then a gabled roof: two halves of slightly different brightness.
        shadow = (slice(ys.start + SHADOW, min(ys.stop + SHADOW, CANVAS)),
                  slice(xs.start + SHADOW, min(xs.stop + SHADOW, CANVAS)))
        canvas[shadow] *= 0.55
        region = canvas[ys, xs]
        roof = np.empty((h, w, 3))
        roof[:] = obj.color
        if h >= w:
            roof[:, : w // 2] *= 1.08
            roof[:, w // 2:] *= 0.9
        else:
            roof[: h // 2] *= 1.08
            roof[h // 2:] *= 0.9
        region[:] = roof + grain * 3
    elif obj.kind == "road":
        asphalt = np.full((h, w, 3), 98.0) + grain * 4
        # A dashed centre line makes a road read as a road, not as a long grey building.
        along = np.arange(w if obj.orientation == "h" else h)
        dashes = (along // 6) % 2 == 0
        if obj.orientation == "h":
            asphalt[h // 2, dashes] = (220, 214, 170)
        else:
            asphalt[dashes, w // 2] = (220, 214, 170)
        region[:] = asphalt
    elif obj.kind == "water":
        depth = _smooth_noise(rng, (h, w), 2)[..., None]
        water = np.array([38.0, 72.0, 112.0]) + depth * 8 + grain * 2
        region[mask] = water[mask]
    elif obj.kind == "parking":
        lot = np.full((h, w, 3), 118.0) + grain * 3
        for x in range(2, w - 1, 6):  # stall lines
            lot[2:h // 2 - 2, x] = 225
            lot[h // 2 + 2:h - 2, x] = 225
        for x in range(3, w - 5, 6):  # parked cars, a few stalls left empty
            for y0 in (3, h // 2 + 3):
                if rng.random() < 0.55 and y0 + 8 < h:
                    lot[y0:y0 + 8, x + 1:x + 4] = CAR_COLORS[int(rng.integers(len(CAR_COLORS)))]
        region[:] = lot
    elif obj.kind == "solar":
        panels = region.copy()
        for row in range(obj.rows):
            y0 = row * 7
            panels[y0:y0 + 5] = (34, 46, 92)
            panels[y0:y0 + 5, ::4] = (70, 84, 130)  # cell frames
        region[:] = panels + grain * 2
    elif obj.kind in ("rubble", "cleared"):
        bare = np.array([150.0, 128.0, 100.0]) + _smooth_noise(rng, (h, w), 3)[..., None] * 10 + grain * 9
        region[mask] = bare[mask]
    elif obj.kind == "trees":
        yy = np.arange(h)[:, None] + ys.start - MARGIN
        xx = np.arange(w)[None, :] + xs.start - MARGIN
        for cy, cx, r in obj.disks:
            # Lit from the upper left, like the shadows: brighter crowns toward that side.
            dist = np.sqrt((yy - cy + r / 3) ** 2 + (xx - cx + r / 3) ** 2) / r
            disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            crown = np.array([34.0, 74.0, 30.0]) * (1.25 - 0.45 * np.clip(dist, 0, 1))[..., None] + grain * 4
            region[disk] = crown[disk]
    canvas[ys, xs] = region


def render_scene(objects: tuple[SceneObject, ...], land_cover: str, background_seed: int, *,
                 background: np.ndarray | None = None) -> np.ndarray:
    """The float RGB canvas, CANVAS x CANVAS, of the objects painted in layer order over the land."""
    canvas = _background(land_cover, background_seed) if background is None else background.copy()
    for obj in sorted(objects, key=lambda o: LAYER[o.kind]):
        _paint(canvas, obj)
    return canvas


def render_pair(pair: ScenePair, *, nuisance: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The before and after images, SIZE x SIZE x 3 uint8 RGB.

    With ``nuisance=False`` the after image differs from the before image only where something changed.
    """
    ground = _background(pair.land_cover, pair.background_seed)  # shared: the same land in both images
    before = render_scene(pair.before, pair.land_cover, pair.background_seed, background=ground)
    after = render_scene(pair.after, pair.land_cover, pair.background_seed, background=ground)
    frame = slice(MARGIN, MARGIN + SIZE)
    before = before[frame, frame]
    if nuisance:
        n = pair.nuisance
        dy, dx = n.shift
        after = after[MARGIN + dy:MARGIN + dy + SIZE, MARGIN + dx:MARGIN + dx + SIZE]
        after = after * np.float32(n.gain) * np.array(n.tint, np.float32)
        noise = np.random.default_rng([pair.seed, 1])
        before = before + noise.standard_normal(size=before.shape, dtype=np.float32) * np.float32(n.noise_sigma)
        after = after + noise.standard_normal(size=after.shape, dtype=np.float32) * np.float32(n.noise_sigma)
    else:
        after = after[frame, frame]
    return (np.clip(np.rint(before), 0, 255).astype(np.uint8), np.clip(np.rint(after), 0, 255).astype(np.uint8))
