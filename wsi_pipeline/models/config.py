"""Per-model YAML configs (``configs/models/<name>.yaml``): architecture plus paper recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from .registry import create_model, model_kwargs, size_divisor

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"


class ModelSpec(BaseModel):
    """Which model to build and with which architecture options."""

    model_config = ConfigDict(extra="forbid")

    name: str
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known(self) -> ModelSpec:
        valid = model_kwargs(self.name)  # raises for an unknown name
        unknown = sorted(set(self.kwargs) - {"in_channels", "num_classes", *valid})
        if unknown:
            raise ValueError(f"{self.name} got unexpected options {unknown}; valid: {valid}")
        return self


class TrainingSpec(BaseModel):
    """The training recipe reported for the model (interpreted by the training code).

    ``loss`` is a name from ``wsi_pipeline.losses`` (e.g. ``"bce_dice"``);
    ``input_size`` is the square training input side in pixels; ``scheduler`` holds a
    ``name`` plus its options; ``monitor`` is the validation metric that picks the best
    checkpoint and drives early stopping.
    """

    model_config = ConfigDict(extra="forbid")

    optimizer: str
    lr: float = Field(gt=0)
    batch_size: int = Field(ge=1)
    epochs: int = Field(ge=1)
    loss: str
    input_size: int = Field(ge=1)
    scheduler: dict[str, Any] | None = None
    monitor: str | None = None
    early_stopping_patience: int | None = Field(default=None, ge=1)


class ModelConfig(BaseModel):
    """A model config file: ``model: {name, kwargs}`` and ``training: {...}``."""

    model_config = ConfigDict(extra="forbid")

    model: ModelSpec
    training: TrainingSpec

    @model_validator(mode="after")
    def _input_size_fits(self) -> ModelConfig:
        divisor = size_divisor(self.model.name)
        if self.training.input_size % divisor:
            raise ValueError(
                f"input_size {self.training.input_size} is not a multiple of {divisor}, "
                f"which {self.model.name} needs"
            )
        return self

    def build(self, **overrides: Any) -> nn.Module:
        """Create the model; ``overrides`` replace entries of ``model.kwargs``."""
        return create_model(self.model.name, **{**self.model.kwargs, **overrides})


def load_model_config(path_or_name: str | Path) -> ModelConfig:
    """Read a model config from a YAML path, or by model name from ``configs/models/``.

    Raises:
        FileNotFoundError: no such file.
        pydantic.ValidationError: the file does not fit the schema.
    """
    path = Path(path_or_name)
    if path.suffix not in (".yaml", ".yml"):
        path = CONFIG_DIR / f"{path_or_name}.yaml"
    return ModelConfig.model_validate(yaml.safe_load(path.read_text()))
