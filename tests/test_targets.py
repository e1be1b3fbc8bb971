from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.segmentation import find_boundaries

from wsi_pipeline.train.targets import BOUNDARY, INTERIOR, make_target, num_classes, one_hot


def test_two_touching_squares_by_hand() -> None:
    labels = np.zeros((5, 8), dtype=np.uint16)
    labels[1:4, 1:4] = 1
    labels[1:4, 4:7] = 2
    expected = np.array(
        [
            [0, 0, 0, 0, 0, 0, 0, 0],
            [0, 2, 2, 2, 2, 2, 2, 0],
            [0, 2, 1, 2, 2, 1, 2, 0],
            [0, 2, 2, 2, 2, 2, 2, 0],
            [0, 0, 0, 0, 0, 0, 0, 0],
        ],
        dtype=np.uint8,
    )
    np.testing.assert_array_equal(make_target(labels), expected)
    np.testing.assert_array_equal(make_target(labels, "binary"), labels > 0)


def test_width_one_matches_find_boundaries_inner() -> None:
    rng = np.random.default_rng(0)
    labels = ndi.label(rng.random((48, 48)) > 0.4)[0]
    expected = find_boundaries(labels, mode="inner") & (labels > 0)
    np.testing.assert_array_equal(make_target(labels) == BOUNDARY, expected)


@pytest.mark.parametrize("width", [1, 2, 3])
def test_interiors_of_touching_nuclei_never_touch(width: int) -> None:
    labels = np.zeros((40, 40), dtype=np.int32)
    labels[5:35, 5:20] = 1
    labels[5:35, 20:35] = 2
    target = make_target(labels, boundary_width=width)
    interior = target == INTERIOR
    assert ndi.label(interior)[1] == 2
    # Each interior shrinks by exactly `width` pixels from every side.
    assert interior.sum() == 2 * (30 - 2 * width) * (15 - 2 * width)


def test_tile_edge_is_not_a_boundary() -> None:
    labels = np.ones((6, 6), dtype=np.int32)
    assert (make_target(labels) == INTERIOR).all()


def test_num_classes_and_errors() -> None:
    assert num_classes("3class") == 3
    assert num_classes("binary") == 2
    with pytest.raises(ValueError, match="valid"):
        num_classes("4class")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="integer"):
        make_target(np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="boundary_width"):
        make_target(np.zeros((4, 4), dtype=np.int32), boundary_width=0)


def test_one_hot() -> None:
    target = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    encoded = one_hot(target, 3)
    assert encoded.shape == (3, 2, 2) and encoded.dtype == np.float32
    np.testing.assert_array_equal(encoded.argmax(0), target)
    np.testing.assert_array_equal(encoded.sum(0), 1.0)
    with pytest.raises(ValueError):
        one_hot(target, 2)


def test_distance_target_peaks_at_each_centre_and_keeps_touching_centres_apart() -> None:
    labels = np.zeros((5, 8), dtype=np.uint16)
    labels[1:4, 1:4] = 1
    labels[1:4, 4:7] = 2
    target = make_target(labels, "distance")
    assert target.shape == (2, 5, 8) and target.dtype == np.uint8
    np.testing.assert_array_equal(target[0], make_target(labels))
    expected = np.zeros((5, 8), dtype=np.uint8)
    expected[2, 2] = expected[2, 5] = 255  # the one interior pixel of each square
    np.testing.assert_array_equal(target[1], expected)
    assert num_classes("distance") == 4


def test_distance_is_normalised_per_nucleus_and_the_border_is_no_edge() -> None:
    yy, xx = np.mgrid[:40, :60]
    labels = np.zeros((40, 60), dtype=np.int32)
    labels[np.hypot(yy - 20, xx - 15) <= 10] = 1  # a large disk
    labels[np.hypot(yy - 20, xx - 45) <= 4] = 2  # a small one
    labels[:6, 25:35] = 3  # cut by the top edge
    distance = make_target(labels, "distance")[1]
    for label in (1, 2, 3):
        assert distance[labels == label].max() == 255
    assert (distance[labels == 0] == 0).all()
    assert distance[20, 15] == 255 and distance[20, 45] == 255
    # The cut nucleus is deepest at the image border, not half-way to it.
    assert distance[0, 30] == 255
    # Centres are above half; the edges of the big disk are below.
    assert distance[20, 6] < 128 < distance[20, 12]
