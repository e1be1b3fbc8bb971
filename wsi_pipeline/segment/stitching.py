"""Tile instances → slide instances: every nucleus exactly once, never cut at a seam.

Invariant (tested as "tiled result == whole-image result"): with tiles of a :class:`TileGrid`
whose overlap ``O`` is at least the diameter of the largest nucleus, every nucleus is kept by
exactly one tile, whole.

1. **Ownership** (:func:`owned_instances`, per tile, in parallel): a tile keeps an instance if its
   centroid lies in the tile's core (the cores partition the slide) and it does not touch a tile
   edge that is not a slide edge (such an instance is cut, and lies within ``O/2`` of the edge, so
   its centroid is in a neighbour's core where it is whole).
2. **Seams** (:class:`SeamResolver`, on the driver, streaming): two tiles may predict the same
   nucleus slightly differently, so that both centroids fall in their own tile's core. Instances
   whose centroid lies within ``margin`` px of a core edge wait until every tile owning a point
   of that neighbourhood has reported; then, of any two overlapping more than ``iou`` (found with
   an STRtree), only the larger is kept. Memory is bounded by the tiles in flight, not the slide.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import shapely
from shapely.geometry import Polygon

from wsi_pipeline.slides.tiling import Tile, TileGrid

TileIndex = tuple[int, int]


def owned_instances(labels: np.ndarray, tile: Tile, grid: TileGrid) -> tuple[list[int], int]:
    """Labels of the instances that ``tile`` owns (see the module invariant), and how many
    instances were too large for the overlap.

    An instance whose centroid lies in this tile's core but which touches an inner tile edge is
    larger than the overlap allows: its neighbour sees it cut too, so it is lost. StarDist
    raises there; a slide goes on, but the count is reported so the overlap can be raised. Each
    tile counts the cut pieces whose centroid it owns, so one wide instance may count twice.

    Args:
        labels: the tile's instance labels, shape ``(tile, tile)``, in the tile's frame.
        tile: the tile, from ``grid``.
        grid: the grid the tile belongs to.
    """
    n = int(labels.max())
    if n == 0:
        return [], 0
    cy, cx = pixel_centroids(labels, n)
    # Centroids are in pixel-index coordinates; +0.5 moves to the pixel-corner frame.
    cols, rows = grid.owners(tile.box.x0 + cx + 0.5, tile.box.y0 + cy + 0.5)
    owned = ~np.isnan(cx) & (cols == tile.col) & (rows == tile.row)
    cut = np.zeros(n + 1, dtype=bool)
    cut[_labels_on_inner_edges(labels, tile, grid)] = True
    ids = np.arange(1, n + 1)
    return ids[owned & ~cut[1:]].tolist(), int(np.count_nonzero(owned & cut[1:]))


def pixel_centroids(labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean row and column index of the pixels of each label ``1..n`` (NaN where it has none).

    The sums are of whole numbers, so exact: a tile and its neighbour find the same centroid of
    the same pixels. Three ``bincount`` passes: a third of ``ndimage.center_of_mass``'s time.
    """
    height, width = labels.shape
    flat = labels.ravel()
    counts = np.bincount(flat, minlength=n + 1)[1:]
    rows = np.repeat(np.arange(height, dtype=np.float64), width)
    cols = np.tile(np.arange(width, dtype=np.float64), height)
    with np.errstate(invalid="ignore", divide="ignore"):
        cy = np.bincount(flat, weights=rows, minlength=n + 1)[1:] / counts
        cx = np.bincount(flat, weights=cols, minlength=n + 1)[1:] / counts
    return cy, cx


def _labels_on_inner_edges(labels: np.ndarray, tile: Tile, grid: TileGrid) -> np.ndarray:
    edges = [np.zeros(0, dtype=labels.dtype)]
    if tile.col > 0:
        edges.append(labels[:, 0])
    if tile.col < grid.cols - 1:
        edges.append(labels[:, -1])
    if tile.row > 0:
        edges.append(labels[0, :])
    if tile.row < grid.rows - 1:
        edges.append(labels[-1, :])
    return np.unique(np.concatenate(edges))


@dataclass
class Nucleus:
    """One kept instance: level-0 polygon, grid-px centroid, owning tile, label, measurements."""

    polygon: Polygon
    centroid: tuple[float, float]
    tile: TileIndex
    properties: dict[str, Any] = field(default_factory=dict)
    label: int = 0


