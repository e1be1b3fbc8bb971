"""Instance extraction as tensor operations: the scipy path's steps and its nuclei, batched."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import shapely
import torch
from conftest import REPO, shared_path
from PIL import Image
from scipy import ndimage as ndi
from shapely.geometry import shape

from wsi_pipeline.checkpoint import (
    DEFAULT_MODEL,
    ModelCard,
    read_card,
    resolve_checkpoint,
    save_checkpoint,
)
from wsi_pipeline.cli.main import main
from wsi_pipeline.config import ConfigError, SegmentConfig
from wsi_pipeline.metrics import score_image
from wsi_pipeline.models import create_model
from wsi_pipeline.segment import tensor_instances as tensor_module
from wsi_pipeline.segment.instances import _fill_enclosed_holes, instances_from_probabilities
from wsi_pipeline.segment.job import resolve_tensor_instances
from wsi_pipeline.segment.predictor import Predictor
from wsi_pipeline.segment.quantize import dequantize, quantize
from wsi_pipeline.segment.tensor_instances import (
    connected_components,
    rounded_to_levels,
    taxicab_distance,
    tensor_instances,
)


def _random_masks(seed: int, batch: int = 3, side: int = 48) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([ndi.binary_opening(rng.random((side, side)) > 0.4) for _ in range(batch)])


@pytest.mark.parametrize("seed", range(4))
def test_connected_components_are_scipys_numbered_by_their_first_pixel(seed: int) -> None:
    masks = _random_masks(seed)
    roots = connected_components(torch.from_numpy(masks)).numpy()
    assert (roots[~masks] == -1).all()
    for b, mask in enumerate(masks):
        expected, n = ndi.label(mask)  # numbered in raster order of their first pixel
        assert n > 5
        firsts = np.sort(np.unique(roots[b][mask]))
        assert len(firsts) == n and (firsts // mask.size == b).all()  # never across tiles
        renumbered = np.searchsorted(firsts, roots[b]) + 1
        np.testing.assert_array_equal(np.where(mask, renumbered, 0), expected)


def test_one_component_winding_across_the_tile_is_found_in_few_passes() -> None:
    snake = np.zeros((1, 64, 64), dtype=bool)
    snake[0, ::4, :] = True
    snake[0, 1::8, -1] = snake[0, 2::8, -1] = snake[0, 3::8, -1] = True
    snake[0, 5::8, 0] = snake[0, 6::8, 0] = snake[0, 7::8, 0] = True
    assert ndi.label(snake[0])[1] == 1
    roots = connected_components(torch.from_numpy(snake))
    assert set(roots[torch.from_numpy(snake)].tolist()) == {0}


@pytest.mark.parametrize("seed", range(3))
def test_taxicab_distance_is_scipys(seed: int) -> None:
    rng = np.random.default_rng(seed)
    seeds = rng.random((2, 40, 56)) > 0.995
    seeds[0, 3, 5] = seeds[1, 30, 50] = True
    expected = np.stack([ndi.distance_transform_cdt(~s, metric="taxicab") for s in seeds])
    np.testing.assert_array_equal(taxicab_distance(torch.from_numpy(seeds)).numpy(), expected)


@pytest.mark.parametrize("seed", range(4))
def test_holes_enclosed_by_one_instance_are_filled_as_scipy_fills_them(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = np.zeros((64, 64), dtype=np.int64)
    for k in range(1, 12):  # rings and touching blobs: holes with one, two or no owner
        y, x, r = rng.integers(8, 56), rng.integers(8, 56), rng.integers(3, 7)
        yy, xx = np.ogrid[:64, :64]
        d = np.hypot(yy - y, xx - x)
        labels[(d <= r) & (d >= r - 2 if k % 2 else d <= r)] = k
    expected = _fill_enclosed_holes(labels.astype(np.int32))
    filled = tensor_module._fill_enclosed_holes(torch.from_numpy(labels[None]))[0].numpy()
    np.testing.assert_array_equal(filled, expected)
    assert (expected > 0).sum() > (labels > 0).sum()  # some hole was filled


def _blobs(seed: int, side: int = 96, mode: str = "distance") -> np.ndarray:
    """Quantised probabilities of touching round nuclei (interior high at their centres)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side]
    centre = np.zeros((side, side))
    for _ in range(14):
        y, x, r = *rng.integers(6, side - 6, 2), rng.integers(4, 9)
        centre = np.maximum(centre, np.clip(1 - np.hypot(yy - y, xx - x) / r, 0, 1))
    centre = ndi.gaussian_filter(centre, 0.7)
    nucleus = np.clip(centre * 3, 0, 1)
    probs = [1 - nucleus, nucleus * centre, nucleus * (1 - centre)]
    if mode == "distance":
        probs.append(centre)
    return dequantize(quantize(np.stack(probs).astype(np.float32)))


