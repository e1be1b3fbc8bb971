from __future__ import annotations

import numpy as np
import pytest
from conftest import shared_path
from scipy import ndimage as ndi

from wsi_pipeline.metrics import score_image
from wsi_pipeline.segment.instances import (
    foreground_probability,
    instance_means,
    instances_from_probabilities,
)
from wsi_pipeline.train.targets import make_target, num_classes, one_hot


def touching_disks(shape: tuple[int, int] = (64, 64)) -> np.ndarray:
    """Two radius-12 disks whose centres are 20 px apart, split at the midline."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    d1 = np.hypot(yy - 32, xx - 22)
    d2 = np.hypot(yy - 32, xx - 42)
    labels = np.zeros(shape, dtype=np.int32)
    labels[(d1 <= 12) | (d2 <= 12)] = 2
    labels[(d1 <= 12) & (d1 <= d2)] = 1
    return labels


def oracle(labels: np.ndarray, mode: str = "3class") -> np.ndarray:
    return one_hot(make_target(labels, mode), num_classes(mode))  # type: ignore[arg-type]


def test_three_class_oracle_separates_touching_nuclei() -> None:
    labels = touching_disks()
    pred = instances_from_probabilities(oracle(labels), min_size=5)
    assert pred.dtype == np.int32
    assert set(np.unique(pred)) == {0, 1, 2}
    assert score_image(labels, pred)["aji"] == 1.0


def test_binary_distance_watershed_splits_touching_nuclei() -> None:
    labels = touching_disks()
    probs = oracle(labels, "binary")
    split = instances_from_probabilities(probs, "binary", min_size=5)
    assert split.max() == 2
    assert score_image(labels, split)["pq"] > 0.9
    merged = instances_from_probabilities(probs, "binary", min_size=5, split_touching=False)
    assert merged.max() == 1


def test_binary_accepts_one_sigmoid_channel() -> None:
    labels = touching_disks()
    two = instances_from_probabilities(oracle(labels, "binary"), "binary")
    one = instances_from_probabilities(oracle(labels, "binary")[1:], "binary")
    np.testing.assert_array_equal(one, two)


def test_small_objects_removed_and_labels_consecutive() -> None:
    labels = np.zeros((32, 32), dtype=np.int32)
    labels[2:12, 2:12] = 7  # 100 px
    labels[20:23, 20:23] = 3  # 9 px, below min_size
    labels[20:30, 2:12] = 9
    pred = instances_from_probabilities(oracle(labels), min_size=10)
    assert sorted(np.unique(pred)) == [0, 1, 2]
    assert (pred[20:23, 20:23] == 0).all()


def test_nucleus_predicted_all_boundary_is_kept() -> None:
    probs = np.zeros((3, 16, 16), dtype=np.float32)
    probs[0] = 1.0
    probs[:, 4:8, 4:8] = np.array([0.0, 0.0, 1.0])[:, None, None]  # no interior, so no marker
    pred = instances_from_probabilities(probs, min_size=1)
    assert pred.max() == 1 and (pred[4:8, 4:8] == 1).all()


def test_holes_filled_only_inside_a_single_nucleus() -> None:
    labels = np.zeros((24, 40), dtype=np.int32)
    labels[2:12, 2:12] = 1
    labels[6:8, 6:8] = 0  # hole inside nucleus 1
    labels[14:22, 20:38] = 2
    labels[14:22, 20:29] = 3
    labels[17:19, 27:31] = 0  # hole shared by nuclei 2 and 3
    probs = oracle(labels, "binary")
    pred = instances_from_probabilities(probs, "binary", split_touching=False, min_size=1)
    assert (pred[6:8, 6:8] > 0).all()
    assert (pred[17:19, 27:31] > 0).all()  # one component in binary mode: enclosed by one object
    pred = instances_from_probabilities(oracle(labels), min_size=1)
    assert (pred[6:8, 6:8] > 0).all()
    assert (pred[17:19, 27:31] == 0).all()


def test_background_open_to_the_edge_is_not_a_hole_and_diagonal_gaps_do_not_open_one() -> None:
    from wsi_pipeline.segment.instances import _fill_enclosed_holes

    labels = np.zeros((12, 12), dtype=np.int32)
    labels[2:10, 0:8] = 1
    labels[4:6, 0:5] = 0  # a bay open to the left edge of the image: not a hole
    labels[2:5, 8:12] = 2
    labels[3, 10] = 0  # enclosed by nucleus 2 alone: a hole
    labels[5:8, 9:12] = 3
    labels[6, 11] = 0  # on the image edge: not a hole
    filled = _fill_enclosed_holes(labels)
    assert (filled[4:6, 0:5] == 0).all() and filled[3, 10] == 2 and filled[6, 11] == 0
    # A corner pixel touching the outside only diagonally is still enclosed (4-connectivity).
    ring = np.zeros((7, 7), dtype=np.int32)
    ring[1:6, 1:6] = 4
    ring[3, 3] = 0
    ring[2, 2] = 0
    assert (_fill_enclosed_holes(ring)[1:6, 1:6] == 4).all()


def _fill_with_binary_fill_holes(labels: np.ndarray) -> np.ndarray:
    """The previous implementation, holes through ``binary_fill_holes``: the reference."""
    from wsi_pipeline.segment.instances import _fill_single_instance_holes

    foreground = labels > 0
    four = ndi.generate_binary_structure(2, 1)
    holes, n_holes = ndi.label(ndi.binary_fill_holes(foreground) & ~foreground, structure=four)
    return _fill_single_instance_holes(labels, holes, n_holes) if n_holes else labels


def test_hole_filling_equals_binary_fill_holes_on_touching_instances() -> None:
    """Labelling the background finds exactly the holes ``binary_fill_holes`` finds, pixel for
    pixel: on watershed instances that touch (holes shared by several stay background), on
    random holes punched into them, and on images all foreground or all background."""
    from skimage.segmentation import watershed

    from wsi_pipeline.segment.instances import _fill_enclosed_holes

    rng = np.random.default_rng(0)
    filled_some = shared = 0
    for _ in range(40):
        blobs = ndi.gaussian_filter(rng.random((64, 64)), 2) > 0.47
        markers = ndi.label(ndi.gaussian_filter(rng.random((64, 64)), 3) > 0.53)[0]
        labels = watershed(-ndi.distance_transform_edt(blobs), markers, mask=blobs)
        labels = labels.astype(np.int32)
        labels[rng.random(labels.shape) < 0.03] = 0  # one-pixel holes
        expected = _fill_with_binary_fill_holes(labels)
        np.testing.assert_array_equal(_fill_enclosed_holes(labels), expected)
        filled_some += int((expected != labels).any())
        shared += int((ndi.binary_fill_holes(labels > 0) & (expected == 0)).any())
    assert filled_some > 20 and shared > 5  # both kinds of hole occurred
    for image in (np.ones((8, 8), np.int32), np.zeros((8, 8), np.int32)):
        np.testing.assert_array_equal(_fill_enclosed_holes(image), image)


def test_mean_nucleus_probability_by_hand() -> None:
    labels = np.array([[1, 1, 0], [0, 3, 0]], dtype=np.int32)
    probs = np.zeros((3, 2, 3), dtype=np.float32)
    probs[0] = [[0.2, 0.6, 1.0], [1.0, 0.1, 1.0]]  # p(background); nucleus = 1 - p
    means = instance_means(labels, foreground_probability(probs))
    # label 1: (0.8 + 0.4) / 2 = 0.6; label 2: no pixels; label 3: 0.9
    np.testing.assert_allclose(means, [0.6, np.nan, 0.9], rtol=1e-6)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="3 channels"):
        instances_from_probabilities(np.zeros((2, 8, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="1 or 2 channels"):
        instances_from_probabilities(np.zeros((3, 8, 8), dtype=np.float32), "binary")
    with pytest.raises(ValueError, match="shape"):
        instances_from_probabilities(np.zeros((8, 8), dtype=np.float32))


@pytest.mark.shared_data
def test_oracle_round_trip_on_monuseg() -> None:
    from PIL import Image

    masks = sorted(shared_path("monuseg_train", "masks").glob("*.png"))[:3]
    assert masks
    for path in masks:
        labels = np.asarray(Image.open(path))
        pred = instances_from_probabilities(oracle(labels), min_size=1)
        assert score_image(labels, pred)["aji"] >= 0.9, path.name


def distance_oracle(labels: np.ndarray) -> np.ndarray:
    """Probabilities of a perfect ``"distance"`` model: one-hot classes and the distance."""
    target = make_target(labels, "distance")
    return np.concatenate([one_hot(target[0], 3), target[1:].astype(np.float32) / 255])


def test_distance_oracle_separates_touching_nuclei() -> None:
    labels = touching_disks()
    pred = instances_from_probabilities(distance_oracle(labels), "distance", min_size=5)
    assert score_image(labels, pred)["aji"] > 0.97


def test_distance_markers_split_what_a_blurred_boundary_merges() -> None:
    """Where the boundary band between two nuclei is predicted faintly (blurred away), the
    interior markers of 3class merge both nuclei; the distance channel still holds two peaks."""
    from scipy import ndimage as ndi

    labels = touching_disks()
    blurred = ndi.gaussian_filter(distance_oracle(labels), sigma=(0, 2.5, 2.5))
    three_class = instances_from_probabilities(blurred[:3], "3class", interior_threshold=0.5)
    distance = instances_from_probabilities(blurred, "distance", distance_threshold=0.5)
    assert three_class.max() == 1
    assert distance.max() == 2
    assert score_image(labels, distance)["aji"] > 0.8


def test_distance_mode_needs_four_channels() -> None:
    with pytest.raises(ValueError, match="4 channels"):
        instances_from_probabilities(oracle(touching_disks()), "distance")
