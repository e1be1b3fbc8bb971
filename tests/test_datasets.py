"""Training data in: folder datasets and QuPath GeoJSON → training store → augmented crops."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely
import zarr
from conftest import SLIDE_MPP, shared_path
from PIL import Image

from wsi_pipeline.cli.main import main
from wsi_pipeline.config import ConfigError
from wsi_pipeline.metrics import score_image
from wsi_pipeline.segment.geojson import FeatureWriter, nucleus_feature, read_features
from wsi_pipeline.segment.polygons import label_polygons
from wsi_pipeline.slides.slide import open_slide
from wsi_pipeline.slides.tiling import Box
from wsi_pipeline.synthetic import MosaicSlide, synthetic_tile
from wsi_pipeline.train import augment, ingest
from wsi_pipeline.train import store as datasets


def write_folder_dataset(
    root: Path,
    n: int = 6,
    size: int = 96,
    *,
    mpp: float | None = 0.5,
    splits: list[str] | None = None,
    seed: int = 0,
) -> Path:
    """A folder dataset of synthetic tiles: images/, masks/ (16-bit) and manifest.json."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        rgb, labels = synthetic_tile(size, rng, mpp=mpp or 0.5, density=0.006)
        Image.fromarray(rgb).save(root / "images" / f"tile{i}.png")
        Image.fromarray(labels.astype(np.uint16)).save(root / "masks" / f"tile{i}.png")
        item: dict[str, object] = {"id": f"tile{i}"}
        if mpp is not None:
            item["mpp"] = mpp
        if splits is not None:
            item["fold_split"] = splits[i]
        items.append(item)
    (root / "manifest.json").write_text(json.dumps({"license": "test data", "items": items}))
    return root


# --- folder datasets ------------------------------------------------------------------------


def test_ingest_folder_resamples_and_records_split(tmp_path: Path) -> None:
    splits = ["train", "train", "train", "holdout", "holdout", "train"]
    data = write_folder_dataset(tmp_path / "ds", mpp=0.25, splits=splits)
    items = ingest.ingest_folder(data, tmp_path / "s.zarr", mpp=0.5)

    store = datasets.open_store(tmp_path / "s.zarr")
    assert store.mpp == 0.5 and len(items) == 6
    assert store.keys(["holdout"]) == ["ds/tile3", "ds/tile4"]
    assert store.datasets["ds"]["split_field"] == "fold_split"
    assert store.datasets["ds"]["license"] == "test data"
    rgb, labels = store.read("ds/tile0")
    assert rgb.shape == (48, 48, 3) and rgb.dtype == np.uint8
    assert labels.shape == (48, 48) and labels.dtype == np.int32
    truth = np.asarray(Image.open(data / "masks" / "tile0.png"))
    assert set(np.unique(labels)) <= set(np.unique(truth))  # nearest: no new labels
    assert items[0].source_mpp == 0.25 and items[0].n_nuclei > 0


def test_ingest_without_split_field_hashes_a_val_fraction(tmp_path: Path) -> None:
    data = write_folder_dataset(tmp_path / "ds", n=10)
    items = ingest.ingest_folder(data, tmp_path / "s.zarr", val_fraction=0.3)
    assert sorted(item.split for item in items).count("val") == 3
    again = ingest.ingest_folder(data, tmp_path / "s.zarr", val_fraction=0.3)
    assert [i.split for i in again] == [i.split for i in items]  # deterministic, replaced
    assert len(datasets.open_store(tmp_path / "s.zarr").items) == 10
    (data / "images" / "tile9.png").unlink()
    ingest.ingest_folder(data, tmp_path / "s.zarr", val_fraction=0.3)
    assert "tile9" not in zarr.open_group(tmp_path / "s.zarr", mode="r")["items/ds"]


def test_ingest_needs_an_mpp_and_one_store_mpp(tmp_path: Path) -> None:
    data = write_folder_dataset(tmp_path / "ds", n=2, mpp=None)
    with pytest.raises(ConfigError, match="--mpp-source"):
        ingest.ingest_folder(data, tmp_path / "s.zarr")
    ingest.ingest_folder(data, tmp_path / "s.zarr", mpp_source=0.5)
    with pytest.raises(ConfigError, match="0.5"):
        ingest.ingest_folder(data, tmp_path / "s.zarr", mpp=0.25, mpp_source=0.5)


