"""Segmentation losses on logits (N, K, H, W) and integer class targets (N, H, W).

K = 1 means one sigmoid channel (target 0/1); K >= 2 means softmax over K classes. Every loss runs
in float32 with autocast disabled, so it is safe inside a bf16 autocast region.

| name | loss | used by |
|---|---|---|
| ``ce_dice`` | cross-entropy (BCE when K = 1) + soft Dice; the default | SA-U-Net, nuclei models |
| ``dice`` | soft Dice | LEECAU-Net (binary) |
| ``bce_dice`` | BCE + soft Dice, K = 1 only | GRU-Net |
| ``wce_ssim_dice`` | class-weighted CE + (1 - SSIM) + soft Dice | CASe-UNet |
| ``lovasz`` | Lovász-Softmax (Berman et al. 2018, CVPR), classes present | LANet |

For the ``"distance"`` target mode :func:`create_target_loss` wraps any of them in
:class:`DistanceLoss`: the named loss on the three class channels plus a BCE regression of the
fourth channel on the normalised distance.

Soft Dice is computed over the whole batch per class and averaged over the foreground classes
(1..K-1), or over all K classes with ``include_background=True``; with K = 1 it is the binary Dice
of the single channel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from wsi_pipeline.forward import probabilities
from wsi_pipeline.train.targets import DISTANCE_SCALE

_LOSSES: dict[str, type[nn.Module]] = {}
LossT = TypeVar("LossT", bound=type[nn.Module])


def register_loss(name: str) -> Callable[[LossT], LossT]:
    """Class decorator adding a loss to the registry under ``name``."""

    def add(cls: LossT) -> LossT:
        _LOSSES[name] = cls
        return cls

    return add


def list_losses() -> list[str]:
    """Names accepted by :func:`create_loss`."""
    return sorted(_LOSSES)


def create_loss(name: str, **kwargs: object) -> nn.Module:
    """Build a registered loss; keyword arguments that are ``None`` keep their default."""
    try:
        cls = _LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; valid: {list_losses()}") from None
    return cls(**{k: v for k, v in kwargs.items() if v is not None})


def create_target_loss(name: str, target_mode: str, **kwargs: object) -> nn.Module:
    """The loss a training run of ``target_mode`` optimises: ``name``, wrapped in
    :class:`DistanceLoss` for the ``"distance"`` mode."""
    loss = create_loss(name, **kwargs)
    return DistanceLoss(loss) if target_mode == "distance" else loss


class DistanceLoss(nn.Module):
    """A class loss on channels 0-2 plus ``distance_weight`` x BCE with logits of channel 3
    against the (N, 2, H, W) uint8 target's distance channel / 255.

    BCE, not MSE: its gradient, ``sigmoid - target``, is on the scale of the class loss's, so one
    weight suits every loss in the registry.
    """

    def __init__(self, classes: nn.Module, distance_weight: float = 1.0) -> None:
        super().__init__()
        self.classes = classes
        self.distance_weight = distance_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of logits (N, 4, H, W) against targets (N, 2, H, W): classes, distance x 255."""
        expected = (logits.shape[0], 2, *logits.shape[2:])
        if logits.ndim != 4 or logits.shape[1] != 4 or target.shape != expected:
            raise ValueError(
                f"expected logits (N,4,H,W), target (N,2,H,W); got "
                f"{tuple(logits.shape)} and {tuple(target.shape)}"
            )
        class_loss = self.classes(logits[:, :3], target[:, 0].long())
        with torch.autocast(device_type=logits.device.type, enabled=False):
            distance = target[:, 1].float() / DISTANCE_SCALE
            regression = F.binary_cross_entropy_with_logits(logits[:, 3].float(), distance)
        return class_loss + self.distance_weight * regression


