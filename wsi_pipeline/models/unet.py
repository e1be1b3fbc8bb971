"""U-Net (Ronneberger et al., MICCAI 2015), the classic 31 M-parameter configuration.

Widths 64-128-256-512-1024, BN after every conv, transposed-conv up-sampling and a 1×1 head,
as in the common PyTorch reference (milesial/Pytorch-UNet). Optional attention blocks on
the skips and after each decoder stage make attention U-Nets a small delta of this class.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .attention import create_attn
from .blocks import DoubleConv, Down, UpConcat, check_divisible
from .registry import register_model


@register_model("unet")
class UNet(nn.Module):
    """Plain U-Net with four 2× down-sampling steps.

    Args:
        in_channels: input channels.
        num_classes: output logit channels K.
        base_channels: width of the first level; level i has ``base_channels * 2**i``.
        skip_attn: attention name (see :func:`create_attn`) applied to each skip tensor.
        decoder_attn: attention name applied after each decoder stage.
        attn_kwargs: options for both attention blocks.
    """

    size_divisor = 16

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 1,
        *,
        base_channels: int = 64,
        skip_attn: str | None = None,
        decoder_attn: str | None = None,
        attn_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        widths = [base_channels * 2**i for i in range(5)]
        kw = attn_kwargs or {}
        self.inc = DoubleConv(in_channels, widths[0])
        self.downs = nn.ModuleList(Down(widths[i], widths[i + 1]) for i in range(4))
        deep_first = range(3, -1, -1)
        self.skip_attn = nn.ModuleList(create_attn(skip_attn, widths[i], **kw) for i in deep_first)
        self.ups = nn.ModuleList(UpConcat(widths[i + 1], widths[i], widths[i]) for i in deep_first)
        self.decoder_attn = nn.ModuleList(
            create_attn(decoder_attn, widths[i], **kw) for i in deep_first
        )
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        check_divisible(x, self.size_divisor, type(self).__name__)
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up, skip_attn, dec_attn, skip in zip(
            self.ups, self.skip_attn, self.decoder_attn, reversed(skips), strict=True
        ):
            x = dec_attn(up(x, skip_attn(skip)))
        return self.head(x)
