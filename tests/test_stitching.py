"""The seam invariant: the tiled result equals the whole-image result."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from scipy import ndimage as ndi
from shapely.geometry import Polygon, box

from wsi_pipeline import synthetic
from wsi_pipeline.checkpoint import ModelCard
from wsi_pipeline.segment.instances import instances_from_probabilities
from wsi_pipeline.segment.nuclei import tile_nuclei
from wsi_pipeline.segment.polygons import label_polygons
from wsi_pipeline.segment.stitching import Nucleus, SeamResolver, near_seams, seam_neighbours
from wsi_pipeline.slides.tiling import Box, TileGrid
from wsi_pipeline.train.targets import make_target, one_hot

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
        nuclei, oversize = tile_nuclei(
            crop, tile, grid, card=CARD, downsample=downsample, level0_mpp=0.25
        )
        assert oversize == 0  # every nucleus is narrower than the overlap
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


def test_pixel_centroids_equal_center_of_mass() -> None:
    from wsi_pipeline.segment.stitching import pixel_centroids

    rng = np.random.default_rng(1)
    labels = ndi.label(ndi.gaussian_filter(rng.random((90, 70)), 2) > 0.52)[0]
    n = int(labels.max())
    labels[labels == 2] = 0  # a label without pixels
    cy, cx = pixel_centroids(labels, n)
    with np.errstate(invalid="ignore"):  # the empty label's 0 / 0
        expected = ndi.center_of_mass(np.ones_like(labels), labels, np.arange(1, n + 1))
    assert n > 5 and np.isnan(cy[1]) and np.isnan(cx[1])
    np.testing.assert_array_equal(np.stack([cy, cx], axis=1), np.array(expected))


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


def test_an_instance_wider_than_the_overlap_is_counted_not_silently_lost() -> None:
    from wsi_pipeline.segment.stitching import owned_instances

    grid = TileGrid(256, 128, 128, 16)  # two tiles side by side, overlap 16 px
    tile = grid.tile_at(0, 0)
    labels = np.zeros((128, 128), dtype=np.int32)
    labels[40:60, 60:128] = 1  # centroid (x 94) in this tile's core, cut at the inner edge
    labels[10:20, 10:20] = 2  # a small nucleus well inside
    keep, oversize = owned_instances(labels, tile, grid)
    assert keep == [2] and oversize == 1
    # The neighbour sees its cut piece, whose centroid (x 120.5) lies in the neighbour's core:
    # it is dropped and counted there too (the count is per tile, an upper bound).
    right = np.zeros((128, 128), dtype=np.int32)
    right[40:60, 0:16] = 1
    assert owned_instances(right, grid.tile_at(1, 0), grid) == ([], 1)
    right[:] = 0
    right[40:60, 0:6] = 1  # centroid x 115: in tile 0's core, so tile 1 neither keeps nor counts
    assert owned_instances(right, grid.tile_at(1, 0), grid) == ([], 0)


def test_near_seams_is_whether_a_nucleus_has_seam_neighbours() -> None:
    grid = TileGrid(1000, 800, 256, 64)
    rng = np.random.default_rng(3)
    nuclei = []
    for x, y in rng.uniform(0, [1000, 800], size=(300, 2)):
        tile = grid.owner(x, y)
        nuclei.append(Nucleus(Polygon(), (float(x), float(y)), tile))
    near = near_seams(grid, nuclei, margin=16.0)
    assert near.tolist() == [bool(seam_neighbours(grid, n, 16.0)) for n in nuclei]
    assert 0 < near.sum() < len(nuclei)
    assert near_seams(grid, [], 16.0).shape == (0,)