def class_weights_from_counts(counts: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Inverse-frequency class weights ``N / (K n_c)`` rescaled to mean 1 over present classes.

    Classes with no pixels get weight 0.
    """
    counts = torch.as_tensor(counts, dtype=torch.float32)
    present = counts > 0
    weights = torch.zeros_like(counts)
    weights[present] = counts.sum() / (counts.numel() * counts[present])
    return weights / weights[present].mean()


class SegmentationLoss(nn.Module):
    """Base class: checks shapes, leaves autocast and calls :meth:`compute` in float32."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of logits (N, K, H, W) against integer targets (N, H, W)."""
        if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
            raise ValueError(
                f"expected logits (N,K,H,W), target (N,H,W); got "
                f"{tuple(logits.shape)} and {tuple(target.shape)}"
            )
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return self.compute(logits.float(), target.long())

    def compute(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss in float32; implemented by subclasses."""
        raise NotImplementedError


def one_hot_target(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, K, H, W) float one-hot target; for K = 1 the target itself as one channel."""
    if num_classes == 1:
        return target.unsqueeze(1).float()
    return F.one_hot(target, num_classes).permute(0, 3, 1, 2).float()


def cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """CE for K >= 2 (optionally class-weighted), BCE with logits for K = 1."""
    if logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(logits[:, 0], target.float())
    return F.cross_entropy(logits, target, weight=weight)


def soft_dice_loss(
    probs: torch.Tensor,
    target_1h: torch.Tensor,
    smooth: float = 1.0,
    include_background: bool = False,
) -> torch.Tensor:
    """1 - mean per-class soft Dice, summed over batch and pixels."""
    if probs.shape[1] > 1 and not include_background:
        probs, target_1h = probs[:, 1:], target_1h[:, 1:]
    dims = (0, 2, 3)
    inter = (probs * target_1h).sum(dims)
    total = probs.sum(dims) + target_1h.sum(dims)
    return 1.0 - ((2.0 * inter + smooth) / (total + smooth)).mean()


def ssim_loss(probs: torch.Tensor, target_1h: torch.Tensor, window: int = 11) -> torch.Tensor:
    """1 - SSIM between probabilities and one-hot targets, averaged over classes and positions.

    Gaussian window of ``window`` pixels (sigma 1.5), C1 = 0.01², C2 = 0.03², no padding.
    """
    k = probs.shape[1]
    if min(probs.shape[2:]) < window:
        raise ValueError(f"SSIM needs images of at least {window}x{window} pixels")
    coords = torch.arange(window, dtype=probs.dtype, device=probs.device) - (window - 1) / 2
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(k, 1, window, window).contiguous()

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, kernel, groups=k)

    mu_x, mu_y = blur(probs), blur(target_1h)
    var_x = blur(probs * probs) - mu_x**2
    var_y = blur(target_1h * target_1h) - mu_y**2
    cov = blur(probs * target_1h) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    ssim = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return 1.0 - ssim.mean()


def lovasz_softmax_flat(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Lovász-Softmax of (P, C) probabilities and (P,) labels, averaged over present classes.

    With C = 1 the single column is the foreground probability of a binary problem, and the loss is
    that of the foreground class whether or not it is present (as in Berman's binary loss).
    """
    if probs.shape[1] == 1:
        return _lovasz_class(probs[:, 0], (target == 1).float())
    losses = []
    for c in range(probs.shape[1]):
        fg = (target == c).float()
        if fg.sum() > 0:
            losses.append(_lovasz_class(probs[:, c], fg))
    return torch.stack(losses).mean()


def _lovasz_class(prob: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    errors_sorted, perm = torch.sort((fg - prob).abs(), descending=True)
    return torch.dot(errors_sorted, _lovasz_grad(fg[perm]))


def _lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovász extension of the Jaccard loss at sorted errors (Berman et al.)."""
    gts = gt_sorted.sum()
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1.0 - gt_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    jaccard[1:] = jaccard[1:] - jaccard[:-1]
    return jaccard


@register_loss("dice")
class DiceLoss(SegmentationLoss):
    """Soft Dice loss."""

    def __init__(self, smooth: float = 1.0, include_background: bool = False) -> None:
        super().__init__()
        self.smooth = smooth
        self.include_background = include_background

    def compute(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Soft Dice of the probabilities."""
        target_1h = one_hot_target(target, logits.shape[1])
        return soft_dice_loss(
            probabilities(logits), target_1h, self.smooth, self.include_background
        )


@register_loss("ce_dice")
class CEDiceLoss(SegmentationLoss):
    """``ce_weight`` x cross-entropy (BCE for K = 1) + ``dice_weight`` x soft Dice."""

    class_weights: torch.Tensor | None

    def __init__(
        self,
        ce_weight: float = 1.0,
        dice_weight: float = 1.0,
        class_weights: Sequence[float] | None = None,
        smooth: float = 1.0,
        include_background: bool = False,
    ) -> None:
        super().__init__()
        self.ce_weight = ce_weight
        self.dice = DiceLoss(smooth, include_background)
        self.dice_weight = dice_weight
        weights = None if class_weights is None else torch.as_tensor(class_weights).float()
        self.register_buffer("class_weights", weights, persistent=False)

    def compute(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Weighted sum of the two terms."""
        ce = cross_entropy(logits, target, self.class_weights)
        return self.ce_weight * ce + self.dice_weight * self.dice.compute(logits, target)


@register_loss("bce_dice")
class BCEDiceLoss(CEDiceLoss):
    """BCE with logits + soft Dice for a single sigmoid channel."""

    def compute(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """As :class:`CEDiceLoss`, after checking that K = 1."""
        if logits.shape[1] != 1:
            raise ValueError(f"bce_dice needs 1 channel, got {logits.shape[1]}; use ce_dice")
        return super().compute(logits, target)


@register_loss("wce_ssim_dice")
class WCESSIMDiceLoss(SegmentationLoss):
    """Class-weighted CE + (1 - SSIM) + soft Dice (CASe-UNet; weights 1:1:1 by default).

    Without ``class_weights`` the CE weights are the inverse class frequencies of each batch
    (:func:`class_weights_from_counts`); pass weights computed on the training masks to fix them.
    """

    class_weights: torch.Tensor | None

    def __init__(
        self,
        class_weights: Sequence[float] | None = None,
        ce_weight: float = 1.0,
        ssim_weight: float = 1.0,
        dice_weight: float = 1.0,
        window: int = 11,
        smooth: float = 1.0,
    ) -> None:
        super().__init__()
        weights = None if class_weights is None else torch.as_tensor(class_weights).float()
        self.register_buffer("class_weights", weights, persistent=False)
        self.ce_weight, self.ssim_weight, self.dice_weight = ce_weight, ssim_weight, dice_weight
        self.window = window
        self.smooth = smooth

    def compute(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Weighted sum of the three terms."""
        k = logits.shape[1]
        weights = self.class_weights
        if weights is None and k > 1:
            counts = torch.bincount(target.flatten(), minlength=k)[:k]
            weights = class_weights_from_counts(counts).to(logits.device)
        ce = cross_entropy(logits, target, weights)
        probs, target_1h = probabilities(logits), one_hot_target(target, k)
        return (
            self.ce_weight * ce
            + self.ssim_weight * ssim_loss(probs, target_1h, self.window)
            + self.dice_weight * soft_dice_loss(probs, target_1h, self.smooth)
        )


@register_loss("lovasz")
class LovaszSoftmaxLoss(SegmentationLoss):
    """Lovász-Softmax over the batch (or averaged per image), classes present in the target."""

    def __init__(self, per_image: bool = False) -> None:
        super().__init__()
        self.per_image = per_image

    def compute(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Lovász extension of the Jaccard loss of the probabilities."""
        probs = probabilities(logits)
        k = probs.shape[1]
        flat_probs = probs.permute(0, 2, 3, 1).reshape(probs.shape[0], -1, k)
        flat_target = target.reshape(target.shape[0], -1)
        if self.per_image:
            per = [lovasz_softmax_flat(p, t) for p, t in zip(flat_probs, flat_target, strict=True)]
            return torch.stack(per).mean()
        return lovasz_softmax_flat(flat_probs.reshape(-1, k), flat_target.reshape(-1))
