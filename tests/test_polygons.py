"""The outline tracer (``segment/polygons.py``) against scikit-image's ``find_contours``, object by
object: the same rings, vertex for vertex, with and without a sub-pixel field."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
import shapely.affinity
from conftest import shared_path
from PIL import Image
from shapely.geometry import Polygon
from skimage import measure

from wsi_pipeline import synthetic
from wsi_pipeline.segment.polygons import (
    label_polygons,
    label_rings,
    largest_polygon,
    polygon_array,
    rasterize,
)


def reference_ring(
    labels: np.ndarray, label: int, field: np.ndarray | None, level: float
) -> np.ndarray:
    """The longest ``find_contours`` ring of one object's mask, closed, xy in the corner frame:
    the tracer's former implementation, object by object."""
    mask = labels == label
    padded = np.zeros((labels.shape[0] + 2, labels.shape[1] + 2), dtype=np.float32)
    if field is None:
        padded[1:-1, 1:-1][mask] = 1.0
    else:
        values = np.where(mask | (labels == 0), field, 0).astype(np.float32)
        eps = np.float32(1e-3)
        padded[1:-1, 1:-1] = np.where(
            mask, np.maximum(values, level + eps), np.minimum(values, level - eps)
        )
    contour = max(measure.find_contours(padded, level), key=len)
    return contour[:-1, ::-1] - 0.5  # find_contours repeats the first point of a closed ring


def same_ring(ring: np.ndarray, expected: np.ndarray) -> bool:
    """Whether two rings are the same cyclic sequence of vertices (any start)."""
    if ring.shape != expected.shape:
        return False
    start = int(np.argmin(np.abs(ring - expected[0]).sum(axis=1)))
    return bool(np.allclose(np.roll(ring, -start, axis=0), expected, atol=1e-5))


def assert_rings_match(labels: np.ndarray, field: np.ndarray | None = None) -> int:
    rings = label_rings(labels, field=field, level=0.5)
    present = [int(k) for k in np.unique(labels) if k]
    assert list(rings) == present
    for label, ring in rings.items():
        assert same_ring(ring, reference_ring(labels, label, field, 0.5)), label
    return len(rings)


EDGE_CASES = {
    "single pixel": np.array([[1]]),
    "corner-touching pixels are apart": np.array([[1, 0], [0, 1]]),
    "saddle of two objects": np.array([[1, 2], [2, 1]]),
    "ring with a hole": np.pad(np.pad(np.zeros((2, 3), int), 1, constant_values=3), 1),
    "touching objects at the edge": np.array([[1, 1, 2, 2], [1, 1, 2, 2], [4, 4, 4, 0]]),
    "one pixel wide": np.array([[1], [1], [0], [2]]),
    "uint16 labels with gaps": np.array([[0, 300, 300], [7, 0, 300]], dtype=np.uint16),
    "spiral": np.array(
        [
            [5, 5, 5, 5, 5],
            [0, 0, 0, 0, 5],
            [5, 5, 5, 0, 5],
            [5, 0, 0, 0, 5],
            [5, 5, 5, 5, 5],
        ]
    ),
}


@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_rings_equal_find_contours_on_edge_cases(name: str) -> None:
    labels = EDGE_CASES[name]
    field = np.random.default_rng(0).random(labels.shape).astype(np.float32)
    assert assert_rings_match(labels) == assert_rings_match(labels, field) > 0


def test_no_objects_no_rings() -> None:
    assert label_rings(np.zeros((3, 4), dtype=np.int32)) == {}
    assert list(label_polygons(np.zeros((0, 0), dtype=np.int32))) == []


def test_rings_equal_find_contours_on_random_labels() -> None:
    """Speckled objects have every corner configuration: saddles, one-pixel bridges, holes."""
    rng = np.random.default_rng(3)
    for _ in range(5):
        labels = rng.integers(0, 4, size=(24, 31)) * (rng.random((24, 31)) < 0.6)
        field = rng.random(labels.shape).astype(np.float32)
        assert assert_rings_match(labels) > 0
        assert assert_rings_match(labels, field) > 0


def test_polygons_equal_find_contours_on_a_tile_of_nuclei() -> None:
    _, labels = synthetic.synthetic_tile(256, np.random.default_rng(1), mpp=0.5)
    field = np.clip((labels > 0) + np.random.default_rng(2).normal(0, 0.3, labels.shape), 0, 1)
    assert assert_rings_match(labels) > 20
    assert assert_rings_match(labels, field.astype(np.float32)) > 20
    # As polygons, in the output frame: valid, and each rasterises back to its nucleus.
    for label, polygon in label_polygons(labels, offset=(100.0, 50.0), scale=2.0):
        assert polygon.is_valid and polygon.exterior.is_ccw
        local = shapely.affinity.affine_transform(polygon, [0.5, 0, 0, 0.5, -50.0, -25.0])
        assert (rasterize(Polygon(local), labels.shape) == (labels == label)).all()


@pytest.mark.shared_data
def test_rings_equal_find_contours_on_real_nuclei() -> None:
    """Every nucleus of two real MoNuSeg masks (1000², hundreds of touching nuclei)."""
    masks = sorted(shared_path("monuseg_train", "masks").glob("*.png"))[:2]
    for path in masks:
        labels = np.asarray(Image.open(path)).astype(np.int32)
        field = np.random.default_rng(4).random(labels.shape).astype(np.float32)
        assert assert_rings_match(labels) > 300
        assert assert_rings_match(labels, field) > 300


def test_polygon_array_builds_what_one_polygon_per_ring_would() -> None:
    """The array path (one GEOS call for all objects) against a polygon per ring, and a
    self-touching outline repaired to its largest part as before."""
    _, labels = synthetic.synthetic_tile(256, np.random.default_rng(5), mpp=0.5)
    labels[0:3, 0:3] = 0
    labels[0, 0] = labels[1, 1] = labels[0:3, 2] = labels.max() + 1  # a bow tie of pixels
    ids, polygons = polygon_array(labels, offset=(10.0, 20.0), scale=4.0)
    rings = label_rings(labels)
    assert ids.tolist() == list(rings) and len(ids) > 20
    for label, polygon in zip(ids.tolist(), polygons.tolist(), strict=True):
        expected = largest_polygon(Polygon(rings[label] * 4.0 + (10.0, 20.0)))
        assert polygon.is_valid and polygon.equals_exact(expected, 0)


def test_shape_measurements_of_a_square_and_a_triangle() -> None:
    from wsi_pipeline.segment.nuclei import shape_measurements

    square, triangle = (
        Polygon([(0, 0), (10, 0), (10, 10), (0, 10)]),
        Polygon([(0, 0), (4, 0), (0, 3)]),
    )
    first, second = shape_measurements(np.array([square, triangle], dtype=object), 0.5)
    assert first == {
        "Area µm^2": 25.0,
        "Perimeter µm": 20.0,
        "Circularity": 0.7854,
        "Solidity": 1.0,
    }
    assert second == {"Area µm^2": 1.5, "Perimeter µm": 6.0, "Circularity": 0.5236, "Solidity": 1.0}