def seam_neighbours(grid: TileGrid, nucleus: Nucleus, margin: float) -> set[TileIndex]:
    """Other tiles owning a point within ``margin`` px of the nucleus' centroid.

    Empty for the nuclei no other tile can also have claimed: those are final at once.
    """
    x, y = nucleus.centroid
    # A point's owning column depends on x alone and its row on y alone: the owners of the nine
    # points around the centroid are every pair of the three columns and three rows.
    cols = {grid.owner(x + d, y)[0] for d in (-margin, 0, margin)}
    rows = {grid.owner(x, y + d)[1] for d in (-margin, 0, margin)}
    return {(col, row) for col in cols for row in rows} - {nucleus.tile}


def near_seams(grid: TileGrid, nuclei: list[Nucleus], margin: float) -> np.ndarray:
    """``bool(seam_neighbours(grid, n, margin))`` for each of ``nuclei`` at once."""
    if not nuclei:
        return np.zeros(0, dtype=bool)
    x, y = np.array([n.centroid for n in nuclei], dtype=np.float64).T
    tile_cols, tile_rows = np.array([n.tile for n in nuclei]).T
    near = np.zeros(len(nuclei), dtype=bool)
    for d in (-margin, 0, margin):
        cols, rows = grid.owners(x + d, y + d)
        near |= (cols != tile_cols) | (rows != tile_rows)
    return near


@dataclass
class _Pending:
    nucleus: Nucleus
    waits_for: set[TileIndex]


class SeamResolver:
    """Streams tiles' nuclei out, de-duplicating those that sit on a seam.

    Call :meth:`add` with each tile's owned nuclei (in any order); it returns the nuclei that
    are final. :meth:`finish` returns the rest once every tile has been added.
    """

    def __init__(self, grid: TileGrid, *, margin: float = 8.0, iou: float = 0.3) -> None:
        self.grid = grid
        self.margin = margin
        self.iou = iou
        self.done: set[TileIndex] = set()
        self.pending: list[_Pending] = []
        self.dropped = 0

    def add(self, tile: TileIndex, nuclei: Iterable[Nucleus]) -> list[Nucleus]:
        """Register a finished tile; returns the nuclei that are now final."""
        ready = []
        for nucleus in nuclei:
            near = seam_neighbours(self.grid, nucleus, self.margin)
            if near:
                self.pending.append(_Pending(nucleus, near))
            else:
                ready.append(nucleus)
        self.done.add(tile)
        return ready + self._resolve()

    def finish(self) -> list[Nucleus]:
        """Everything still pending (call once all tiles are added)."""
        self.done.update(t for p in self.pending for t in p.waits_for)
        return self._resolve()

    def _resolve(self) -> list[Nucleus]:
        if not self.pending:
            return []
        polygons = [p.nucleus.polygon for p in self.pending]
        tree = shapely.STRtree(polygons)
        # Rank: larger first, then by position, so the same duplicate wins whatever the order
        # in which tiles arrive (runs are reproducible).
        order = sorted(
            range(len(polygons)),
            key=lambda i: (-polygons[i].area, self.pending[i].nucleus.centroid),
        )
        rank = {i: r for r, i in enumerate(order)}
        removed: set[int] = set()
        emitted: list[int] = []
        for i in order:
            if i in removed or not self.pending[i].waits_for <= self.done:
                continue
            near = (int(j) for j in tree.query(polygons[i]))
            duplicates = [
                j
                for j in near
                if j != i and j not in removed and self._same(polygons[i], polygons[j])
            ]
            if any(rank[j] < rank[i] for j in duplicates):
                removed.add(i)  # a better-ranked duplicate is still waiting for its tiles
                self.dropped += 1
                continue
            removed.update(duplicates)
            self.dropped += len(duplicates)
            removed.add(i)
            emitted.append(i)
        out = [self.pending[i].nucleus for i in emitted]
        self.pending = [p for k, p in enumerate(self.pending) if k not in removed]
        return out

    def _same(self, a: Polygon, b: Polygon) -> bool:
        inter = a.intersection(b).area
        return inter > 0 and inter / (a.area + b.area - inter) > self.iou
