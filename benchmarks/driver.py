"""How many tiles/s one segment job's driver can stitch and write, in one process.

The driver's share of the segment job is the only part that does not scale out, so it caps one
job's throughput. Post-processed tile rows are made once (synthetic nuclei at 0.5 µm/px through
the real post-processing), then fed to the driver's writer twice in the same run:

* ``fast``: the shipped path: tasks send finished GeoJSON text; only seam nuclei are stitched;
* ``all_stitched``: the baseline: every nucleus goes through the seam resolver as polygons.

Prints one JSON line:

    python benchmarks/driver.py --size 4096
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from wsi_pipeline import synthetic
from wsi_pipeline.checkpoint import ModelCard
from wsi_pipeline.config import SegmentConfig
from wsi_pipeline.segment.job import SlideOutputs, SlidePlan, postprocess_tile
from wsi_pipeline.segment.quantize import quantize
from wsi_pipeline.slides.tiling import TileGrid
from wsi_pipeline.train.targets import make_target, one_hot


def tile_rows(size: int, tile: int, overlap: int, keep_all: bool) -> tuple[SlidePlan, list[dict]]:
    """Post-processed rows of every tile of a ``size``² px synthetic image at 0.5 µm/px."""
    sources = synthetic.synthetic_sources(4, 512, mpp=0.5, seed=0)
    mosaic = synthetic.MosaicSlide(sources, size, size, seed=1, tissue_fraction=1.0, levels=1)
    grid = TileGrid(size, size, tile, overlap)
    plan = SlidePlan(
        slide="bench",
        stem="bench",
        source="slide",
        path="bench",
        backend="openslide",
        level0_mpp=0.25,
        downsample=2.0,
        width=size,
        height=size,
        tile=tile,
        overlap=overlap,
        tissue_mm2=(size * 0.5e-3) ** 2,
        tiles=[(t.col, t.row) for t in grid],
    )
    card = ModelCard(architecture="unet", mpp=0.5)
    plans = {"bench": plan.for_tasks()}
    rows = []
    for t in grid:
        labels = mosaic.render_labels(t.box).astype(np.int32)
        probs = ndi.gaussian_filter(one_hot(make_target(labels), 3), sigma=(0, 1, 1))
        row = {
            "slide": "bench",
            "col": t.col,
            "row": t.row,
            "error": "",
            "probs": quantize(probs),
        }
        rows.append(postprocess_tile(row, plans, card, 0.0, 8.0, keep_all))
    return plan, rows


def drive(plan: SlidePlan, rows: list[dict], out: str) -> tuple[float, int]:
    """Seconds for the driver to take every row and finish the slide; nuclei written."""
    card = ModelCard(architecture="unet", mpp=0.5)
    start = time.perf_counter()
    writer = SlideOutputs(plan, out, card, SegmentConfig())
    for row in rows:
        writer.add(row)
    result = writer.finish()
    return time.perf_counter() - start, result.nuclei


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="image side, px at 0.5 µm/px")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=64)
    args = parser.parse_args()
    result: dict[str, object] = {"benchmark": "driver", "size": args.size, "tile": args.tile}
    with tempfile.TemporaryDirectory() as tmp:
        for name, keep_all in [("fast", False), ("all_stitched", True)]:
            plan, rows = tile_rows(args.size, args.tile, args.overlap, keep_all)
            seconds, nuclei = drive(plan, rows, str(Path(tmp) / name))
            result[f"{name}_tiles_per_s"] = round(len(rows) / seconds, 1)
            result[f"{name}_nuclei_per_s"] = round(nuclei / seconds, 1)
            result[f"{name}_nuclei"] = nuclei
    result["tiles"] = len(rows)
    result["ratio"] = round(
        float(result["fast_tiles_per_s"]) / float(result["all_stitched_tiles_per_s"]), 2
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
