"""The training job's configuration: model, optimizer, data sections and the run settings.

Loaded from YAML (``configs/train/*.yaml``) with ``--set`` overrides; every section forbids
unknown keys, so a typo fails before Ray starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from torch import nn

from wsi_pipeline.checkpoint import (
    Normalization,
    PostProcess,
)
from wsi_pipeline.config import StrictModel, load_config
from wsi_pipeline.train.augment import AugmentConfig
from wsi_pipeline.train.evaluation import SCORES
from wsi_pipeline.train.losses import list_losses
from wsi_pipeline.train.targets import TargetMode, num_classes

# "epoch" keeps the last epoch: a fixed schedule, no pick among noisy validation scores.
MONITORS = ("epoch", "val_loss", "train_loss", *(f"val_{s}" for s in SCORES))


class ModelSection(StrictModel):
    """The architecture: a registered model name and its options."""

    name: str = "unet"
    kwargs: dict[str, Any] = Field(default_factory=dict)
    num_classes: int | None = Field(
        None,
        ge=1,
        description="output channels; default 3 (3class), 2 (binary), 4 (distance); 1: sigmoid",
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

    @model_validator(mode="after")
    def _known_kwargs(self) -> ModelSection:
        from wsi_pipeline.models import model_kwargs

        valid = model_kwargs(self.name)
        unknown = sorted(set(self.kwargs) - set(valid))
        if unknown:
            raise ValueError(f"{self.name} got unexpected options {unknown}; valid: {valid}")
        return self


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
    target_mode: TargetMode = Field(
        "3class", description="3class, binary, or distance (3class + each nucleus's edge distance)"
    )
    boundary_width: int = Field(1, ge=1)
    augment: AugmentConfig = AugmentConfig()
    loader: Literal["ray", "device"] = Field(
        "ray",
        description="ray: crops from Ray Data CPU tasks; device: each worker holds its share of "
        "the store on its device and draws the crops there (train/device_crops.py)",
    )
    loader_cpus: float = Field(1.0, gt=0, description="CPUs per Ray Data crop task")
    loader_tasks: int | None = Field(None, ge=1, description="concurrent crop tasks (None: auto)")
    rows_per_task: int = Field(32, ge=1)
    prefetch_batches: int = Field(4, ge=1)
    cache_mb: float = Field(1024, ge=0, description="items kept in memory per loader process")
    crop_seed: int | None = Field(
        None,
        description="ray loader: the same crops every epoch (tests, benchmarks), None: fresh "
        "ones; device loader: the seed of its draws (+ the worker's rank), None: from seed",
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
    monitor: str = Field(
        "val_aji",
        description=f"what picks the checkpoint, one of {', '.join(MONITORS)} (epoch: the last)",
    )
    monitor_mode: Literal["max", "min"] | None = Field(None, description="default: min for *loss")
    early_stopping_patience: int | None = Field(None, ge=1, description="epochs without gain")
    workers: int = Field(1, ge=1)
    gpu: bool = False
    cpus_per_worker: float = Field(1.0, ge=0)
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 on GPU")
    max_failures: int = Field(2, ge=-1, description="worker-group restarts (-1: unlimited)")
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = 0
    ema_decay: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="exponential moving average of the weights per step (0: off); validation "
        "and checkpoints use the averaged weights, which chase noise less than the last step's",
    )
    init_from: str | None = Field(
        None,
        description="start from this checkpoint's weights (a directory or shipped model name, "
        "of the same architecture, width and target mode): fine-tune it on your annotations",
    )
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
        if self.data.target_mode == "distance" and k != 4:
            raise ValueError(f"target_mode distance needs 4 output channels, got {k}")
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

    def build_model(self) -> nn.Module:
        """An untrained model of this recipe."""
        from wsi_pipeline.models import create_model

        return create_model(self.model.name, num_classes=self.num_classes, **self.model.kwargs)

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
