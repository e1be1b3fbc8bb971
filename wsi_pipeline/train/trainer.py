"""Training with Ray Train: the ``TorchTrainer`` assembly on the driver.

``run_training(config, store, out)`` trains on a training store (:mod:`~wsi_pipeline.train.store`)
with ``config.workers`` DDP workers (:mod:`~wsi_pipeline.train.loop`) fed by the Ray Data crop
pipeline (:mod:`~wsi_pipeline.train.augment`) and leaves in ``out``::

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

import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

from wsi_pipeline import storage
from wsi_pipeline.checkpoint import CARD, WEIGHTS, read_card, resolve_checkpoint
from wsi_pipeline.config import ConfigError, save_config
from wsi_pipeline.train.augment import crop_dataset
from wsi_pipeline.train.config import DataSection, TrainConfig, load_train_config
from wsi_pipeline.train.loop import StepCallback, split_keys, train_loop_per_worker
from wsi_pipeline.train.store import TrainingStore, open_store

logger = logging.getLogger(__name__)


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


def _with_initial_weights(config: TrainConfig, store_mpp: float) -> TrainConfig:
    """The config with ``init_from`` resolved to an absolute checkpoint directory (workers may
    run elsewhere), after checking that its model is the recipe's.

    Raises:
        CheckpointError: no such checkpoint.
        ConfigError: its architecture, width or output channels differ from the recipe's.
    """
    if not config.init_from:
        return config
    path = resolve_checkpoint(config.init_from).resolve()
    card = read_card(path)
    theirs = (card.architecture, card.kwargs, card.num_classes, card.target_mode)
    ours = (config.model.name, config.model.kwargs, config.num_classes, config.data.target_mode)
    if theirs != ours:
        raise ConfigError(
            f"config error: init_from: {path} is a {card.architecture} {card.kwargs} with "
            f"{card.num_classes} outputs ({card.target_mode}); the recipe trains a "
            f"{config.model.name} {config.model.kwargs} with {config.num_classes} "
            f"({config.data.target_mode})"
        )
    if abs(card.mpp - store_mpp) > 0.01 * store_mpp:
        logger.warning(
            "init_from: %s was trained at %.3g µm/px, this store is at %.3g: its nuclei will "
            "look %.2gx as large",
            path,
            card.mpp,
            store_mpp,
            card.mpp / store_mpp,
        )
    return config.model_copy(update={"init_from": str(path)})


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
    config = _with_initial_weights(config, store.mpp)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, str(out / "train-config.yaml"))
    steps = default_steps(store, train_keys, config)
    # The workers log progress per epoch; Ray Data's per-execution bars would repeat it.
    ray.data.DataContext.get_current().enable_progress_bars = False
    datasets = {}
    if config.data.loader == "ray":
        samples = steps * config.data.batch_size * config.workers
        datasets["train"] = training_crops(store, train_keys, samples, config.data)
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
        datasets=datasets,
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
    storage.write_bytes_atomic(str(out / "summary.json"), json.dumps(summary, indent=2).encode())
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
