"""The checkpoint format: a directory with the weights and a model card.

```
<checkpoint>/
  model.pt      the model's state_dict (torch.save), loaded with weights_only=True
  model.json    the model card (:class:`ModelCard`): everything needed to rebuild and use it
```

Loading needs neither Ray nor the training code, and never unpickles arbitrary objects.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from wsi_pipeline import __version__

WEIGHTS = "model.pt"
CARD = "model.json"


class Normalization(BaseModel):
    """Input normalisation: ``(rgb / 255 - mean) / std`` per channel."""

    model_config = ConfigDict(extra="forbid")

    mean: list[float] = Field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = Field(default_factory=lambda: [0.25, 0.25, 0.25])


class PostProcess(BaseModel):
    """Arguments of :func:`wsi_pipeline.instances.instances_from_probabilities` for this model."""

    model_config = ConfigDict(extra="allow")

    min_size: int = 10
    interior_threshold: float = 0.5
    foreground_threshold: float = 0.5


class ModelCard(BaseModel):
    """What a checkpoint is: architecture, classes, resolution, data, scores, provenance."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    architecture: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    in_channels: int = 3
    num_classes: int = 3
    target_mode: Literal["3class", "binary"] = "3class"
    mpp: float = Field(gt=0, description="µm/px the model was trained at; inference reads at it")
    normalization: Normalization = Field(default_factory=Normalization)
    postprocess: PostProcess = Field(default_factory=PostProcess)
    datasets: list[str] = Field(default_factory=list)
    split: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    license: str = ""
    package_version: str = __version__
    created: str = Field(
        default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    )


def build_model(card: ModelCard) -> nn.Module:
    """An untrained model of the card's architecture."""
    from wsi_pipeline.models import create_model

    return create_model(
        card.architecture, in_channels=card.in_channels, num_classes=card.num_classes, **card.kwargs
    )


def save_checkpoint(path: str | Path, model: nn.Module, card: ModelCard) -> Path:
    """Write ``model.pt`` and ``model.json`` into ``path`` (created if needed)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k.removeprefix("_orig_mod."): v.detach().cpu() for k, v in model.state_dict().items()}
    state = {k.removeprefix("module."): v for k, v in state.items()}  # unwrap DDP
    torch.save(state, path / WEIGHTS)
    (path / CARD).write_text(card.model_dump_json(indent=2))
    return path


def read_card(path: str | Path) -> ModelCard:
    """The model card of a checkpoint directory."""
    card_file = Path(path) / CARD
    if not card_file.exists():
        raise FileNotFoundError(f"{path}: not a checkpoint (no {CARD})")
    return ModelCard.model_validate(json.loads(card_file.read_text()))


def load_checkpoint(
    path: str | Path, *, device: str | torch.device = "cpu"
) -> tuple[nn.Module, ModelCard]:
    """The model (eval mode, on ``device``) and card of a checkpoint directory."""
    card = read_card(path)
    model = build_model(card)
    weights = Path(path) / WEIGHTS
    if not weights.exists():
        raise FileNotFoundError(f"{path}: not a checkpoint (no {WEIGHTS})")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval(), card
