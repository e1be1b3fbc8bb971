"""The segment job as a user meets it, on a synthetic slide with known nuclei."""

from __future__ import annotations

import csv
import gzip
import json
import os
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import shapely
import shapely.affinity
import torch
import yaml
import zarr
from conftest import SLIDE_MPP, shared_path
from PIL import Image
from scipy import ndimage as ndi
from shapely.geometry import shape

from wsi_pipeline import synthetic
from wsi_pipeline.checkpoint import ModelCard, read_card, save_checkpoint
from wsi_pipeline.cli.main import main
from wsi_pipeline.config import SegmentConfig
from wsi_pipeline.models import create_model
from wsi_pipeline.segment.job import segment_slides
from wsi_pipeline.segment.polygons import rasterize
from wsi_pipeline.segment.quantize import quantize
from wsi_pipeline.slides.tiling import Box
from wsi_pipeline.train.targets import make_target, one_hot

pytestmark = pytest.mark.usefixtures("ray_local")


class HematoxylinOracle:
    """Stands in for a trained model on synthetic slides: nuclei are the dark purple pixels."""

    def __init__(self, checkpoint: str, device: str = "auto", tta: bool = False) -> None:
        self.mode = read_card(checkpoint).target_mode  # the channels the card's model has

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch.pop("image")
        probs = []
        for image in images:
            labels, _ = ndi.label((image[..., 1] < 110) & (image[..., 0] < 180))
            target = make_target(labels, self.mode)
            if self.mode == "distance":
                p = np.concatenate([one_hot(target[0], 3), target[1:] / np.float32(255)])
            else:
                p = one_hot(target, 3)
            probs.append(quantize(ndi.gaussian_filter(p, sigma=(0, 1, 1))))
        batch["probs"] = np.stack(probs)
        return batch


