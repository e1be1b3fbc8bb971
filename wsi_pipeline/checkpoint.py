"""The checkpoint format: a directory with the weights and a model card.

```
<checkpoint>/
  model.pt      the model's state_dict (torch.save), loaded with weights_only=True
  model.json    the model card (:class:`ModelCard`): everything needed to rebuild and use it
```

Loading needs neither Ray nor the training code, and never unpickles arbitrary objects. The
card side (reading, resolving and :func:`check_checkpoint`) does not import torch, so processes
that run no model (the job's driver, slide reads, post-processing) stay small.
"""

from __future__ import annotations

import datetime as dt
import json
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from wsi_pipeline import __version__
from wsi_pipeline.batch import error_line

if TYPE_CHECKING:
    import torch
    from torch import nn

WEIGHTS = "model.pt"
CARD = "model.json"
SHIPPED = Path(__file__).resolve().parent / "weights"
DEFAULT_MODEL = "nuclei-unet16-v6"


class CheckpointError(FileNotFoundError):
    """A checkpoint cannot be found or loaded; the message is one line saying which and why."""


class Normalization(BaseModel):
    """Input normalisation: ``(rgb / 255 - mean) / std`` per channel."""

    model_config = ConfigDict(extra="forbid")

    mean: list[float] = Field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = Field(default_factory=lambda: [0.25, 0.25, 0.25])


class PostProcess(BaseModel):
    """Every keyword argument of instance extraction for this model
    (:func:`~wsi_pipeline.segment.instances.instances_from_probabilities`); an unknown key is
    an error, so a typo never reaches a training worker."""

    model_config = ConfigDict(extra="forbid")

    min_size: int = Field(10, ge=0, description="instances with fewer px are removed")
    interior_threshold: float = Field(0.5, ge=0, le=1, description="marker seed (3class)")
    foreground_threshold: float = Field(0.5, ge=0, le=1, description="nucleus px")
    marker_min_size: int = Field(4, ge=0, description="smaller markers are noise (3class)")
    split_touching: bool = Field(True, description="distance watershed (binary)")
    peak_min_distance: int = Field(5, ge=1, description="px between seeds (binary)")
    fill_holes: bool = Field(True, description="fill holes enclosed by one instance")
    distance_threshold: float = Field(0.5, ge=0, le=1, description="marker seed (distance)")


class ModelCard(BaseModel):
    """What a checkpoint is: architecture, classes, resolution, data, scores, provenance."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    architecture: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    in_channels: int = 3
    num_classes: int = 3
    target_mode: Literal["3class", "binary", "distance"] = "3class"
    mpp: float = Field(gt=0, description="µm/px the model was trained at; inference reads at it")
    size_divisor: int | None = Field(
        None, ge=1, description="input H and W must be multiples of this (None: older cards)"
    )
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
    from wsi_pipeline.models import create_model  # registers the architectures

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
    import torch

    from wsi_pipeline.models.registry import size_divisor, strip_wrappers

    for key, value in strip_wrappers(model.state_dict()).items():
        value = value.detach().cpu()
        state[key] = value.half() if half and value.is_floating_point() else value
    torch.save(state, path / WEIGHTS)
    # Always the architecture's own: a card copied from another model must not carry its divisor.
    card = card.model_copy(update={"size_divisor": size_divisor(card.architecture)})
    (path / CARD).write_text(card.model_dump_json(indent=2))
    return path


def read_card(checkpoint: str | Path | None) -> ModelCard:
    """The model card of a checkpoint: a directory, a shipped model's name or ``None`` (the
    default model)."""
    card_file = resolve_checkpoint(checkpoint) / CARD
    try:
        return ModelCard.model_validate(json.loads(card_file.read_text()))
    except (ValueError, OSError) as exc:  # ValidationError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"{card_file}: not a valid model card ({error_line(exc)})") from None


def check_checkpoint(checkpoint: str | Path | None) -> tuple[Path, ModelCard]:
    """The directory and card of a checkpoint, checked without torch: a valid card, and a
    weights file that is an intact torch archive (every member's CRC that was recorded
    matches). A legacy ``torch.save`` file (not a zip archive) is accepted unchecked. Weights
    that do not fit the architecture show only when a model loads them
    (:func:`load_checkpoint`).

    Raises:
        CheckpointError: missing, corrupt, or not a torch archive.
    """
    path = resolve_checkpoint(checkpoint)
    card = read_card(path)
    weights = path / WEIGHTS
    if not weights.exists():
        raise CheckpointError(f"{path}: not a checkpoint (no {WEIGHTS})")
    try:
        if _is_legacy_torch_file(weights):
            return path, card
        with zipfile.ZipFile(weights) as archive:
            corrupt, names = _corrupt_member(archive), archive.namelist()
    except Exception as exc:  # truncated, not a zip, unreadable
        raise CheckpointError(f"{weights}: cannot load the weights ({error_line(exc)})") from None
    if corrupt:
        raise CheckpointError(f"{weights}: cannot load the weights ({corrupt} is corrupt)")
    if not any(name.endswith("/data.pkl") for name in names):
        raise CheckpointError(f"{weights}: cannot load the weights (not a torch.save archive)")
    return path, card


# torch.save's format before archives (``_use_new_zipfile_serialization=False``) starts with a
# pickled magic number: PROTO <n>, LONG1 of 10 bytes, 0x1950a86a20f9469cfc6c little-endian.
_LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def _is_legacy_torch_file(weights: Path) -> bool:
    with weights.open("rb") as file:
        head = file.read(2 + len(_LEGACY_MAGIC))
    return head[:1] == b"\x80" and head[2:] == _LEGACY_MAGIC


def _corrupt_member(archive: zipfile.ZipFile) -> str | None:
    """The first member whose bytes do not match their CRC. Members stored with CRC 0 and
    bytes in them were written with torch's CRCs turned off (``set_crc32_options(False)``):
    nothing to check them against."""
    for info in archive.infolist():
        if info.CRC == 0 and info.file_size:
            continue
        try:
            with archive.open(info) as member:
                while member.read(1 << 20):
                    pass
        except zipfile.BadZipFile:
            return info.filename
    return None


def load_checkpoint(
    checkpoint: str | Path | None, *, device: str | torch.device = "cpu"
) -> tuple[nn.Module, ModelCard]:
    """The model (eval mode, on ``device``) and card of a checkpoint (see :func:`read_card`)."""
    from wsi_pipeline.models.registry import load_weights

    path = resolve_checkpoint(checkpoint)
    card = read_card(path)
    try:
        model = build_model(card)
    except (ValueError, TypeError) as exc:  # an unknown architecture or keyword
        raise CheckpointError(f"{path / CARD}: {error_line(exc)}") from None
    weights = path / WEIGHTS
    if not weights.exists():
        raise CheckpointError(f"{path}: not a checkpoint (no {WEIGHTS})")
    try:
        load_weights(model, weights)
    except Exception as exc:  # a truncated or foreign file; a refused pickle
        raise CheckpointError(f"{weights}: cannot load the weights ({error_line(exc)})") from None
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
        CheckpointError: nothing matches; the message lists the shipped models.
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
    raise CheckpointError(f"{what}; shipped models: {valid}")
