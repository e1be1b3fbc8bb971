"""LANet (ITTA 2024): MobileViT-S encoder, EFA attention, additive AFF decoder.

Follows the official code (tyjcbzd/LANet, ``LANet.py``/``blocks.py``): EFA on each encoder
level, decoder blocks that *add* the up-sampled deeper map to the skip, weighted multi-level
aggregation and a BN'd 1×1 head. The code's final softmax is left out: the model returns
logits. ``seed-models.md`` §3 has the details.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

from .attention import EFA, SqueezeExcite
from .blocks import ConvNormAct, check_divisible
from .mobilevit import MobileViTEncoder
from .registry import load_weights, register_model


def _up2(x: Tensor) -> Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


class AFF(nn.Module):
    """Attention feature fusion: ReLU(conv-BN-ReLU-conv-BN(z) + SE(BN(conv1×1(z))))."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(in_channels, out_channels, 3, bias=True)
        self.conv2 = ConvNormAct(out_channels, out_channels, 3, bias=True, act=None)
        self.shortcut = ConvNormAct(in_channels, out_channels, 1, bias=True, act=None)
        # The code's SE uses reduction = channels, i.e. a hidden width of 1.
        self.se = SqueezeExcite(out_channels, hidden_channels=1, bias=False)

    def forward(self, z: Tensor) -> Tensor:
        return F.relu(self.conv2(self.conv1(z)) + self.se(self.shortcut(z)))


class DecoderBlock(nn.Module):
    """Reduce the deeper map to the skip's width, up-sample ×2, add the skip, then AFF."""

    def __init__(self, skip_channels: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.reduce = ConvNormAct(in_channels, skip_channels, 1)
        self.fuse = AFF(skip_channels, out_channels)

    def forward(self, skip: Tensor, x: Tensor) -> Tensor:
        return self.fuse(skip + _up2(self.reduce(x)))


class WeightBlock(nn.Sequential):
    """1×1 projection to ``out_channels`` gated by a BN'd squeeze-excitation."""

    def __init__(self, in_channels: int, out_channels: int = 32) -> None:
        super().__init__(
            ConvNormAct(in_channels, out_channels, 1),
            SqueezeExcite(out_channels, hidden_channels=out_channels, bias=False, norm=True),
        )


@register_model("lanet")
class LANet(nn.Module):
    """LANet segmentation network.

    Args:
        in_channels: input channels.
        num_classes: output logit channels K (2 in the paper, with softmax).
        agg_channels: width of the multi-level aggregation and head.
        encoder_weights: state-dict file for the MobileViT-S encoder (our key names).
        freeze_encoder: stop gradients into the encoder, as the paper does with ImageNet
            weights. Default off: without pretrained weights the encoder must train.
    """

    size_divisor = 32

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 1,
        *,
        agg_channels: int = 32,
        encoder_weights: str | Path | None = None,
        freeze_encoder: bool = False,
    ) -> None:
        super().__init__()
        self.encoder = MobileViTEncoder(in_channels)
        if encoder_weights is not None:
            load_weights(self.encoder, encoder_weights)
        self.encoder.requires_grad_(not freeze_encoder)
        enc = self.encoder.out_channels
        self.efa = nn.ModuleList(EFA(c) for c in enc)
        # Decoder i fuses skip level 3-i with the deeper map; outputs are 128, 96, 64, 32 ch.
        self.decoder = nn.ModuleList(DecoderBlock(enc[i], enc[i + 1], enc[i]) for i in (3, 2, 1, 0))
        self.weight_blocks = nn.ModuleList(WeightBlock(enc[i], agg_channels) for i in (3, 2, 1, 0))
        self.head = nn.Sequential(
            ConvNormAct(agg_channels, agg_channels, 1, bias=True),
            nn.Upsample(scale_factor=2.0, mode="bilinear", align_corners=False),
            ConvNormAct(agg_channels, num_classes, 1, bias=True, act=None),
        )

    def forward(self, x: Tensor) -> Tensor:
        check_divisible(x, self.size_divisor, type(self).__name__)
        feats = [efa(f) for efa, f in zip(self.efa, self.encoder(x), strict=True)]
        y = feats.pop()
        decoded = []
        for block, skip in zip(self.decoder, reversed(feats), strict=True):
            y = block(skip, y)
            decoded.append(y)
        agg = self.weight_blocks[0](decoded[0])
        for weight, d in zip(self.weight_blocks[1:], decoded[1:], strict=True):
            agg = _up2(agg) + weight(d)
        return self.head(agg)
