"""How probabilities travel from the predictor to post-processing: uint8 in steps of 1/255.

A module of its own, with numpy only, so that the predictor's processes do not import what
post-processing needs (scikit-image, shapely): their start is on the path to the first tile.
"""

from __future__ import annotations

import numpy as np


def quantize(probs: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] → uint8 (a quarter of float32's bytes in the object store)."""
    return np.clip(np.rint(probs * 255), 0, 255).astype(np.uint8)


def dequantize(probs: np.ndarray) -> np.ndarray:
    """uint8 from :func:`quantize` → float32 probabilities."""
    return probs.astype(np.float32) / 255
