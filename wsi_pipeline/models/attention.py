"""Attention blocks and a name → class factory.

Every block in :data:`ATTENTION_LAYERS` maps (N, C, H, W) to the same shape and is built as
``cls(channels, **kwargs)``. GdAM (GRU-Net) produces attention maps from a separate tensor,
so it lives here but is not in the factory.

References: ECA-Net (Wang et al., CVPR 2020), SE (Hu et al., CVPR 2018), CBAM (Woo et al.,
ECCV 2018), scSE (Roy et al., MICCAI 2018), LEECAU-Net (Das et al., PIC 2024), LANet
(ITTA 2024), GRU-Net (Roy et al., MIUA 2024).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import pairwise
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import create_act


def eca_kernel_size(channels: int, gamma: int = 2, beta: int = 1) -> int:
    """ECA-Net's adaptive kernel: the odd number nearest to ``(log2 C + beta) / gamma``."""
    t = int(abs((math.log2(channels) + beta) / gamma))
    return t if t % 2 else t + 1


class ECA(nn.Module):
    """Efficient channel attention: x · σ(Conv1d(GAP(x))).

    Args:
        channels: input channels.
        kernel_size: Conv1d kernel; ``None`` picks ECA-Net's adaptive size (``standard``) or 3.
        mode: ``"standard"`` convolves across the channel axis (ECA-Net); ``"depthwise"``
            reproduces the LEECAU code, a C-group Conv1d on a length-1 sequence, so each
            channel is gated only by its own pooled value. Its side taps multiply the zero
            padding and never receive a gradient.
        bias: Conv1d bias.
    """

    def __init__(
        self,
        channels: int,
        *,
        kernel_size: int | None = None,
        mode: Literal["standard", "depthwise"] = "standard",
        bias: bool = False,
    ) -> None:
        super().__init__()
        if mode == "standard":
            k = kernel_size or eca_kernel_size(channels)
            self.conv = nn.Conv1d(1, 1, k, padding=k // 2, bias=bias)
        elif mode == "depthwise":
            k = kernel_size or 3
            self.conv = nn.Conv1d(channels, channels, k, padding=k // 2, groups=channels, bias=bias)
        else:
            raise ValueError(f"unknown ECA mode {mode!r}; valid: ['standard', 'depthwise']")
        self.mode = mode

    def forward(self, x: Tensor) -> Tensor:
        s = x.mean((2, 3))
        s = s.unsqueeze(1) if self.mode == "standard" else s.unsqueeze(-1)
        a = torch.sigmoid(self.conv(s)).reshape(x.shape[0], -1, 1, 1)
        return x * a


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation on a ``grid × grid`` pooled map.

    ``grid=1`` is SE; ``grid=2`` is LEECAU's LECA (quadrant-wise SE whose 2×2 gate is
    bilinearly upsampled to H×W).

    Args:
        channels: input channels.
        reduction: hidden width is ``channels // reduction`` (at least 1).
        hidden_channels: explicit hidden width, overrides ``reduction``.
        bias: bias on the two 1×1 convs.
        norm: BatchNorm after each 1×1 conv (LANet's WB gate).
        grid: adaptive-pool output size.
        act: hidden activation.
    """

    def __init__(
        self,
        channels: int,
        *,
        reduction: int = 16,
        hidden_channels: int | None = None,
        bias: bool = True,
        norm: bool = False,
        grid: int = 1,
        act: str = "relu",
    ) -> None:
        super().__init__()
        hidden = hidden_channels or max(1, channels // reduction)
        self.grid = grid
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=bias)
        self.bn1 = nn.BatchNorm2d(hidden) if norm else nn.Identity()
        self.act = create_act(act)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=bias)
        self.bn2 = nn.BatchNorm2d(channels) if norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        s = F.adaptive_avg_pool2d(x, self.grid)
        a = torch.sigmoid(self.bn2(self.fc2(self.act(self.bn1(self.fc1(s))))))
        if self.grid > 1:
            a = F.interpolate(a, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return x * a


class LECA(SqueezeExcite):
    """LEECAU's local channel attention as coded: SE on a 2×2 grid (reduction 16, bias)."""

    def __init__(self, channels: int, *, reduction: int = 16) -> None:
        super().__init__(channels, reduction=reduction, bias=True, grid=2)


class EntropyLECA(nn.Module):
    """Entropy-quantised channel attention, our reading of the LEECAU paper (not in its code).

    Per channel, the spatial softmax entropy (normalised by log HW) is quantised to ``levels``
    values with a straight-through round; [GAP(x), H] feeds a C/r-bottleneck gate.

    Args:
        channels: input channels.
        reduction: bottleneck reduction.
        levels: quantisation levels.
    """

    def __init__(self, channels: int, *, reduction: int = 16, levels: int = 8) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.levels = levels
        self.fc1 = nn.Conv2d(2 * channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.flatten(2).float()
        logp = flat.log_softmax(-1)
        # log(HW) is 0 for a 1×1 map, where the entropy is 0 too.
        entropy = -(logp.exp() * logp).sum(-1) / max(math.log(flat.shape[-1]), 1e-6)
        q = self.levels - 1
        entropy = entropy + (torch.round(entropy * q) / q - entropy).detach()
        s = torch.cat([x.mean((2, 3)), entropy.to(x.dtype)], dim=1)[..., None, None]
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class CbamSpatial(nn.Module):
    """CBAM spatial attention: x · σ(BN(Conv7×7([mean_c x, max_c x]))).

    Args:
        channels: input channels (unused; kept for the factory signature).
        kernel_size: conv kernel.
        norm: BatchNorm on the 1-channel map, as in the original CBAM.
    """

    def __init__(self, channels: int, *, kernel_size: int = 7, norm: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1) if norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        s = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.bn(self.conv(s)))


class SpatialSE(nn.Module):
    """sSE (scSE's spatial branch): x · σ(Conv1×1_{C→1}(x))."""

    def __init__(self, channels: int, *, bias: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.conv(x))


class EFA(nn.Module):
    """LANet's efficient feature attention: ECA(k=3, bias)(x) + sSE(x)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channel = ECA(channels, kernel_size=3, bias=True)
        self.spatial = SpatialSE(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.channel(x) + self.spatial(x)


class EcaLeca(nn.Module):
    """LEECAU's stage attention: (ECA(x) + LECA(x)) / 2.

    Args:
        channels: input channels.
        eca_mode: ``"repo"`` (depthwise ECA as coded) or ``"standard"`` (ECA-Net).
        leca_mode: ``"repo"`` (2×2-grid SE as coded) or ``"entropy"`` (:class:`EntropyLECA`).
    """

    def __init__(
        self,
        channels: int,
        *,
        eca_mode: Literal["repo", "standard"] = "repo",
        leca_mode: Literal["repo", "entropy"] = "repo",
    ) -> None:
        super().__init__()
        if eca_mode not in ("repo", "standard"):
            raise ValueError(f"unknown eca_mode {eca_mode!r}; valid: ['repo', 'standard']")
        if leca_mode not in ("repo", "entropy"):
            raise ValueError(f"unknown leca_mode {leca_mode!r}; valid: ['repo', 'entropy']")
        self.eca = ECA(channels, mode="depthwise" if eca_mode == "repo" else "standard")
        self.leca = LECA(channels) if leca_mode == "repo" else EntropyLECA(channels)

    def forward(self, x: Tensor) -> Tensor:
        return (self.eca(x) + self.leca(x)) / 2


ATTENTION_LAYERS: dict[str, Callable[..., nn.Module]] = {
    "cbam_spatial": CbamSpatial,
    "eca": ECA,
    "eca_leca": EcaLeca,
    "efa": EFA,
    "leca": LECA,
    "leca_entropy": EntropyLECA,
    "se": SqueezeExcite,
    "sse": SpatialSE,
}


def create_attn(name: str | None, channels: int, **kwargs: object) -> nn.Module:
    """Build an attention block by name; ``None`` gives an identity.

    Raises:
        ValueError: the name is not in :data:`ATTENTION_LAYERS`.
    """
    if name is None:
        return nn.Identity()
    if name not in ATTENTION_LAYERS:
        raise ValueError(f"unknown attention {name!r}; valid: {sorted(ATTENTION_LAYERS)}")
    return ATTENTION_LAYERS[name](channels, **kwargs)


class SeparableHead(nn.Sequential):
    """Depthwise 1×1 (no bias) → pointwise C→1 (bias) → softplus, as Keras SeparableConv2D."""

    def __init__(self, channels: int) -> None:
        super().__init__(
            nn.Conv2d(channels, channels, 1, groups=channels, bias=False),
            nn.Conv2d(channels, 1, 1),
            nn.Softplus(),
        )


class GdAM(nn.Module):
    """GRU-Net's Gaussian distribution-based attention.

    From the bridge tensor, ``levels`` transposed convs build features at ×2, ×4, … of its
    resolution; a 32×32 prior map goes through its own ×2 transposed convs. At each level
    μ = h_μ(f) + mean(T) and σ = sqrt(h_σ(f)² + var(T)) (scalars over the prior map), and the
    attention map is μ + σ·ε while training (reparameterised sample) and μ at eval unless
    ``sample_at_eval``.

    Args:
        in_channels: bridge channels.
        hidden_channels: feature-path width (256 in the paper).
        levels: number of maps, finest last.
        prior: ``"fixed"`` (seeded N(0,1) buffer, or projected ``text_embeddings``) or
            ``"learnable"`` (the same start values as a parameter).
        prior_size: side of the prior map.
        text_embeddings: optional (N, D) embeddings of pathology phrases; two frozen seeded
            random projections turn them into the prior, as the paper's untrained Dense pair.
        sample_at_eval: sample at eval too, as the original code does.
        seed: seed of the prior and its projections.
    """

    def __init__(
        self,
        in_channels: int,
        *,
        hidden_channels: int = 256,
        levels: int = 4,
        prior: Literal["fixed", "learnable"] = "fixed",
        prior_size: int = 32,
        text_embeddings: Tensor | None = None,
        sample_at_eval: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if prior not in ("fixed", "learnable"):
            raise ValueError(f"unknown prior {prior!r}; valid: ['fixed', 'learnable']")
        self.sample_at_eval = sample_at_eval
        widths = [in_channels] + [hidden_channels] * levels
        self.features = nn.ModuleList(
            nn.ConvTranspose2d(a, b, 2, stride=2) for a, b in pairwise(widths)
        )
        prior_up = [nn.ConvTranspose2d(1, 1, 2, stride=2) for _ in range(levels)]
        for up in prior_up:
            # Positive kernels and zero bias keep the ReLU chain on the prior from dying at init.
            nn.init.uniform_(up.weight, 0.25, 0.75)
            nn.init.zeros_(up.bias)  # type: ignore[arg-type]  # built with a bias
        self.prior_up = nn.ModuleList(prior_up)
        self.mu = SeparableHead(hidden_channels)
        self.sigma = SeparableHead(hidden_channels)
        t0 = self._initial_prior(prior_size, text_embeddings, seed)
        if prior == "learnable":
            self.prior = nn.Parameter(t0)
        else:
            self.register_buffer("prior", t0)

    @staticmethod
    def _initial_prior(size: int, text_embeddings: Tensor | None, seed: int) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        if text_embeddings is None:
            return torch.randn(1, 1, size, size, generator=g, device="cpu")
        e = text_embeddings.float().cpu()
        w1 = torch.randn(e.shape[1], size, generator=g, device="cpu") / math.sqrt(e.shape[1])
        w2 = torch.randn(e.shape[0], size, generator=g, device="cpu") / math.sqrt(e.shape[0])
        return F.relu(F.relu(e @ w1).T @ w2)[None, None]

    def forward(self, x: Tensor) -> list[Tensor]:
        maps = []
        f: Tensor = x
        t: Tensor = self.prior
        for up_f, up_t in zip(self.features, self.prior_up, strict=True):
            f, t = F.relu(up_f(f)), F.relu(up_t(t))
            mu = self.mu(f) + t.mean()
            if self.training or self.sample_at_eval:
                sigma = torch.sqrt(self.sigma(f) ** 2 + t.var(correction=0))
                mu = mu + sigma * torch.randn_like(mu)
            maps.append(mu)
        return maps