@pytest.mark.parametrize("mode", ["distance", "3class"])
def test_a_batch_gives_the_scipy_paths_instances_tile_by_tile(mode: str) -> None:
    post = {"min_size": 10, "foreground_threshold": 0.5, "marker_min_size": 4}
    post |= {"interior_threshold": 0.3, "distance_threshold": 0.3}
    probs = np.stack([_blobs(seed, mode=mode) for seed in range(3)])
    batch = tensor_instances(torch.from_numpy(probs), mode, **post).numpy()
    for tile, labels in zip(probs, batch, strict=True):
        expected = instances_from_probabilities(tile, mode, **post)
        assert labels.max() == expected.max() > 5
        # Touching nuclei may trade a boundary pixel where two floods tie; nothing more.
        assert (labels != expected).mean() < 0.005
        assert score_image(expected, labels)["aji"] > 0.99
    alone = tensor_instances(torch.from_numpy(probs[1:2]), mode, **post).numpy()
    np.testing.assert_array_equal(alone[0], batch[1])  # tiles of a batch do not interact


@pytest.mark.gpu
def test_the_same_code_on_a_gpu_gives_the_same_labels() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    probs = torch.from_numpy(np.stack([_blobs(seed, side=512) for seed in range(4)]))
    on_cpu = tensor_instances(probs, "distance", distance_threshold=0.3)
    on_gpu = tensor_instances(probs.cuda(), "distance", distance_threshold=0.3)
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=0, atol=0)


def test_modes_without_a_tensor_path_are_refused() -> None:
    with pytest.raises(ValueError, match="not 'binary'"):
        tensor_instances(torch.zeros(1, 1, 8, 8), "binary")
    with pytest.raises(ValueError, match=r"needs \(B, 4, H, W\)"):
        tensor_instances(torch.zeros(1, 3, 8, 8), "distance")
    too_large = torch.empty(1, 4, 4097, 4097, device="meta")  # refused before any compute
    with pytest.raises(ValueError, match="tiles of over 16777216 px have no tensor path"):
        tensor_instances(too_large, "distance")


def test_tensor_instances_are_on_where_a_gpu_runs_a_model_they_support() -> None:
    cpu, gpu = {"CPU": 2.0}, {"CPU": 16.0, "GPU": 1.0}
    card = read_card(resolve_checkpoint(None))
    binary = card.model_copy(update={"target_mode": "binary"})
    assert resolve_tensor_instances(SegmentConfig(), gpu, card).tensor_instances is True
    assert resolve_tensor_instances(SegmentConfig(), cpu, card).tensor_instances is False
    assert resolve_tensor_instances(SegmentConfig(), gpu, binary).tensor_instances is False
    assert (
        resolve_tensor_instances(SegmentConfig(device="cpu"), gpu, card).tensor_instances is False
    )
    config = SegmentConfig(tensor_instances=True)
    assert resolve_tensor_instances(config, cpu, card).tensor_instances is True
    with pytest.raises(ConfigError, match="target mode 'binary' has no tensor path"):
        resolve_tensor_instances(config, gpu, binary)


