"""Model probabilities → nucleus instance labels: the one post-processing used everywhere.

Evaluation and whole-slide inference (per tile, on CPU) both call
:func:`instances_from_probabilities`, so a score measured on a validation set describes exactly
what the slide pipeline produces.

- ``"3class"`` (channels background / interior / boundary): markers are the connected components
  of ``interior > interior_threshold``; a watershed on the negative interior probability grows them
  over the foreground ``1 - p(background) > foreground_threshold``. Foreground components that hold
  no marker (nuclei whose whole area was predicted as boundary) become instances of their own.
- ``"distance"`` (channels background / interior / boundary / distance to the nucleus edge):
  as ``"3class"``, but the markers are the components of ``distance > distance_threshold`` and
  the watershed runs on the negative distance; touching nuclei keep apart centres where the
  predicted boundary band between them is too faint to separate their interiors.
- ``"binary"`` (one sigmoid channel or two softmax channels): the foreground is thresholded and,
  with ``split_touching``, split by a watershed on its distance transform with one marker per
  distance peak; otherwise every connected component is one instance.

Both modes then fill holes enclosed by a single instance, drop instances smaller than ``min_size``
pixels and number the rest 1..N.
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import watershed

logger = logging.getLogger(__name__)

InstanceMode = Literal["3class", "binary", "distance"]

_FOUR = ndi.generate_binary_structure(2, 1)
_EIGHT = ndi.generate_binary_structure(2, 2)


def foreground_probability(probs: np.ndarray) -> np.ndarray:
    """(H, W) nucleus probability: the single channel if K = 1, else ``1 - p(background)``."""
    _check_probs(probs)
    return probs[0] if probs.shape[0] == 1 else 1.0 - probs[0]


def instances_from_probabilities(
    probs: np.ndarray,
    mode: InstanceMode = "3class",
    *,
    min_size: int = 10,
    interior_threshold: float = 0.5,
    foreground_threshold: float = 0.5,
    marker_min_size: int = 4,
    split_touching: bool = True,
    peak_min_distance: int = 5,
    fill_holes: bool = True,
    distance_threshold: float = 0.5,
) -> np.ndarray:
    """Instance labels from per-class probabilities of one tile.

    Args:
        probs: (K, H, W) softmax (or, for K = 1, sigmoid) probabilities. ``"3class"`` needs K = 3;
            ``"binary"`` takes K = 1 or K = 2; ``"distance"`` K = 4 (three softmax classes and
            the sigmoid distance).
        mode: ``"3class"``, ``"binary"`` or ``"distance"``, as the model was trained.
        min_size: instances with fewer pixels are removed.
        interior_threshold: interior probability above which a pixel seeds a marker (``"3class"``).
        foreground_threshold: nucleus probability above which a pixel belongs to some instance.
        marker_min_size: markers with fewer pixels are discarded as noise (``"3class"``,
            ``"distance"``).
        split_touching: split touching nuclei by a distance-transform watershed (``"binary"``).
        peak_min_distance: two distance peaks closer than this many pixels seed one nucleus
            (``"binary"`` with ``split_touching``).
        fill_holes: fill background holes enclosed by a single instance.
        distance_threshold: normalised distance above which a pixel seeds a marker
            (``"distance"``).

    Returns:
        (H, W) int32 labels, 0 = background, instances 1..N.
    """
    foreground = foreground_probability(probs) > foreground_threshold
    if mode == "3class":
        if probs.shape[0] != 3:
            raise ValueError(f"mode '3class' needs 3 channels, got {probs.shape[0]}")
        labels = _watershed_from_interior(probs[1], foreground, interior_threshold, marker_min_size)
    elif mode == "distance":
        if probs.shape[0] != 4:
            raise ValueError(f"mode 'distance' needs 4 channels, got {probs.shape[0]}")
        labels = _watershed_from_interior(probs[3], foreground, distance_threshold, marker_min_size)
    elif mode == "binary":
        if probs.shape[0] not in (1, 2):
            raise ValueError(f"mode 'binary' needs 1 or 2 channels, got {probs.shape[0]}")
        if split_touching:
            labels = _watershed_from_distance(foreground, peak_min_distance)
        else:
            labels = ndi.label(foreground, structure=_FOUR)[0]
    else:
        raise ValueError(f"unknown mode {mode!r}; valid: ['3class', 'binary', 'distance']")
    if fill_holes:
        labels = _fill_enclosed_holes(labels)
    return _remove_small_and_relabel(labels, min_size)


def instance_means(labels: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The mean of ``values`` over each instance of ``labels`` (same shape): float32, entry
    ``i`` for label ``i + 1``, NaN where that label has no pixels."""
    if values.shape != labels.shape:
        raise ValueError(f"labels {labels.shape} and values {values.shape} differ in size")
    n = int(labels.max(initial=0))
    flat = labels.ravel()
    counts = np.bincount(flat, minlength=n + 1)[1:]
    sums = np.bincount(flat, weights=values.ravel(), minlength=n + 1)[1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sums / counts).astype(np.float32)


