"""Tissue detection on a low-resolution thumbnail, so that background is never read again.

The mask is computed at ``mask_mpp`` (coarse, e.g. 4 µm/px): tissue is where saturation is above
an Otsu threshold clipped to ``[min_saturation, max_saturation]`` and the pixel is not near-black
(scanner borders; pen marks are left to the user), cleaned with a morphological closing and
opening, holes filled and specks smaller than ``min_area_um2`` dropped.

Otsu separates glass (saturation ~0.01) from stained tissue (~0.1 to 0.6). The clip keeps it honest
where one of the two is missing: a blank slide has no tissue (the floor), and on a region covered
by tissue, with no glass, Otsu would split the tissue itself and drop its paler half (the ceiling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage import filters, morphology

from wsi_pipeline.slides.slide import Slide
from wsi_pipeline.slides.tiling import Box


@dataclass(frozen=True)
class TissueMask:
    """A boolean mask at ``mpp`` covering the slide from level-0 ``(0, 0)``."""

    mask: np.ndarray
    mpp: float
    slide_mpp: float

    @property
    def fraction(self) -> float:
        """Share of the slide that is tissue, in [0, 1]."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    def area_mm2(self) -> float:
        return float(self.mask.sum()) * (self.mpp / 1000.0) ** 2

    def box_fraction(self, box: Box, grid_mpp: float) -> float:
        """Share of tissue under ``box`` given in grid px at ``grid_mpp``."""
        scale = grid_mpp / self.mpp
        h, w = self.mask.shape
        x0, y0 = int(box.x0 * scale), int(box.y0 * scale)
        x1 = max(int(np.ceil(box.x1 * scale)), x0 + 1)
        y1 = max(int(np.ceil(box.y1 * scale)), y0 + 1)
        window = self.mask[max(y0, 0) : min(y1, h), max(x0, 0) : min(x1, w)]
        return float(window.mean()) if window.size else 0.0

    def has_tissue(self, box: Box, grid_mpp: float, min_fraction: float) -> bool:
        """Whether enough of ``box`` is tissue (any tissue at all when ``min_fraction`` is 0)."""
        fraction = self.box_fraction(box, grid_mpp)
        return fraction > 0 if min_fraction <= 0 else fraction >= min_fraction

    def grown(self, margin_um: float) -> TissueMask:
        """The mask with every tissue region grown by ``margin_um`` (a disk)."""
        radius = round(margin_um / self.mpp)
        if radius <= 0 or not self.mask.any():
            return self
        grown = ndi.binary_dilation(self.mask, morphology.disk(radius))
        return TissueMask(grown, self.mpp, self.slide_mpp)

    def window(self, box: Box, grid_mpp: float) -> np.ndarray:
        """The mask's own pixels under ``box`` (grid px at ``grid_mpp``): a square of
        :func:`window_side` pixels from the one that holds the box's corner (beyond the
        mask: not tissue). :func:`on_tissue` looks points up in it."""
        scale = grid_mpp / self.mpp
        side = window_side(box.width, grid_mpp, self.mpp)
        x0, y0 = math.floor(box.x0 * scale), math.floor(box.y0 * scale)
        window = np.zeros((side, side), dtype=bool)
        part = self.mask[max(y0, 0) : max(y0 + side, 0), max(x0, 0) : max(x0 + side, 0)]
        top, left = max(-y0, 0), max(-x0, 0)
        window[top : top + part.shape[0], left : left + part.shape[1]] = part
        return window


def window_side(tile: int, grid_mpp: float, mask_mpp: float) -> int:
    """Mask pixels along a tile's side in :meth:`TissueMask.window` (one more for a tile that
    starts inside a mask pixel)."""
    return math.ceil(tile * grid_mpp / mask_mpp) + 1


def on_tissue(window: np.ndarray, box: Box, scale: float, x: float, y: float) -> bool:
    """Whether grid point ``(x, y)`` lies on tissue, from the :meth:`TissueMask.window` of
    ``box``; ``scale`` is mask px per grid px. The look-up is the whole mask's, whichever tile
    asks."""
    col = math.floor(x * scale) - math.floor(box.x0 * scale)
    row = math.floor(y * scale) - math.floor(box.y0 * scale)
    side = window.shape[0]
    return 0 <= row < side and 0 <= col < side and bool(window[row, col])


def tissue_mask_from_rgb(
    rgb: np.ndarray,
    *,
    mpp: float,
    min_saturation: float = 0.07,
    max_saturation: float = 0.15,
    min_area_um2: float = 2_000.0,
    smoothing_um: float = 16.0,
) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail at ``mpp`` µm/px."""
    if rgb.size == 0:
        return np.zeros(rgb.shape[:2], dtype=bool)
    saturation, value = saturation_value(rgb)
    threshold = min_saturation
    if float(saturation.max() - saturation.min()) > 1e-3:
        otsu = float(filters.threshold_otsu(saturation))
        threshold = min(max(otsu, min_saturation), max(max_saturation, min_saturation))
    mask = (saturation > threshold) & (value > 0.1)
    radius = max(1, round(smoothing_um / mpp / 2))
    mask = morphology.closing(mask, morphology.disk(radius))
    mask = morphology.opening(mask, morphology.disk(radius))
    mask = ndi.binary_fill_holes(mask)
    return _drop_small_objects(mask, max(1, round(min_area_um2 / mpp**2)))


def saturation_value(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HSV saturation and value in [0, 1], as ``skimage.color.rgb2hsv`` gives them, without its
    hue (most of its time)."""
    high = rgb.max(axis=2).astype(np.float32)
    low = rgb.min(axis=2).astype(np.float32)
    saturation = np.divide(high - low, high, out=np.zeros_like(high), where=high > 0)
    return saturation, high / 255


def _drop_small_objects(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    # Written out because scikit-image renamed remove_small_objects' size argument in 0.26.
    labels, _ = ndi.label(mask)
    keep = np.bincount(labels.ravel()) >= min_pixels
    keep[0] = False
    return keep[labels]


def detect_tissue(slide: Slide, *, mask_mpp: float = 4.0, **kwargs: float) -> TissueMask:
    """Tissue mask of ``slide`` at ``mask_mpp`` (never finer than level 0)."""
    mpp = max(mask_mpp, slide.mpp)
    rgb = slide.thumbnail(mpp)
    return TissueMask(tissue_mask_from_rgb(rgb, mpp=mpp, **kwargs), mpp, slide.mpp)
