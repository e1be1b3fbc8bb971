"""Tiling throughput: the Ray Data job vs a plain OpenSlide read loop over the same tiles.

Prints one JSON line. Example (the README's figure):

    python benchmarks/tiling.py --size 16384 --workers 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import openslide
from PIL import Image

from wsi_pipeline import synthetic
from wsi_pipeline.config import TileConfig
from wsi_pipeline.slides.image_store import read_layout
from wsi_pipeline.slides.slide import open_slide
from wsi_pipeline.slides.tile_job import store_path, tile_slides
from wsi_pipeline.slides.tiling import Box
from wsi_pipeline.slides.tissue import detect_tissue


def tissue_tiles(slide_file: str, config: TileConfig, out: str) -> list[Box]:
    """The tiles the job read (those the tissue mask keeps), from the store it wrote."""
    layout = read_layout(store_path(out, slide_file))
    tissue = detect_tissue(open_slide(slide_file))
    t = layout.tile
    boxes = [
        Box(x, y, x + t, y + t)
        for y in range(0, layout.height, t)
        for x in range(0, layout.width, t)
    ]
    return [b for b in boxes if tissue.has_tissue(b, layout.mpp, config.tissue.min_fraction)]


def plain_openslide_loop(slide_file: str, tiles: list[Box], mpp: float, tile: int) -> float:
    """Seconds for the naive baseline: OpenSlide read_region at level 0 + resize, one process."""
    slide = openslide.OpenSlide(slide_file)
    ds = mpp / float(slide.properties["openslide.mpp-x"])
    size = round(tile * ds)
    start = time.perf_counter()
    for box in tiles:
        region = slide.read_region((round(box.x0 * ds), round(box.y0 * ds)), 0, (size, size))
        region.convert("RGB").resize((tile, tile), Image.Resampling.BOX)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=16384, help="synthetic slide side, px")
    parser.add_argument("--mpp", type=float, default=0.5)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    args = parser.parse_args()

    import ray

    ray.init(logging_level="ERROR", include_dashboard=False)
    with tempfile.TemporaryDirectory() as tmp:
        slide_file = str(Path(tmp) / "bench.tiff")
        mosaic = synthetic.MosaicSlide(
            synthetic.synthetic_sources(mpp=0.25), args.size, args.size, seed=0
        )
        synthetic.write_tiff(mosaic, slide_file, mpp=0.25)
        result: dict[str, object] = {
            "benchmark": "tiling",
            "slide_px": args.size,
            "mpp": args.mpp,
            "tile": args.tile,
            "cpus": os.cpu_count(),
        }
        # Warm-up: start Ray's worker processes and import their libraries once, untimed.
        tile_slides([slide_file], str(Path(tmp) / "warm-up"), TileConfig(mpp=args.mpp))
        for workers in args.workers:
            config = TileConfig(mpp=args.mpp, tile=args.tile, workers=workers, overwrite=True)
            out = str(Path(tmp) / f"tiles-{workers}")
            start = time.perf_counter()
            (outcome,) = tile_slides([slide_file], out, config)
            seconds = time.perf_counter() - start
            assert outcome.status == "complete", outcome.reason
            result[f"job_tiles_per_s_{workers}w"] = round(outcome.tiles / seconds, 2)
        tiles = tissue_tiles(slide_file, config, out)
        baseline = len(tiles) / plain_openslide_loop(slide_file, tiles, args.mpp, args.tile)
        result["tiles"] = len(tiles)
        result["openslide_loop_tiles_per_s"] = round(baseline, 2)
        for workers in args.workers:
            tps = result[f"job_tiles_per_s_{workers}w"]
            result[f"ratio_{workers}w"] = round(float(tps) / baseline, 3)  # type: ignore[arg-type]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
