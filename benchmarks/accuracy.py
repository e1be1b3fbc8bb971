"""How accurate is a checkpoint, through the whole-slide path and through ``evaluate``?

Prints one JSON line. For each split of a folder dataset (by default MoNuSeg's
``test_same_organ`` and the unseen ``test_other_organ``), in the same run:

* ``whole_slide``: the split's images as one mosaic slide (a JPEG pyramid, as scanners write
  them), segmented by the ``segment`` job and scored cell by cell;
* ``evaluate``: ``wsi-pipeline evaluate``'s code on the original images;
* ``oracle``: the true labels taken to the model's pixel grid and back: the ceiling that the
  model's resolution leaves (1.0 = resolution costs nothing);
* ``ratio_whole_slide_vs_evaluate``: what the slide path (JPEG pyramid reads, tiles, polygons)
  costs against scoring the images directly.

``--pixel-grid`` traces the job's outlines on the model's pixel grid instead of the nucleus
probability (``segment --set subpixel=false``); ``--tta`` averages the slide path's predictions
over flips (``segment --tta``; ``evaluate`` has none).

    python benchmarks/accuracy.py --checkpoint nuclei-unet16
    python benchmarks/accuracy.py --checkpoint runs/x/best --splits test_other_organ
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from wsi_pipeline.checkpoint import read_card, resolve_checkpoint
from wsi_pipeline.config import SegmentConfig
from wsi_pipeline.segment.job import resolve_for_hardware
from wsi_pipeline.slide_scoring import load_sources, oracle_ceiling, whole_slide_scores
from wsi_pipeline.train.evaluation import SCORES, evaluate_checkpoint


def measure(
    data: str,
    splits: list[str],
    checkpoint: str | None = None,
    *,
    tile: int = 512,
    overlap: int = 64,
    device: str = "auto",
    cells: int | None = None,
    subpixel: bool = True,
    tta: bool | None = None,
    tensor_instances: bool | None = None,
) -> dict:
    """Score ``checkpoint`` on each split three ways (Ray must be initialised)."""
    import ray

    checkpoint = str(resolve_checkpoint(checkpoint))
    card = read_card(checkpoint)
    config = SegmentConfig(
        checkpoint=checkpoint,
        tile=tile,
        overlap=overlap,
        device=device,
        subpixel=subpixel,
        tta=tta,
        tensor_instances=tensor_instances,
    )
    config = resolve_for_hardware(config, ray.cluster_resources(), card)  # unset: as the job
    result: dict = {
        "benchmark": "accuracy",
        "checkpoint": checkpoint,
        "mpp": card.mpp,
        "subpixel": subpixel,
        "tta": config.tta,
        "tensor_instances": config.tensor_instances,
    }
    for split in splits:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            slide = whole_slide_scores(data, [split], config, tmp, cells=cells)
        evaluated = evaluate_checkpoint(checkpoint, data, splits=[split], device=device)
        sources, mpp = load_sources(data, [split])
        oracle = oracle_ceiling([labels for _, labels in sources], mpp, card.mpp)
        result[split] = {
            "whole_slide": slide,
            "evaluate": {k: round(evaluated[k], 4) for k in SCORES},
            "oracle": oracle,
            "ratio_whole_slide_vs_evaluate": round(slide["aji"] / evaluated["aji"], 4),
            "seconds": round(time.perf_counter() - start, 1),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/monuseg_train", help="folder dataset")
    parser.add_argument("--splits", default="test_same_organ,test_other_organ")
    parser.add_argument("--checkpoint", help="checkpoint or shipped name (default: the default)")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cells", type=int, help="mosaic cells per side (default: all images)")
    parser.add_argument(
        "--pixel-grid", action="store_true", help="outlines on the model's pixel grid"
    )
    parser.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        help="flip test-time augmentation in the slide path (default: the job's, on a GPU only)",
    )
    parser.add_argument(
        "--tensor-instances",
        action=argparse.BooleanOptionalAction,
        help="instances found in the predictor, as tensors (default: the job's, on a GPU only)",
    )
    args = parser.parse_args()

    import ray

    ray.init(logging_level="ERROR", include_dashboard=False)
    splits = [s for s in args.splits.split(",") if s]
    result = measure(
        args.data,
        splits,
        args.checkpoint,
        tile=args.tile,
        overlap=args.overlap,
        device=args.device,
        cells=args.cells,
        subpixel=not args.pixel_grid,
        tta=args.tta,
        tensor_instances=args.tensor_instances,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
