"""The per-worker training loop (Ray Train): steps, validation, reports, checkpoints.

:func:`train_loop_per_worker` is the ``TorchTrainer`` entry point; each worker holds its state in
a :class:`_Worker`. Rank 0 writes the learning curves; every report carries a loadable checkpoint
(``model.pt`` + ``model.json``) plus ``train_state.pt`` for resuming.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from wsi_pipeline import storage
from wsi_pipeline.checkpoint import (
    WEIGHTS,
    ModelCard,
    build_model,
    save_checkpoint,
)
from wsi_pipeline.forward import forward
from wsi_pipeline.models.registry import load_weights, strip_wrappers
from wsi_pipeline.train.config import DataSection, OptimizerSection, TrainConfig
from wsi_pipeline.train.device_crops import DeviceCrops
from wsi_pipeline.train.evaluation import SCORES, score_tiles
from wsi_pipeline.train.losses import create_target_loss
from wsi_pipeline.train.store import TrainingStore, open_store

logger = logging.getLogger(__name__)


STATE = "train_state.pt"


StepCallback = Callable[..., None]


def make_optimizer(config: OptimizerSection, params: Any) -> torch.optim.Optimizer:
    """Adam, AdamW or Adamax with the configured lr and weight decay."""
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "adamax": torch.optim.Adamax}
    return cls[config.name](params, lr=config.lr, weight_decay=config.weight_decay)


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR factor at ``step``: linear warm-up over ``warmup`` steps, then cosine to ``min_ratio``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def validate(worker: _Worker) -> tuple[dict[str, float], int]:
    """Sums of the loss and scores over this worker's share of the validation tiles, and their
    number. Instances come from the same post-processing as inference, at the training mpp."""
    config = worker.config
    sums = dict.fromkeys(["loss", *SCORES], 0.0)
    count = 0
    for key in worker.val_keys[worker.rank :: worker.world]:
        rgb, labels = worker.store.read(key)
        for scores in score_tiles(
            worker.served,
            rgb,
            labels,
            target_mode=config.data.target_mode,
            normalization=config.normalization,
            postprocess=config.postprocess.model_dump(),
            device=worker.device,
            autocast=worker.autocast,
            tile=config.data.val_tile,
            loss_fn=worker.loss_fn,
            boundary_width=config.data.boundary_width,
        ):
            for name in sums:
                sums[name] += scores[name]
            count += 1
    return sums, count


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker: train, validate each epoch, report metrics and a checkpoint.

    ``loop_config`` holds ``config`` (a :class:`TrainConfig` dump), ``store``, ``out``,
    ``steps_per_epoch`` and an optional ``step_callback(epoch=, step=, rank=)`` called after every
    optimizer step (for progress hooks and fault injection).
    """
    worker = _Worker.start(loop_config)
    for epoch in range(worker.progress.epoch + 1, worker.config.epochs):
        if worker.progress.stopped:
            break
        start = time.perf_counter()
        loss_sum, steps = worker.train_epoch(epoch)
        train_time = time.perf_counter() - start
        worker.ddp_model.eval()
        worker.served.eval()
        sums, count = validate(worker)
        totals = _all_reduce({"train_loss": loss_sum, "steps": steps, **sums, "n": count})
        metrics = {
            "epoch": epoch,
            "train_loss": totals["train_loss"] / max(totals["steps"], 1),
            "lr": worker.scheduler.get_last_lr()[0],
            **{f"val_{k}": totals[k] / max(totals["n"], 1) for k in ("loss", *SCORES)},
            "crops_per_s": steps * worker.config.data.batch_size * worker.world / train_time,
            "epoch_s": time.perf_counter() - start,
        }
        worker.end_epoch(metrics)


