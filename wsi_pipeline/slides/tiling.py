"""Tile and shard geometry: pure arithmetic, no I/O.

Coordinates come in two frames:

* **level-0 pixels** of the slide, the frame of every output (QuPath's convention);
* **grid pixels** at the tiling resolution (``mpp``), where tiles are ``tile`` px square.

One grid pixel spans ``downsample = mpp / slide_mpp`` level-0 pixels.

Ownership rule (the invariant stitching relies on): tiles start every ``stride = tile - overlap``
grid pixels; tile ``i`` *owns* the half-open core ``[core_start(i), core_start(i + 1))`` where
``core_start(0) = 0``, ``core_start(i) = i * stride + overlap // 2`` and the last core ends at the
grid's edge. The cores partition the grid, so every grid (and level-0) point is owned by exactly
one tile, and every core lies at least ``overlap // 2`` px inside its tile on each side that is not
a slide edge. An object whose pixels lie within ``overlap // 2`` px of its centroid is therefore
whole in the tile that owns its centroid.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, order=True)
class Box:
    """Half-open pixel rectangle ``[x0, x1) x [y0, y1)``."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    def clip(self, width: int, height: int) -> Box:
        """This box cut to ``[0, width) x [0, height)`` (may become empty)."""
        return Box(
            min(max(self.x0, 0), width),
            min(max(self.y0, 0), height),
            min(max(self.x1, 0), width),
            min(max(self.y1, 0), height),
        )

    @property
    def empty(self) -> bool:
        return self.width <= 0 or self.height <= 0

    def scaled(self, factor: float) -> tuple[float, float, float, float]:
        """Corners multiplied by ``factor`` (e.g. grid px to level-0 px)."""
        return (self.x0 * factor, self.y0 * factor, self.x1 * factor, self.y1 * factor)


@dataclass(frozen=True)
class Tile:
    """One tile of a :class:`TileGrid`: its index, full extent and owned core, in grid px."""

    col: int
    row: int
    box: Box
    core: Box


def _axis_count(length: int, tile: int, stride: int) -> int:
    """Tiles along one axis so that the last one reaches ``length`` (at least one)."""
    if length <= tile:
        return 1
    return 1 + math.ceil((length - tile) / stride)


@dataclass(frozen=True)
class TileGrid:
    """Tiles of ``tile`` px with ``overlap`` px overlap over a ``width x height`` grid-px image.

    Edge tiles may extend past the image; readers pad them with background.
    """

    width: int
    height: int
    tile: int
    overlap: int = 0

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"grid size must be positive, got {self.width}x{self.height}")
        if self.tile <= 0:
            raise ValueError(f"tile must be positive, got {self.tile}")
        if not 0 <= self.overlap < self.tile:
            raise ValueError(
                f"overlap must be in [0, tile), got {self.overlap} for tile {self.tile}"
            )

    @property
    def stride(self) -> int:
        return self.tile - self.overlap

    # Cached: ownership tests ask for them for every nucleus of every tile.
    @functools.cached_property
    def cols(self) -> int:
        return _axis_count(self.width, self.tile, self.stride)

    @functools.cached_property
    def rows(self) -> int:
        return _axis_count(self.height, self.tile, self.stride)

    def __len__(self) -> int:
        return self.cols * self.rows

    def _core_start(self, i: int, count: int, length: int) -> int:
        if i <= 0:
            return 0
        if i >= count:
            return length
        return min(i * self.stride + self.overlap // 2, length)

    def tile_at(self, col: int, row: int) -> Tile:
        """The tile at grid index ``(col, row)``."""
        if not (0 <= col < self.cols and 0 <= row < self.rows):
            raise IndexError(f"tile ({col}, {row}) outside a {self.cols}x{self.rows} grid")
        x0, y0 = col * self.stride, row * self.stride
        core = Box(
            self._core_start(col, self.cols, self.width),
            self._core_start(row, self.rows, self.height),
            self._core_start(col + 1, self.cols, self.width),
            self._core_start(row + 1, self.rows, self.height),
        )
        return Tile(col, row, Box(x0, y0, x0 + self.tile, y0 + self.tile), core)

    def __iter__(self) -> Iterator[Tile]:
        for row in range(self.rows):
            for col in range(self.cols):
                yield self.tile_at(col, row)

    def owner(self, x: float, y: float) -> tuple[int, int]:
        """Index ``(col, row)`` of the one tile whose core holds grid point ``(x, y)``."""
        return (
            self._owner_index(x, self.cols),
            self._owner_index(y, self.rows),
        )

    def owners(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`owner` of many grid points at once: their columns and rows (int arrays)."""
        return self._owner_indices(xs, self.cols), self._owner_indices(ys, self.rows)

    def _owner_index(self, v: float, count: int) -> int:
        return min(count - 1, max(0, math.floor((v - self.overlap // 2) / self.stride)))

    def _owner_indices(self, v: np.ndarray, count: int) -> np.ndarray:
        index = np.floor((np.asarray(v, dtype=np.float64) - self.overlap // 2) / self.stride)
        return np.clip(index, 0, count - 1).astype(np.int64)


@dataclass(frozen=True)
class ShardGrid:
    """Non-overlapping shard blocks of ``shard`` px (a multiple of the chunk) over an image."""

    width: int
    height: int
    shard: int

    @property
    def cols(self) -> int:
        return max(1, math.ceil(self.width / self.shard))

    @property
    def rows(self) -> int:
        return max(1, math.ceil(self.height / self.shard))

    def box(self, col: int, row: int) -> Box:
        """Shard ``(col, row)`` cut to the image."""
        s = self.shard
        return Box(col * s, row * s, (col + 1) * s, (row + 1) * s).clip(self.width, self.height)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for row in range(self.rows):
            for col in range(self.cols):
                yield col, row

    def chunks(self, col: int, row: int, chunk: int) -> Iterator[Box]:
        """The chunk-aligned boxes of one shard, cut to the image."""
        box = self.box(col, row)
        for y in range(box.y0, box.y1, chunk):
            for x in range(box.x0, box.x1, chunk):
                yield Box(x, y, x + chunk, y + chunk).clip(self.width, self.height)


def grid_size(level0_width: int, level0_height: int, downsample: float) -> tuple[int, int]:
    """Size in grid px of a slide of the given level-0 size seen at ``downsample``.

    Rounded up so that the grid covers every level-0 pixel.
    """
    if downsample <= 0:
        raise ValueError(f"downsample must be positive, got {downsample}")
    # A small tolerance keeps exact ratios (e.g. 2220 / 2.0) from rounding up by float noise.
    return (
        max(1, math.ceil(level0_width / downsample - 1e-6)),
        max(1, math.ceil(level0_height / downsample - 1e-6)),
    )
