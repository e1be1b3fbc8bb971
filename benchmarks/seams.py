"""Do seams cost accuracy? Whole-slide segmentation vs the same model on each image whole.

Prints one JSON line. A mosaic slide is built from annotated images (by default MoNuSeg's
``test_other_organ`` split, which the shipped model never saw), so its ground truth is exact. The
same checkpoint then segments it four ways:

* ``whole_slide``: the ``segment`` job (tiles with overlap, seams stitched, GeoJSON), its polygons
  rasterised back at pixel centres;
* ``one_tile``: the same job with one tile as large as the slide: the same reads, tissue mask,
  polygons and GeoJSON, but no seam anywhere;
* ``whole_image``: the whole mosaic predicted as one image by ``evaluate``'s code (no Ray, no
  tiles, no polygons);
* ``per_image``: every mosaic cell (one source image under a flip or rotation), read from the same
  slide file and predicted alone, as ``evaluate`` predicts each image.

All four are scored against the truth cell by cell and averaged over cells, as ``evaluate``
averages over images. The ratios split the difference between the job and ``evaluate``:
``seam_ratio_*`` = whole_slide / one_tile (the seams; 1.0 = they cost nothing),
``pipeline_ratio_aji`` = one_tile / whole_image (reads, tissue mask, polygons; on the project's
two-fold pyramids the job reads 0.5 µm/px from the JPEG level 1, where ``evaluate`` area-averages
level 0) and
``context_ratio_aji`` = whole_image / per_image (a mosaic cell's neighbours are other images,
where ``evaluate`` pads each image with its reflection).

    python benchmarks/seams.py --data ../shared/data/monuseg_train --split test_other_organ
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from wsi_pipeline import synthetic
from wsi_pipeline.checkpoint import (
    load_checkpoint,
    read_card,
    resolve_checkpoint,
)
from wsi_pipeline.config import SegmentConfig
from wsi_pipeline.forward import choose_device
from wsi_pipeline.segment.job import resolve_for_hardware
from wsi_pipeline.slide_scoring import build_mosaic, load_sources, score_cells, segment_labels
from wsi_pipeline.slides.slide import open_slide
from wsi_pipeline.slides.tiling import Box
from wsi_pipeline.train.evaluation import predict_instances


def evaluate_labels(
    slide_path: str,
    mosaic: synthetic.MosaicSlide,
    checkpoint: str,
    mpp: float,
    device: str,
    *,
    per_cell: bool,
) -> np.ndarray:
    """Level-0 labels from ``evaluate``'s code on the whole slide, or on every cell alone."""
    torch_device = choose_device(device)
    model, card = load_checkpoint(checkpoint, device=torch_device)
    slide = open_slide(slide_path)
    labels = np.zeros((mosaic.height, mosaic.width), dtype=np.int32)
    offset = 0
    boxes = (
        [box for _, box in mosaic.tissue_cells()]
        if per_cell
        else [Box(0, 0, mosaic.width, mosaic.height)]
    )
    for box in boxes:
        box = box.clip(mosaic.width, mosaic.height)
        rgb = slide.read_region(box.x0, box.y0, box.width, box.height, mpp=mpp)
        cell = predict_instances(model, card, rgb, mpp, torch_device)
        labels[box.y0 : box.y1, box.x0 : box.x1] = np.where(cell > 0, cell + offset, 0)
        offset += int(cell.max())
    return labels


def measure(
    data: str,
    splits: list[str],
    *,
    cells: int = 3,
    checkpoint: str | None = None,
    tile: int = 512,
    overlap: int = 64,
    device: str = "auto",
    seed: int = 0,
    tensor_instances: bool | None = None,
) -> dict:
    """Build the mosaic, segment it four ways and score each (Ray must be initialised)."""
    sources, mpp = load_sources(data, splits)
    mosaic = build_mosaic(sources, cells, seed)
    side = mosaic.width
    checkpoint = str(resolve_checkpoint(checkpoint))
    config = SegmentConfig(
        checkpoint=checkpoint,
        tile=tile,
        overlap=overlap,
        device=device,
        tensor_instances=tensor_instances,
    )
    import ray

    card = read_card(checkpoint)
    config = resolve_for_hardware(config, ray.cluster_resources(), card)
    # One tile covering the slide at the model's mpp, rounded up to a multiple of 64 px.
    one_tile = -(-round(side * mpp / card.mpp) // 64) * 64
    with tempfile.TemporaryDirectory() as tmp:
        slide = str(Path(tmp) / "seams.tiff")
        synthetic.write_tiff(mosaic, slide, mpp=mpp, quality=95)
        start = time.perf_counter()
        tiled = segment_labels(slide, mosaic, config, f"{tmp}/tiled")
        tiled_s = time.perf_counter() - start
        single = config.model_copy(update={"tile": one_tile, "overlap": 0})
        untiled = segment_labels(slide, mosaic, single, f"{tmp}/one")
        whole_image = evaluate_labels(slide, mosaic, checkpoint, mpp, device, per_cell=False)
        per_image = evaluate_labels(slide, mosaic, checkpoint, mpp, device, per_cell=True)
    truth = mosaic.render_labels(Box(0, 0, mosaic.width, mosaic.height))
    variants = [
        ("whole_slide", tiled),
        ("one_tile", untiled),
        ("whole_image", whole_image),
        ("per_image", per_image),
    ]
    scores = {name: score_cells(mosaic, truth, labels) for name, labels in variants}
    whole, one, image = (scores[k]["aji"] for k in ("whole_slide", "one_tile", "whole_image"))
    return {
        "benchmark": "seams",
        "data": data,
        "split": ",".join(splits),
        "checkpoint": checkpoint,
        "slide_px": side,
        "cells": sum(1 for _ in mosaic.tissue_cells()),
        "tile": tile,
        "overlap": overlap,
        "tensor_instances": config.tensor_instances,
        **scores,
        "seam_ratio_aji": round(whole / one, 4),
        "seam_ratio_dice": round(scores["whole_slide"]["dice"] / scores["one_tile"]["dice"], 4),
        "pipeline_ratio_aji": round(one / image, 4),
        "context_ratio_aji": round(image / scores["per_image"]["aji"], 4),
        "whole_slide_s": round(tiled_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/monuseg_train", help="folder dataset")
    parser.add_argument("--split", default="test_other_organ", help="comma-separated; '' = all")
    parser.add_argument("--cells", type=int, default=3, help="mosaic cells per side")
    parser.add_argument("--checkpoint", help="checkpoint or shipped name (default: the default)")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tensor-instances",
        action=argparse.BooleanOptionalAction,
        help="instances found in the predictor, as tensors (default: the job's, on a GPU only)",
    )
    args = parser.parse_args()

    import ray

    ray.init(logging_level="ERROR", include_dashboard=False)
    splits = [s for s in args.split.split(",") if s]
    result = measure(
        args.data,
        splits,
        cells=args.cells,
        checkpoint=args.checkpoint,
        tile=args.tile,
        overlap=args.overlap,
        device=args.device,
        seed=args.seed,
        tensor_instances=args.tensor_instances,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
