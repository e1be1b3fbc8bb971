"""Synthetic slides with known nuclei, for tests, benchmarks and the demo.

A slide is a *mosaic*: square cells, each a copy of one annotated source tile (image + instance
labels) under one of the 8 flips/rotations, laid out inside an elliptical tissue region on white
glass. Sources are either purely synthetic H&E-like tiles (:func:`synthetic_tile`) or real
annotated tiles (``images/`` + ``masks/`` folders such as MoNuSeg). Any region of any pyramid
level is rendered on demand from per-source pyramids, so a 40000 x 40000 px slide is written tile
by tile without ever being held in memory, and its ground truth (labels or polygons) is exact.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely
import tifffile
from PIL import Image
from shapely import affinity
from shapely.geometry import Polygon

from wsi_pipeline.progress import Progress
from wsi_pipeline.segment.geojson import FeatureWriter, nucleus_feature
from wsi_pipeline.segment.polygons import label_polygons, largest_polygon
from wsi_pipeline.slides.image_store import downsample2
from wsi_pipeline.slides.tiling import Box, ShardGrid
from wsi_pipeline.train.augment import square_symmetry
from wsi_pipeline.train.ingest import IMAGE_SUFFIXES

logger = logging.getLogger(__name__)

STROMA = np.array([236, 168, 200], dtype=np.float32)
NUCLEUS = np.array([92, 52, 140], dtype=np.float32)
GLASS = 255
TIFF_TILE = 256


def synthetic_tile(
    size: int, rng: np.random.Generator, *, mpp: float = 0.25, density: float = 0.0035
) -> tuple[np.ndarray, np.ndarray]:
    """An H&E-like tile with non-overlapping elliptical nuclei (3–5.5 µm radius).

    Args:
        size: tile side in px.
        rng: random generator (the tile is a pure function of its state).
        mpp: resolution, µm/px, which sets the nuclei's size in pixels.
        density: nuclei per µm² of tile area.

    Returns:
        ``(rgb uint8 (size, size, 3), labels int32 (size, size))`` with labels 1..N.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 2)
    wave = 0.5 + 0.25 * (np.sin(xx / 37.0 + phase[0]) + np.sin(yy / 53.0 + phase[1]))
    rgb = STROMA[None, None] - 18 * wave[..., None] + rng.normal(0, 4, (size, size, 3))
    labels = np.zeros((size, size), dtype=np.int32)
    target = int(density * (size * mpp) ** 2)
    centres: list[tuple[float, float, float]] = []
    for _ in range(target * 6):
        if len(centres) >= target:
            break
        r = rng.uniform(3.0, 5.5) / mpp
        cx, cy = rng.uniform(0, size, 2)
        if all((cx - x) ** 2 + (cy - y) ** 2 > (r + q + 1) ** 2 for x, y, q in centres):
            centres.append((cx, cy, r))
    for index, (cx, cy, r) in enumerate(centres, start=1):
        _draw_nucleus(rgb, labels, index, cx, cy, r, rng)
    return np.clip(rgb, 0, 255).astype(np.uint8), labels


def _draw_nucleus(
    rgb: np.ndarray,
    labels: np.ndarray,
    index: int,
    cx: float,
    cy: float,
    r: float,
    rng: np.random.Generator,
) -> None:
    a, b = r * rng.uniform(1.0, 1.3), r * rng.uniform(0.75, 1.0)
    angle = rng.uniform(0, np.pi)
    size = labels.shape[0]
    x0, x1 = max(int(cx - a - 2), 0), min(int(cx + a + 3), size)
    y0, y1 = max(int(cy - a - 2), 0), min(int(cy + a + 3), size)
    if x1 <= x0 or y1 <= y0:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
    u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
    d = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    inside = d <= 1.0
    shade = NUCLEUS * rng.uniform(0.85, 1.15) - 25 * d[..., None]
    texture = rng.normal(0, 10, inside.shape)[..., None]
    patch = rgb[y0:y1, x0:x1]
    patch[inside] = (shade + texture)[inside]
    labels[y0:y1, x0:x1][inside] = index