def _check_probs(probs: np.ndarray) -> None:
    if probs.ndim != 3 or probs.shape[0] < 1:
        raise ValueError(f"probs must have shape (K, H, W), got {probs.shape}")


def _watershed_from_interior(
    interior: np.ndarray, foreground: np.ndarray, threshold: float, marker_min_size: int
) -> np.ndarray:
    seeds = (interior > threshold) & foreground
    markers, n = ndi.label(seeds, structure=_FOUR)
    if marker_min_size > 1 and n:
        small = np.bincount(markers.ravel(), minlength=n + 1) < marker_min_size
        small[0] = False
        markers[small[markers]] = 0
    # The distance to the nearest marker breaks ties on flat probability plateaus, which would
    # otherwise be resolved by the flooding order and so differ between a tile and the whole image.
    # Taxicab (chamfer) distance: a quarter of the Euclidean transform's time on a 512² tile.
    elevation = ndi.distance_transform_cdt(markers == 0, metric="taxicab") * 1e-3 - interior
    labels = watershed(elevation, markers, mask=foreground, connectivity=1)
    return _label_unmarked(labels, foreground)


def _label_unmarked(labels: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """Give each foreground component that no marker reached a new label of its own."""
    rest, n_rest = ndi.label(foreground & (labels == 0), structure=_FOUR)
    if n_rest:
        offset = int(labels.max(initial=0))
        labels = np.where(rest > 0, rest + offset, labels)
    return labels.astype(np.int32, copy=False)


def _watershed_from_distance(foreground: np.ndarray, min_distance: int) -> np.ndarray:
    distance = ndi.distance_transform_edt(foreground)
    # Light smoothing removes the one-pixel ridges of the Euclidean distance map that would
    # otherwise each seed a marker; peaks within min_distance of a higher value are not peaks.
    smooth = ndi.gaussian_filter(distance, sigma=1.0)
    size = 2 * min_distance + 1
    peaks = (ndi.maximum_filter(smooth, size=size) == smooth) & foreground
    markers = ndi.label(peaks, structure=_EIGHT)[0]
    labels = watershed(-smooth, markers, mask=foreground, connectivity=1)
    return _label_unmarked(labels, foreground)


def _fill_enclosed_holes(labels: np.ndarray) -> np.ndarray:
    """Fill background regions enclosed by exactly one instance with that instance's label."""
    holes, n_holes = _enclosed_holes(labels > 0)
    if not holes.any():
        return labels
    return _fill_single_instance_holes(labels, holes, n_holes)


def _enclosed_holes(foreground: np.ndarray) -> tuple[np.ndarray, int]:
    """Background components that do not reach the image edge (4-connected, as
    ``binary_fill_holes`` has them), labelled; and the largest label there may be. Labelling the
    background once is 2.3x faster than filling."""
    background, n_background = ndi.label(~foreground, structure=_FOUR)
    is_hole = np.ones(n_background + 1, dtype=bool)
    is_hole[[0, *np.unique(_edge_pixels(background))]] = False
    return np.where(is_hole[background], background, 0), n_background


def _fill_single_instance_holes(labels: np.ndarray, holes: np.ndarray, n_holes: int) -> np.ndarray:
    """Give each hole (labels ``1..n_holes``) the instance on its rim, if there is one only."""
    foreground = labels > 0
    # Pair every hole with the instances on its one-pixel rim; a hole shared by several
    # instances (a gap between touching nuclei, a lumen) stays background.
    rim = ndi.grey_dilation(holes, footprint=_FOUR) * foreground
    pairs = np.unique(np.stack([rim[rim > 0], labels[rim > 0]]), axis=1)
    hole_ids, first, n_neighbours = np.unique(pairs[0], return_index=True, return_counts=True)
    fill = np.zeros(n_holes + 1, dtype=labels.dtype)
    single = n_neighbours == 1
    fill[hole_ids[single]] = pairs[1, first[single]]
    return np.where(holes > 0, fill[holes], labels)


def _edge_pixels(image: np.ndarray) -> np.ndarray:
    return np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])


def _remove_small_and_relabel(labels: np.ndarray, min_size: int) -> np.ndarray:
    flat = labels.ravel()
    sizes = np.bincount(flat)
    keep = sizes >= max(min_size, 1)
    keep[0] = False
    lut = np.zeros(sizes.size, dtype=np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return lut[labels]
