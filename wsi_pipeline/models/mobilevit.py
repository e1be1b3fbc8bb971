"""MobileViT-S (Mehta & Rastegari, ICLR 2022) as a 5-level segmentation encoder.

As in Apple's cvnets (the port LANet uses) and timm's ``mobilevit_s``: SiLU everywhere, 2×2
patches, 4 heads, MLP ratio 2, dropout 0.1. The unused 1×1 160→640 conv and the classifier
are left out. Outputs are at /2 … /32 with 32, 64, 96, 128, 160 channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import ConvNormAct, TransformerLayer


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to a multiple of ``divisor``, never more than 10 % below it."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1×1 expand → depthwise 3×3 → linear 1×1, residual when shapes match.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: depthwise stride.
        expand_ratio: hidden width is ``make_divisible(expand_ratio * in_channels)``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, *, stride: int = 1, expand_ratio: float = 4.0
    ) -> None:
        super().__init__()
        hidden = make_divisible(expand_ratio * in_channels)
        self.use_residual = stride == 1 and in_channels == out_channels
        self.conv1_1x1 = ConvNormAct(in_channels, hidden, 1, act="silu")
        self.conv2_kxk = ConvNormAct(hidden, hidden, 3, stride=stride, groups=hidden, act="silu")
        self.conv3_1x1 = ConvNormAct(hidden, out_channels, 1, act=None)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv3_1x1(self.conv2_kxk(self.conv1_1x1(x)))
        return x + out if self.use_residual else out


class MobileViTBlock(nn.Module):
    """Local 3×3 conv, a transformer across 2×2-patch token sequences, then conv fusion.

    Args:
        channels: input and output channels.
        dim: transformer width.
        mlp_dim: transformer MLP width.
        depth: transformer layers.
        num_heads: attention heads.
        patch_size: patch side.
        drop: dropout after attention and MLP.
    """

    def __init__(
        self,
        channels: int,
        dim: int,
        mlp_dim: int,
        depth: int,
        *,
        num_heads: int = 4,
        patch_size: int = 2,
        drop: float = 0.1,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.conv_kxk = ConvNormAct(channels, channels, 3, act="silu")
        self.conv_1x1 = nn.Conv2d(channels, dim, 1, bias=False)
        self.transformer = nn.Sequential(
            *[
                TransformerLayer(dim, num_heads, mlp_dim, act="silu", drop=drop)
                for _ in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(dim)
        self.conv_proj = ConvNormAct(dim, channels, 1, act="silu")
        self.conv_fusion = ConvNormAct(2 * channels, channels, 3, act="silu")

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        y = self.conv_1x1(self.conv_kxk(x))
        b, c, h, w = y.shape
        p = self.patch_size
        nh, nw = -(-h // p), -(-w // p)
        resized = (nh * p, nw * p) != (h, w)
        if resized:
            y = F.interpolate(y, size=(nh * p, nw * p), mode="bilinear", align_corners=False)
        # (B, C, nh·p, nw·p) → (B·p·p, nh·nw, C): one token sequence per pixel position in a patch.
        y = y.reshape(b, c, nh, p, nw, p).permute(0, 3, 5, 2, 4, 1).reshape(b * p * p, nh * nw, c)
        y = self.norm(self.transformer(y))
        y = y.reshape(b, p, p, nh, nw, c).permute(0, 5, 3, 1, 4, 2).reshape(b, c, nh * p, nw * p)
        if resized:
            y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
        return self.conv_fusion(torch.cat([shortcut, self.conv_proj(y)], dim=1))


class MobileViTEncoder(nn.Module):
    """MobileViT-S: stem then five stages, returning each stage output.

    Args:
        in_channels: input channels.
    """

    out_channels = (32, 64, 96, 128, 160)

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = ConvNormAct(in_channels, 16, 3, stride=2, act="silu")
        self.stages = nn.ModuleList(
            [
                nn.Sequential(InvertedResidual(16, 32)),
                nn.Sequential(
                    InvertedResidual(32, 64, stride=2),
                    InvertedResidual(64, 64),
                    InvertedResidual(64, 64),
                ),
                nn.Sequential(InvertedResidual(64, 96, stride=2), MobileViTBlock(96, 144, 288, 2)),
                nn.Sequential(
                    InvertedResidual(96, 128, stride=2), MobileViTBlock(128, 192, 384, 4)
                ),
                nn.Sequential(
                    InvertedResidual(128, 160, stride=2), MobileViTBlock(160, 240, 480, 3)
                ),
            ]
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d | nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats
