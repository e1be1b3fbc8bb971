from __future__ import annotations

from pathlib import Path

import numpy as np

from wsi_pipeline.slides.slide import open_slide
from wsi_pipeline.slides.tiling import Box
from wsi_pipeline.slides.tissue import detect_tissue, tissue_mask_from_rgb


def test_blank_glass_has_no_tissue() -> None:
    rgb = np.full((200, 300, 3), 250, dtype=np.uint8)
    assert not tissue_mask_from_rgb(rgb, mpp=8.0).any()


def test_tissue_blob_found_and_specks_dropped() -> None:
    rgb = np.full((200, 200, 3), 245, dtype=np.uint8)
    rgb[50:150, 40:160] = (220, 140, 190)  # 100 x 120 px pink block = 768,000 µm² at 8 µm/px
    rgb[10:12, 10:12] = (120, 40, 140)  # a 2 x 2 speck: 256 µm², below min_area_um2
    mask = tissue_mask_from_rgb(rgb, mpp=8.0)
    assert mask[60:140, 50:150].all()
    assert not mask[10:12, 10:12].any()
    assert abs(int(mask.sum()) - 100 * 120) < 600


def test_region_covered_by_tissue_keeps_its_pale_half() -> None:
    # No glass: Otsu alone would split dark from pale tissue (threshold ~0.35 here).
    rgb = np.zeros((200, 200, 3), dtype=np.uint8)
    rgb[:, :100] = (150, 60, 160)  # dense, saturation 0.63
    rgb[:, 100:] = (230, 190, 215)  # pale stroma, saturation 0.17
    assert tissue_mask_from_rgb(rgb, mpp=8.0).all()
    # and on a slide with glass, the pale tissue still counts while the glass does not
    rgb[:, 150:] = 245
    mask = tissue_mask_from_rgb(rgb, mpp=8.0)
    assert mask[:, :140].all() and not mask[:, 160:].any()


def test_synthetic_slide_tissue_matches_layout(slide_path: Path, mosaic) -> None:
    tissue = detect_tissue(open_slide(slide_path), mask_mpp=8.0)
    truth = mosaic.render(Box(0, 0, 3000, 2000)).min(axis=2) < 250
    assert abs(tissue.fraction - truth.mean()) < 0.05
    # A tile in glass has no tissue; one in the middle has.
    assert not tissue.has_tissue(Box(0, 0, 64, 64), grid_mpp=0.5, min_fraction=0)
    assert tissue.has_tissue(Box(700, 450, 764, 514), grid_mpp=0.5, min_fraction=0.5)
