"""How a tile travels from the predictor to post-processing: its probabilities as uint8 in
steps of 1/255, or, where the predictor finds the instances itself
(:mod:`~wsi_pipeline.segment.tensor_instances`, for models of the ``TENSOR_MODES``), their
labels and the background probability, in the same steps.

A module of its own, with numpy only, so that the predictor's processes do not import what
post-processing needs (scikit-image, shapely), nor the driver torch: their start is on the path
to the first tile.
"""

from __future__ import annotations

import numpy as np

LEVELS = 255  # steps between 0 and 1
TENSOR_MODES = ("3class", "distance")  # target modes whose instances the predictor can find


def quantize(probs: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] → uint8 (a quarter of float32's bytes in the object store)."""
    return np.clip(np.rint(probs * LEVELS), 0, LEVELS).astype(np.uint8)


def dequantize(probs: np.ndarray) -> np.ndarray:
    """uint8 from :func:`quantize` → float32 probabilities."""
    return probs.astype(np.float32) / LEVELS
