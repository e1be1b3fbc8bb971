"""Inception-v4 trunk (Szegedy et al., AAAI 2017) as a 5-level segmentation encoder.

Module layout and names follow timm's ``inception_v4`` (``features.0`` … ``features.21``)
without the classifier. Every 3×3 conv and max-pool is padded by 1, as smp's encoder patches
it, so the five taps sit at exactly /2 … /32 of inputs divisible by 32.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from .blocks import ConvNormAct

# BN eps 1e-3 as in the TF-ported weights; 'same' padding is the smp padding patch.
_cbr = partial(ConvNormAct, norm_eps=1e-3)


def _maxpool() -> nn.MaxPool2d:
    return nn.MaxPool2d(3, stride=2, padding=1)


def _avgpool_1x1(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False),
        _cbr(in_channels, out_channels, 1),
    )


class _Branches(nn.Module):
    """Runs the ``branch*`` children on the same input and concatenates them."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([branch(x) for branch in self.children()], dim=1)


class Mixed3a(_Branches):
    def __init__(self) -> None:
        super().__init__()
        self.maxpool = _maxpool()
        self.conv = _cbr(64, 96, 3, stride=2)


class Mixed4a(_Branches):
    def __init__(self) -> None:
        super().__init__()
        self.branch0 = nn.Sequential(_cbr(160, 64, 1), _cbr(64, 96, 3))
        self.branch1 = nn.Sequential(
            _cbr(160, 64, 1), _cbr(64, 64, (1, 7)), _cbr(64, 64, (7, 1)), _cbr(64, 96, 3)
        )


class Mixed5a(_Branches):
    def __init__(self) -> None:
        super().__init__()
        self.conv = _cbr(192, 192, 3, stride=2)
        self.maxpool = _maxpool()


class InceptionA(_Branches):
    def __init__(self) -> None:
        super().__init__()
        self.branch0 = _cbr(384, 96, 1)
        self.branch1 = nn.Sequential(_cbr(384, 64, 1), _cbr(64, 96, 3))
        self.branch2 = nn.Sequential(_cbr(384, 64, 1), _cbr(64, 96, 3), _cbr(96, 96, 3))
        self.branch3 = _avgpool_1x1(384, 96)


class ReductionA(_Branches):
    def __init__(self) -> None:
        super().__init__()
        self.branch0 = _cbr(384, 384, 3, stride=2)
        self.branch1 = nn.Sequential(
            _cbr(384, 192, 1), _cbr(192, 224, 3), _cbr(224, 256, 3, stride=2)
        )
        self.branch2 = _maxpool()


class InceptionB(_Branches):
    def __init__(self) -> None:
        super().__init__()
        self.branch0 = _cbr(1024, 384, 1)
        self.branch1 = nn.Sequential(
            _cbr(1024, 192, 1), _cbr(192, 224, (1, 7)), _cbr(224, 256, (7, 1))
        )
        self.branch2 = nn.Sequential(
            _cbr(1024, 192, 1),
            _cbr(192, 192, (7, 1)),
            _cbr(192, 224, (1, 7)),
            _cbr(224, 224, (7, 1)),
            _cbr(224, 256, (1, 7)),
        )
        self.branch3 = _avgpool_1x1(1024, 128)


class ReductionB(_Branches):
    def __init__(self) -> None:
        super().__init__()
        self.branch0 = nn.Sequential(_cbr(1024, 192, 1), _cbr(192, 192, 3, stride=2))
        self.branch1 = nn.Sequential(
            _cbr(1024, 256, 1),
            _cbr(256, 256, (1, 7)),
            _cbr(256, 320, (7, 1)),
            _cbr(320, 320, 3, stride=2),
        )
        self.branch2 = _maxpool()


class InceptionC(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.branch0 = _cbr(1536, 256, 1)
        self.branch1_0 = _cbr(1536, 384, 1)
        self.branch1_1a = _cbr(384, 256, (1, 3))
        self.branch1_1b = _cbr(384, 256, (3, 1))
        self.branch2_0 = _cbr(1536, 384, 1)
        self.branch2_1 = _cbr(384, 448, (3, 1))
        self.branch2_2 = _cbr(448, 512, (1, 3))
        self.branch2_3a = _cbr(512, 256, (1, 3))
        self.branch2_3b = _cbr(512, 256, (3, 1))
        self.branch3 = _avgpool_1x1(1536, 256)

    def forward(self, x: Tensor) -> Tensor:
        x1 = self.branch1_0(x)
        x2 = self.branch2_2(self.branch2_1(self.branch2_0(x)))
        return torch.cat(
            [
                self.branch0(x),
                self.branch1_1a(x1),
                self.branch1_1b(x1),
                self.branch2_3a(x2),
                self.branch2_3b(x2),
                self.branch3(x),
            ],
            dim=1,
        )


class InceptionV4Encoder(nn.Module):
    """Inception-v4 trunk returning the five stage outputs (64, 192, 384, 1024, 1536 ch).

    Args:
        in_channels: input channels.
    """

    out_channels = (64, 192, 384, 1024, 1536)
    # Exclusive end index of each stage in ``features`` (taps after features 2, 4, 8, 14, 21).
    stage_ends = (3, 5, 9, 15, 22)

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _cbr(in_channels, 32, 3, stride=2),
            _cbr(32, 32, 3),
            _cbr(32, 64, 3),
            Mixed3a(),
            Mixed4a(),
            Mixed5a(),
            *[InceptionA() for _ in range(4)],
            ReductionA(),
            *[InceptionB() for _ in range(7)],
            ReductionB(),
            *[InceptionC() for _ in range(3)],
        )

    def stages(self) -> list[nn.Module]:
        """The five stages as views on ``features`` (no parameters are copied)."""
        starts = (0, *self.stage_ends[:-1])
        return [self.features[a:b] for a, b in zip(starts, self.stage_ends, strict=True)]

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = []
        for stage in self.stages():
            x = stage(x)
            feats.append(x)
        return feats