@pytest.fixture(autouse=True, scope="module")
def _ship_oracle_to_workers():
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny, untrained 3-class U-Net at 0.5 µm/px."""
    model = create_model("unet", num_classes=3, base_channels=4)
    card = ModelCard(architecture="unet", kwargs={"base_channels": 4}, mpp=0.5)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", model, card)


def read_geojson(path: Path) -> dict:
    with gzip.open(path, "rt") as f:
        return json.load(f)


def test_oracle_segmentation_matches_truth(tmp_path: Path, slide_path: Path, mosaic, checkpoint):
    config = SegmentConfig(
        checkpoint=str(checkpoint), tile=256, overlap=48, batch_size=4, labels=True
    )
    (result,) = segment_slides(
        [str(slide_path)], str(tmp_path), config, predictor=HematoxylinOracle
    )
    assert result.status == "complete", result.reason
    data = read_geojson(tmp_path / "synthetic.geojson.gz")
    predicted = [shape(f["geometry"]) for f in data["features"]]
    truth = [p for _, p in mosaic.polygons() if p.area > 100]  # level-0 px; ignore slivers
    tree = shapely.STRtree(predicted)
    matched = 0
    for polygon in truth:
        hits = tree.query(polygon)
        if (
            len(hits)
            and max(shapely.intersection(predicted[j], polygon).area for j in hits)
            > 0.5 * polygon.area
        ):
            matched += 1
    recall = matched / len(truth)
    precision = len(truth) * recall / len(predicted)
    assert recall > 0.95 and precision > 0.9, (recall, precision, len(truth), len(predicted))
    # No nucleus twice: predicted polygons do not overlap one another.
    overlaps = tree.query(predicted, predicate="overlaps")
    assert overlaps.shape[1] == 0
    summary = json.loads((tmp_path / "synthetic.json").read_text())
    assert summary["nuclei"] == len(predicted) == result.nuclei
    assert summary["model"]["mpp"] == 0.5 and summary["tissue_mm2"] > 0
    assert summary["oversize_dropped"] == result.oversize == 0  # nuclei << the 48 px overlap
    profile = summary["profile"]
    for stage in ("plan_s", "read_s", "instances_s", "polygons_s", "driver_s", "first_tile_s"):
        assert 0 < profile[stage] < result.seconds * 20, (stage, profile)
    check_label_image(tmp_path / "synthetic.labels.zarr", data["features"], downsample=2.0)
    assert not list(tmp_path.glob(".tmp-*"))  # the label image was renamed into place
    # Results honour the umask (022 here), so other users of shared storage can read them.
    for name in ["synthetic.geojson.gz", "synthetic.json", "segment-config.yaml"]:
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


def test_postprocessing_in_the_predictor_writes_the_same_nuclei_as_tasks(
    tmp_path: Path, slide_path: Path, checkpoint: Path
) -> None:
    """The CPU default (predictor actors post-process) and the GPU layout (CPU tasks do) write
    the same nuclei, with the same labels and measurements."""
    outputs = {}
    for fused in (True, False):
        config = SegmentConfig(
            checkpoint=str(checkpoint),
            tile=256,
            overlap=48,
            postprocess_in_predictor=fused,
            batch_size=2 if fused else 1,  # the actor post-processes every tile of its batch
        )
        out = tmp_path / str(fused)
        (result,) = segment_slides([str(slide_path)], str(out), config, predictor=HematoxylinOracle)
        assert result.status == "complete", result.reason
        features = read_geojson(out / "synthetic.geojson.gz")["features"]
        outputs[fused] = sorted(
            (
                f["properties"]["label"],
                json.dumps(f["geometry"]),
                str(f["properties"]["measurements"]),
            )
            for f in features
        )
    assert len(outputs[True]) > 100
    assert outputs[True] == outputs[False]


class SpeckledMosaic(synthetic.MosaicSlide):
    """The test mosaic with nucleus-sized dark specks on its glass (debris, dust)."""

    specks = [(300, 200), (2700, 200)]  # level-0 px, in glass near tissue (tiles of 512 see them)
    radius = 14  # level-0 px: 3.5 µm, the size of a nucleus

    def render(self, box, level: int = 0) -> np.ndarray:
        out = super().render(box, level)
        f = 2**level
        yy, xx = np.mgrid[box.y0 : box.y1, box.x0 : box.x1]
        for x, y in self.specks:
            out[(xx - x / f) ** 2 + (yy - y / f) ** 2 <= (self.radius / f) ** 2] = (90, 40, 120)
        return out


def test_specks_on_the_glass_are_not_nuclei(tmp_path: Path, checkpoint: Path) -> None:
    """A model that outlines debris on the glass (as models do) writes none of it: nuclei whose
    centre lies beyond ``tissue_margin_um`` of the tissue are dropped; null keeps them."""
    sources = synthetic.synthetic_sources(4, 512, mpp=SLIDE_MPP, seed=0)
    slide = SpeckledMosaic(sources, 3000, 2000, seed=1, tissue_fraction=0.6)
    for x, y in slide.specks:  # each speck lies in glass, ≥ 50 µm from the tissue
        around = synthetic.MosaicSlide.render(slide, Box(x - 200, y - 200, x + 200, y + 200))
        assert around.min() == synthetic.GLASS
    path = tmp_path / "speckled.tiff"
    synthetic.write_tiff(slide, path, mpp=SLIDE_MPP)
    found = {}
    for margin in (16.0, None):
        config = SegmentConfig(
            checkpoint=str(checkpoint), tile=512, overlap=48, tissue_margin_um=margin
        )
        out = tmp_path / str(margin)
        (result,) = segment_slides([str(path)], str(out), config, predictor=HematoxylinOracle)
        assert result.status == "complete", result.reason
        features = read_geojson(out / "speckled.geojson.gz")["features"]
        found[margin] = {json.dumps(f["geometry"]): shape(f["geometry"]) for f in features}
    specks = [shapely.Point(x, y) for x, y in slide.specks]
    on_glass = {k for k, p in found[None].items() if any(p.contains(s) for s in specks)}
    assert len(on_glass) == len(specks)  # kept with null: the model did outline them
    assert found[16.0].keys() == found[None].keys() - on_glass  # and nothing else is lost
    assert len(found[16.0]) > 100
    # preview --compare draws what the margin dropped in red, around the speck only.
    png = tmp_path / "dropped.png"
    runs = [str(tmp_path / str(m) / "speckled.geojson.gz") for m in (16.0, None)]
    for x, y in [slide.specks[0], (1500, 1000)]:  # a speck, then the tissue's middle
        region = f"{x - 100},{y - 100},200,200"
        argv = ["preview", str(path), runs[0], "--compare", runs[1], "--out", str(png)]
        assert main([*argv, "--region", region]) == 0
        red = (np.asarray(Image.open(png)) == (255, 0, 0)).all(axis=2).sum()
        assert (red > 20) == ((x, y) == slide.specks[0]), (x, y, red)


@pytest.fixture(autouse=True)
def _umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


class EverythingIsOneNucleus:
    """A model that sees one nucleus filling every tile: wider than any overlap."""

    def __init__(self, checkpoint: str, device: str = "auto", tta: bool = False) -> None:
        pass

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch.pop("image")
        labels = np.ones(images.shape[1:3], dtype=np.int32)
        p = quantize(one_hot(make_target(labels), 3))
        batch["probs"] = np.stack([p] * len(images))
        return batch


def test_instances_wider_than_the_overlap_are_counted_and_reported(
    tmp_path: Path, slide_path: Path, checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = SegmentConfig(checkpoint=str(checkpoint), tile=256, overlap=32, batch_size=4)
    (result,) = segment_slides(
        [str(slide_path)], str(tmp_path), config, predictor=EverythingIsOneNucleus
    )
    assert result.status == "complete", result.reason
    # Every tile owns its one instance's centroid, and each touches an inner tile edge.
    assert result.oversize == result.tiles > 1
    assert result.nuclei == 0
    summary = json.loads((tmp_path / "synthetic.json").read_text())
    assert summary["oversize_dropped"] == result.oversize
    assert "wider than the overlap" in caplog.text


def test_saved_config_records_the_checkpoint_that_ran(tmp_path: Path, slide_path: Path) -> None:
    from wsi_pipeline.checkpoint import resolve_checkpoint

    config = SegmentConfig(tile=256, overlap=32)  # no checkpoint: the shipped default
    (result,) = segment_slides(
        [str(slide_path)], str(tmp_path), config, predictor=HematoxylinOracle
    )
    assert result.status == "complete", result.reason
    saved = yaml.safe_load((tmp_path / "segment-config.yaml").read_text())
    assert saved["checkpoint"] == str(resolve_checkpoint(None).resolve())
    assert saved["tta"] is False  # decided (a CPU cluster), not left null
    summary = json.loads((tmp_path / "synthetic.json").read_text())
    assert summary["config"]["checkpoint"] == saved["checkpoint"]


def check_label_image(path: Path, features: list[dict], downsample: float) -> None:
    """The label image holds each GeoJSON nucleus, at the model's mpp, under its label."""
    labels = zarr.open_group(path, mode="r")["0"][:]
    assert labels.shape == (1000, 1500)  # 3000 x 2000 level-0 px at 2 px per model px
    assert len(np.unique(labels)) - 1 >= 0.98 * len(features)
    for feature in features[:: max(1, len(features) // 30)]:
        polygon = shapely.affinity.scale(
            shape(feature["geometry"]), 1 / downsample, 1 / downsample, origin=(0, 0)
        )
        x0, y0, x1, y1 = (int(v) for v in polygon.bounds)
        window = labels[y0 : y1 + 2, x0 : x1 + 2] == feature["properties"]["label"]
        local = shapely.affinity.translate(polygon, -x0, -y0)
        expected = rasterize(local, window.shape)
        assert (window & expected).sum() >= 0.95 * max(expected.sum(), 1)


def test_geojson_is_qupath_ready(tmp_path: Path, slide_path: Path, checkpoint: Path) -> None:
    config = SegmentConfig(checkpoint=str(checkpoint), tile=256, overlap=48)
    segment_slides([str(slide_path)], str(tmp_path), config, predictor=HematoxylinOracle)
    data = read_geojson(tmp_path / "synthetic.geojson.gz")
    assert data["type"] == "FeatureCollection" and len(data["features"]) > 100
    ids = set()
    for feature in data["features"]:
        assert feature["type"] == "Feature"
        ids.add(str(uuid.UUID(feature["id"])))
        geometry = shape(feature["geometry"])
        assert geometry.geom_type == "Polygon" and geometry.is_valid and not geometry.is_empty
        props = feature["properties"]
        assert props["objectType"] == "detection"
        assert props["classification"]["name"] == "Nucleus"
        m = props["measurements"]
        assert m["Area µm^2"] == pytest.approx(geometry.area * 0.25**2, rel=1e-3)
        assert 0 < m["Circularity"] <= 1 and 0 < m["Solidity"] <= 1
        assert 0.5 < m["Nucleus probability"] <= 1
        # QuPath's precision, on every nucleus, seam nuclei included.
        xy = np.asarray(feature["geometry"]["coordinates"][0])
        assert np.array_equal(xy, np.round(xy, 2))
    assert len(ids) == len(data["features"])


def test_feature_text_is_what_json_dumps_writes() -> None:
    """orjson writes the features: the same compact, ASCII-only text as ``json.dumps``."""
    from shapely.geometry import Polygon

    from wsi_pipeline.segment.geojson import encode_feature, nucleus_feature

    polygon = Polygon([(0.123, 1.0), (5.5551, 1.0), (3.0, 7.004)], holes=[[(2, 2), (3, 2), (3, 3)]])
    feature = nucleus_feature(polygon, {"Area µm^2": 12.5, "Note": "nucléus 😀"})
    text = encode_feature(feature)
    as_lists = json.loads(text)
    assert text == json.dumps(as_lists, separators=(",", ":"))
    assert text.isascii() and as_lists["properties"]["measurements"]["Note"] == "nucléus 😀"
    assert as_lists["geometry"]["coordinates"][0][:2] == [[0.12, 1.0], [5.56, 1.0]]
    assert len(as_lists["geometry"]["coordinates"]) == 2  # the hole is kept


def test_polygons_rasterise_back_to_their_mask() -> None:
    from wsi_pipeline.segment.polygons import label_polygons

    labels = np.zeros((40, 40), dtype=np.int32)
    yy, xx = np.mgrid[0:40, 0:40]
    labels[(yy - 20) ** 2 / 36 + (xx - 15) ** 2 / 64 <= 1] = 1
    labels[30:36, 30:38] = 2
    for label, polygon in label_polygons(labels):
        mask = labels == label
        back = rasterize(polygon, labels.shape)
        assert (back & mask).sum() / (back | mask).sum() >= 0.95


def test_cli_batch_with_bad_slides_and_resume(
    tmp_path: Path, slide_path: Path, checkpoint: Path, capsys
) -> None:
    bad = tmp_path / "corrupt.svs"
    bad.write_bytes(b"II*\x00" + b"\x00" * 100)
    out = tmp_path / "results"
    argv = [
        "segment",
        str(slide_path),
        str(bad),
        str(tmp_path / "missing.svs"),
        "--checkpoint",
        str(checkpoint),
        "--out",
        str(out),
        "--tile",
        "256",
        "--overlap",
        "48",
    ]
    assert main(argv) == 1
    with open(out / "summary.csv") as f:
        rows = {Path(r["slide"]).name: r for r in csv.DictReader(f)}
    assert rows["synthetic.tiff"]["status"] == "complete"
    assert rows["corrupt.svs"]["status"] == "failed" and rows["corrupt.svs"]["reason"]
    assert "no such file" in rows["missing.svs"]["reason"]
    first = read_geojson(out / "synthetic.geojson.gz")
    assert json.loads((out / "synthetic.json").read_text())["profile"]["forward_s"] > 0
    # The untrained model finds something or nothing, but the outputs are complete and valid.
    assert first["type"] == "FeatureCollection"
    # An interrupted run leaves no summary for the slide: re-running redoes it, identically.
    (out / "synthetic.json").unlink()
    assert main([*argv[:2], *argv[4:]]) == 0
    again = read_geojson(out / "synthetic.geojson.gz")
    geometry = [f["geometry"] for f in first["features"]]
    assert [f["geometry"] for f in again["features"]] == geometry
    assert main([*argv[:2], *argv[4:]]) == 0
    assert "1 skipped" in capsys.readouterr().out


def test_segment_from_tiling_store_and_preview(
    tmp_path: Path, slide_path: Path, checkpoint: Path
) -> None:
    tiles = tmp_path / "tiles"
    assert main(["tile", str(slide_path), "--out", str(tiles), "--mpp", "0.5"]) == 0
    out = tmp_path / "results"
    config = SegmentConfig(checkpoint=str(checkpoint), tile=256, overlap=48)
    (from_store,) = segment_slides(
        [str(tiles / "synthetic.ome.zarr")], str(out), config, predictor=HematoxylinOracle
    )
    assert from_store.status == "complete" and from_store.nuclei > 100
    (direct,) = segment_slides(
        [str(slide_path)], str(tmp_path / "direct"), config, predictor=HematoxylinOracle
    )
    assert abs(from_store.nuclei - direct.nuclei) <= 0.02 * direct.nuclei
    png = tmp_path / "overlay.png"
    argv = [
        "preview",
        str(slide_path),
        str(out / "synthetic.geojson.gz"),
        "--out",
        str(png),
        "--region",
        "500,400,1000,800",
    ]
    assert main(argv) == 0

    image = np.asarray(Image.open(png))
    assert image.shape == (800, 1000, 3)
    assert ((image == (0, 230, 80)).all(axis=2)).sum() > 1000  # outlines drawn


@pytest.mark.shared_data
def test_real_slide_end_to_end(tmp_path: Path, checkpoint: Path) -> None:
    cmu = shared_path("slides", "CMU-1-Small-Region.svs")
    config = SegmentConfig(checkpoint=str(checkpoint), tile=256, overlap=48)
    (result,) = segment_slides([str(cmu)], str(tmp_path), config, predictor=HematoxylinOracle)
    assert result.status == "complete" and result.tiles > 0
    summary = json.loads((tmp_path / "CMU-1-Small-Region.json").read_text())
    assert summary["plan"]["level0_mpp"] == pytest.approx(0.499)
    assert summary["nuclei"] > 500  # real H&E: thousands of hematoxylin blobs


def test_half_precision_checkpoint_round_trip(tmp_path: Path) -> None:
    from wsi_pipeline.checkpoint import load_checkpoint, resolve_checkpoint

    model = create_model("unet", num_classes=3, base_channels=4).eval()
    card = ModelCard(architecture="unet", kwargs={"base_channels": 4}, mpp=0.5)
    path = save_checkpoint(tmp_path / "half", model, card, half=True)
    loaded, loaded_card = load_checkpoint(resolve_checkpoint(path))
    x = torch.rand(1, 3, 64, 64)
    assert loaded_card.mpp == 0.5
    assert torch.allclose(loaded(x), model(x), atol=2e-2)
    with pytest.raises(FileNotFoundError, match="shipped models"):
        resolve_checkpoint(tmp_path / "nothing-here")


def test_subpixel_outlines_follow_the_probability_between_pixel_centres() -> None:
    """A disc of radius 6.3 px, its probability a smooth edge: the mask outline can only be as
    good as the pixel grid; the probability's iso-contour recovers the true radius."""
    from wsi_pipeline.segment.polygons import label_polygons

    yy, xx = np.mgrid[0:32, 0:32] + 0.5
    radius = 6.3
    distance = np.hypot(xx - 16.2, yy - 15.7)
    probability = 1 / (1 + np.exp((distance - radius) / 0.6))  # 0.5 exactly on the circle
    labels = (probability > 0.5).astype(np.int32)
    true_area = np.pi * radius**2
    ((_, on_grid),) = label_polygons(labels)
    ((_, subpixel),) = label_polygons(labels, field=probability, level=0.5)
    assert abs(subpixel.area - true_area) < abs(on_grid.area - true_area)
    assert abs(subpixel.area - true_area) / true_area < 0.01
    assert subpixel.is_valid
    # Without a field the outline is the mask's, exactly as before.
    ((_, again),) = label_polygons(labels, field=None)
    assert again.equals(on_grid)


def test_predictor_batch_defaults_to_single_tiles_on_a_cpu() -> None:
    from wsi_pipeline.segment.job import predictor_batch_size

    assert predictor_batch_size(None, use_gpu=False) == 1
    assert predictor_batch_size(None, use_gpu=True) == 8
    assert predictor_batch_size(4, use_gpu=False) == predictor_batch_size(4, use_gpu=True) == 4


def test_tta_is_on_where_a_gpu_runs_the_model_unless_set() -> None:
    from wsi_pipeline.segment.job import resolve_tta

    cpu, gpu = {"CPU": 2.0}, {"CPU": 16.0, "GPU": 1.0}
    assert resolve_tta(SegmentConfig(), cpu).tta is False
    assert resolve_tta(SegmentConfig(), gpu).tta is True
    assert resolve_tta(SegmentConfig(device="cpu"), gpu).tta is False
    assert resolve_tta(SegmentConfig(tta=False), gpu).tta is False
    assert resolve_tta(SegmentConfig(tta=True), cpu).tta is True


class ThreadTaggedOracle(HematoxylinOracle):
    """The oracle, slowed down, telling which process and thread ran each tile and when."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        time.sleep(0.1)  # a model's forward: long enough for the calls to overlap
        batch = super().__call__(batch)
        size = len(batch["probs"])
        batch["worker"] = np.array([f"{os.getpid()}:{threading.get_ident()}"] * size, dtype=object)
        batch["span"] = np.array([(start, time.perf_counter())] * size)
        return batch


def test_a_cpu_job_reads_predicts_and_postprocesses_in_one_actor_with_a_model_per_core(
    slide_path: Path, checkpoint: Path
) -> None:
    """On the 2-CPU test cluster one actor process runs two calls at once, each on its own
    thread, and reads its tiles itself: no read tasks."""
    import ray

    from wsi_pipeline.segment.job import _graph, plan_slide, predictor_pool

    config = SegmentConfig(checkpoint=str(checkpoint), tile=256, overlap=48)
    pool = predictor_pool(config, ray.cluster_resources())
    assert (pool.size, pool.calls, pool.reads) == (1, 2, True)
    card = read_card(str(checkpoint))
    plan = plan_slide(str(slide_path), card, config)
    rows = plan.rows(str(slide_path))
    graph = _graph(rows, {str(slide_path): plan.for_tasks()}, card, config, ThreadTaggedOracle)
    out = list(graph.iter_rows())
    assert len(out) == len(rows) > 8
    assert not any(r["error"] for r in out) and sum(r["count"] for r in out) > 100
    pids = {r["worker"].split(":")[0] for r in out}
    threads = {r["worker"] for r in out}
    assert len(pids) == 1 and len(threads) == 2
    spans = sorted(tuple(r["span"]) for r in out)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False))  # calls overlapped
    assert "read_tiles" not in graph.stats()  # the actor read the tiles
    tasks = config.model_copy(update={"postprocess_in_predictor": False})
    layout = _graph(rows, {str(slide_path): plan.for_tasks()}, card, tasks, HematoxylinOracle)
    assert len(list(layout.iter_rows())) == len(rows) and "read_tiles" in layout.stats()


def test_predictor_pool_on_a_cpu_runs_one_single_threaded_model_per_core_that_postprocesses():
    from wsi_pipeline.segment.job import predictor_pool

    # Two cores: one actor reads, predicts and post-processes, in two calls that share its model.
    cpu = predictor_pool(SegmentConfig(), {"CPU": 2.0})
    assert (cpu.use_gpu, cpu.postprocess, cpu.reads, cpu.size, cpu.calls, cpu.threads) == (
        False,
        True,
        True,
        1,
        2,
        1,
    )
    assert cpu.batch_size == 1 and cpu.cpus <= 2
    # A model per core (one more on an odd count), each single-threaded; the actors fit.
    for cores in (1.0, 3.0, 4.0, 5.0, 16.0):
        pool = predictor_pool(SegmentConfig(), {"CPU": cores})
        assert cores <= pool.size * pool.calls <= cores + 1, cores
        assert pool.size * pool.cpus <= cores and pool.cpus <= 1.5
    # Nodes of one CPU (a 4-CPU cluster of them): one call per actor, and an actor fits a node.
    small = predictor_pool(SegmentConfig(), {"CPU": 4.0}, node_cpus=1.0)
    assert (small.size, small.calls) == (4, 1) and small.cpus <= 1.0
    # A multi-threaded model asked for: one call of it; calls asked for: as many, fitting a node.
    threaded = predictor_pool(SegmentConfig(predictor_threads=2), {"CPU": 8.0})
    assert (threaded.calls, threaded.threads) == (1, 2)
    three = predictor_pool(SegmentConfig(predictor_calls=3), {"CPU": 8.0}, node_cpus=2.0)
    assert (three.calls, three.size, three.cpus) == (3, 3, 2.0)
    # A GPU host: one actor per GPU with every core's threads; CPU tasks post-process.
    gpu = predictor_pool(SegmentConfig(), {"CPU": 16.0, "GPU": 2.0})
    assert (gpu.use_gpu, gpu.postprocess, gpu.size, gpu.threads, gpu.cpus, gpu.batch_size) == (
        True,
        False,
        2,
        None,
        1.0,
        8,
    )
    # Without post-processing in it, a CPU predictor is one actor on every core, as before.
    tasks = predictor_pool(SegmentConfig(postprocess_in_predictor=False), {"CPU": 8.0})
    assert (tasks.size, tasks.threads, tasks.postprocess) == (1, None, False)
    assert (tasks.calls, tasks.reads) == (1, False)
    # What is configured wins.
    set_ = SegmentConfig(predictors=3, predictor_threads=2, cpus_per_predictor=0.5)
    pool = predictor_pool(set_, {"CPU": 8.0})
    assert (pool.size, pool.threads, pool.cpus) == (3, 2, 0.5)
