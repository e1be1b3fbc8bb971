"""The seam invariant: the tiled result equals the whole-image result."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from scipy import ndimage as ndi
from shapely.geometry import Polygon, box

from wsi_pipeline import synthetic
from wsi_pipeline.checkpoint import ModelCard
from wsi_pipeline.inference import tile_nuclei
from wsi_pipeline.instances import instances_from_probabilities
from wsi_pipeline.polygons import label_polygons
from wsi_pipeline.stitching import Nucleus, SeamResolver
from wsi_pipeline.targets import make_target, one_hot
from wsi_pipeline.tiling import Box, TileGrid

CARD = ModelCard(architecture="unet", mpp=0.5)


@pytest.fixture(scope="module")
def whole_image() -> tuple[np.ndarray, np.ndarray]:
    """Probabilities of a 1100 x 900 px image (nuclei ≤ 29 px across) and its instances."""
    sources = synthetic.synthetic_sources(3, 256, mpp=0.5, seed=4)
    mosaic = synthetic.MosaicSlide(sources, 1100, 900, seed=2, tissue_fraction=0.9, levels=1)
    labels = mosaic.render_labels(Box(0, 0, 1100, 900)).astype(np.int32)
    # Smoothed like a real model's output: one-hot maps are flat, and watershed ties on flat
    # plateaus are broken by flooding order, which differs between a tile and the whole image.
    probs = ndi.gaussian_filter(one_hot(make_target(labels), 3), sigma=(0, 1, 1))
    return probs, instances_from_probabilities(probs, "3class", **CARD.postprocess.model_dump())


def tiled_polygons(probs: np.ndarray, grid: TileGrid, downsample: float) -> list[Polygon]:
    resolver = SeamResolver(grid)
    kept: list[Nucleus] = []
    for tile in grid:
        crop = np.zeros((3, grid.tile, grid.tile), dtype=np.float32)
        crop[0] = 1.0  # background beyond the image
        inside = tile.box.clip(grid.width, grid.height)
        crop[:, : inside.height, : inside.width] = probs[
            :, inside.y0 : inside.y1, inside.x0 : inside.x1
        ]
        nuclei = tile_nuclei(crop, tile, grid, card=CARD, downsample=downsample, level0_mpp=0.25)
        kept += resolver.add((tile.col, tile.row), nuclei)
    return [n.polygon for n in kept + resolver.finish()]


def iou(a: Polygon, b: Polygon) -> float:
    return a.intersection(b).area / a.union(b).area


@pytest.mark.parametrize(("tile", "overlap"), [(128, 32), (256, 48), (200, 64), (512, 32)])
@pytest.mark.parametrize("downsample", [1.0, 2.0])
def test_tiled_equals_whole_image(whole_image, tile: int, overlap: int, downsample: float) -> None:
    probs, instances = whole_image
    grid = TileGrid(probs.shape[2], probs.shape[1], tile, overlap)
    whole = [p for _, p in label_polygons(instances, scale=downsample)]
    tiled = tiled_polygons(probs, grid, downsample)
    assert len(tiled) == len(whole) > 300
    tree = shapely.STRtree(tiled)
    matched = set()
    for polygon in whole:
        best = max(tree.query(polygon), key=lambda j: iou(tiled[j], polygon))
        assert iou(tiled[best], polygon) >= 0.99
        matched.add(int(best))
    assert len(matched) == len(tiled)  # one to one


def square(x: float, y: float, size: float = 10) -> Polygon:
    return box(x, y, x + size, y + size)


def test_seam_duplicates_keep_the_larger_once_whatever_the_order() -> None:
    grid = TileGrid(200, 100, 110, 20)  # two tiles, cores split at x = 100
    a = Nucleus(square(95, 40, 10), (99.5, 45), (0, 0))  # left tile's view, centroid left of 100
    b = Nucleus(square(96, 40, 10.5), (100.5, 45), (1, 0))  # right tile's view: larger
    far = Nucleus(square(20, 20), (25, 25), (0, 0))
    for first, second in [((0, 0), (1, 0)), ((1, 0), (0, 0))]:
        resolver = SeamResolver(grid)
        nuclei = {(0, 0): [a, far], (1, 0): [b]}
        out = resolver.add(first, nuclei[first])
        out += resolver.add(second, nuclei[second])
        out += resolver.finish()
        assert sorted(n.tile for n in out) == [(0, 0), (1, 0)]
        assert b in out and a not in out and far in out
        assert resolver.dropped == 1


def test_nuclei_near_a_seam_wait_for_the_neighbour() -> None:
    grid = TileGrid(200, 100, 110, 20)
    resolver = SeamResolver(grid)
    near = Nucleus(square(92, 40), (97, 45), (0, 0))
    assert resolver.add((0, 0), [near]) == []
    assert resolver.add((1, 0), []) == [near]
