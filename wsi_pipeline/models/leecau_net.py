"""LEECAU-Net (Das et al., IEEE PIC 2024): Inception-v4 U-Net with ECA + LECA stage attention.

Follows the official notebook (Cmatermedicalimageanalysis/LEECAU-Net): the smp U-Net decoder
on an Inception-v4 encoder whose every stage output is replaced by (ECA(x) + LECA(x)) / 2,
which is both the skip and the next stage's input. ``seed-models.md`` §1 has the details.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from torch import Tensor, nn

from .attention import EcaLeca
from .blocks import InterpConcatBlock, check_divisible, init_head, init_smp_decoder
from .inception_v4 import InceptionV4Encoder
from .registry import load_weights, register_model


@register_model("leecau_net")
class LEECAUNet(nn.Module):
    """Inception-v4 encoder, in-line ECA+LECA attention, smp U-Net decoder, 3×3 head.

    Args:
        in_channels: input channels.
        num_classes: output logit channels K (1 in the paper, binary nuclei).
        decoder_channels: widths of the five decoder blocks.
        eca_mode: ``"repo"`` (per-channel gate as coded) or ``"standard"`` (ECA-Net).
        leca_mode: ``"repo"`` (2×2-grid SE as coded) or ``"entropy"`` (paper's wording).
        encoder_weights: state-dict file for the encoder (timm ``inception_v4`` key names
            under ``features.``, without the classifier).
        freeze_encoder: stop gradients into the encoder.
    """

    size_divisor = 32

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 1,
        *,
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        eca_mode: Literal["repo", "standard"] = "repo",
        leca_mode: Literal["repo", "entropy"] = "repo",
        encoder_weights: str | Path | None = None,
        freeze_encoder: bool = False,
    ) -> None:
        super().__init__()
        if len(decoder_channels) != 5:
            raise ValueError(f"decoder_channels needs 5 widths, got {list(decoder_channels)}")
        self.encoder = InceptionV4Encoder(in_channels)
        if encoder_weights is not None:
            load_weights(self.encoder, encoder_weights)
        self.encoder.requires_grad_(not freeze_encoder)
        enc = self.encoder.out_channels
        self.attention = nn.ModuleList(
            EcaLeca(c, eca_mode=eca_mode, leca_mode=leca_mode) for c in enc
        )
        in_chs = [enc[-1], *decoder_channels[:-1]]
        skip_chs = [*enc[-2::-1], 0]
        self.decoder = nn.ModuleList(
            InterpConcatBlock(i, s, o)
            for i, s, o in zip(in_chs, skip_chs, decoder_channels, strict=True)
        )
        self.head = nn.Conv2d(decoder_channels[-1], num_classes, 3, padding=1)
        init_smp_decoder(self.decoder)
        init_head(self.head)

    def forward(self, x: Tensor) -> Tensor:
        check_divisible(x, self.size_divisor, type(self).__name__)
        feats = []
        for stage, attn in zip(self.encoder.stages(), self.attention, strict=True):
            x = attn(stage(x))
            feats.append(x)
        x = feats.pop()
        skips: list[Tensor | None] = [*reversed(feats), None]
        for block, skip in zip(self.decoder, skips, strict=True):
            x = block(x, skip)
        return self.head(x)
