from __future__ import annotations

from pathlib import Path

import numpy as np

from wsi_pipeline.slides.slide import open_slide
from wsi_pipeline.slides.tiling import Box
from wsi_pipeline.slides.tissue import (
    TissueMask,
    detect_tissue,
    on_tissue,
    saturation_value,
    tissue_mask_from_rgb,
    window_side,
)


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


def test_thin_tissue_strip_is_kept() -> None:
    # A 3 x 30 px strip at 8 µm/px (24 x 240 µm = 5,760 µm²) with nuclei, as on CMU-1's left.
    rgb = np.full((200, 200, 3), 245, dtype=np.uint8)
    rgb[85:115, 20:23] = (200, 120, 180)
    rgb[40:160, 100:190] = (220, 140, 190)
    mask = tissue_mask_from_rgb(rgb, mpp=8.0)
    assert mask[87:113, 20:23].all()
    assert not mask[:, :10].any() and not mask[:30].any()
    # The former default (10,000 µm²) lost it.
    assert not tissue_mask_from_rgb(rgb, mpp=8.0, min_area_um2=10_000)[:, :50].any()


def test_grown_mask_reaches_the_margin_and_no_farther() -> None:
    mask = np.zeros((40, 40), dtype=bool)
    mask[18:22, 18:22] = True
    grown = TissueMask(mask, mpp=8.0, slide_mpp=0.25).grown(16.0)  # 2 mask px
    assert grown.mask[16:24, 18:22].all() and grown.mask[18:22, 16:24].all()
    assert not grown.mask[:15].any() and not grown.mask[25:].any()
    assert grown.mask.sum() > mask.sum()
    assert TissueMask(mask, 8.0, 0.25).grown(0.0).mask.sum() == mask.sum()


def test_tile_windows_answer_as_the_whole_mask_does() -> None:
    """Any tile holding a point finds the same answer in its window as the whole mask; beyond the
    mask there is no tissue."""
    rng = np.random.default_rng(0)
    mask = rng.random((30, 40)) > 0.5
    tissue = TissueMask(mask, mpp=8.0, slide_mpp=0.25)
    grid_mpp, tile = 0.5, 200  # 16 grid px per mask px; tiles start mid-pixel
    scale = grid_mpp / tissue.mpp
    for x0, y0 in [(-30, -50), (0, 0), (173, 291), (500, 300), (600, 420)]:
        box = Box(x0, y0, x0 + tile, y0 + tile)
        window = tissue.window(box, grid_mpp)
        assert window.shape == (window_side(tile, grid_mpp, tissue.mpp),) * 2
        for x, y in rng.uniform((x0, y0), (x0 + tile, y0 + tile), size=(200, 2)):
            col, row = int(x * scale // 1), int(y * scale // 1)
            inside = 0 <= row < mask.shape[0] and 0 <= col < mask.shape[1]
            expected = inside and bool(mask[row, col])
            assert on_tissue(window, box, scale, x, y) == expected, (box, x, y)


def test_saturation_and_value_are_hsv_s_and_v() -> None:
    from skimage import color

    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    rgb[0, 0] = 0  # black: saturation 0, not a division by zero
    hsv = color.rgb2hsv(rgb)
    saturation, value = saturation_value(rgb)
    np.testing.assert_allclose(saturation, hsv[..., 1], atol=1e-6)
    np.testing.assert_allclose(value, hsv[..., 2], atol=1e-6)
