from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import SLIDE_MPP, shared_path

from wsi_pipeline.slides.slide import SlideError, open_slide
from wsi_pipeline.slides.tiling import Box

BACKENDS = ["openslide", "tiffslide"]


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.mark.parametrize("backend", BACKENDS)
def test_synthetic_tiff_metadata(slide_path: Path, backend: str) -> None:
    slide = open_slide(slide_path, backend)
    assert slide.backend == backend
    assert slide.dimensions == (3000, 2000)
    assert slide.mpp == pytest.approx(SLIDE_MPP)
    assert slide.level_dimensions == [(3000, 2000), (1500, 1000), (750, 500)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_level0_read_matches_rendered_truth(slide_path: Path, mosaic, backend: str) -> None:
    slide = open_slide(slide_path, backend)
    region = slide.read_region(700, 300, 400, 300, mpp=SLIDE_MPP)
    assert region.shape == (300, 400, 3)
    assert mad(region, mosaic.render(Box(700, 300, 1100, 600))) < 3  # JPEG q90 only


@pytest.mark.parametrize("backend", BACKENDS)
def test_coarser_mpp_is_area_average_from_best_level(
    slide_path: Path, mosaic, backend: str
) -> None:
    slide = open_slide(slide_path, backend)
    assert (
        slide.best_level(2.0) == 1
        and slide.best_level(1.9) == 0
        and slide.best_level(3) == 1
        and slide.best_level(4) == 2
    )
    region = slide.read_region(800, 400, 200, 150, mpp=SLIDE_MPP * 2)
    assert region.shape == (150, 200, 3)
    assert mad(region, mosaic.render(Box(400, 200, 600, 350), level=1)) < 3
    # A non-integer ratio still lands on the right place: compare with averaging level 0.
    fine = slide.read_region(800, 400, 600, 450, mpp=SLIDE_MPP).astype(np.float32)
    coarse = slide.read_region(800, 400, 200, 150, mpp=SLIDE_MPP * 3)
    expected = fine.reshape(150, 3, 200, 3, 3).mean(axis=(1, 3))
    # Level 1 and level 0 are separate JPEG generations: ~3.6 here, > 5 one level-0 px off.
    assert mad(coarse, expected.round().astype(np.uint8)) < 4.2


def test_backends_agree_and_outside_is_white(slide_path: Path) -> None:
    a = open_slide(slide_path, "openslide").read_region(2900, 1900, 300, 200, mpp=0.5)
    b = open_slide(slide_path, "tiffslide").read_region(2900, 1900, 300, 200, mpp=0.5)
    assert a.shape == b.shape == (200, 300, 3)
    assert mad(a, b) <= 2
    assert (a[60:, 60:] == 255).all() and (b[60:, 60:] == 255).all()


def test_threaded_reads_equal_sequential(slide_path: Path) -> None:
    slide = open_slide(slide_path, "openslide")
    boxes = [(x, y) for x in range(0, 2800, 400) for y in range(0, 1800, 400)]
    expected = {b: slide.read_region(*b, 128, 128, mpp=0.5) for b in boxes}
    got: dict = {}

    def work(part: list) -> None:
        for b in part:
            got[b] = slide.read_region(*b, 128, 128, mpp=0.5)

    threads = [threading.Thread(target=work, args=(boxes[i::4],)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert all(np.array_equal(got[b], expected[b]) for b in boxes)


def test_missing_and_not_a_slide(tmp_path: Path) -> None:
    with pytest.raises(SlideError, match="no such file"):
        open_slide(tmp_path / "missing.svs")
    text = tmp_path / "notes.svs"
    text.write_text("this is not a slide\n")
    with pytest.raises(SlideError, match="not a readable slide"):
        open_slide(text)
    with pytest.raises(SlideError, match="directory"):
        open_slide(tmp_path)


def test_mpp_override(slide_path: Path) -> None:
    slide = open_slide(slide_path, mpp_override=0.5)
    assert slide.mpp == 0.5 and slide.downsample_for(1.0) == 2.0


@pytest.mark.shared_data
@pytest.mark.parametrize("backend", BACKENDS)
def test_real_slides_match_manifest(backend: str) -> None:
    manifest = json.loads(shared_path("slides", "manifest.json").read_text())
    for item in manifest["items"]:
        slide = open_slide(shared_path("slides", item["file"]), backend)
        assert [list(d) for d in slide.level_dimensions] == item["level_dimensions"]
        assert slide.level_downsamples == pytest.approx(item["level_downsamples"], rel=1e-4)
        if item["mpp_x"] is None:
            assert not slide.has_mpp
        else:
            assert slide.mpp == pytest.approx(item["mpp_x"])


@pytest.mark.shared_data
def test_real_slide_without_mpp_needs_override() -> None:
    path = shared_path("slides", "TCGA-CR-7395-01A-01-TS1.svs")
    with pytest.raises(SlideError, match="--mpp-override"):
        open_slide(path).read_region(0, 0, 10, 10, mpp=4.0)
    region = open_slide(path, mpp_override=2.0).read_region(0, 0, 100, 80, mpp=4.0)
    assert region.shape == (80, 100, 3)


@pytest.mark.shared_data
def test_real_slide_backends_agree() -> None:
    path = shared_path("slides", "CMU-1-Small-Region.svs")
    a = open_slide(path, "openslide").read_region(500, 700, 256, 256, mpp=1.0)
    b = open_slide(path, "tiffslide").read_region(500, 700, 256, 256, mpp=1.0)
    assert mad(a, b) <= 2
