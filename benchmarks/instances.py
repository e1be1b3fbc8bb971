"""Instance extraction per tile: scipy on one CPU core vs tensor operations on a device.

Prints one JSON line. The shipped model's probabilities of ``--tiles`` tiles of 512² at its
0.5 µm/px (MoNuSeg training images, resized, from ``--data``; tiles of a synthetic slide where
that folder is absent) are made once; then, on the same probabilities:

* ``scipy_ms_per_tile``: :func:`~wsi_pipeline.segment.instances.instances_from_probabilities`,
  one tile at a time on one thread (what a CPU post-process task runs);
* ``tensor_ms_per_tile``: :func:`~wsi_pipeline.segment.tensor_instances.tensor_instances` on
  ``--device``, in batches of ``--batch-size`` (what the predictor runs with
  ``tensor_instances``), after one warm-up batch;
* ``ratio_scipy_vs_tensor`` (above 1: the tensor path is faster per tile) and the agreement
  of the two: the fraction of equal pixels, the lowest AJI of one against the other, and the
  largest difference in instance count.

Examples (the README's figures):

    python benchmarks/instances.py --device cpu
    python benchmarks/instances.py --device cuda --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from wsi_pipeline import synthetic
from wsi_pipeline.checkpoint import DEFAULT_MODEL
from wsi_pipeline.metrics import score_image
from wsi_pipeline.segment.instances import instances_from_probabilities
from wsi_pipeline.segment.predictor import Predictor
from wsi_pipeline.segment.quantize import dequantize, quantize
from wsi_pipeline.segment.tensor_instances import tensor_instances
from wsi_pipeline.slides.tiling import Box

TILE = 512


def load_tiles(data: Path, count: int) -> tuple[np.ndarray, str]:
    """``count`` RGB tiles at 0.5 µm/px, and where they came from."""
    images = sorted((data / "images").glob("*.png"))
    if images:
        picked = [images[i % len(images)] for i in range(count)]
        tiles = [np.asarray(Image.open(p).convert("RGB").resize((TILE, TILE))) for p in picked]
        return np.stack(tiles), str(data)
    side = TILE * 4
    mosaic = synthetic.MosaicSlide(synthetic.synthetic_sources(mpp=0.25), side * 2, side * 2)
    corners = [(x, y) for y in range(0, side, TILE) for x in range(0, side, TILE)]
    boxes = [Box(x, y, x + TILE, y + TILE) for x, y in corners]
    rendered = [mosaic.render(boxes[i % len(boxes)], level=1) for i in range(count)]
    return np.stack(rendered), "synthetic"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/monuseg_train")
    parser.add_argument("--tiles", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--checkpoint", help="checkpoint or shipped name (default: the default)")
    args = parser.parse_args()

    tiles, source = load_tiles(Path(args.data), args.tiles)
    checkpoint = args.checkpoint or DEFAULT_MODEL
    predictor = Predictor(checkpoint, device=args.device)
    card, device = predictor.card, predictor.device
    post = card.postprocess.model_dump()
    chunks = [quantize(predictor.predict(tiles[i : i + 4])) for i in range(0, len(tiles), 4)]
    probs = dequantize(np.concatenate(chunks))

    torch.set_num_threads(1)  # one core each, as a post-process task has (the GPU: no matter)
    start = time.perf_counter()
    expected = [instances_from_probabilities(p, card.target_mode, **post) for p in probs]
    scipy_s = time.perf_counter() - start

    size = args.batch_size  # on the device already, as the predictor's probabilities are
    batches = [torch.from_numpy(probs[i : i + size]).to(device) for i in range(0, len(probs), size)]
    tensor_instances(batches[0], card.target_mode, **post)  # warm-up
    found = []
    start = time.perf_counter()
    for batch in batches:
        found.extend(tensor_instances(batch, card.target_mode, **post).cpu().numpy())
    tensor_s = time.perf_counter() - start

    pairs = list(zip(expected, found, strict=True))
    agreement = [score_image(a, b)["aji"] for a, b in pairs]
    counts = [abs(int(a.max()) - int(b.max())) for a, b in pairs]
    result = {
        "benchmark": "instances",
        "tiles": len(tiles),
        "source": source,
        "checkpoint": checkpoint,
        "device": str(device),
        "batch_size": args.batch_size,
        "scipy_ms_per_tile": round(scipy_s / len(tiles) * 1e3, 2),
        "tensor_ms_per_tile": round(tensor_s / len(tiles) * 1e3, 2),
        "ratio_scipy_vs_tensor": round(scipy_s / tensor_s, 3),
        "equal_pixels": round(float(np.mean([(a == b).mean() for a, b in pairs])), 6),
        "min_aji_between": round(min(agreement), 4),
        "max_count_difference": max(counts),
        "instances": int(sum(int(a.max()) for a in expected)),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
