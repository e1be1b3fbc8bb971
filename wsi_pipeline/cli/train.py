"""``wsi-pipeline ingest | ingest-qupath | train | evaluate``: the training commands.

:func:`add_commands` registers them on the main parser's subparsers. Each command returns an exit
status; user errors raise :class:`~wsi_pipeline.config.ConfigError` or ``FileNotFoundError``,
which the main command line prints as one line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

logger = logging.getLogger(__name__)


def _splits(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def cmd_ingest(args: argparse.Namespace) -> int:
    from wsi_pipeline.train.ingest import ingest_folder

    items = ingest_folder(
        args.dataset,
        args.out,
        mpp=args.mpp,
        mpp_source=args.mpp_source,
        split_field=args.split_field,
        val_fraction=args.val_fraction,
        name=args.name,
    )
    _print_items(items, args.out, args.mpp)
    return 0


def cmd_ingest_qupath(args: argparse.Namespace) -> int:
    from wsi_pipeline.train.ingest import ingest_qupath

    items = ingest_qupath(
        args.slide,
        args.geojson,
        args.out,
        mpp=args.mpp,
        mpp_override=args.mpp_override,
        region_classes=tuple(args.region_class or ["Region"]),
        margin_um=args.margin_um,
        split=args.split,
        name=args.name,
    )
    _print_items(items, args.out, args.mpp)
    return 0


def _print_items(items: list[Any], out: str, mpp: float) -> None:
    splits: dict[str, int] = {}
    for item in items:
        splits[item.split] = splits.get(item.split, 0) + 1
    nuclei = sum(item.n_nuclei for item in items)
    counts = ", ".join(f"{n} {split}" for split, n in sorted(splits.items()))
    print(f"{out}: {len(items)} items at {mpp} µm/px ({counts}), {nuclei} nuclei")


def cmd_train(args: argparse.Namespace) -> int:
    import ray.train

    from wsi_pipeline.cli.batch import init_ray
    from wsi_pipeline.config import merge_overrides, parse_assignments
    from wsi_pipeline.train.config import load_train_config
    from wsi_pipeline.train.store import open_store
    from wsi_pipeline.train.trainer import run_training

    overrides = {
        "workers": args.workers,
        "gpu": True if args.gpu else None,
        "epochs": args.epochs,
        "name": args.name,
        "init_from": args.init_from,
        "data": {"store": args.data} if args.data else None,
    }
    config = load_train_config(args.config, merge_overrides(overrides, parse_assignments(args.set)))
    out = args.out or os.path.join("runs", config.name)
    open_store(config.data.store)  # a missing store fails before Ray starts
    # Ray Train's placement-group cleaner watches the run's controller through the state API,
    # which the dashboard serves: without it, a warning a second and no clean-up if it dies.
    init_ray(args.verbose, dashboard=True)
    try:
        summary = run_training(config, config.data.store, out)
    except ray.train.TrainingFailedError as exc:
        print(f"error: training failed: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    metric = summary["metrics"].get(config.monitor)
    picked = "the last" if metric is None else f"{config.monitor} {metric:.4f}"
    print(
        f"best checkpoint: {summary['best']} (epoch {summary['best_epoch']}, {picked}); "
        f"{summary['seconds']} s"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from wsi_pipeline.train.evaluation import evaluate_checkpoint, evaluate_predictions

    splits = _splits(args.split) if args.split else None
    if args.checkpoint:
        result = evaluate_checkpoint(
            args.checkpoint,
            args.data,
            mpp_source=args.mpp_source,
            split_field=args.split_field,
            splits=splits,
            device=args.device,
        )
    else:
        result = evaluate_predictions(
            args.pred, args.data, split_field=args.split_field, splits=splits
        )
    line = json.dumps(result)
    if args.output:
        with open(args.output, "w") as f:
            f.write(line + "\n")
    print(line)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from wsi_pipeline.train.tuning import tune_checkpoint

    result = tune_checkpoint(
        args.checkpoint,
        args.data,
        splits=_splits(args.split) if args.split else None,
        monitor=args.monitor,
        mpp_source=args.mpp_source,
        split_field=args.split_field,
        device=args.device,
        write=args.write,
    )
    print(json.dumps(result))
    return 0


def add_commands(subparsers: Any) -> None:
    """Register ``ingest``, ``ingest-qupath``, ``train``, ``evaluate`` and ``tune``."""
    p = subparsers.add_parser("ingest", help="folder dataset (images/ + masks/) -> training store")
    p.add_argument("dataset", help="folder with images/, masks/ and optionally manifest.json")
    p.add_argument("--out", required=True, help="training store (Zarr), created or extended")
    p.add_argument("--mpp", type=float, default=0.5, help="training µm/px (default 0.5)")
    p.add_argument("--mpp-source", type=float, help="µm/px of the images (default: manifest)")
    p.add_argument("--split-field", help="manifest item field with the split (default: *_split)")
    p.add_argument(
        "--val-fraction", type=float, default=0.2, help="val share when no split field (0.2)"
    )
    p.add_argument("--name", help="dataset name in the store (default: folder name)")
    p.set_defaults(func=cmd_ingest)

    p = subparsers.add_parser("ingest-qupath", help="QuPath GeoJSON nuclei on a slide -> store")
    p.add_argument("slide")
    p.add_argument("geojson", help="QuPath export: nuclei polygons (+ region annotations)")
    p.add_argument("--out", required=True, help="training store (Zarr), created or extended")
    p.add_argument("--mpp", type=float, default=0.5, help="training µm/px (default 0.5)")
    p.add_argument("--mpp-override", type=float, help="level-0 µm/px if the slide lacks it")
    p.add_argument(
        "--region-class",
        action="append",
        help="classification of region annotations (repeatable; default Region)",
    )
    p.add_argument(
        "--margin-um", type=float, default=10.0, help="margin around all nuclei without regions"
    )
    p.add_argument("--split", default="train", help="split of these regions (default train)")
    p.add_argument("--name", help="dataset name in the store (default: slide name)")
    p.set_defaults(func=cmd_ingest_qupath)

    p = subparsers.add_parser("train", help="train a model with Ray Train")
    p.add_argument("--config", help="YAML (configs/train/*.yaml)")
    p.add_argument("--data", help="training store from wsi-pipeline ingest (default: train.zarr)")
    p.add_argument("--out", help="run directory, best checkpoint in OUT/best (runs/<name>)")
    p.add_argument("--workers", type=int, help="training workers (DDP)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--epochs", type=int)
    p.add_argument("--name", help="run name (same --out and name: resume)")
    p.add_argument(
        "--init-from",
        metavar="CHECKPOINT",
        help="start from this checkpoint's weights (e.g. nuclei-unet16-v6: fine-tune it)",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config key")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("evaluate", help="Dice, IoU, AJI, PQ, F1 on a folder dataset")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint directory (e.g. runs/x/best)")
    source.add_argument("--pred", help="folder of predicted label images, same file names")
    p.add_argument("--data", required=True, help="folder dataset: images/ + masks/")
    p.add_argument("--mpp-source", type=float, help="µm/px of the images (default: manifest)")
    p.add_argument("--split-field", help="manifest item field with the split")
    p.add_argument("--split", help="comma-separated splits to score (default: all images)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--output", help="also write the JSON line to this file")
    p.set_defaults(func=cmd_evaluate)

    p = subparsers.add_parser("tune", help="choose a checkpoint's post-processing thresholds")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory or shipped name")
    p.add_argument("--data", required=True, help="folder dataset: images/ + masks/")
    p.add_argument("--split", help="comma-separated splits to tune on (default: all images)")
    p.add_argument("--monitor", default="aji", help="score to maximise (default aji)")
    p.add_argument("--mpp-source", type=float, help="µm/px of the images (default: manifest)")
    p.add_argument("--split-field", help="manifest item field with the split")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--write", action="store_true", help="store the result in the model card")
    p.set_defaults(func=cmd_tune)
