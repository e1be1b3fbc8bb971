"""Training with Ray Train: the config, the per-worker loop and the ``TorchTrainer`` assembly.

``run_training(config, store, out)`` trains on a training store (:mod:`wsi_pipeline.datasets`)
with ``config.workers`` DDP workers fed by the Ray Data crop pipeline (:mod:`wsi_pipeline.augment`)
and leaves in ``out``::

    out/
      train-config.yaml     the resolved config
      <name>/               Ray Train's run directory: one checkpoint per epoch (the best
                            ``keep_checkpoints`` by the monitored metric and the latest are kept)
      best/                 model.pt + model.json of the best epoch (:mod:`wsi_pipeline.checkpoint`)
      metrics.csv           one row per epoch (rank 0); tensorboard/ too when tensorboardX exists
      summary.json          best epoch and metrics, epochs run, wall time

Every Ray checkpoint is itself a loadable checkpoint (``model.pt`` + ``model.json``) plus
``train_state.pt`` (optimizer, schedule, epoch, early-stopping state, history). Running again
with the same ``out`` and run name resumes from the latest checkpoint (Ray Train V2 restores a
run from its ``RunConfig(name, storage_path)``); a worker failure restarts the workers from it,
up to ``max_failures`` times. ``out`` must be on storage every worker can reach.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from wsi_pipeline.augment import AugmentConfig, crop_dataset
from wsi_pipeline.checkpoint import (
    CARD,
    WEIGHTS,
    ModelCard,
    Normalization,
    PostProcess,
    build_model,
    normalize,
    save_checkpoint,
)
from wsi_pipeline.config import ConfigError, StrictModel, dump_config, load_config
from wsi_pipeline.datasets import TrainingStore, open_store
from wsi_pipeline.evaluation import SCORES, score_tiles
from wsi_pipeline.losses import create_loss, list_losses
from wsi_pipeline.targets import num_classes

logger = logging.getLogger(__name__)

STATE = "train_state.pt"
MONITORS = ("val_loss", "train_loss", *(f"val_{s}" for s in SCORES))
StepCallback = Callable[..., None]


# --- configuration --------------------------------------------------------------------------


class ModelSection(StrictModel):
    """The architecture: a registered model name and its options."""

    name: str = "unet"
    kwargs: dict[str, Any] = Field(default_factory=dict)
    num_classes: int | None = Field(
        None, ge=1, description="output channels; default 3 (3class) or 2 (binary); 1: sigmoid"
    )

    @field_validator("kwargs", mode="before")
    @classmethod
    def _none_is_empty(cls, kwargs: Any) -> Any:
        # "--set model.kwargs=null" resets the options when switching architecture
        return {} if kwargs is None else kwargs

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        from wsi_pipeline.models import list_models

        if name not in list_models():
            raise ValueError(f"unknown model {name!r}; valid: {list_models()}")
        return name


class OptimizerSection(StrictModel):
    """Optimizer and learning-rate schedule (linear warm-up, then cosine decay, per step)."""

    name: Literal["adam", "adamw", "adamax"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    min_lr_ratio: float = Field(0.01, ge=0, le=1, description="final lr / peak lr")
    grad_clip: float | None = Field(1.0, gt=0, description="max gradient norm (None: off)")


class DataSection(StrictModel):
    """What the workers see: crops from the store, targets, validation items, the loader."""

    store: str = Field("train.zarr", description="training store (wsi-pipeline ingest)")
    input_size: int = Field(256, ge=16, description="square crop side, px at the store mpp")
    batch_size: int = Field(8, ge=1, description="crops per step per worker")
    steps_per_epoch: int | None = Field(
        None, ge=1, description="default: one pass over the training area"
    )
    train_splits: list[str] = Field(default_factory=lambda: ["train"])
    val_splits: list[str] | None = Field(None, description="default: every other split")
    max_val_items: int | None = Field(None, ge=1)
    val_tile: int = Field(1024, ge=64, description="larger items are scored in tiles of this")
    target_mode: Literal["3class", "binary"] = "3class"
    boundary_width: int = Field(1, ge=1)
    augment: AugmentConfig = AugmentConfig()
    loader_cpus: float = Field(1.0, gt=0, description="CPUs per Ray Data crop task")
    loader_tasks: int | None = Field(None, ge=1, description="concurrent crop tasks (None: auto)")
    rows_per_task: int = Field(32, ge=1)
    prefetch_batches: int = Field(4, ge=1)
    cache_mb: float = Field(1024, ge=0, description="items kept in memory per loader process")
    crop_seed: int | None = Field(
        None, description="fix the crops (same every epoch; tests, benchmarks); None: fresh"
    )


class TrainConfig(StrictModel):
    """``wsi-pipeline train``: a model, a loss, an optimizer and the data, on Ray Train."""

    name: str = Field("train", description="run name: Ray Train's run directory under out/")
    model: ModelSection = ModelSection()
    loss: str = "ce_dice"
    loss_kwargs: dict[str, Any] = Field(default_factory=dict)
    optimizer: OptimizerSection = OptimizerSection()
    data: DataSection = DataSection()
    epochs: int = Field(100, ge=1)
    monitor: str = Field("val_aji", description=f"one of {', '.join(MONITORS)}")
    monitor_mode: Literal["max", "min"] | None = Field(None, description="default: min for *loss")
    early_stopping_patience: int | None = Field(None, ge=1, description="epochs without gain")
    workers: int = Field(1, ge=1)
    gpu: bool = False
    cpus_per_worker: float = Field(1.0, ge=0)
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 on GPU")
    max_failures: int = Field(2, ge=-1, description="worker-group restarts (-1: unlimited)")
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = 0
    log_every: int = Field(20, ge=1, description="steps between progress lines")
    normalization: Normalization = Normalization()
    postprocess: PostProcess = PostProcess()
    license: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.monitor not in MONITORS:
            raise ValueError(f"monitor {self.monitor!r} is not one of {list(MONITORS)}")
        if self.loss not in list_losses():
            raise ValueError(f"unknown loss {self.loss!r}; valid: {list_losses()}")
        k = self.num_classes
        if self.data.target_mode == "3class" and k != 3:
            raise ValueError(f"target_mode 3class needs 3 output classes, got {k}")
        if self.data.target_mode == "binary" and k not in (1, 2):
            raise ValueError(f"target_mode binary needs 1 or 2 output classes, got {k}")
        from wsi_pipeline.models import get_model_class

        divisor = get_model_class(self.model.name).size_divisor  # type: ignore[attr-defined]
        if self.data.input_size % divisor:
            raise ValueError(
                f"data.input_size {self.data.input_size} is not a multiple of {divisor}, "
                f"which {self.model.name} needs"
            )
        return self

    @property
    def num_classes(self) -> int:
        return self.model.num_classes or num_classes(self.data.target_mode)

    @property
    def mode(self) -> Literal["max", "min"]:
        """Whether a higher or a lower monitored value is better."""
        return self.monitor_mode or ("min" if self.monitor.endswith("loss") else "max")


def load_train_config(
    path: str | Path | None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """A :class:`TrainConfig` from YAML plus overrides (raises :class:`ConfigError`)."""
    return load_config(TrainConfig, path, overrides)


# --- the pieces of the loop -----------------------------------------------------------------


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


def training_crops(
    store: TrainingStore, keys: list[str], num_samples: int, data: DataSection
) -> Any:
    """The augmented-crop Ray Dataset that ``data`` describes (training and its benchmark)."""
    return crop_dataset(
        store,
        keys,
        num_samples,
        size=data.input_size,
        augment=data.augment,
        target_mode=data.target_mode,
        boundary_width=data.boundary_width,
        rows_per_task=data.rows_per_task,
        num_cpus=data.loader_cpus,
        concurrency=data.loader_tasks,
        cache_mb=data.cache_mb,
        seed=data.crop_seed,
    )


def split_keys(store: TrainingStore, data: DataSection) -> tuple[list[str], list[str]]:
    """Training and validation item keys of a store."""
    train = store.keys(data.train_splits)
    if data.val_splits is None:
        val = store.keys(exclude=data.train_splits)
    else:
        val = store.keys(data.val_splits)
    return train, val[: data.max_val_items]


def validate(worker: _Worker) -> tuple[dict[str, float], int]:
    """Sums of the loss and scores over this worker's share of the validation tiles, and their
    number. Instances come from the same post-processing as inference, at the training mpp."""
    config = worker.config
    sums = dict.fromkeys(["loss", *SCORES], 0.0)
    count = 0
    for key in worker.val_keys[worker.rank :: worker.world]:
        rgb, labels = worker.store.read(key)
        for scores in score_tiles(
            worker.model,
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


# --- the per-worker loop --------------------------------------------------------------------


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
            model.load_state_dict(state.pop("model"))
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        ddp_model = ray.train.torch.prepare_model(model)
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
            optimizer=optimizer,
            scheduler=scheduler,
            loss_fn=create_loss(config.loss, **config.loss_kwargs).to(device),
            progress=progress,
            card=card,
            steps=steps,
            shard=ray.train.get_dataset_shard("train"),
            callback=loop_config.get("step_callback"),
            curves=_Curves(Path(loop_config["out"]), progress.history) if rank == 0 else None,
        )

    def train_epoch(self, epoch: int) -> tuple[float, int]:
        """One pass over this worker's shard of the epoch's crops: ``(loss sum, steps)``."""
        config, start = self.config, time.perf_counter()
        self.ddp_model.train()
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
                rate = step * config.data.batch_size * self.world / (time.perf_counter() - start)
                logger.info(
                    "epoch %d/%d step %d/%d loss %.4f lr %.2e %.1f crops/s",
                    epoch + 1,
                    config.epochs,
                    step,
                    self.steps,
                    loss_sum / step,
                    self.scheduler.get_last_lr()[0],
                    rate,
                )
        return loss_sum, step

    def train_step(self, images: torch.Tensor, target: torch.Tensor) -> float:
        """Forward (bf16 autocast on GPU), backward, clip, step; the loss."""
        x = normalize(images, self.config.normalization)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.ddp_model(x)
        loss = self.loss_fn(logits, target.long())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.optimizer.grad_clip:
            nn.utils.clip_grad_norm_(self.ddp_model.parameters(), self.config.optimizer.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return float(loss.detach())

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
            save_checkpoint(directory, worker.model, card)
            state = {
                "optimizer": worker.optimizer.state_dict(),
                "scheduler": worker.scheduler.state_dict(),
                **worker.progress.state(),
            }
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
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.rows)
        tmp.replace(self.path)
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


# --- the driver -----------------------------------------------------------------------------


def default_steps(store: TrainingStore, keys: list[str], config: TrainConfig) -> int:
    """Steps per epoch: the configured number, or one pass over the training area."""
    if config.data.steps_per_epoch is not None:
        return config.data.steps_per_epoch
    area = sum(store.items[k].height * store.items[k].width for k in keys)
    per_step = config.data.input_size**2 * config.data.batch_size * config.workers
    return max(1, math.ceil(area / per_step))


def _check_resumable(out: Path, config: TrainConfig) -> None:
    """Refuse to resume a run in ``out`` whose model or targets differ from ``config``."""
    previous_file = out / "train-config.yaml"
    if not previous_file.exists() or not (out / config.name).exists():
        return
    try:
        previous = load_train_config(previous_file)
    except ConfigError:
        return
    if (previous.model, previous.data.target_mode) != (config.model, config.data.target_mode):
        raise ConfigError(
            f"config error: {out / config.name} is a run of another model or target mode; "
            "use another --out (or --name) to start a new run"
        )


def run_training(
    config: TrainConfig,
    store_path: str | Path,
    out_dir: str | Path,
    *,
    step_callback: StepCallback | None = None,
) -> dict[str, Any]:
    """Train with Ray Train (Ray must be initialised) and copy the best checkpoint to out/best.

    Returns:
        The summary also written to ``out/summary.json``.

    Raises:
        ConfigError: no training or validation items, or an incompatible run in ``out_dir``.
        ray.train.TrainingFailedError: the run failed more than ``max_failures`` times.
    """
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    out = Path(out_dir).resolve()
    # Workers may run elsewhere (another cwd, another node): hand them an absolute path or URL.
    store = open_store(store_path if "://" in str(store_path) else Path(store_path).resolve())
    train_keys, val_keys = split_keys(store, config.data)
    if not train_keys or not val_keys:
        raise ConfigError(
            f"config error: {store.path}: {len(train_keys)} training and {len(val_keys)} "
            f"validation items for splits {config.data.train_splits} / {config.data.val_splits}"
        )
    _check_resumable(out, config)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train-config.yaml").write_text(dump_config(config))
    steps = default_steps(store, train_keys, config)
    # The workers log progress per epoch; Ray Data's per-execution bars would repeat it.
    ray.data.DataContext.get_current().enable_progress_bars = False
    dataset = training_crops(
        store, train_keys, steps * config.data.batch_size * config.workers, config.data
    )
    resources = {"CPU": config.cpus_per_worker, **({"GPU": 1} if config.gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config.model_dump(mode="json"),
            "store": store.path,
            "out": str(out),
            "steps_per_epoch": steps,
            "step_callback": step_callback,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.workers, use_gpu=config.gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=config.name,
            storage_path=str(out),
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=config.keep_checkpoints,
                checkpoint_score_attribute=config.monitor,
                checkpoint_score_order=config.mode,
            ),
        ),
        datasets={"train": dataset},
    )
    logger.info(
        "training %s on %d items (%d validation), %d workers, %d steps/epoch of %d x %d px",
        config.model.name,
        len(train_keys),
        len(val_keys),
        config.workers,
        steps,
        config.data.batch_size,
        config.data.input_size,
    )
    start = time.perf_counter()
    result = trainer.fit()
    best = result.get_best_checkpoint(metric=config.monitor, mode=config.mode)
    if best is None:
        raise RuntimeError(f"{out}: the run reported no checkpoint with {config.monitor}")
    best_dir = _copy_best(best, out / "best")
    card = json.loads((best_dir / CARD).read_text())
    summary = {
        "best": str(best_dir),
        "best_epoch": card["training"].get("epoch"),
        "monitor": config.monitor,
        "metrics": card["metrics"],
        "last_epoch": int(result.metrics.get("epoch", -1)) if result.metrics else None,
        "seconds": round(time.perf_counter() - start, 1),
        "run": str(out / config.name),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _copy_best(checkpoint: Any, target: Path) -> Path:
    """Copy model.pt and model.json of a Ray checkpoint to ``target``, replacing it atomically."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with checkpoint.as_directory() as directory:
        for name in (WEIGHTS, CARD):
            shutil.copy2(Path(directory) / name, tmp / name)
    old = target.with_name(f".{target.name}.old")
    if target.exists():
        target.replace(old)
    tmp.replace(target)
    shutil.rmtree(old, ignore_errors=True)
    return target
