"""``wsi-pipeline``: the command line. Parses arguments, configures logging, starts Ray.

Every error a user can cause (a missing slide, a typo in a config, a bad value) ends as one line
on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from wsi_pipeline import __version__
from wsi_pipeline.cli.batch import EXIT_FAILED, EXIT_USAGE, CliError, init_ray, run_batch
from wsi_pipeline.config import SegmentConfig, TileConfig, flag_help
from wsi_pipeline.slides.tiling import Box

logger = logging.getLogger("wsi_pipeline")


def _size(text: str) -> tuple[int, int]:
    try:
        w, _, h = text.lower().partition("x")
        return int(w), int(h or w)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}") from None


# --- info -----------------------------------------------------------------------------------


def cmd_info(args: argparse.Namespace) -> int:
    from wsi_pipeline.slides.slide import SlideError, open_slide
    from wsi_pipeline.slides.tissue import detect_tissue

    failed = 0
    for path in args.slides:
        try:
            slide = open_slide(path, args.backend, mpp_override=args.mpp_override)
            info = asdict(slide.info())
            info.pop("properties")
            info["tissue_percent"] = (
                round(100 * detect_tissue(slide).fraction, 2) if slide.has_mpp else None
            )
        except SlideError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(json.dumps(info) if args.json else _format_info(info))
    return EXIT_USAGE if failed else 0


def _format_info(info: dict[str, Any]) -> str:
    mpp = f"{info['mpp']:.4g} µm/px" if info["mpp"] else "unknown (use --mpp-override)"
    tissue = f"{info['tissue_percent']:.1f} %" if info["tissue_percent"] is not None else "n/a"
    levels = ", ".join(
        f"{w}x{h} (/{ds:.4g})"
        for (w, h), ds in zip(info["level_dimensions"], info["level_downsamples"], strict=True)
    )
    return "\n".join(
        [
            info["path"],
            f"  backend    {info['backend']}",
            f"  vendor     {info['vendor'] or 'unknown'}",
            f"  levels     {info['level_count']}: {levels}",
            f"  mpp        {mpp}",
            f"  objective  {info['objective_power'] or 'unknown'}",
            f"  tissue     {tissue}",
        ]
    )


# --- tile -----------------------------------------------------------------------------------


def cmd_tile(args: argparse.Namespace) -> int:
    from wsi_pipeline.slides.tile_job import tile_slides

    def describe(r: Any) -> str:
        return f"{r.shards} shards, {r.tiles} tiles -> {r.output}"

    return run_batch(args, TileConfig, tile_slides, describe)


# --- segment --------------------------------------------------------------------------------


def cmd_segment(args: argparse.Namespace) -> int:
    from wsi_pipeline.segment.job import prepare_config, segment_slides

    def describe(r: Any) -> str:
        return f"{r.nuclei} nuclei, {r.tiles} tiles, {r.seconds:.1f} s -> {r.geojson}"

    segment = functools.partial(segment_slides, started=_process_start_time())
    return run_batch(args, SegmentConfig, segment, describe, prepare=prepare_config)


def _process_start_time() -> float:
    """When this process started, as ``time.time()`` (from ``/proc``: a command's own imports
    count; where there is no ``/proc``, now)."""
    try:
        started = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return time.time()
    return time.time() - max(uptime - started / os.sysconf("SC_CLK_TCK"), 0.0)


def cmd_preview(args: argparse.Namespace) -> int:
    from wsi_pipeline.segment.preview import render_preview

    region = None
    if args.region:
        try:
            x, y, w, h = (int(v) for v in args.region.split(","))
        except ValueError:
            raise CliError(
                f"--region: expected x,y,w,h in level-0 px, got {args.region!r}"
            ) from None
        if w <= 0 or h <= 0:
            raise CliError(f"--region: width and height must be positive, got {w}x{h}")
        region = Box(x, y, x + w, y + h)
    count = render_preview(
        args.slide,
        args.geojson,
        args.out,
        region=region,
        max_size=args.max_size,
        backend=args.backend,
        mpp_override=args.mpp_override,
        compare=args.compare,
    )
    print(f"wrote {args.out}: {count} nuclei drawn")
    return 0


# --- synth-slide ----------------------------------------------------------------------------


def cmd_synth_slide(args: argparse.Namespace) -> int:
    truth = args.truth or _default_truth(args.out)
    print(
        _write_synthetic_slide(
            args.out, args.size, mpp=args.mpp, seed=args.seed, quality=args.quality,
            truth=truth, tiles=args.tiles,
        )
    )  # fmt: skip
    return 0


def _write_synthetic_slide(
    out: str,
    size: tuple[int, int],
    *,
    mpp: float,
    truth: str,
    seed: int = 0,
    quality: int = 90,
    tiles: str | None = None,
) -> str:
    """Write a synthetic slide and its truth; the line that says what was written."""
    from wsi_pipeline import synthetic

    width, height = size
    if tiles:
        sources = synthetic.load_annotated_tiles(tiles)
    else:
        sources = synthetic.synthetic_sources(mpp=mpp, seed=seed)
    slide = synthetic.MosaicSlide(sources, width, height, seed=seed)
    start = time.perf_counter()
    synthetic.write_tiff(slide, out, mpp=mpp, quality=quality)
    count = synthetic.write_truth(slide, truth)
    return (
        f"wrote {out}: {width}x{height} px at {mpp} µm/px, {slide.levels} levels, "
        f"{count} nuclei in {time.perf_counter() - start:.1f} s; truth: {truth}"
    )


def _default_truth(out: str) -> str:
    stem = out
    for suffix in (".tiff", ".tif"):
        stem = stem.removesuffix(suffix)
    return f"{stem}.truth.geojson.gz"


# --- demo -----------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    """Generate a slide, segment it with the default model, draw the overlay, score it."""
    from wsi_pipeline.batch import COMPLETE, write_results_csv
    from wsi_pipeline.checkpoint import resolve_checkpoint
    from wsi_pipeline.segment.job import segment_slides
    from wsi_pipeline.segment.preview import render_preview

    checkpoint = resolve_checkpoint(args.checkpoint)  # fails early, before any work
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slide, truth = out / "demo-slide.tiff", out / "demo-slide.truth.geojson.gz"
    results, overlay = out / "results", out / "demo-slide-overlay.png"
    w, h = args.size
    print(f"[1/4] synthetic H&E slide, {w}x{h} px at 0.25 µm/px, known nuclei -> {slide}")
    print("      " + _write_synthetic_slide(str(slide), args.size, mpp=0.25, truth=str(truth)))
    print(f"[2/4] segmenting it with {checkpoint.name} on local Ray -> {results}")
    init_ray(args.verbose)
    config = SegmentConfig(checkpoint=str(checkpoint), overwrite=True)
    (result,) = segment_slides([str(slide)], str(results), config)
    write_results_csv([result], str(results / "summary.csv"))
    if result.status != COMPLETE:
        print(f"error: segmenting the demo slide failed: {result.reason}", file=sys.stderr)
        return EXIT_FAILED
    geojson = Path(result.geojson)
    print(f"      {result.nuclei} nuclei, {result.tiles} tiles, {result.seconds:.1f} s")
    print(f"[3/4] overlay -> {overlay}")
    region = Box(w // 4, h // 4, w // 4 + min(w // 2, 2048), h // 4 + min(h // 2, 2048))
    drawn = render_preview(str(slide), str(geojson), str(overlay), region=region)
    print(f"      {drawn} nuclei drawn")
    print("[4/4] scoring against the slide's ground truth")
    print("      " + json.dumps(_score_against_truth(geojson, truth)))
    print(
        f"done. In QuPath: File > Open {slide.resolve()}, then File > Import objects "
        f"(or drag) {geojson.resolve()}; the truth is {truth.resolve()}"
    )
    return 0


def _score_against_truth(geojson: Path, truth: Path) -> dict[str, float]:
    from shapely.geometry import shape

    from wsi_pipeline.metrics import polygon_detection_scores
    from wsi_pipeline.segment.geojson import read_features

    predicted = [shape(f["geometry"]) for f in read_features(geojson)]
    expected = [shape(f["geometry"]) for f in read_features(truth)]
    return polygon_detection_scores(predicted, expected)


def cmd_models(args: argparse.Namespace) -> int:
    """List shipped checkpoints and those found under the given directories."""
    from wsi_pipeline.checkpoint import (
        DEFAULT_MODEL,
        find_checkpoints,
        read_card,
        shipped_checkpoints,
    )

    rows = [("shipped", p) for p in shipped_checkpoints()]
    rows += [("user", p) for root in args.dirs for p in find_checkpoints(root)]
    if not rows:
        print("no checkpoints found")
        return 0
    for kind, path in rows:
        card = read_card(path)
        metrics = ", ".join(f"{k} {v:.3f}" for k, v in sorted(card.metrics.items())[:4])
        default = " (default)" if kind == "shipped" and path.name == DEFAULT_MODEL else ""
        print(
            f"{kind:>7}  {path.name if kind == 'shipped' else path}{default}\n"
            f"         {card.architecture} {card.kwargs or ''}, {card.num_classes} classes "
            f"({card.target_mode}), {card.mpp} µm/px; {metrics or 'no metrics'}"
        )
    return 0


# --- parser ---------------------------------------------------------------------------------


def _slide_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        choices=["auto", "openslide", "tiffslide"],
        default=None,
        help="slide reader (default auto)",
    )
    parser.add_argument(
        "--mpp-override", type=float, help="level-0 µm/px for slides that do not record it"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsi-pipeline",
        description="Nuclei segmentation of whole-slide images at cluster scale, with Ray.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="vendor, levels, dimensions, mpp, objective, tissue %%")
    p.add_argument("slides", nargs="+")
    _slide_options(p)
    p.add_argument("--json", action="store_true", help="one JSON line per slide")
    p.set_defaults(func=cmd_info, backend="auto")

    p = sub.add_parser("tile", help="slides -> one OME-Zarr image per slide (Ray Data)")
    p.add_argument("inputs", nargs="+", help="slides, globs, directories or a CSV manifest")
    p.add_argument("--out", required=True, help="output directory (local or mounted path)")
    p.add_argument("--config", help="YAML file (see configs/tile.yaml)")
    p.add_argument("--mpp", type=float, help=flag_help(TileConfig, "mpp"))
    p.add_argument("--tile", type=int, help=flag_help(TileConfig, "tile"))
    p.add_argument("--shard-tiles", type=int, help=flag_help(TileConfig, "shard_tiles"))
    p.add_argument("--workers", type=int, help=flag_help(TileConfig, "workers"))
    p.add_argument(
        "--overwrite", action="store_const", const=True, help=flag_help(TileConfig, "overwrite")
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config key")
    _slide_options(p)
    p.set_defaults(func=cmd_tile)

    p = sub.add_parser("segment", help="slides or tiling stores -> QuPath GeoJSON nuclei")
    p.add_argument("inputs", nargs="+", help="slides, globs, directories, CSV manifests, stores")
    p.add_argument("--checkpoint", help=flag_help(SegmentConfig, "checkpoint"))
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--config", help="YAML file (see configs/segment.yaml)")
    p.add_argument("--tile", type=int, help=flag_help(SegmentConfig, "tile"))
    p.add_argument("--overlap", type=int, help=flag_help(SegmentConfig, "overlap"))
    p.add_argument("--batch-size", type=int, help=flag_help(SegmentConfig, "batch_size"))
    p.add_argument("--tta", action="store_const", const=True, help=flag_help(SegmentConfig, "tta"))
    p.add_argument(
        "--no-tta", dest="tta", action="store_const", const=False, help="no TTA, even on a GPU"
    )
    p.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], help=flag_help(SegmentConfig, "device")
    )
    p.add_argument("--predictors", type=int, help=flag_help(SegmentConfig, "predictors"))
    p.add_argument(
        "--no-gzip", dest="gzip", action="store_const", const=False, help="write plain .geojson"
    )
    p.add_argument(
        "--labels", action="store_const", const=True, help=flag_help(SegmentConfig, "labels")
    )
    p.add_argument(
        "--overwrite", action="store_const", const=True, help=flag_help(SegmentConfig, "overwrite")
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config key")
    _slide_options(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("preview", help="PNG overlay of nuclei polygons on a slide")
    p.add_argument("slide")
    p.add_argument("geojson")
    p.add_argument("--out", required=True, help="output .png")
    p.add_argument("--region", help="x,y,w,h in level-0 px (default: whole slide)")
    p.add_argument("--max-size", type=int, default=2048, help="longest side of the PNG")
    p.add_argument(
        "--compare",
        metavar="OTHER_GEOJSON",
        help="also draw, in red, the nuclei of another run that GEOJSON lacks",
    )
    _slide_options(p)
    p.set_defaults(func=cmd_preview, backend="auto")

    from wsi_pipeline.cli import train as cli_train

    cli_train.add_commands(sub)

    p = sub.add_parser("synth-slide", help="a synthetic pyramidal TIFF with known nuclei")
    p.add_argument("--out", required=True, help="output .tiff")
    p.add_argument("--tiles", help="annotated tiles (images/ + masks/) to build a mosaic from")
    p.add_argument("--size", type=_size, default=(8192, 8192), help="WIDTHxHEIGHT in px")
    p.add_argument("--mpp", type=float, default=0.25, help="level-0 µm/px (default 0.25)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    p.add_argument("--truth", help="ground-truth GeoJSON (default: <out>.truth.geojson.gz)")
    p.set_defaults(func=cmd_synth_slide)

    p = sub.add_parser("demo", help="generate a slide and run the pipeline on it, locally")
    p.add_argument("--out", default="demo-output")
    p.add_argument("--size", type=_size, default=(4096, 4096), help="WIDTHxHEIGHT in px")
    p.add_argument("--checkpoint", help="default: the shipped nuclei model")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("models", help="list shipped checkpoints and those under DIRS")
    p.add_argument("dirs", nargs="*", help="directories to search for checkpoints (e.g. runs/)")
    p.set_defaults(func=cmd_models)
    return parser


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger().handlers[0].addFilter(lambda r: r.name.startswith("wsi_pipeline"))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``wsi-pipeline`` console script."""
    from wsi_pipeline.batch import error_line
    from wsi_pipeline.config import ConfigError
    from wsi_pipeline.segment.geojson import GeoJSONError
    from wsi_pipeline.slides.inputs import InputError
    from wsi_pipeline.slides.slide import SlideError
    from wsi_pipeline.train.ingest import DataError

    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        _configure_logging(args.verbose)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ConfigError, DataError, GeoJSONError, InputError, SlideError, CliError, OSError) as exc:
        print(f"error: {error_line(exc)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
