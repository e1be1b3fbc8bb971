"""``wsi-pipeline``: the command line. Parses arguments, configures logging, starts Ray.

Every error a user can cause (a missing slide, a typo in a config, a bad value) ends as one line
on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
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

logger = logging.getLogger("wsi_pipeline")

EXIT_FAILED, EXIT_USAGE = 1, 2


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _size(text: str) -> tuple[int, int]:
    try:
        w, _, h = text.lower().partition("x")
        return int(w), int(h or w)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}") from None


def _init_ray() -> None:
    """Connect to ``RAY_ADDRESS`` if set, else start a local Ray; quiet unless asked."""
    import ray

    if not ray.is_initialized():
        ray.init(logging_level=logging.WARNING, log_to_driver=True)


# --- info -----------------------------------------------------------------------------------


def cmd_info(args: argparse.Namespace) -> int:
    from wsi_pipeline.slide import SlideError, open_slide
    from wsi_pipeline.tissue import detect_tissue

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
    return EXIT_FAILED if failed else 0


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


def _config(model: type, args: argparse.Namespace) -> Any:
    """``model`` from ``--config`` with every flag named like a field, and ``--set``, on top."""
    from wsi_pipeline.config import load_config, parse_assignments

    overrides = {name: getattr(args, name) for name in model.model_fields if hasattr(args, name)}
    return load_config(model, args.config, {**overrides, **parse_assignments(args.set)})


def _run_batch(
    args: argparse.Namespace,
    model: type,
    run: Callable[..., list[Any]],
    name: str,
    describe: Callable[[Any], str],
) -> int:
    """What tile and segment share: config, inputs, Ray, the run, saved config, summary, report."""
    from wsi_pipeline.config import dump_config
    from wsi_pipeline.inputs import expand_inputs
    from wsi_pipeline.storage import write_results_csv

    config = _config(model, args)
    slides = expand_inputs(args.inputs)
    _init_ray()
    start = time.perf_counter()
    results = run(slides, args.out, config)
    Path(args.out, f"{name}-config.yaml").write_text(dump_config(config))
    summary = os.path.join(args.out, "summary.csv")
    write_results_csv(results, summary, exclude=("errors",))
    for r in results:
        print(f"{r.status:>9}  {r.slide}  ({r.reason or describe(r)})")
    counts = {s: sum(r.status == s for r in results) for s in ("complete", "skipped", "failed")}
    print(
        f"{len(results)} slides in {time.perf_counter() - start:.1f} s: "
        f"{counts['complete']} complete, {counts['skipped']} skipped, {counts['failed']} failed; "
        f"summary: {summary}"
    )
    return EXIT_FAILED if counts["failed"] else 0


def cmd_tile(args: argparse.Namespace) -> int:
    from wsi_pipeline.config import TileConfig
    from wsi_pipeline.pipeline import tile_slides

    def describe(r: Any) -> str:
        return f"{r.shards} shards, {r.tiles} tiles -> {r.output}"

    return _run_batch(args, TileConfig, tile_slides, "tile", describe)


# --- segment --------------------------------------------------------------------------------


def cmd_segment(args: argparse.Namespace) -> int:
    from wsi_pipeline.config import SegmentConfig
    from wsi_pipeline.segment import segment_slides

    def describe(r: Any) -> str:
        return f"{r.nuclei} nuclei, {r.tiles} tiles, {r.seconds:.1f} s -> {r.geojson}"

    return _run_batch(args, SegmentConfig, segment_slides, "segment", describe)


def cmd_preview(args: argparse.Namespace) -> int:
    from wsi_pipeline.preview import render_preview
    from wsi_pipeline.tiling import Box

    region = None
    if args.region:
        try:
            x, y, w, h = (int(v) for v in args.region.split(","))
        except ValueError:
            raise CliError(
                f"--region: expected x,y,w,h in level-0 px, got {args.region!r}"
            ) from None
        region = Box(x, y, x + w, y + h)
    count = render_preview(
        args.slide,
        args.geojson,
        args.out,
        region=region,
        max_size=args.max_size,
        backend=args.backend,
        mpp_override=args.mpp_override,
    )
    print(f"wrote {args.out}: {count} nuclei drawn")
    return 0


# --- synth-slide ----------------------------------------------------------------------------


def cmd_synth_slide(args: argparse.Namespace) -> int:
    from wsi_pipeline import synthetic

    width, height = args.size
    if args.tiles:
        sources = synthetic.load_annotated_tiles(args.tiles)
    else:
        sources = synthetic.synthetic_sources(mpp=args.mpp, seed=args.seed)
    slide = synthetic.MosaicSlide(sources, width, height, seed=args.seed)
    start = time.perf_counter()
    synthetic.write_tiff(slide, args.out, mpp=args.mpp, quality=args.quality)
    truth = args.truth or _default_truth(args.out)
    count = synthetic.write_truth(slide, truth)
    print(
        f"wrote {args.out}: {width}x{height} px at {args.mpp} µm/px, {slide.levels} levels, "
        f"{count} nuclei in {time.perf_counter() - start:.1f} s; truth: {truth}"
    )
    return 0


def _default_truth(out: str) -> str:
    stem = out
    for suffix in (".tiff", ".tif"):
        stem = stem.removesuffix(suffix)
    return f"{stem}.truth.geojson.gz"


# --- demo -----------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    """Generate a slide, segment it with the default model, draw the overlay, score it."""
    from wsi_pipeline.checkpoint import resolve_checkpoint

    checkpoint = resolve_checkpoint(args.checkpoint)  # fails early, before any work
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slide, truth = out / "demo-slide.tiff", out / "demo-slide.truth.geojson.gz"
    results, overlay = out / "results", out / "demo-slide-overlay.png"
    size = f"{args.size[0]}x{args.size[1]}"
    print(f"[1/4] synthetic H&E slide, {size} px at 0.25 µm/px, known nuclei -> {slide}")
    main(["synth-slide", "--out", str(slide), "--size", size, "--mpp", "0.25"])
    print(f"[2/4] segmenting it with {checkpoint.name} on local Ray -> {results}")
    argv = ["segment", str(slide), "--checkpoint", str(checkpoint), "--out", str(results)]
    status = main([*argv, "--overwrite"])
    if status:
        return status
    geojson = results / "demo-slide.geojson.gz"
    print(f"[3/4] overlay -> {overlay}")
    w, h = args.size
    region = f"{w // 4},{h // 4},{min(w // 2, 2048)},{min(h // 2, 2048)}"
    main(["preview", str(slide), str(geojson), "--out", str(overlay), "--region", region])
    print("[4/4] scoring against the slide's ground truth")
    print("      " + json.dumps(_score_against_truth(geojson, truth)))
    print(
        f"done. In QuPath: File > Open {slide.resolve()}, then File > Import objects "
        f"(or drag) {geojson.resolve()}; the truth is {truth.resolve()}"
    )
    return 0


def _score_against_truth(geojson: Path, truth: Path) -> dict[str, float]:
    from shapely.geometry import shape

    from wsi_pipeline.export import read_features
    from wsi_pipeline.metrics import polygon_detection_scores

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
    parser.add_argument("--backend", choices=["auto", "openslide", "tiffslide"], default=None)
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
    p.add_argument("--out", required=True, help="output directory (local or fsspec URL)")
    p.add_argument("--config", help="YAML file (see configs/tile.yaml)")
    p.add_argument("--mpp", type=float, help="target resolution, µm/px (default 0.5)")
    p.add_argument("--tile", type=int, help="tile = chunk size in px (default 512)")
    p.add_argument("--overlap", type=int)
    p.add_argument("--shard-tiles", type=int, help="tiles per shard side (default 8)")
    p.add_argument("--workers", type=int, help="concurrent shard tasks (default: all CPUs)")
    p.add_argument("--overwrite", action="store_const", const=True, help="rewrite complete stores")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config key")
    _slide_options(p)
    p.set_defaults(func=cmd_tile)

    p = sub.add_parser("segment", help="slides or tiling stores -> QuPath GeoJSON nuclei")
    p.add_argument("inputs", nargs="+", help="slides, globs, directories, CSV manifests, stores")
    p.add_argument("--checkpoint", help="checkpoint directory (model.pt + model.json)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--config", help="YAML file (see configs/segment.yaml)")
    p.add_argument("--tile", type=int, help="tile px at the model's mpp (default 512)")
    p.add_argument("--overlap", type=int, help="px at the model's mpp (default 64)")
    p.add_argument("--batch-size", type=int, help="tiles per predictor call (default 8)")
    p.add_argument("--tta", action="store_const", const=True, help="flip test-time augmentation")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--predictors", type=int, help="predictor actors (default: GPUs or 1)")
    p.add_argument(
        "--no-gzip", dest="gzip", action="store_const", const=False, help="write plain .geojson"
    )
    p.add_argument(
        "--labels", action="store_const", const=True, help="also write <slide>.labels.zarr"
    )
    p.add_argument("--overwrite", action="store_const", const=True, help="redo complete slides")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config key")
    _slide_options(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("preview", help="PNG overlay of nuclei polygons on a slide")
    p.add_argument("slide")
    p.add_argument("geojson")
    p.add_argument("--out", required=True, help="output .png")
    p.add_argument("--region", help="x,y,w,h in level-0 px (default: whole slide)")
    p.add_argument("--max-size", type=int, default=2048, help="longest side of the PNG")
    _slide_options(p)
    p.set_defaults(func=cmd_preview, backend="auto")

    from wsi_pipeline import cli_train

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
    from wsi_pipeline.config import ConfigError
    from wsi_pipeline.inputs import InputError
    from wsi_pipeline.slide import SlideError

    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        _configure_logging(args.verbose)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ConfigError, InputError, SlideError, CliError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