def _crop_source(
    config: TrainConfig, store: TrainingStore, rank: int, world: int, device: torch.device
) -> Any:
    """This worker's crops: its Ray Data shard, or its share of the store on its device."""
    import ray.train

    data = config.data
    if data.loader == "ray":
        return ray.train.get_dataset_shard("train")
    return DeviceCrops(
        store,
        split_keys(store, data)[0],
        size=data.input_size,
        augment=data.augment,
        target_mode=data.target_mode,
        boundary_width=data.boundary_width,
        device=device,
        rank=rank,
        world=world,
        seed=config.seed * 1000 + rank if data.crop_seed is None else data.crop_seed + rank,
    )


@dataclass
class _Worker:
    """The state of one training worker."""

    config: TrainConfig
    store: TrainingStore
    val_keys: list[str]
    rank: int
    world: int
    device: torch.device
    autocast: bool
    model: nn.Module
    ddp_model: nn.Module
    ema: AveragedModel | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: nn.Module
    progress: _Progress
    card: ModelCard
    steps: int
    shard: Any
    callback: StepCallback | None
    curves: _Curves | None

    @classmethod
    def start(cls, loop_config: dict[str, Any]) -> _Worker:
        """Build everything, restoring the latest checkpoint if Ray Train hands one over."""
        import ray.train
        import ray.train.torch

        config = TrainConfig.model_validate(loop_config["config"])
        context = ray.train.get_context()
        rank, world = context.get_world_rank(), context.get_world_size()
        _worker_logging(rank)
        store = open_store(loop_config["store"])
        device = ray.train.torch.get_device()
        torch.manual_seed(config.seed)
        card = base_card(config, store)
        state = _restore(ray.train.get_checkpoint())
        model = build_model(card)
        if state is not None:
            model.load_state_dict(state.pop("raw_model", None) or state["model"])
        elif config.init_from:  # a fresh run that fine-tunes a checkpoint; a resume has its own
            load_weights(model, Path(config.init_from) / WEIGHTS)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        ddp_model = ray.train.torch.prepare_model(model)
        ema = None
        if config.ema_decay:
            decay = get_ema_multi_avg_fn(config.ema_decay)
            ema = AveragedModel(model, multi_avg_fn=decay, use_buffers=True)
            if state is not None:
                ema.module.load_state_dict(state["model"])
                ema.n_averaged.fill_(state.get("ema_steps", 1))
        if state is not None:
            state.pop("model")
        optimizer = make_optimizer(config.optimizer, ddp_model.parameters())
        steps = int(loop_config["steps_per_epoch"])
        total, warmup = config.epochs * steps, round(config.optimizer.warmup_epochs * steps)
        ratio = config.optimizer.min_lr_ratio
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, total, warmup, ratio)
        )
        progress = _Progress(config)
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            progress.load(state)
            logger.info("resuming after epoch %d", progress.epoch + 1)
        return cls(
            config=config,
            store=store,
            val_keys=split_keys(store, config.data)[1],
            rank=rank,
            world=world,
            device=device,
            autocast=config.precision == "bf16"
            or (config.precision == "auto" and device.type == "cuda"),
            model=model,
            ddp_model=ddp_model,
            ema=ema,
            optimizer=optimizer,
            scheduler=scheduler,
            loss_fn=create_target_loss(
                config.loss, config.data.target_mode, **config.loss_kwargs
            ).to(device),
            progress=progress,
            card=card,
            steps=steps,
            shard=_crop_source(config, store, rank, world, device),
            callback=loop_config.get("step_callback"),
            curves=_Curves(Path(loop_config["out"]), progress.history) if rank == 0 else None,
        )

    def train_epoch(self, epoch: int) -> tuple[float, int]:
        """One pass over this worker's shard of the epoch's crops: ``(loss sum, steps)``."""
        config, start = self.config, time.perf_counter()
        self.ddp_model.train()
        if isinstance(self.shard, DeviceCrops):
            batches = self.shard.batches(self.steps, config.data.batch_size)
        else:
            batches = self.shard.iter_torch_batches(
                batch_size=config.data.batch_size,
                drop_last=True,
                prefetch_batches=config.data.prefetch_batches,
                device=self.device,
            )
        loss_sum, step = 0.0, 0
        for step, batch in enumerate(batches, start=1):
            loss_sum += self.train_step(batch["image"], batch["target"])
            if self.callback is not None:
                self.callback(epoch=epoch, step=step - 1, rank=self.rank)
            if self.rank == 0 and step % config.log_every == 0:
                elapsed = time.perf_counter() - start
                rate = step * config.data.batch_size * self.world / elapsed
                left = (config.epochs - epoch - 1) * self.steps + self.steps - step
                logger.info(
                    "epoch %d/%d step %d/%d loss %.4f lr %.2e %.1f crops/s, ETA %.0f s "
                    "(training steps only)",
                    epoch + 1,
                    config.epochs,
                    step,
                    self.steps,
                    loss_sum / step,
                    self.scheduler.get_last_lr()[0],
                    rate,
                    left * elapsed / step,
                )
        return loss_sum, step

    def train_step(self, images: torch.Tensor, target: torch.Tensor) -> float:
        """Forward (bf16 autocast on GPU), backward, clip, step; the loss."""
        logits = forward(self.ddp_model, images, self.config.normalization, autocast=self.autocast)
        loss = self.loss_fn(logits, target.long())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.optimizer.grad_clip:
            nn.utils.clip_grad_norm_(self.ddp_model.parameters(), self.config.optimizer.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        return float(loss.detach())

    @property
    def served(self) -> nn.Module:
        """The weights validated and checkpointed: the moving average when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def end_epoch(self, metrics: dict[str, float]) -> None:
        """Track the best epoch, report (with a checkpoint from rank 0), write curves, log."""
        self.progress.update(metrics)
        metrics[f"best_{self.config.monitor}"] = self.progress.best
        _report(metrics, self)
        if self.curves is not None:
            self.curves.write(metrics)
        if self.rank == 0:
            logger.info(
                "epoch %d/%d train_loss %.4f val_loss %.4f val_dice %.3f val_aji %.3f "
                "val_pq %.3f (%.0f s)%s",
                metrics["epoch"] + 1,
                self.config.epochs,
                metrics["train_loss"],
                metrics["val_loss"],
                metrics["val_dice"],
                metrics["val_aji"],
                metrics["val_pq"],
                metrics["epoch_s"],
                "; early stop" if self.progress.stopped else "",
            )


class _Progress:
    """Epoch, best monitored value, early stopping and the metric history (all resumable)."""

    def __init__(self, config: TrainConfig) -> None:
        self.monitor, self.mode = config.monitor, config.mode
        self.patience = config.early_stopping_patience
        self.epoch = -1
        self.best = -math.inf if self.mode == "max" else math.inf
        self.best_epoch = -1
        self.stopped = False
        self.history: list[dict[str, float]] = []

    def update(self, metrics: dict[str, float]) -> None:
        self.epoch = int(metrics["epoch"])
        value = metrics[self.monitor]
        if value > self.best if self.mode == "max" else value < self.best:
            self.best, self.best_epoch = value, self.epoch
        if self.patience is not None and self.epoch - self.best_epoch >= self.patience:
            self.stopped = True
        self.history.append(dict(metrics))

    def state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "stopped": self.stopped,
            "history": self.history,
        }

    def load(self, state: dict[str, Any]) -> None:
        self.epoch, self.best = int(state["epoch"]), float(state["best"])
        self.best_epoch, self.stopped = int(state["best_epoch"]), bool(state["stopped"])
        self.history = list(state["history"])


def base_card(config: TrainConfig, store: TrainingStore) -> ModelCard:
    """The model card of this training run, without the metrics of an epoch."""
    train, val = split_keys(store, config.data)
    licences = sorted({str(d.get("license", "")) for d in store.datasets.values()} - {""})
    return ModelCard(
        architecture=config.model.name,
        kwargs=config.model.kwargs,
        num_classes=config.num_classes,
        target_mode=config.data.target_mode,
        mpp=store.mpp,
        normalization=config.normalization,
        postprocess=config.postprocess,
        datasets=[f"{name}: {info.get('source', '')}" for name, info in store.datasets.items()],
        split={
            "train_splits": config.data.train_splits,
            "val_splits": config.data.val_splits,
            "split_fields": {n: d.get("split_field") for n, d in store.datasets.items()},
            "train": train,
            "val": val,
        },
        training={"config": config.model_dump(mode="json"), "store": store.path},
        license=config.license or " | ".join(licences),
    )


def _restore(checkpoint: Any) -> dict[str, Any] | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        state = torch.load(Path(directory) / STATE, map_location="cpu", weights_only=True)
        state["model"] = torch.load(
            Path(directory) / WEIGHTS, map_location="cpu", weights_only=True
        )
    return state


def _all_reduce(values: dict[str, float]) -> dict[str, float]:
    """Sums over workers (identity without a process group), so every worker agrees."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return values
    backend_cuda = dist.get_backend() == "nccl"
    tensor = torch.tensor(list(values.values()), dtype=torch.float64)
    if backend_cuda:
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return dict(zip(values, tensor.cpu().tolist(), strict=True))


def _report(metrics: dict[str, float], worker: _Worker) -> None:
    """All workers report the same metrics; rank 0 attaches the checkpoint."""
    import ray.train

    epoch = int(metrics["epoch"])
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if worker.rank == 0:
            scores = {k: float(v) for k, v in metrics.items() if k.startswith(("val_", "train_"))}
            training = {
                **worker.card.training,
                "epoch": epoch,
                "best_epoch": worker.progress.best_epoch,
                "workers": worker.world,
            }
            card = worker.card.model_copy(update={"metrics": scores, "training": training})
            save_checkpoint(directory, worker.served, card)
            state = {
                "optimizer": worker.optimizer.state_dict(),
                "scheduler": worker.scheduler.state_dict(),
                **worker.progress.state(),
            }
            if worker.ema is not None:  # model.pt holds the average; resuming needs both
                state["raw_model"] = strip_wrappers(worker.model.state_dict())
                state["ema_steps"] = int(worker.ema.n_averaged)
            torch.save(state, Path(directory) / STATE)
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch-{epoch:04d}")


class _Curves:
    """Rank 0's learning curves: ``metrics.csv`` (rewritten from the history) and TensorBoard."""

    def __init__(self, out: Path, history: list[dict[str, float]]) -> None:
        self.path = out / "metrics.csv"
        self.rows = list(history)
        self.writer = None
        try:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            logger.debug("tensorboardX not installed: CSV curves only")

    def write(self, metrics: dict[str, float]) -> None:
        self.rows.append(dict(metrics))
        keys = list(dict.fromkeys(k for row in self.rows for k in row))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=keys)
        writer.writeheader()
        writer.writerows(self.rows)
        storage.write_bytes_atomic(str(self.path), text.getvalue().encode())
        if self.writer is not None:
            for key, value in metrics.items():
                if key != "epoch":
                    self.writer.add_scalar(key, value, int(metrics["epoch"]))
            self.writer.flush()


def _worker_logging(rank: int) -> None:
    # A Ray Train worker is a fresh process whose entry point is the loop: give the package
    # logger a handler there (rank 0 at INFO, the others at WARNING), as an entry point would.
    package = logging.getLogger("wsi_pipeline")
    if not package.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        package.addHandler(handler)
        package.propagate = False
    package.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def split_keys(store: TrainingStore, data: DataSection) -> tuple[list[str], list[str]]:
    """Training and validation item keys of a store."""
    train = store.keys(data.train_splits)
    if data.val_splits is None:
        val = store.keys(exclude=data.train_splits)
    else:
        val = store.keys(data.val_splits)
    return train, val[: data.max_val_items]