def test_ingest_commands(
    tmp_path: Path, slide_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_folder_dataset(tmp_path / "ds", n=4, mpp=0.25)
    store = str(tmp_path / "s.zarr")
    assert main(["ingest", str(data), "--out", store, "--mpp", "0.5"]) == 0
    assert "4 items at 0.5 µm/px (3 train, 1 val)" in capsys.readouterr().out
    _write_geojson(tmp_path / "a.geojson", [shapely.Point(400, 400).buffer(10)], [])
    argv = ["ingest-qupath", str(slide_path), str(tmp_path / "a.geojson"), "--out", store]
    assert main(argv) == 0
    assert len(datasets.open_store(store).items) == 5
    assert main(["ingest", str(tmp_path / "missing"), "--out", store]) == 2
    assert "no images/" in capsys.readouterr().err


def test_parse_mpp_reads_manifest_text() -> None:
    assert ingest.parse_mpp("about 0.25 (the XML headers state 0.2456-0.2527)") == 0.25
    assert ingest.parse_mpp(0.5) == 0.5
    assert ingest.parse_mpp("not stated; approx 0.5 at 20x") is None


@pytest.mark.shared_data
def test_ingest_monuseg_uses_kumar_split(tmp_path: Path) -> None:
    data = shared_path("compact", "monuseg_train")
    items = ingest.ingest_folder(data, tmp_path / "m.zarr", mpp=0.5)
    splits = [item.split for item in items]
    assert (splits.count("train"), splits.count("test_same_organ")) == (16, 8)
    assert splits.count("test_other_organ") == 6
    # per-item mpp where the XML gave one (0.2456-0.2527), else the dataset's "about 0.25"
    for item in items:
        assert item.height == item.width == round(1000 * item.source_mpp / 0.5)
    assert {item.source_mpp for item in items} > {0.25}


# --- QuPath GeoJSON -------------------------------------------------------------------------


def _write_geojson(path: Path, polygons: list[shapely.Polygon], regions: list[Box]) -> None:
    with FeatureWriter(path) as writer:
        for polygon in polygons:
            writer.write(nucleus_feature(polygon))
        for box in regions:
            feature = nucleus_feature(
                shapely.box(box.x0, box.y0, box.x1, box.y1), object_type="annotation"
            )
            feature["properties"]["classification"] = {"name": "Region", "color": [0, 0, 255]}
            writer.write(feature)


def test_geojson_labels_geojson_round_trip(tmp_path: Path) -> None:
    _, labels = synthetic_tile(128, np.random.default_rng(3), mpp=0.5)
    offset, scale = (1000.0, 2000.0), 2.0  # level-0 px of the label image's corner, px per px
    originals = [p for _, p in label_polygons(labels, offset=offset, scale=scale)]
    _write_geojson(tmp_path / "in.geojson", originals, [])

    nuclei, regions = ingest.read_qupath(tmp_path / "in.geojson")
    assert regions == [] and len(nuclei) == len(originals)
    back = ingest.rasterize_nuclei(
        nuclei, list(range(1, len(nuclei) + 1)), offset, scale, labels.shape
    )
    assert score_image(labels, back)["aji"] > 0.99

    with FeatureWriter(tmp_path / "out.geojson.gz") as writer:
        for _, polygon in label_polygons(back, offset=offset, scale=scale):
            writer.write(nucleus_feature(polygon))
    again = [
        shapely.geometry.shape(f["geometry"]) for f in read_features(tmp_path / "out.geojson.gz")
    ]
    assert len(again) == len(originals)
    tree = shapely.STRtree(again)
    ious = []
    for polygon in originals:
        match = again[int(tree.query_nearest(polygon.centroid)[0])]
        ious.append(polygon.intersection(match).area / polygon.union(match).area)
    assert min(ious) > 0.95


@pytest.mark.parametrize("mpp", [SLIDE_MPP, 2 * SLIDE_MPP])
def test_ingest_qupath_regions_match_the_slide(
    tmp_path: Path, slide_path: Path, mosaic: MosaicSlide, mpp: float
) -> None:
    region = Box(512, 256, 1024, 768)
    polygons = [
        p for _, p in mosaic.polygons() if p.intersects(shapely.box(*region_bounds(region)))
    ]
    _write_geojson(tmp_path / "a.geojson", polygons, [region])

    items = ingest.ingest_qupath(slide_path, tmp_path / "a.geojson", tmp_path / "q.zarr", mpp=mpp)
    assert [item.id for item in items] == ["region-000"]
    store = datasets.open_store(tmp_path / "q.zarr")
    rgb, labels = store.read(items[0].key)
    factor = round(mpp / SLIDE_MPP)
    assert labels.shape == (region.height // factor, region.width // factor)
    slide = open_slide(slide_path)
    expected = slide.read_region(region.x0, region.y0, *labels.shape[::-1], mpp=mpp)
    assert np.array_equal(rgb, expected)
    truth = mosaic.render_labels(region).astype(np.int64)
    truth = truth[factor // 2 :: factor, factor // 2 :: factor]  # pixel centres at this mpp
    assert score_image(truth, labels)["aji"] > (0.99 if factor == 1 else 0.9)


def region_bounds(box: Box) -> tuple[int, int, int, int]:
    return box.x0, box.y0, box.x1, box.y1


def test_ingest_qupath_without_regions_boxes_the_nuclei(tmp_path: Path, slide_path: Path) -> None:
    nuclei = [shapely.Point(600, 500).buffer(12), shapely.Point(700, 560).buffer(10)]
    _write_geojson(tmp_path / "n.geojson", nuclei, [])
    items = ingest.ingest_qupath(
        slide_path, tmp_path / "n.geojson", tmp_path / "q.zarr", margin_um=5.0, split="val"
    )
    margin = 5.0 / SLIDE_MPP
    assert items[0].split == "val" and items[0].n_nuclei == 2
    width = (710 + margin) - (588 - margin)
    assert items[0].width == pytest.approx(width / 2, abs=1)


# --- crops ----------------------------------------------------------------------------------


@pytest.fixture()
def store(tmp_path: Path) -> datasets.TrainingStore:
    data = write_folder_dataset(tmp_path / "ds", n=3, size=80)
    ingest.ingest_folder(data, tmp_path / "s.zarr", val_fraction=0.0)
    return datasets.open_store(tmp_path / "s.zarr")


def test_crops_keep_image_and_labels_aligned(store: datasets.TrainingStore) -> None:
    rng = np.random.default_rng(0)
    config = augment.AugmentConfig(affine_p=1.0, blur_p=0.0)
    for _ in range(10):
        rgb, labels = augment.sample_crop(store, store.keys()[0], 64, rng, config)
        assert rgb.shape == (64, 64, 3) and labels.shape == (64, 64)
        if labels.any():  # nuclei are the dark, blue pixels
            assert rgb[labels > 0].mean() < rgb[labels == 0].mean() - 40


def test_crop_batch_is_seeded_and_sized(store: datasets.TrainingStore) -> None:
    keys = store.keys()
    kwargs = {
        "store": store.path,
        "keys": keys,
        "weights": augment.area_weights(store, keys),
        "size": 96,  # larger than the 80 px items: mirrored out
        "augment": augment.AugmentConfig().model_dump(),
        "target_mode": "3class",
        "boundary_width": 1,
        "seed": 7,
    }
    a = augment.crop_batch({"id": np.arange(5)}, **kwargs)
    b = augment.crop_batch({"id": np.arange(5)}, **kwargs)
    assert a["image"].shape == (5, 96, 96, 3) and a["target"].shape == (5, 96, 96)
    assert np.array_equal(a["image"], b["image"]) and set(np.unique(a["target"])) == {0, 1, 2}


def test_no_augment_crop_is_a_plain_window(store: datasets.TrainingStore) -> None:
    key = store.keys()[0]
    rgb, labels = augment.sample_crop(store, key, 32, np.random.default_rng(1), augment.NO_AUGMENT)
    full_rgb, full_labels = store.read(key)
    hits = [
        (y, x)
        for y in range(full_labels.shape[0] - 31)
        for x in range(full_labels.shape[1] - 31)
        if np.array_equal(full_rgb[y : y + 32, x : x + 32], rgb)
    ]
    assert hits and np.array_equal(full_labels[hits[0][0] :, hits[0][1] :][:32, :32], labels)


@pytest.mark.usefixtures("ray_local")
def test_crop_dataset_on_ray_data(store: datasets.TrainingStore) -> None:
    ds = augment.crop_dataset(
        store, store.keys(), 10, size=32, augment=augment.AugmentConfig(), num_cpus=0.5
    )
    batches = list(ds.iter_batches(batch_size=5))
    assert [len(b["image"]) for b in batches] == [5, 5]
    assert batches[0]["image"].dtype == np.uint8 and batches[0]["target"].shape == (5, 32, 32)


def test_store_layout_is_documented_zarr(store: datasets.TrainingStore) -> None:
    group = zarr.open_group(store.path, mode="r")
    meta = group.attrs[datasets.ATTRS]
    assert meta["mpp"] == 0.5 and set(meta["items"]) == set(store.keys())
    assert group["items/ds/tile0/image"].shape[2] == 3


def test_jpeg_and_resampling_round_trips_change_detail_not_content() -> None:
    rng = np.random.default_rng(0)
    rgb, _ = synthetic_tile(128, rng, mpp=0.5, density=0.006)
    jpeg = augment.jpeg_round_trip(rgb, 60)
    resampled = augment.resample_round_trip(rgb, 2.0)
    for out in (jpeg, resampled):
        assert out.shape == rgb.shape and out.dtype == np.uint8
        diff = np.abs(out.astype(int) - rgb.astype(int))
        assert 0.5 < diff.mean() < 12  # visibly degraded, still the same picture
    # Quality and factor matter: a gentler round trip stays closer to the original.
    assert (
        np.abs(augment.jpeg_round_trip(rgb, 95).astype(int) - rgb).mean()
        < np.abs(jpeg.astype(int) - rgb).mean()
    )
    assert np.array_equal(augment.resample_round_trip(rgb, 1.0), rgb)


def test_photometric_applies_jpeg_and_resampling_only_when_asked() -> None:
    rgb, _ = synthetic_tile(64, np.random.default_rng(1), mpp=0.5, density=0.006)
    plain = augment.NO_AUGMENT
    assert np.array_equal(augment.photometric(rgb, np.random.default_rng(0), plain), rgb)
    jpeg_only = plain.model_copy(update={"jpeg_p": 1.0, "jpeg_quality": 50})
    out = augment.photometric(rgb, np.random.default_rng(0), jpeg_only)
    assert not np.array_equal(out, rgb)
