"""GRU-Net (Roy et al., MIUA 2024, arXiv 2406.08604): MultiRes U-Net with CDRB skips and GdAM.

Follows the official Keras code (AyushRoy2001/GRU-Net, ``model.py``) in PyTorch: MultiRes
blocks (Ibtehaz & Rahman 2020), controlled dense residual blocks on the skips, and decoder
stages multiplied by Gaussian attention maps (:class:`~.attention.GdAM`).
``seed-models.md`` §5 has the details and our defaults where the code is questionable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import GdAM
from .blocks import ConvNormAct, check_divisible
from .registry import register_model


class MultiResBlock(nn.Module):
    """MultiRes block: chained 3×3 CBRs (c1, c2, c3 ch) concatenated, plus a 1×1 shortcut.

    Args:
        in_channels: input channels.
        filters: U; the three widths are int(0.167·αU), int(0.333·αU), int(0.5·αU).
        alpha: width multiplier α.
    """

    def __init__(self, in_channels: int, filters: int, *, alpha: float = 1.67) -> None:
        super().__init__()
        w = alpha * filters
        c1, c2, c3 = int(w * 0.167), int(w * 0.333), int(w * 0.5)
        self.out_channels = c1 + c2 + c3
        self.conv1 = ConvNormAct(in_channels, c1)
        self.conv2 = ConvNormAct(c1, c2)
        self.conv3 = ConvNormAct(c2, c3)
        self.bn_cat = nn.BatchNorm2d(self.out_channels)
        self.shortcut = ConvNormAct(in_channels, self.out_channels, 1, act=None)
        self.bn_out = nn.BatchNorm2d(self.out_channels)

    def forward(self, x: Tensor) -> Tensor:
        a = self.conv1(x)
        b = self.conv2(a)
        c = self.conv3(b)
        m = self.bn_cat(torch.cat([a, b, c], dim=1))
        return self.bn_out(F.relu(m + self.shortcut(x)))


class DenseUnit(nn.Module):
    """BN(ReLU([3×3 conv + BN](t) + [1×1 conv + BN](t)))."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv3 = ConvNormAct(in_channels, out_channels, 3, act=None)
        self.conv1 = ConvNormAct(in_channels, out_channels, 1, act=None)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, t: Tensor) -> Tensor:
        return self.bn(F.relu(self.conv3(t) + self.conv1(t)))


class CDRB(nn.Module):
    """Controlled dense residual block: four densely connected units, gated per pixel.

    Unit inputs are t1 = x, t2 = [u1, t1], t3 = [u2, t1, t2], t4 = [u3, t1, t2, t3] (as coded,
    so inputs repeat); the output u4 is multiplied by σ(conv1×1_{C→1}(x)).

    Args:
        in_channels: C.
        filters: F, output channels.
        gate_batch_mean: average the gate over the batch, as the original code does; the
            default gates each sample by itself so outputs do not depend on batch mates.
    """

    def __init__(self, in_channels: int, filters: int, *, gate_batch_mean: bool = False) -> None:
        super().__init__()
        c, f = in_channels, filters
        self.units = nn.ModuleList(DenseUnit(n, f) for n in (c, f + c, 2 * (f + c), 4 * (f + c)))
        self.gate = nn.Conv2d(c, 1, 1)
        self.gate_batch_mean = gate_batch_mean

    def forward(self, x: Tensor) -> Tensor:
        u1 = self.units[0](x)
        t2 = torch.cat([u1, x], dim=1)
        u2 = self.units[1](t2)
        t3 = torch.cat([u2, x, t2], dim=1)
        u3 = self.units[2](t3)
        u4 = self.units[3](torch.cat([u3, x, t2, t3], dim=1))
        g = torch.sigmoid(self.gate(x))
        if self.gate_batch_mean:
            g = g.mean(0, keepdim=True)
        return u4 * g


@register_model("gru_net")
class GRUNet(nn.Module):
    """GRU-Net: four MultiRes levels with CDRB skips, a MultiRes bridge, GdAM-gated decoder.

    Args:
        in_channels: input channels.
        num_classes: output logit channels K (1 in the paper, sigmoid).
        base_channels: U at level 0; level i uses ``base_channels * 2**i``.
        alpha: MultiRes width multiplier.
        gdam_channels: width of GdAM's feature path.
        gate_batch_mean: CDRB gate averaged over the batch (original code).
        prior: GdAM prior, ``"fixed"`` buffer or ``"learnable"`` parameter.
        text_embeddings: optional ``torch.save``'d (N, D) tensor of phrase embeddings for the
            GdAM prior (the paper used DistilBERT embeddings of 16 pathology phrases).
        sample_at_eval: sample GdAM maps at eval too (original code) instead of using μ.
    """

    size_divisor = 16

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 1,
        *,
        base_channels: int = 32,
        alpha: float = 1.67,
        gdam_channels: int = 256,
        gate_batch_mean: bool = False,
        prior: Literal["fixed", "learnable"] = "fixed",
        text_embeddings: str | Path | None = None,
        sample_at_eval: bool = False,
    ) -> None:
        super().__init__()
        filters = [base_channels * 2**i for i in range(5)]
        self.encoder = nn.ModuleList()
        self.skips = nn.ModuleList()
        channels = in_channels
        for f in filters[:4]:
            block = MultiResBlock(channels, f, alpha=alpha)
            self.encoder.append(block)
            self.skips.append(CDRB(block.out_channels, f, gate_batch_mean=gate_batch_mean))
            channels = block.out_channels
        self.bridge = MultiResBlock(channels, filters[4], alpha=alpha)
        self.ups = nn.ModuleList()
        self.decoder = nn.ModuleList()
        channels = self.bridge.out_channels
        for f in reversed(filters[:4]):
            self.ups.append(nn.ConvTranspose2d(channels, f, 2, stride=2))
            block = MultiResBlock(2 * f, f, alpha=alpha)
            self.decoder.append(block)
            channels = block.out_channels
        embeddings = None
        if text_embeddings is not None:
            embeddings = torch.load(text_embeddings, map_location="cpu", weights_only=True)
        self.gdam = GdAM(
            self.bridge.out_channels,
            hidden_channels=gdam_channels,
            prior=prior,
            text_embeddings=embeddings,
            sample_at_eval=sample_at_eval,
        )
        self.head = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        check_divisible(x, self.size_divisor, type(self).__name__)
        skips = []
        for i, (block, skip) in enumerate(zip(self.encoder, self.skips, strict=True)):
            x = block(F.max_pool2d(x, 2) if i else x)
            skips.append(skip(x))
        x = self.bridge(F.max_pool2d(x, 2))
        maps = self.gdam(x)
        for up, block, skip, attn in zip(
            self.ups, self.decoder, reversed(skips), maps, strict=True
        ):
            x = block(torch.cat([up(x), skip], dim=1)) * attn
        return self.head(x)
