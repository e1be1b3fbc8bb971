"""CASe-UNet (CHSN 2023): multi-scale convs, MHSA bottleneck, UNet3+ full-scale decoder.

The official notebooks (argon125/CASe_UNet_Segmentation) were unavailable; this is our
reconstruction from the paper's description (``seed-models.md`` §4): multi-scale encoder
blocks, one pre-norm transformer layer on the /16 bottleneck tokens, and a UNet 3+
(Huang et al., ICASSP 2020) decoder without deep supervision.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import ConvNormAct, TransformerLayer, check_divisible
from .registry import register_model


class MultiScaleBlock(nn.Module):
    """Parallel CBR(3), CBR(5), CBR(7) → concat → CBR(1) → CBR(3)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.branches = nn.ModuleList(ConvNormAct(in_channels, out_channels, k) for k in (3, 5, 7))
        self.fuse = ConvNormAct(3 * out_channels, out_channels, 1)
        self.conv = ConvNormAct(out_channels, out_channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.fuse(torch.cat([b(x) for b in self.branches], dim=1)))


class FullScaleStage(nn.Module):
    """UNet 3+ decoder stage at ``level``: every source is resized to it, CBR(3) → cat width.

    Sources at a finer level are max-pooled (ceil mode), coarser ones bilinearly up-sampled.

    Args:
        level: target level (0 = full resolution).
        in_channels: channels of the sources, finest first; source j is at level j.
        cat_channels: width each source is projected to.
    """

    def __init__(self, level: int, in_channels: Sequence[int], cat_channels: int) -> None:
        super().__init__()
        self.level = level
        self.convs = nn.ModuleList(ConvNormAct(c, cat_channels) for c in in_channels)
        width = cat_channels * len(in_channels)
        self.fuse = ConvNormAct(width, width)

    def forward(self, sources: Sequence[Tensor]) -> Tensor:
        out = []
        for j, (src, conv) in enumerate(zip(sources, self.convs, strict=True)):
            if j < self.level:
                src = F.max_pool2d(src, 2 ** (self.level - j), ceil_mode=True)
            elif j > self.level:
                scale = float(2 ** (j - self.level))
                src = F.interpolate(src, scale_factor=scale, mode="bilinear", align_corners=False)
            out.append(conv(src))
        return self.fuse(torch.cat(out, dim=1))


@register_model("case_unet")
class CASeUNet(nn.Module):
    """CASe-UNet reconstruction.

    Args:
        in_channels: input channels.
        num_classes: output logit channels K (8 for EndoVis2018, 3 for LiTS in the paper).
        base_channels: encoder width at level 0; level i has ``base_channels * 2**i``.
        cat_channels: UNet 3+ per-source width.
        num_heads: bottleneck attention heads.
        mlp_ratio: bottleneck MLP width over token width.
    """

    size_divisor = 16

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 1,
        *,
        base_channels: int = 32,
        cat_channels: int = 32,
        num_heads: int = 8,
        mlp_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        widths = [base_channels * 2**i for i in range(5)]
        self.encoder = nn.ModuleList(
            MultiScaleBlock(a, b) for a, b in zip([in_channels, *widths[:-1]], widths, strict=True)
        )
        self.bottleneck = TransformerLayer(widths[4], num_heads, int(widths[4] * mlp_ratio))
        decoded = 5 * cat_channels
        self.decoder = nn.ModuleList(
            FullScaleStage(
                level, [*widths[: level + 1], *[decoded] * (3 - level), widths[4]], cat_channels
            )
            for level in (3, 2, 1, 0)
        )
        self.head = nn.Conv2d(decoded, num_classes, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        check_divisible(x, self.size_divisor, type(self).__name__)
        feats = []
        for i, block in enumerate(self.encoder):
            x = block(F.max_pool2d(x, 2) if i else x)
            feats.append(x)
        b, c, h, w = x.shape
        tokens = self.bottleneck(x.flatten(2).transpose(1, 2))
        feats[4] = tokens.transpose(1, 2).reshape(b, c, h, w)
        # Replacing level i by its decoded map makes it a decoder source for finer levels.
        for level, stage in zip((3, 2, 1, 0), self.decoder, strict=True):
            feats[level] = stage(feats)
        return self.head(feats[0])
