from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_path
from shapely.geometry import Polygon

from wsi_pipeline import synthetic
from wsi_pipeline.segment.polygons import label_polygons, rasterize
from wsi_pipeline.slides.tiling import Box
from wsi_pipeline.train.augment import square_symmetry


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.mark.parametrize("t", range(8))
def test_polygon_transform_matches_array_transform(t: int) -> None:
    mask = np.zeros((16, 16), dtype=bool)
    mask[2:5, 3:9] = True
    mask[5:12, 3:5] = True
    polygon = Polygon([(3, 2), (9, 2), (9, 5), (5, 5), (5, 12), (3, 12)])
    assert np.array_equal(rasterize(polygon, (16, 16)), mask)
    moved = synthetic.transform_polygon(polygon, t, 16)
    assert np.array_equal(rasterize(moved, (16, 16)), square_symmetry(mask, t))


def test_synthetic_tile_has_known_nuclei() -> None:
    rgb, labels = synthetic.synthetic_tile(256, np.random.default_rng(3), mpp=0.5)
    n = int(labels.max())
    assert rgb.shape == (256, 256, 3) and n >= 10
    assert set(np.unique(labels)) == set(range(n + 1))
    # Nuclei are dark purple, stroma pink: hematoxylin pixels sit under labels.
    assert rgb[labels > 0, 1].mean() < rgb[labels == 0, 1].mean() - 60


def test_mosaic_labels_and_polygons_agree(mosaic: synthetic.MosaicSlide) -> None:
    box = Box(0, 0, mosaic.width, mosaic.height)
    labels = mosaic.render_labels(box)
    polygons = dict(mosaic.polygons())
    assert set(polygons) == set(np.unique(labels)) - {0}
    for label in list(polygons)[:: max(1, len(polygons) // 40)]:
        polygon = polygons[label]
        x0, y0, x1, y1 = (int(v) for v in polygon.bounds)
        window = Box(max(x0 - 1, 0), max(y0 - 1, 0), x1 + 2, y1 + 2)
        local = labels[window.y0 : window.y1, window.x0 : window.x1] == label
        if local.sum() < 20:
            continue
        shifted = Polygon(np.asarray(polygon.exterior.coords) - (window.x0, window.y0))
        assert iou(rasterize(shifted, local.shape), local) >= 0.9


def test_label_polygons_roundtrip_and_offset() -> None:
    _, labels = synthetic.synthetic_tile(128, np.random.default_rng(1), mpp=0.5)
    found = dict(label_polygons(labels, offset=(1000.0, 2000.0), scale=2.0))
    assert len(found) == labels.max()
    some = next(iter(found))
    minx, miny, _, _ = found[some].bounds
    ys, xs = np.nonzero(labels == some)
    assert minx == pytest.approx(1000 + 2 * xs.min(), abs=1.1)
    assert miny == pytest.approx(2000 + 2 * ys.min(), abs=1.1)


def test_truth_geojson(tmp_path: Path, mosaic: synthetic.MosaicSlide) -> None:
    path = tmp_path / "truth.geojson.gz"
    count = synthetic.write_truth(mosaic, path)
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    assert data["type"] == "FeatureCollection" and len(data["features"]) == count > 100
    feature = data["features"][0]
    assert feature["geometry"]["type"] == "Polygon"
    assert feature["properties"]["classification"]["name"] == "Nucleus"


@pytest.mark.shared_data
def test_mosaic_from_real_annotated_tiles(tmp_path: Path) -> None:
    from wsi_pipeline.slides.slide import open_slide

    sources = synthetic.load_annotated_tiles(shared_path("monuseg_train"))[:3]
    slide = synthetic.MosaicSlide(sources, 2500, 1800, seed=0)
    path = tmp_path / "mosaic.tiff"
    synthetic.write_tiff(slide, path, mpp=0.25)
    opened = open_slide(path, "openslide")
    assert opened.dimensions == (2500, 1800) and opened.mpp == pytest.approx(0.25)
    region = opened.read_region(1000, 700, 300, 300, mpp=0.25)
    expected = slide.render(Box(1000, 700, 1300, 1000))
    assert np.abs(region.astype(int) - expected).mean() < 4
