"""The model suite: every architecture and the default candidates, trained and scored one way.

One command, one folder of results, in as little device time as one GPU run allows:

1. ingest MoNuSeg (Kumar split) and CPM-15 into a training store at 0.5 µm/px;
2. train each candidate under one recipe (the same crops, steps and schedule for each; the
   default candidates keep their own recipes) with Ray Train, and time it;
3. tune each one's post-processing on ``test_same_organ``;
4. score each on the unseen ``test_other_organ`` through the whole-slide path (the ``segment``
   job on a JPEG mosaic slide) and through ``evaluate``;
5. write ``results.json``, ``results.md`` (the model table) and fp16 checkpoints
   (``checkpoints/<name>/``, those of ≤ 16 MiB: LEECAU-Net's 49 M parameters are 94 MiB even in
   fp16 and stay in ``runs/``) into ``--out``, printing progress as it goes.

    python benchmarks/gpu_suite.py --out suite/ --gpu            # the GPU run (≤ 9 minutes)
    python benchmarks/gpu_suite.py --out /tmp/suite --tiny       # the same code, CPU, synthetic

``--tiny`` replaces the data by a small synthetic folder dataset with the same splits and every
recipe by a few steps of small crops: a CI test of the whole suite.

``--augmentations`` runs the augmentation study instead: ``default-v3``'s recipe with all its
augmentation, with each group of steps switched off in turn, and with none; the same crops
(``crop_seed``), seed and schedule for each; the table adds each variant's AJI change against
all augmentation on the unseen organs:

    python benchmarks/gpu_suite.py --out augment/ --gpu --augmentations
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline.checkpoint import load_checkpoint, save_checkpoint
from wsi_pipeline.config import SegmentConfig
from wsi_pipeline.models import list_models
from wsi_pipeline.slide_scoring import whole_slide_scores
from wsi_pipeline.train.augment import NO_AUGMENT
from wsi_pipeline.train.config import TrainConfig, load_train_config
from wsi_pipeline.train.evaluation import SCORES, evaluate_checkpoint
from wsi_pipeline.train.ingest import ingest_folder
from wsi_pipeline.train.trainer import run_training
from wsi_pipeline.train.tuning import tune_checkpoint

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "configs" / "train"
DEFAULTS = ("default", "default-v2", "default-v3")
SPLIT_FIELD = "kumar2017_split"
# fp16 checkpoints up to this size are exported (a GPU host sends back files of ≤ 16 MiB).
EXPORT_LIMIT = 16 * 2**20
# The shared recipe of the architecture comparison: the same crops and schedule for each model.
SUITE = {
    "data": {
        "input_size": 256,
        "batch_size": 32,
        "steps_per_epoch": 100,
        "train_splits": ["train"],
        "val_splits": ["test_same_organ"],
        "val_tile": 512,
        "crop_seed": 0,
        "augment": {"jpeg_p": 0.5, "jpeg_quality": 60, "resample_p": 0.3, "stain": 0.1},
    },
    "optimizer": {"name": "adamw", "lr": 1e-3, "warmup_epochs": 0.5},
    "epochs": 4,
    "ema_decay": 0.99,
    "monitor": "val_aji",
    "loss": "ce_dice",
    "keep_checkpoints": 1,
    "max_failures": 0,
}
TINY = {
    "data": {"input_size": 64, "batch_size": 2, "steps_per_epoch": 2, "val_tile": 256,
             "loader_cpus": 0.25, "max_val_items": 1},
    "epochs": 1,
    "cpus_per_worker": 0.5,
    "gpu": False,
}  # fmt: skip


# The augmentation study: each group of default-v3's augmentation steps switched off in turn.
ABLATIONS: dict[str, dict[str, Any]] = {
    "all": {},
    "no-geometry": {"flips": False, "affine_p": 0.0},
    "no-stain": {"stain": 0.0, "stain_shift": 0.0},
    "no-colour": {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0},
    "no-blur": {"blur_p": 0.0},
    "no-jpeg": {"jpeg_p": 0.0},
    "no-resampling": {"resample_p": 0.0},
    "none": NO_AUGMENT.model_dump(),
}
ABLATED_RECIPE = "default-v3"


def log(message: str) -> None:
    print(f"[suite {time.strftime('%H:%M:%S')}] {message}", flush=True)


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and key in out else value
    return out


def candidates(gpu: bool, tiny: bool, models: list[str]) -> dict[str, TrainConfig]:
    """Each candidate's training config: the architectures under the suite recipe, the default
    recipes under their own."""
    # Crops drawn on the device: on a GPU the CPU loader, not the model, set the pace.
    device = {"gpu": gpu, "workers": 1, "cpus_per_worker": 4 if gpu else 1.0}
    device["data"] = {"loader": "device"}
    configs = {}
    for name in models:
        recipe = merge(SUITE, {**device, "name": name, "model": {"name": name}})
        configs[name] = merge(recipe, TINY) if tiny else recipe
    for default in DEFAULTS:
        recipe = load_train_config(RECIPES / f"{default}.yaml").model_dump(mode="json")
        recipe = merge(recipe, {**device, "name": default})
        configs[default] = merge(recipe, TINY) if tiny else recipe
    if tiny:  # narrow models: the same code, seconds per model on a CPU
        for recipe in configs.values():
            recipe["model"]["kwargs"] = _tiny_kwargs(recipe["model"]["name"])
    return {name: TrainConfig.model_validate(recipe) for name, recipe in configs.items()}


def augmentation_variants(gpu: bool, tiny: bool) -> dict[str, TrainConfig]:
    """``aug-<variant>``: :data:`ABLATED_RECIPE` under each of :data:`ABLATIONS`, on the same
    crops."""
    recipe = candidates(gpu, tiny, [])[ABLATED_RECIPE].model_dump(mode="json")
    recipe["data"]["crop_seed"] = 0
    return {
        f"aug-{variant}": TrainConfig.model_validate(
            merge(recipe, {"name": f"aug-{variant}", "data": {"augment": change}})
        )
        for variant, change in ABLATIONS.items()
    }


def _tiny_kwargs(model: str) -> dict[str, Any]:
    return {
        "unet": {"base_channels": 4},
        "sa_unet": {"base_channels": 4},
        "case_unet": {"base_channels": 4, "cat_channels": 4, "num_heads": 2},
        "gru_net": {"base_channels": 4, "gdam_channels": 8},
    }.get(model, {})


def tiny_dataset(root: Path) -> Path:
    """A synthetic folder dataset with MoNuSeg's splits (0.25 µm/px, like MoNuSeg)."""
    from PIL import Image

    from wsi_pipeline.synthetic import synthetic_tile

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    splits = ["train"] * 4 + ["test_same_organ"] * 2 + ["test_other_organ"] * 4
    items = []
    for i, split in enumerate(splits):
        rgb, labels = synthetic_tile(256, rng, mpp=0.25, density=0.004)
        Image.fromarray(rgb).save(root / "images" / f"img{i}.png")
        Image.fromarray(labels.astype(np.uint16)).save(root / "masks" / f"img{i}.png")
        items.append({"id": f"img{i}", "mpp": 0.25, SPLIT_FIELD: split})
    (root / "manifest.json").write_text(json.dumps({"items": items}))
    return root