def load_annotated_tiles(directory: str | Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(rgb, labels)`` pairs from ``images/<name>.*`` and ``masks/<name>.png`` of a folder."""
    root = Path(directory)
    images = sorted(p for p in (root / "images").glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise FileNotFoundError(f"{root}: no images/ with .png/.jpg/.tif files")
    pairs = []
    for image in images:
        mask = root / "masks" / f"{image.stem}.png"
        if not mask.exists():
            raise FileNotFoundError(f"{mask}: missing mask for {image.name}")
        rgb = np.asarray(Image.open(image).convert("RGB"))
        pairs.append((rgb, np.asarray(Image.open(mask)).astype(np.int32)))
    return pairs


def transform_polygon(polygon: Polygon, t: int, size: float) -> Polygon:
    """The symmetry of :func:`square_symmetry` on pixel-corner coordinates in ``[0, size]``."""
    for _ in range(t % 4):
        # np.rot90 sends input (x, y) to output (y, size - x).
        polygon = affinity.affine_transform(polygon, [0, 1, -1, 0, 0, size])
    if t >= 4:
        polygon = affinity.affine_transform(polygon, [-1, 0, 0, 1, size, 0])
    return polygon


@dataclass(frozen=True)
class _Source:
    pyramid: list[np.ndarray]
    labels: np.ndarray
    polygons: list[tuple[int, Polygon]]

    @property
    def count(self) -> int:
        return int(self.labels.max())


class MosaicSlide:
    """A ``width x height`` level-0 slide tiled with transformed copies of annotated sources."""

    def __init__(
        self,
        sources: list[tuple[np.ndarray, np.ndarray]],
        width: int,
        height: int,
        *,
        seed: int = 0,
        tissue_fraction: float = 0.85,
        levels: int | None = None,
    ) -> None:
        if width <= 0 or height <= 0:
            raise ValueError(f"slide size must be positive, got {width}x{height}")
        self.width, self.height = width, height
        self.levels = levels or _default_levels(width, height)
        align = 2 ** (self.levels - 1)
        side = min(min(img.shape[:2]) for img, _ in sources)
        self.cell = side // align * align
        if self.cell < align:
            raise ValueError(f"source tiles of {side} px are too small for {self.levels} levels")
        self._sources = [self._prepare(img, lab) for img, lab in sources]
        rng = np.random.default_rng(seed)
        self.cols, self.rows = math.ceil(width / self.cell), math.ceil(height / self.cell)
        n = self.cols * self.rows
        self._source_of = rng.integers(0, len(sources), n)
        self._transform_of = rng.integers(0, 8, n)
        self._tissue = self._tissue_layout(tissue_fraction)
        counts = np.array([self._sources[s].count for s in self._source_of]) * self._tissue
        self._label_offset = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.nuclei = int(counts.sum())

    def _prepare(self, image: np.ndarray, labels: np.ndarray) -> _Source:
        c = self.cell
        image, labels = image[:c, :c], _relabel(labels[:c, :c])
        pyramid = [image]
        for _ in range(1, self.levels):
            pyramid.append(downsample2(pyramid[-1], channels_last=True))
        return _Source(pyramid, labels, list(label_polygons(labels)))

    def _tissue_layout(self, fraction: float) -> np.ndarray:
        """Cells whose centre lies in a centred ellipse covering about ``fraction`` of the slide."""
        rows, cols = np.mgrid[0 : self.rows, 0 : self.cols]
        u = ((cols + 0.5) * self.cell / self.width - 0.5) * 2
        v = ((rows + 0.5) * self.cell / self.height - 0.5) * 2
        scale = math.sqrt(max(fraction, 1e-6) * 4 / math.pi)
        inside = (u / scale) ** 2 + (v / scale) ** 2 <= 1.0
        if not inside.any():
            inside[self.rows // 2, self.cols // 2] = True
        return inside.ravel()

    def _cells(self, box: Box, cell: int) -> Iterator[tuple[int, Box]]:
        """``(cell index, cell box)`` of tissue cells meeting ``box`` (coordinates of one level)."""
        for row in range(max(box.y0 // cell, 0), min(-(-box.y1 // cell), self.rows)):
            for col in range(max(box.x0 // cell, 0), min(-(-box.x1 // cell), self.cols)):
                index = row * self.cols + col
                if self._tissue[index]:
                    yield index, Box(col * cell, row * cell, (col + 1) * cell, (row + 1) * cell)

    def tissue_cells(self) -> Iterator[tuple[int, Box]]:
        """``(cell index, level-0 box)`` of every tissue cell: one transformed source tile each."""
        return self._cells(Box(0, 0, self.width, self.height), self.cell)

    def _paste(self, out: np.ndarray, box: Box, cell_box: Box, data: np.ndarray) -> None:
        part = Box(
            max(box.x0, cell_box.x0),
            max(box.y0, cell_box.y0),
            min(box.x1, cell_box.x1),
            min(box.y1, cell_box.y1),
        )
        out[part.y0 - box.y0 : part.y1 - box.y0, part.x0 - box.x0 : part.x1 - box.x0] = data[
            part.y0 - cell_box.y0 : part.y1 - cell_box.y0,
            part.x0 - cell_box.x0 : part.x1 - cell_box.x0,
        ]

    def level_size(self, level: int) -> tuple[int, int]:
        f = 2**level
        return -(-self.width // f), -(-self.height // f)

    def render(self, box: Box, level: int = 0) -> np.ndarray:
        """RGB pixels of ``box`` (pixels of ``level``); outside the slide is glass (white)."""
        out = np.full((box.height, box.width, 3), GLASS, dtype=np.uint8)
        w, h = self.level_size(level)
        for index, cell_box in self._cells(box.clip(w, h), self.cell >> level):
            src = self._sources[self._source_of[index]]
            self._paste(
                out, box, cell_box, square_symmetry(src.pyramid[level], self._transform_of[index])
            )
        self._blank_outside(out, box, w, h)
        return out

    def render_labels(self, box: Box) -> np.ndarray:
        """Level-0 instance labels (uint32, unique across the slide) of ``box``."""
        out = np.zeros((box.height, box.width), dtype=np.uint32)
        for index, cell_box in self._cells(box.clip(self.width, self.height), self.cell):
            src = self._sources[self._source_of[index]]
            labels = square_symmetry(src.labels, self._transform_of[index]).astype(np.uint32)
            labels[labels > 0] += np.uint32(self._label_offset[index])
            self._paste(out, box, cell_box, labels)
        self._blank_outside(out, box, self.width, self.height)
        return out

    @staticmethod
    def _blank_outside(out: np.ndarray, box: Box, width: int, height: int) -> None:
        out[max(height - box.y0, 0) :] = GLASS if out.ndim == 3 else 0
        out[:, max(width - box.x0, 0) :] = GLASS if out.ndim == 3 else 0

    def polygons(self) -> Iterator[tuple[int, Polygon]]:
        """``(label, polygon)`` of every nucleus, level-0 px; labels match :meth:`render_labels`."""
        slide_box = shapely.box(0, 0, self.width, self.height)
        for index, cell_box in self.tissue_cells():
            src = self._sources[self._source_of[index]]
            t = int(self._transform_of[index])
            for label, polygon in src.polygons:
                moved = affinity.translate(
                    transform_polygon(polygon, t, self.cell), cell_box.x0, cell_box.y0
                )
                if cell_box.x1 > self.width or cell_box.y1 > self.height:
                    moved = largest_polygon(moved.intersection(slide_box))
                if moved is not None:
                    yield label + int(self._label_offset[index]), moved


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 1..N in order, so that cropping leaves no gaps."""
    values = np.unique(labels)
    values = values[values != 0]
    lut = np.zeros(int(labels.max()) + 1, dtype=np.int32)
    lut[values] = np.arange(1, len(values) + 1, dtype=np.int32)
    return lut[labels]


def _default_levels(width: int, height: int) -> int:
    """Halve until the smallest level is at most ~1024 px (at most 6 levels)."""
    levels = 1
    while levels < 6 and max(width, height) >> (levels - 1) > 1024:
        levels += 1
    return levels


def synthetic_sources(
    count: int = 6, size: int = 512, *, mpp: float = 0.25, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``count`` synthetic H&E tiles to build a mosaic from."""
    rng = np.random.default_rng(seed)
    return [synthetic_tile(size, rng, mpp=mpp) for _ in range(count)]


def write_tiff(slide: MosaicSlide, path: str | Path, *, mpp: float, quality: int = 90) -> None:
    """Write ``slide`` as a JPEG-compressed tiled pyramidal TIFF with resolution tags.

    OpenSlide (generic-tiff) and tiffslide both read the pyramid and its µm/px. Memory stays at
    one tile per level.
    """
    grids = [ShardGrid(*slide.level_size(level), TIFF_TILE) for level in range(slide.levels)]
    total = sum(grid.cols * grid.rows for grid in grids)
    tiles = Progress(total, f"synth-slide {slide.width}x{slide.height}", unit="tiles")
    with tifffile.TiffWriter(path, bigtiff=True) as tiff:
        for level in range(slide.levels):
            w, h = slide.level_size(level)
            level_mpp = mpp * 2**level
            tiff.write(
                _level_tiles(slide, level, tiles),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(TIFF_TILE, TIFF_TILE),
                compression="jpeg",
                compressionargs={"level": quality},
                photometric="rgb",
                resolution=(1e4 / level_mpp, 1e4 / level_mpp),
                resolutionunit="CENTIMETER",
                subfiletype=1 if level else 0,
                description=f"wsi-pipeline synthetic mosaic; level {level}; mpp {level_mpp}",
                metadata=None,
            )


def _level_tiles(slide: MosaicSlide, level: int, tiles: Progress) -> Iterator[np.ndarray]:
    w, h = slide.level_size(level)
    grid = ShardGrid(w, h, TIFF_TILE)
    for col, row in grid:
        x0, y0 = col * TIFF_TILE, row * TIFF_TILE
        yield slide.render(Box(x0, y0, x0 + TIFF_TILE, y0 + TIFF_TILE), level)
        tiles.update()


def write_truth(slide: MosaicSlide, path: str | Path) -> int:
    """Ground-truth nuclei as a QuPath GeoJSON (annotations, level-0 px); returns their count."""
    with FeatureWriter(path) as writer:
        for label, polygon in slide.polygons():
            feature = nucleus_feature(polygon, object_type="annotation")
            feature["properties"]["label"] = label
            writer.write(feature)
    return writer.count
