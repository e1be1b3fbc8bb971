"""Model zoo: attention U-Nets for nuclei segmentation behind one registry.

>>> model = create_model("lanet", in_channels=3, num_classes=2)

Every model maps (N, in_channels, H, W) to (N, num_classes, H, W) logits, with H and W
multiples of ``model.size_divisor``.
"""

from __future__ import annotations

from . import case_unet, gru_net, lanet, leecau_net, sa_unet, unet  # noqa: F401  (registers)
from .registry import (
    create_model,
    get_model_class,
    list_models,
    load_weights,
    model_kwargs,
    register_model,
    size_divisor,
)

__all__ = [
    "create_model",
    "get_model_class",
    "list_models",
    "load_weights",
    "model_kwargs",
    "register_model",
    "size_divisor",
]
