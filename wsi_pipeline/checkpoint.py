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
SHIPPED = Path(__file__).resolve().parent / "weights"
DEFAULT_MODEL = "nuclei-unet16"


class Normalization(BaseModel):
    """Input normalisation: ``(rgb / 255 - mean) / std`` per channel."""

    model_config = ConfigDict(extra="forbid")

    mean: list[float] = Field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = Field(default_factory=lambda: [0.25, 0.25, 0.25])


def normalize(images: torch.Tensor, norm: Normalization) -> torch.Tensor:
    """(B, H, W, 3) uint8 → (B, 3, H, W) float, ``(x / 255 - mean) / std``."""
    mean = torch.tensor(norm.mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(norm.std, device=images.device).view(1, -1, 1, 1)
    return (images.permute(0, 3, 1, 2).float() / 255 - mean) / std


def choose_device(device: str = "auto") -> torch.device:
    """``"auto"``: CUDA if available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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


def save_checkpoint(
    path: str | Path, model: nn.Module, card: ModelCard, *, half: bool = False
) -> Path:
    """Write ``model.pt`` and ``model.json`` into ``path`` (created if needed).

    Args:
        half: store floating-point weights as fp16 (half the size; loading casts them back).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, value in model.state_dict().items():
        key = key.removeprefix("_orig_mod.").removeprefix("module.")  # compiled / DDP wrappers
        value = value.detach().cpu()
        state[key] = value.half() if half and value.is_floating_point() else value
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


def shipped_checkpoints() -> list[Path]:
    """Checkpoints that ship inside the package (``wsi_pipeline/weights/<name>/``)."""
    if not SHIPPED.is_dir():
        return []
    return sorted(p for p in SHIPPED.iterdir() if (p / CARD).exists() and (p / WEIGHTS).exists())


def find_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint directories under ``root`` (``model.json`` beside ``model.pt``)."""
    return sorted(
        card.parent for card in Path(root).rglob(CARD) if (card.parent / WEIGHTS).exists()
    )


def resolve_checkpoint(checkpoint: str | Path | None) -> Path:
    """A checkpoint directory from a path, a shipped model's name, or ``None`` (the default).

    Raises:
        FileNotFoundError: nothing matches; the message lists the shipped models.
    """
    name = DEFAULT_MODEL if checkpoint is None else str(checkpoint)
    path = Path(name)
    if (path / CARD).exists():
        return path
    shipped = {p.name: p for p in shipped_checkpoints()}
    if name in shipped:
        return shipped[name]
    valid = ", ".join(shipped) or "none"
    what = (
        "no checkpoint given and the default model is not installed"
        if checkpoint is None
        else (f"{name}: not a checkpoint directory (model.json + model.pt) nor a shipped model")
    )
    raise FileNotFoundError(f"{what}; shipped models: {valid}")
