"""Input pipelines vs model, in crops/s: each loader alone, training alone, and both together.

Prints one JSON line with

* ``loader_crops_per_s``: the Ray Data CPU loader alone (``data.loader: ray``);
* ``device_loader_crops_per_s``: the device loader alone (``data.loader: device``), on the
  training device;
* ``train_crops_per_s``: forward + backward + optimizer steps on crops already on the device;
* ``device_train_crops_per_s``: training steps fed by the device loader, the two together, and
  ``device_train_over_train`` (1.0: the loader costs the model nothing).

A loader keeps the accelerator busy when it alone is at least twice as fast as training alone.
Examples:

    python benchmarks/training.py --data train.zarr --config configs/train/unet.yaml
    python benchmarks/training.py --model unet --input-size 256 --batch-size 8   # synthetic data

Without ``--data`` a synthetic training store is generated. The figures are measured one after
the other, so they do not compete for the CPUs.
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
from wsi_pipeline.train.device_crops import DeviceCrops
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


def device_crops(
    store: datasets.TrainingStore, config: TrainConfig, device: torch.device
) -> DeviceCrops:
    """The device loader of one worker holding the whole store."""
    data = config.data
    return DeviceCrops(
        store,
        store.keys(data.train_splits) or store.keys(),
        size=data.input_size,
        augment=data.augment,
        target_mode=data.target_mode,
        boundary_width=data.boundary_width,
        device=device,
    )


def device_loader_rate(crops: DeviceCrops, batch_size: int, batches: int) -> float:
    """Crops/s the device loader draws, after one warm-up batch."""
    crops.batch(batch_size)
    _sync(crops.device)
    start = time.perf_counter()
    for _ in crops.batches(batches, batch_size):
        pass
    _sync(crops.device)
    return batches * batch_size / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def training_rate(
    store: datasets.TrainingStore,
    config: TrainConfig,
    steps: int,
    device: torch.device,
    crops: DeviceCrops | None = None,
) -> float:
    """Crops/s of forward + backward + optimizer steps on one device: on one batch already in
    memory, or on batches drawn by ``crops``."""
    model = build_model(base_card(config, store)).to(device).train()
    autocast = device.type == "cuda"
    if autocast:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(config.optimizer, model.parameters())
    loss_fn = create_target_loss(config.loss, config.data.target_mode, **config.loss_kwargs)
    loss_fn = loss_fn.to(device)
    batch = config.data.batch_size
    fixed = device_crops(store, config, device).batch(batch)

    def step() -> None:
        data = fixed if crops is None else crops.batch(batch)
        logits = forward(model, data["image"], config.normalization, autocast=autocast)
        loss = loss_fn(logits, data["target"].long())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up (allocator, cuDNN autotuning)
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
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
        crops = device_crops(store, config, device)
        device_loader = device_loader_rate(crops, config.data.batch_size, args.loader_batches)
        train = training_rate(store, config, args.steps, device)
        device_train = training_rate(store, config, args.steps, device, crops)
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
        "device_loader_crops_per_s": round(device_loader, 1),
        "device_loader_over_train": round(device_loader / train, 2),
        "device_train_crops_per_s": round(device_train, 1),
        "device_train_over_train": round(device_train / train, 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
