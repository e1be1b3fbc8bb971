"""Input pipeline vs model: augmented crops/s from Ray Data alone, and training crops/s alone.

The pipeline keeps the accelerator busy when the first is at least twice the second. Prints one
JSON line. Examples:

    python benchmarks/training.py --data train.zarr --config configs/train/unet.yaml
    python benchmarks/training.py --model unet --input-size 256 --batch-size 8   # synthetic data

Without ``--data`` a synthetic training store is generated. The two are measured one after the
other, so they do not compete for the CPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from wsi_pipeline.checkpoint import build_model
from wsi_pipeline.forward import choose_device, forward
from wsi_pipeline.synthetic import synthetic_tile
from wsi_pipeline.train import ingest
from wsi_pipeline.train import store as datasets
from wsi_pipeline.train.config import TrainConfig, load_train_config
from wsi_pipeline.train.loop import base_card, make_optimizer
from wsi_pipeline.train.losses import create_target_loss
from wsi_pipeline.train.trainer import training_crops


def synthetic_store(root: Path, n: int = 12, size: int = 512) -> str:
    """A training store of ``n`` synthetic tiles at 0.5 µm/px."""
    data = root / "synthetic"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        rgb, labels = synthetic_tile(size, rng, mpp=0.5)
        Image.fromarray(rgb).save(data / "images" / f"t{i}.png")
        Image.fromarray(labels.astype(np.uint16)).save(data / "masks" / f"t{i}.png")
    ingest.ingest_folder(data, root / "train.zarr", mpp_source=0.5, val_fraction=0.0)
    return str(root / "train.zarr")


def loader_rate(store: datasets.TrainingStore, config: TrainConfig, batches: int) -> float:
    """Crops/s delivered by the Ray Data pipeline to one consumer, after one warm-up batch."""
    data = config.data
    keys = store.keys(data.train_splits) or store.keys()
    dataset = training_crops(store, keys, (batches + 1) * data.batch_size, data)
    iterator = iter(
        dataset.iter_torch_batches(
            batch_size=data.batch_size, prefetch_batches=data.prefetch_batches
        )
    )
    next(iterator)
    start, count = time.perf_counter(), 0
    for batch in iterator:
        count += len(batch["image"])
    return count / (time.perf_counter() - start)


def training_rate(
    store: datasets.TrainingStore, config: TrainConfig, steps: int, device: torch.device
) -> float:
    """Crops/s of forward + backward + optimizer steps on one device, data already in memory."""
    model = build_model(base_card(config, store)).to(device).train()
    autocast = device.type == "cuda"
    if autocast:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(config.optimizer, model.parameters())
    loss_fn = create_target_loss(config.loss, config.data.target_mode, **config.loss_kwargs)
    loss_fn = loss_fn.to(device)
    size, batch = config.data.input_size, config.data.batch_size
    images = torch.randint(0, 255, (batch, size, size, 3), dtype=torch.uint8, device=device)
    target = torch.randint(0, config.num_classes, (batch, size, size), device=device)

    def step() -> None:
        logits = forward(model, images, config.normalization, autocast=autocast)
        loss = loss_fn(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up (allocator, cuDNN autotuning)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="training store (default: a synthetic one)")
    parser.add_argument("--config", help="training config (default: built-in defaults)")
    parser.add_argument("--model", default="unet")
    parser.add_argument("--input-size", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--loader-batches", type=int, default=20)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    overrides: dict[str, object] = {"data": {}}
    if not args.config:
        overrides["model"] = {"name": args.model}
    for key, value in (("input_size", args.input_size), ("batch_size", args.batch_size)):
        if value is not None:
            overrides["data"][key] = value  # type: ignore[index]
    config = load_train_config(args.config, overrides)

    import ray

    ray.init(logging_level="ERROR", include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    device = choose_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        store = datasets.open_store(args.data or synthetic_store(Path(tmp)))
        loader = loader_rate(store, config, args.loader_batches)
        train = training_rate(store, config, args.steps, device)
    result = {
        "benchmark": "training",
        "model": config.model.name,
        "input_size": config.data.input_size,
        "batch_size": config.data.batch_size,
        "device": str(device),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loader_crops_per_s": round(loader, 1),
        "train_crops_per_s": round(train, 1),
        "loader_over_train": round(loader / train, 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
