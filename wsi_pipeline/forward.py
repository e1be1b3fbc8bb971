"""A model's forward pass, as every caller runs it: normalise, autocast, probabilities.

Training, validation, evaluation, tuning and the segment job's predictor all go through
:func:`forward` and :func:`probabilities`, so a model sees the same input everywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from wsi_pipeline.checkpoint import Normalization


def choose_device(device: str = "auto") -> torch.device:
    """``"auto"``: CUDA if available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def normalize(images: torch.Tensor, norm: Normalization) -> torch.Tensor:
    """(B, H, W, 3) uint8 → (B, 3, H, W) float, ``(x / 255 - mean) / std``."""
    mean = torch.tensor(norm.mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(norm.std, device=images.device).view(1, -1, 1, 1)
    return (images.permute(0, 3, 1, 2).float() / 255 - mean) / std


def forward(
    model: nn.Module, images: torch.Tensor, norm: Normalization, *, autocast: bool
) -> torch.Tensor:
    """Logits of ``(B, H, W, 3)`` uint8 images: normalised, ``channels_last`` on CUDA, and under
    bf16 autocast when ``autocast``."""
    x = normalize(images, norm)
    if x.device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        return model(x)


def probabilities(logits: torch.Tensor, mode: str = "3class") -> torch.Tensor:
    """Sigmoid for K = 1, softmax over the class axis otherwise (in float32); for the
    ``"distance"`` target mode, softmax over the three classes and sigmoid on the distance."""
    logits = logits.float()
    if mode == "distance":
        return torch.cat([logits[:, :3].softmax(dim=1), torch.sigmoid(logits[:, 3:])], dim=1)
    return torch.sigmoid(logits) if logits.shape[1] == 1 else logits.softmax(dim=1)