def ingest(data: Path, store: Path, tiny: bool) -> Path:
    """The training store, and the folder dataset that holds the dev and test splits."""
    monuseg = tiny_dataset(store.parent / "tiny-data") if tiny else data / "monuseg_train"
    ingest_folder(monuseg, store, mpp=0.5, split_field=SPLIT_FIELD)
    if not tiny and (data / "cpm15").exists():
        ingest_folder(data / "cpm15", store, mpp=0.5, val_fraction=0.0)
    return monuseg


def run_candidate(
    name: str, config: TrainConfig, store: Path, dev_test: Path, out: Path, args: Any
) -> dict[str, Any]:
    """Train, tune, score and export one candidate; its row of the results."""
    start = time.perf_counter()
    summary = run_training(config, store, out / "runs" / name)
    train_s = time.perf_counter() - start
    best = Path(summary["best"])
    device = "cuda" if config.gpu else "cpu"
    tuned = tune_checkpoint(best, dev_test, splits=["test_same_organ"], device=device, write=True)
    segment = SegmentConfig(checkpoint=str(best), tile=args.tile, overlap=64, device=device)
    with_slide = whole_slide_scores(dev_test, ["test_other_organ"], segment, out / "work" / name)
    evaluated = evaluate_checkpoint(best, dev_test, splits=["test_other_organ"], device=device)
    model, card = load_checkpoint(best)
    params = sum(p.numel() for p in model.parameters())
    export: Path | None = out / "checkpoints" / name
    if params * 2 <= EXPORT_LIMIT:
        save_checkpoint(export, model, card, half=True)
    else:  # the run's own checkpoint stays in runs/; it is too large to bring back
        export = None
    return {
        "name": name,
        "architecture": config.model.name,
        "params_m": round(params / 1e6, 2),
        "train_s": round(train_s, 1),
        "crops": config.epochs * (config.data.steps_per_epoch or 0) * config.data.batch_size,
        "best_epoch": summary["best_epoch"],
        "tuned": tuned["postprocess"],
        "whole_slide": with_slide,
        "evaluate": {k: round(evaluated[k], 4) for k in SCORES},
        "checkpoint": str(export) if export else None,
        "checkpoint_mb": round(sum(f.stat().st_size for f in export.iterdir()) / 2**20, 2)
        if export
        else None,
    }


