"""Small building blocks shared by the model zoo.

Every block takes its channel counts first and options as keywords, so an architecture
file only wires blocks together. Module attribute names (``conv``/``bn``/``act``,
``norm1``/``attn``/``mlp``) follow timm, which keeps state-dict keys familiar.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
}


def create_act(name: str | None) -> nn.Module:
    """Activation module by name; ``None`` gives an identity.

    Raises:
        ValueError: the name is not one of the known activations.
    """
    if name is None:
        return nn.Identity()
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


def check_divisible(x: Tensor, divisor: int, model: str) -> None:
    """Raise if the spatial size of ``x`` is not a multiple of ``divisor``.

    Raises:
        ValueError: H or W is not divisible by ``divisor``.
    """
    h, w = x.shape[-2:]
    if h % divisor or w % divisor:
        raise ValueError(
            f"{model} needs H and W divisible by {divisor}, got {h}x{w}; "
            f"pad or crop tiles to a multiple of {divisor}"
        )


def _same_padding(kernel_size: int | tuple[int, int]) -> int | tuple[int, int]:
    if isinstance(kernel_size, int):
        return kernel_size // 2
    return kernel_size[0] // 2, kernel_size[1] // 2


class ConvNormAct(nn.Module):
    """Conv2d → BatchNorm → activation, with 'same' padding for odd kernels by default.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: square size or (kh, kw).
        stride: convolution stride.
        padding: explicit padding; ``None`` pads to keep the size at stride 1.
        groups: convolution groups.
        bias: conv bias (off by default because a norm follows).
        norm: ``"bn"`` or ``None``.
        act: activation name or ``None``.
        norm_eps: BatchNorm epsilon.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = 3,
        *,
        stride: int = 1,
        padding: int | tuple[int, int] | None = None,
        groups: int = 1,
        bias: bool = False,
        norm: str | None = "bn",
        act: str | None = "relu",
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if norm not in ("bn", None):
            raise ValueError(f"unknown norm {norm!r}; valid: ['bn', None]")
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=_same_padding(kernel_size) if padding is None else padding,
            groups=groups,
            bias=bias,
        )
        self.bn = nn.BatchNorm2d(out_channels, eps=norm_eps) if norm else nn.Identity()
        self.act = create_act(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class DoubleConv(nn.Sequential):
    """Two 3×3 conv-BN-ReLU layers (the U-Net unit)."""

    def __init__(
        self, in_channels: int, out_channels: int, *, mid_channels: int | None = None
    ) -> None:
        mid = mid_channels or out_channels
        super().__init__(ConvNormAct(in_channels, mid), ConvNormAct(mid, out_channels))


class Down(nn.Sequential):
    """2×2 max-pool followed by a :class:`DoubleConv`."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels))


class UpConcat(nn.Module):
    """U-Net up step: 2×2 stride-2 transposed conv, concat the skip, then a block.

    Args:
        in_channels: channels of the deeper input.
        skip_channels: channels of the skip tensor.
        out_channels: output channels.
        up_channels: transposed-conv output channels (default ``in_channels // 2``).
    """

    def __init__(
        self,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        *,
        up_channels: int | None = None,
    ) -> None:
        super().__init__()
        up = up_channels or in_channels // 2
        self.up = nn.ConvTranspose2d(in_channels, up, 2, stride=2)
        self.conv = DoubleConv(up + skip_channels, out_channels)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class InterpConcatBlock(nn.Module):
    """smp U-Net decoder block: ×2 interpolation, optional skip concat, two CBR(3).

    Args:
        in_channels: channels of the deeper input.
        skip_channels: channels of the skip tensor (0 for none).
        out_channels: output channels.
        mode: interpolation mode (``"nearest"`` in smp).
    """

    def __init__(
        self, in_channels: int, skip_channels: int, out_channels: int, *, mode: str = "nearest"
    ) -> None:
        super().__init__()
        self.mode = mode
        self.conv1 = ConvNormAct(in_channels + skip_channels, out_channels)
        self.conv2 = ConvNormAct(out_channels, out_channels)

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode=self.mode)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class Attention(nn.Module):
    """Multi-head self-attention on (B, N, C) tokens via ``scaled_dot_product_attention``.

    Args:
        dim: token width.
        num_heads: heads; ``dim`` must be divisible by it.
        qkv_bias: bias on the fused qkv projection.
        attn_drop: dropout on the attention weights (training only).
        proj_drop: dropout after the output projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        drop = self.attn_drop if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class Mlp(nn.Module):
    """Linear → activation → Linear → dropout."""

    def __init__(self, dim: int, hidden_dim: int, *, act: str = "gelu", drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = create_act(act)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class TransformerLayer(nn.Module):
    """Pre-norm transformer layer: x + MHSA(LN(x)), then x + MLP(LN(x)).

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_dim: hidden width of the MLP.
        act: MLP activation.
        drop: dropout after the attention projection and in the MLP.
        attn_drop: dropout on the attention weights.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        *,
        act: str = "gelu",
        drop: float = 0.0,
        attn_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_dim, act=act, drop=drop)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def init_smp_decoder(module: nn.Module) -> None:
    """smp's decoder init: kaiming-uniform convs (fan-in, ReLU), BN weight 1 and bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_uniform_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def init_head(head: nn.Module) -> None:
    """smp's head init: xavier-uniform weights, zero bias."""
    for m in head.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
