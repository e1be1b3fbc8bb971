"""Training targets from nucleus instance labels.

Two target modes share one label convention (0 = background):

- ``"3class"`` (default): 0 background, 1 nucleus interior, 2 nucleus boundary. The boundary is the
  band of an instance's own pixels within ``boundary_width`` steps (4-connected) of a pixel with a
  different label, so touching nuclei are separated by two boundary bands and their interiors never
  touch. The image border is not a boundary: a nucleus cut by the tile edge stays open there.
- ``"binary"``: 0 background, 1 nucleus, the setting of the seed papers. A binary model may use one
  output channel (sigmoid) or two (softmax).
- ``"distance"``: the 3-class map plus each nucleus's distance to its own edge, normalised to 1 at
  its centre (Naylor et al. 2018, IEEE TMI), as a (2, H, W) uint8 target: channel 0 the classes,
  channel 1 the distance × 255. Touching nuclei meet at distance 0, so their centres stay apart
  even where the model blurs the boundary band between them.

:func:`num_classes` gives the number of model output channels a mode needs (4 for ``"distance"``:
three softmax classes and one sigmoid distance).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy import ndimage as ndi

TargetMode = Literal["3class", "binary", "distance"]

BACKGROUND, INTERIOR, BOUNDARY = 0, 1, 2
_NUM_CLASSES: dict[str, int] = {"3class": 3, "binary": 2, "distance": 4}
DISTANCE_SCALE = 255


def num_classes(mode: TargetMode) -> int:
    """Output channels a mode needs: 3 (``"3class"``), 2 (``"binary"``), 4 (``"distance"``)."""
    try:
        return _NUM_CLASSES[mode]
    except KeyError:
        raise ValueError(f"unknown target mode {mode!r}; valid: {sorted(_NUM_CLASSES)}") from None


def make_target(
    labels: np.ndarray, mode: TargetMode = "3class", boundary_width: int = 1
) -> np.ndarray:
    """Class map for training from an instance label image.

    Args:
        labels: (H, W) integer instance labels, 0 = background; values need not be consecutive.
        mode: ``"3class"`` (background / interior / boundary), ``"binary"`` or ``"distance"``.
        boundary_width: width in pixels of the boundary band inside each instance (``"3class"``,
            ``"distance"``).

    Returns:
        (H, W) uint8 class map; for ``"distance"`` (2, H, W) uint8: classes, distance × 255.
    """
    num_classes(mode)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 2-D integer array, got {labels.dtype} {labels.shape}")
    if boundary_width < 1:
        raise ValueError(f"boundary_width must be >= 1, got {boundary_width}")
    foreground = labels > 0
    if mode == "binary":
        return foreground.astype(np.uint8)
    target = np.where(foreground, BOUNDARY, BACKGROUND).astype(np.uint8)
    target[foreground & _uniform_neighbourhood(labels, boundary_width)] = INTERIOR
    if mode == "distance":
        return np.stack([target, normalized_distance(labels, target == INTERIOR)])
    return target


def normalized_distance(labels: np.ndarray, interior: np.ndarray) -> np.ndarray:
    """(H, W) uint8: each interior pixel's distance to the nearest pixel outside the interior
    (its own boundary band or background), divided by its instance's largest distance, × 255.

    The image border is not an edge, as for the boundary band: a cut nucleus peaks at the cut.
    """
    distance = ndi.distance_transform_edt(interior)
    n = int(labels.max(initial=0))
    if n == 0:
        return np.zeros(labels.shape, dtype=np.uint8)
    peak = ndi.maximum(distance, labels, index=np.arange(n + 1))
    peak = np.asarray(peak, dtype=np.float64)
    peak[peak == 0] = 1.0
    scaled = distance / peak[labels] * DISTANCE_SCALE
    return np.rint(scaled).astype(np.uint8)


def one_hot(target: np.ndarray, n_classes: int) -> np.ndarray:
    """(K, H, W) float32 one-hot encoding of an (H, W) class map, e.g. an oracle probability map."""
    if target.size and int(target.max()) >= n_classes:
        raise ValueError(f"target has class {int(target.max())}, but n_classes is {n_classes}")
    return (np.arange(n_classes)[:, None, None] == target[None]).astype(np.float32)


def _uniform_neighbourhood(labels: np.ndarray, width: int) -> np.ndarray:
    """True where every pixel within L1 distance ``width`` carries the same label."""
    footprint = ndi.iterate_structure(ndi.generate_binary_structure(2, 1), width)
    # "nearest" repeats the edge pixel, so the image border never creates a boundary.
    high = ndi.grey_dilation(labels, footprint=footprint, mode="nearest")
    low = ndi.grey_erosion(labels, footprint=footprint, mode="nearest")
    return high == low
