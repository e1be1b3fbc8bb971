"""Tissue detection on a low-resolution thumbnail, so that background is never read again.

The mask is computed at ``mask_mpp`` (coarse, e.g. 8 µm/px): tissue is where saturation is above
an Otsu threshold clipped to ``[min_saturation, max_saturation]`` and the pixel is not near-black
(scanner borders; pen marks are left to the user), cleaned with a morphological closing and
opening, holes filled and specks smaller than ``min_area_um2`` dropped.

Otsu separates glass (saturation ~0.01) from stained tissue (~0.1 to 0.6). The clip keeps it honest
where one of the two is missing: a blank slide has no tissue (the floor), and on a region covered
by tissue, with no glass, Otsu would split the tissue itself and drop its paler half (the ceiling).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage import color, filters, morphology

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


def tissue_mask_from_rgb(
    rgb: np.ndarray,
    *,
    mpp: float,
    min_saturation: float = 0.07,
    max_saturation: float = 0.15,
    min_area_um2: float = 10_000.0,
    smoothing_um: float = 16.0,
) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail at ``mpp`` µm/px."""
    if rgb.size == 0:
        return np.zeros(rgb.shape[:2], dtype=bool)
    hsv = color.rgb2hsv(rgb)
    saturation, value = hsv[..., 1], hsv[..., 2]
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


def _drop_small_objects(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    # Written out because scikit-image renamed remove_small_objects' size argument in 0.26.
    labels, _ = ndi.label(mask)
    keep = np.bincount(labels.ravel()) >= min_pixels
    keep[0] = False
    return keep[labels]


def detect_tissue(slide: Slide, *, mask_mpp: float = 8.0, **kwargs: float) -> TissueMask:
    """Tissue mask of ``slide`` at ``mask_mpp`` (never finer than level 0)."""
    mpp = max(mask_mpp, slide.mpp)
    rgb = slide.thumbnail(mpp)
    return TissueMask(tissue_mask_from_rgb(rgb, mpp=mpp, **kwargs), mpp, slide.mpp)