def table(rows: list[dict[str, Any]], baseline: str | None = None) -> str:
    """The model table (Markdown): scores on test_other_organ, size, training time; with
    ``baseline`` (a row's name), each row's whole-slide AJI change against that row."""
    header = "| model | params (M) | whole-slide Dice | AJI | PQ | evaluate AJI | train s |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    if baseline:
        lines = [header + " Δ AJI |", lines[1] + "---|"]
        reference = next(r for r in rows if r["name"] == baseline)["whole_slide"]["aji"]
    for r in sorted(rows, key=lambda r: -r["whole_slide"]["aji"]):
        s = r["whole_slide"]
        line = (
            f"| {r['name']} | {r['params_m']} | {s['dice']:.3f} | {s['aji']:.3f} | "
            f"{s['pq']:.3f} | {r['evaluate']['aji']:.3f} | {r['train_s']:.0f} |"
        )
        lines.append(line + (f" {s['aji'] - reference:+.3f} |" if baseline else ""))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="results folder (replaced)")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--gpu", action="store_true", help="train on one GPU per worker")
    parser.add_argument("--tiny", action="store_true", help="synthetic data, a few steps, CPU")
    parser.add_argument("--models", nargs="+", default=list_models(), choices=list_models())
    parser.add_argument("--tile", type=int, default=512, help="segment tile for the scoring")
    parser.add_argument(
        "--augmentations",
        action="store_true",
        help=f"the augmentation study of {ABLATED_RECIPE} instead of the model suite",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(ABLATIONS),
        choices=list(ABLATIONS),
        help="the study's variants (default: all; 'all' is the baseline and always runs)",
    )
    args = parser.parse_args()
    if args.tiny:
        args.tile = min(args.tile, 256)

    import ray

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    ray.init(logging_level="ERROR", include_dashboard=False)
    start = time.perf_counter()
    log("ingest")
    dev_test = ingest(Path(args.data), out / "train.zarr", args.tiny)
    rows = []
    if args.augmentations:
        variants = augmentation_variants(args.gpu, args.tiny)
        wanted = {"all", *args.variants}
        configs = {k: v for k, v in variants.items() if k.removeprefix("aug-") in wanted}
    else:
        configs = candidates(args.gpu, args.tiny, args.models)
    for i, (name, config) in enumerate(configs.items(), start=1):
        log(f"[{i}/{len(configs)}] {name}: train, tune, score")
        rows.append(run_candidate(name, config, out / "train.zarr", dev_test, out, args))
        scores = rows[-1]["whole_slide"]
        log(f"{name}: AJI {scores['aji']:.3f}, Dice {scores['dice']:.3f} ({rows[-1]['train_s']} s)")
    result = {
        "benchmark": "gpu_suite",
        "tiny": args.tiny,
        "study": "augmentations" if args.augmentations else "models",
        "seconds": round(time.perf_counter() - start, 1),
        "models": rows,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "results.md").write_text(table(rows, "aug-all" if args.augmentations else None))
    shutil.rmtree(out / "work", ignore_errors=True)
    log(f"done in {result['seconds']} s: {out / 'results.md'}")
    print(json.dumps({k: v for k, v in result.items() if k != "models"}))


if __name__ == "__main__":
    main()
