"""Model registry: a dict of name → model class, filled by :func:`register_model`."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor, nn

M = TypeVar("M", bound=type[nn.Module])

_MODELS: dict[str, type[nn.Module]] = {}
_COMPILED_PREFIX, _DDP_PREFIX = "_orig_mod.", "module."


def register_model(name: str) -> Callable[[M], M]:
    """Class decorator that registers a model under ``name``.

    The class must accept ``in_channels`` and ``num_classes`` and define ``size_divisor``
    (H and W of every input must be a multiple of it).

    Raises:
        ValueError: ``name`` is already registered.
        TypeError: the class has no int ``size_divisor``.
    """

    def decorator(cls: M) -> M:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        if not isinstance(getattr(cls, "size_divisor", None), int):
            raise TypeError(f"{cls.__name__} must define an int size_divisor")
        _MODELS[name] = cls
        return cls

    return decorator


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_MODELS)


def get_model_class(name: str) -> type[nn.Module]:
    """The class registered under ``name``.

    Raises:
        ValueError: unknown name; the message lists the valid ones.
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {list_models()}")
    return _MODELS[name]


def size_divisor(name: str) -> int:
    """Input H and W for model ``name`` must be multiples of this."""
    divisor: int = get_model_class(name).size_divisor  # type: ignore[attr-defined]
    return divisor


def model_kwargs(name: str) -> list[str]:
    """Keyword arguments accepted by model ``name`` besides in_channels and num_classes."""
    params = inspect.signature(get_model_class(name)).parameters
    return sorted(set(params) - {"in_channels", "num_classes"})


def create_model(
    name: str,
    in_channels: int = 3,
    num_classes: int = 1,
    *,
    weights: str | Path | None = None,
    **kwargs: object,
) -> nn.Module:
    """Build a registered model; kwargs that are ``None`` are dropped (model defaults apply).

    Args:
        name: registered name, see :func:`list_models`.
        in_channels: input image channels.
        num_classes: output channels K; every model returns (N, K, H, W) logits.
        weights: optional state-dict file for the whole model (see :func:`load_weights`).
        **kwargs: architecture options of that model.

    Raises:
        ValueError: unknown model name, or weights that do not fit.
        TypeError: an option the model does not take; the message lists the valid ones.
    """
    cls = get_model_class(name)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    valid = model_kwargs(name)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise TypeError(f"{name} got unexpected options {unknown}; valid: {valid}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    model = cls(in_channels=in_channels, num_classes=num_classes, **kwargs)
    if weights is not None:
        load_weights(model, weights)
    return model


def _unwrap(state: object) -> Mapping[str, Tensor]:
    if isinstance(state, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping):
        raise ValueError(f"expected a state dict, got {type(state).__name__}")
    return strip_wrappers(state)


def strip_wrappers(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """State-dict keys without the prefixes ``torch.compile`` and DDP add to a wrapped module."""
    return {k.removeprefix(_COMPILED_PREFIX).removeprefix(_DDP_PREFIX): v for k, v in state.items()}


def load_weights(module: nn.Module, path: str | Path) -> None:
    """Load a state dict saved with ``torch.save`` into ``module``, strictly.

    The file may hold the state dict itself or a dict with it under ``"state_dict"`` or
    ``"model"``. It is read with ``weights_only=True``, so no code in it runs.

    Raises:
        ValueError: keys or shapes differ; the message names them.
    """
    state = _unwrap(torch.load(path, map_location="cpu", weights_only=True))
    own = module.state_dict()
    problems = []
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    shapes = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            problems.append(f"{len(items)} {label}: {items[:5]}{more}")
    if problems:
        raise ValueError(
            f"weights {str(path)!r} do not match {type(module).__name__}: " + "; ".join(problems)
        )
    module.load_state_dict(state)