def test_a_predictor_whose_tensor_instances_fail_hands_on_probabilities(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Out of GPU memory, say: the actor warns once and post-processing finds the instances."""
    from wsi_pipeline.segment import predictor as predictor_module

    calls = []

    def fails(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(predictor_module, "tensor_instances", fails)
    predictor = Predictor(DEFAULT_MODEL, device="cpu", tensor_instances=True)
    tiles = np.full((2, 64, 64, 3), 200, dtype=np.uint8)
    for _ in range(2):
        batch = predictor({"image": tiles.copy()})
        assert "labels" not in batch and batch["probs"].shape == (2, 4, 64, 64)
    assert len(calls) == 1 and "post-processing finds them" in caplog.text


def test_labels_travel_in_the_smallest_dtype_the_tile_allows() -> None:
    predictor = Predictor(DEFAULT_MODEL, device="cpu", tensor_instances=True)
    batch = predictor({"image": np.full((1, 64, 64, 3), 200, dtype=np.uint8)})
    assert batch["labels"].dtype == np.uint16 and batch["probs"].shape == (1, 1, 64, 64)


def test_a_predictor_refuses_tensor_instances_for_a_binary_model(tmp_path: Path) -> None:
    model = create_model("unet", num_classes=2, base_channels=4)
    card = ModelCard(architecture="unet", kwargs={"base_channels": 4}, num_classes=2, mpp=0.5)
    card = card.model_copy(update={"target_mode": "binary"})
    checkpoint = save_checkpoint(tmp_path / "binary", model, card)
    with pytest.raises(ValueError, match="no tensor path for 'binary'"):
        Predictor(str(checkpoint), device="cpu", tensor_instances=True)


@pytest.mark.shared_data
def test_the_shipped_model_finds_the_same_nuclei_both_ways_on_real_tiles() -> None:
    """MoNuSeg tiles at the model's 0.5 µm/px, the predictor as the job runs it."""
    images = sorted(shared_path("monuseg_train", "images").glob("*.png"))[:3]
    tiles = np.stack(
        [
            np.asarray(Image.open(p).convert("RGB").resize((512, 512), Image.BILINEAR))
            for p in images
        ]
    )
    predictor = Predictor(DEFAULT_MODEL, device="cpu", tensor_instances=True)
    probs = predictor.predict(tiles)
    batch = predictor({"image": tiles.copy()})
    post = predictor.card.postprocess.model_dump()
    for tile_probs, labels, background in zip(probs, batch["labels"], batch["probs"], strict=True):
        expected = instances_from_probabilities(
            dequantize(quantize(tile_probs)), predictor.card.target_mode, **post
        )
        assert labels.dtype == np.uint16 and labels.max() > 300
        assert abs(int(labels.max()) - int(expected.max())) <= 2
        assert (labels != expected).mean() < 0.001
        assert score_image(expected, labels.astype(np.int32))["aji"] > 0.995
        np.testing.assert_array_equal(background[0], quantize(tile_probs[:1])[0])
    assert batch["predictor_instances_s"].shape == batch["forward_s"].shape == (3,)
    assert np.allclose(rounded_to_levels(torch.tensor([0.5 / 255, 0.2])).numpy() * 255, [0, 51])


@pytest.mark.shared_data
@pytest.mark.usefixtures("ray_local")
def test_segment_writes_the_same_nuclei_with_tensor_instances(tmp_path: Path) -> None:
    """The user's view: `segment` on a mosaic of real MoNuSeg tiles, with and without
    ``tensor_instances``, writes the same nuclei within a few boundary pixels."""
    slide = tmp_path / "mosaic.tiff"
    tiles = shared_path("monuseg_train")
    assert (
        main(["synth-slide", "--tiles", str(tiles), "--out", str(slide), "--size", "1600x1200"])
        == 0
    )
    runs = {  # the CPU layout, then the GPU one: the predictor's labels go to CPU tasks
        "scipy": ["tensor_instances=false"],
        "tensor": ["tensor_instances=true"],
        "tensor-tasks": ["tensor_instances=true", "postprocess_in_predictor=false"],
    }
    polygons = {}
    for name, settings in runs.items():
        out = tmp_path / name
        argv = ["segment", str(slide), "--out", str(out)]
        assert main(argv + [arg for s in settings for arg in ("--set", s)]) == 0
        with gzip.open(out / "mosaic.geojson.gz", "rt") as f:
            polygons[name] = [shape(feature["geometry"]) for feature in json.load(f)["features"]]
        assert settings[0].replace("=", ": ") in (out / "segment-config.yaml").read_text()
    assert sorted(p.wkb for p in polygons["tensor"]) == sorted(
        p.wkb for p in polygons["tensor-tasks"]
    )
    scipy_path, tensor_path = polygons["scipy"], polygons["tensor"]
    assert len(scipy_path) > 500 and abs(len(tensor_path) - len(scipy_path)) <= 3
    tree = shapely.STRtree(tensor_path)
    best = []
    for polygon in scipy_path:
        hits = tree.query(polygon, predicate="intersects")
        union = [shapely.union(polygon, tensor_path[j]).area for j in hits]
        inter = [shapely.intersection(polygon, tensor_path[j]).area for j in hits]
        best.append(max((i / u for i, u in zip(inter, union, strict=True)), default=0.0))
    best = np.array(best)
    figures = [(best > t).mean() for t in (0.5, 0.9, 0.999)] + [best.mean()]
    # Every nucleus is found both ways; a few percent trade a boundary pixel with a neighbour.
    assert figures[0] > 0.998 and figures[1] > 0.99 and figures[2] > 0.9, figures
    assert figures[3] > 0.995, figures


def test_the_instances_benchmark_prints_both_paths_and_their_agreement(tmp_path: Path) -> None:
    script = REPO / "benchmarks" / "instances.py"
    argv = [sys.executable, str(script), "--data", str(tmp_path), "--tiles", "2", "--device", "cpu"]
    done = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=600)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["source"] == "synthetic" and result["tiles"] == 2 and result["instances"] > 20
    assert result["scipy_ms_per_tile"] > 0 and result["tensor_ms_per_tile"] > 0
    ratio = result["scipy_ms_per_tile"] / result["tensor_ms_per_tile"]
    assert result["ratio_scipy_vs_tensor"] == pytest.approx(ratio, rel=0.05)
    assert result["equal_pixels"] > 0.999 and result["min_aji_between"] > 0.99, result
