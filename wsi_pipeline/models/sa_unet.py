"""U-Net with CBAM spatial attention (Setiawan et al., ICCGANT 2025, leukocyte segmentation).

No code or full text of the paper was available; this follows our reconstruction
(``seed-models.md`` §2): the classic U-Net plus CBAM spatial attention (Woo et al., ECCV
2018) on the four skip tensors and after the four decoder stages, 100 parameters each.
"""

from __future__ import annotations

from .registry import register_model
from .unet import UNet


@register_model("sa_unet")
class SAUNet(UNet):
    """U-Net with CBAM spatial attention on the skips and, optionally, the decoder.

    Args:
        in_channels: input channels.
        num_classes: output logit channels K (3 in the paper: background, cytoplasm, nucleus).
        base_channels: width of the first level.
        decoder_attn: also attend after each decoder stage, not only on the skips.
        attn_norm: BatchNorm on the attention map, as in the original CBAM.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 1,
        *,
        base_channels: int = 64,
        decoder_attn: bool = True,
        attn_norm: bool = True,
    ) -> None:
        super().__init__(
            in_channels,
            num_classes,
            base_channels=base_channels,
            skip_attn="cbam_spatial",
            decoder_attn="cbam_spatial" if decoder_attn else None,
            attn_kwargs={"norm": attn_norm},
        )
