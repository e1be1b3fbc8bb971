"""Training crops drawn and augmented on the training device (``data.loader: device``).

Each Ray Train worker loads its share of the training store once onto its device (uint8 images,
instance labels and, for the ``"distance"`` mode, the normalised distance) and draws every batch
there with torch ops, so on a GPU the model never waits on CPU augmentation. The same code runs
on a CPU. Per batch:

- items are drawn in proportion to their area and a window around a random point is cut;
- one ``grid_sample`` applies the scale, the rotation, the quarter turn and the flip (bilinear
  for the image and the distance, nearest for the labels);
- targets are computed from the warped labels, as :func:`~wsi_pipeline.train.targets.make_target`
  does (the same boundary band; the distance is warped and kept on the interior);
- stain, brightness, contrast and saturation jitter, a Gaussian blur and the area-down,
  bilinear-up round trip follow on the whole batch.

What differs from the Ray Data path (:mod:`~wsi_pipeline.train.augment`): the JPEG round trip
comes from a copy of each item compressed on the CPU once per epoch (at a quality drawn per
item), so it precedes the colour jitter and its 8 px blocks turn with the crop.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from wsi_pipeline.train.augment import AugmentConfig, stain_matrix
from wsi_pipeline.train.store import TrainingStore
from wsi_pipeline.train.targets import (
    BOUNDARY,
    DISTANCE_SCALE,
    INTERIOR,
    TargetMode,
    make_target,
)


@dataclass
class _Item:
    """One item on the device, mirrored out by ``pad`` px on every side."""

    image: torch.Tensor  # (3, H, W) uint8
    labels: torch.Tensor  # (1, H, W) float32 instance ids (exact below 2**24)
    distance: torch.Tensor | None  # (1, H, W) uint8, the "distance" mode only
    height: int
    width: int
    rgb: np.ndarray  # the unpadded image on the CPU, for the epoch's JPEG copy
    jpeg: torch.Tensor | None = None  # (3, H, W) uint8


class DeviceCrops:
    """Augmented crops of a worker's share of the store, drawn on ``device``.

    Args:
        store: the training store.
        keys: the training items of the whole run; worker ``rank`` of ``world`` keeps every
            ``world``-th one (all of them when there are fewer items than workers).
        size: crop side in px.
        augment: augmentation strengths (as for the Ray Data path).
        target_mode: ``"3class"``, ``"binary"`` or ``"distance"``.
        boundary_width: boundary band width (``"3class"``, ``"distance"``).
        device: where the items live and the crops are drawn.
        seed: seeds the worker's draws (add the rank for distinct workers).
    """

    def __init__(
        self,
        store: TrainingStore,
        keys: list[str],
        *,
        size: int,
        augment: AugmentConfig,
        target_mode: TargetMode,
        boundary_width: int,
        device: torch.device,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
    ) -> None:
        if not keys:
            raise ValueError("no training items")
        self.keys = keys[rank::world] if len(keys) >= world else list(keys)
        self.size, self.augment, self.device = size, augment, device
        self.target_mode, self.boundary_width = target_mode, boundary_width
        # One window side for every crop: it holds the crop at the largest scale and any angle.
        # Its parity is the crop's, so an identity warp samples exact pixel centres.
        side = math.ceil(size * (1 + augment.scale) * math.sqrt(2)) + 2
        self.window = side + (side - size) % 2
        self.pad = self.window // 2 + 1
        self.items = [self._load(store, key) for key in self.keys]
        areas = torch.tensor([float(i.height * i.width) for i in self.items])
        self.weights = areas / areas.sum()
        self.generator = torch.Generator().manual_seed(seed)

    def _load(self, store: TrainingStore, key: str) -> _Item:
        rgb, labels = store.read(key)
        labels = labels.astype(np.int64)
        distance = None
        if self.target_mode == "distance":  # warped with the crop, then kept on the interior
            distance = self._to_device(make_target(labels, "distance", self.boundary_width)[1:])
        return _Item(
            image=self._to_device(np.moveaxis(rgb, -1, 0)),
            labels=self._to_device(labels[None].astype(np.float32)),
            distance=distance,
            height=labels.shape[0],
            width=labels.shape[1],
            rgb=rgb,
        )

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        """(C, H, W) → mirrored out by ``pad`` (as the Ray Data path mirrors small items)."""
        p = self.pad
        padded = np.pad(array, ((0, 0), (p, p), (p, p)), mode="symmetric")
        return torch.from_numpy(np.ascontiguousarray(padded)).to(self.device)

    def new_epoch(self) -> None:
        """Compress each item's JPEG copy afresh (at a quality drawn per item)."""
        if not self.augment.jpeg_p:
            return
        for item in self.items:
            low = self.augment.jpeg_quality
            quality = int(torch.randint(low, 96, (1,), generator=self.generator))
            buffer = io.BytesIO()
            Image.fromarray(item.rgb).save(buffer, format="JPEG", quality=quality)
            decoded = np.asarray(Image.open(buffer).convert("RGB"))
            item.jpeg = self._to_device(np.moveaxis(decoded, -1, 0))

    def batches(self, steps: int, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """``steps`` batches as the Ray Data loader yields them: ``image`` (B, H, W, 3) uint8
        and ``target`` (B, H, W) uint8, or (B, 2, H, W) for the distance mode."""
        self.new_epoch()
        for _ in range(steps):
            yield self.batch(batch_size)

    @torch.no_grad()
    def batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        """One batch of augmented crops and their targets."""
        chosen = torch.multinomial(
            self.weights, batch_size, replacement=True, generator=self.generator
        )
        windows = [self._window(self.items[int(i)]) for i in chosen]
        image, labels, distance = (
            torch.stack([w[k] for w in windows]) if windows[0][k] is not None else None
            for k in range(3)
        )
        theta = self._geometry(batch_size).to(self.device)
        grid = F.affine_grid(theta, [batch_size, 1, self.size, self.size], align_corners=False)
        image = F.grid_sample(image.float(), grid, mode="bilinear", align_corners=False)
        labels = F.grid_sample(labels, grid, mode="nearest", align_corners=False)
        target = self._target(labels, distance, grid)
        image = self._photometric(image)
        return {"image": image.permute(0, 2, 3, 1).contiguous(), "target": target}

    def _window(self, item: _Item) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The window of one crop: a random position, as the Ray Data path draws it."""
        y0 = self._start(item.height)
        x0 = self._start(item.width)
        ys, xs = slice(y0, y0 + self.window), slice(x0, x0 + self.window)
        source = item.image
        if item.jpeg is not None and self._uniform() < self.augment.jpeg_p:
            source = item.jpeg
        distance = None if item.distance is None else item.distance[:, ys, xs]
        return source[:, ys, xs], item.labels[:, ys, xs], distance

    def _start(self, length: int) -> int:
        """Start in the padded item of a window along an axis of ``length`` original px."""
        if length >= self.window:
            return self.pad + int(
                torch.randint(0, length - self.window + 1, (1,), generator=self.generator)
            )
        return self.pad - (self.window - length) // 2

    def _uniform(self, n: int = 1, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=self.generator)

    def _geometry(self, n: int) -> torch.Tensor:
        """(n, 2, 3) ``affine_grid`` matrices: scale, rotation, quarter turn and flip."""
        config = self.augment
        scale, angle = torch.ones(n), torch.zeros(n)
        drawn = self._uniform(n) < config.affine_p
        if config.scale:
            log = math.log1p(config.scale)
            scale = torch.where(drawn, torch.exp(self._uniform(n, -log, log)), scale)
        if config.rotate_deg:
            degrees = self._uniform(n, -config.rotate_deg, config.rotate_deg)
            angle = torch.where(drawn, torch.deg2rad(degrees), angle)
        flip = torch.ones(n)
        if config.flips:
            angle = angle + torch.randint(0, 4, (n,), generator=self.generator) * (math.pi / 2)
            flip = torch.where(self._uniform(n) < 0.5, -1.0, 1.0)
        # Output px offsets map to window px offsets scaled by `scale`; in normalised
        # coordinates that is a factor size / window more.
        a = scale * self.size / self.window
        cos, sin = torch.cos(angle) * a, torch.sin(angle) * a
        zero = torch.zeros(n)
        return torch.stack(
            [torch.stack([cos * flip, -sin, zero], -1), torch.stack([sin * flip, cos, zero], -1)],
            dim=1,
        )

    def _target(
        self, labels: torch.Tensor, distance: torch.Tensor | None, grid: torch.Tensor
    ) -> torch.Tensor:
        """Targets of the warped (B, 1, H, W) labels, as ``make_target`` makes them."""
        foreground = labels > 0
        if self.target_mode == "binary":
            return foreground[:, 0].to(torch.uint8)
        high, low = labels, labels
        for _ in range(self.boundary_width):
            high, low = _cross_max(high), -_cross_max(-low)
        classes = torch.where(foreground, BOUNDARY, 0).to(torch.uint8)
        classes[foreground & (high == low)] = INTERIOR
        classes = classes[:, 0]
        if self.target_mode != "distance":
            return classes
        assert distance is not None
        warped = F.grid_sample(distance.float(), grid, mode="bilinear", align_corners=False)
        warped = torch.where(classes[:, None] == INTERIOR, warped, 0.0)
        warped = warped.round().clamp(0, DISTANCE_SCALE).to(torch.uint8)
        return torch.stack([classes, warped[:, 0]], dim=1)

    def _photometric(self, image: torch.Tensor) -> torch.Tensor:
        """Stain, colour and blur jitter and the resampling round trip of (B, 3, H, W) floats
        in [0, 255]; uint8 out."""
        config, n = self.augment, image.shape[0]
        if config.stain or config.stain_shift:
            alpha = self._uniform(3 * n, 1 - config.stain, 1 + config.stain).view(n, 3)
            beta = self._uniform(3 * n, -config.stain_shift, config.stain_shift).view(n, 3)
            pairs = [stain_matrix(a.numpy(), b.numpy()) for a, b in zip(alpha, beta, strict=True)]
            a = torch.from_numpy(np.stack([p[0] for p in pairs])).to(self.device)
            c = torch.from_numpy(np.stack([p[1] for p in pairs])).to(self.device)
            log = torch.log(torch.clamp(image.round() / 255, min=1e-6)).permute(0, 2, 3, 1)
            log = (log.reshape(n, -1, 3) @ a + c[:, None]).view(log.shape)
            image = (torch.exp(log) * 255).permute(0, 3, 1, 2)
        gain = self._uniform(n, 1 - config.contrast, 1 + config.contrast).to(self.device)
        sat = self._uniform(n, 1 - config.saturation, 1 + config.saturation).to(self.device)
        shift = self._uniform(n, -config.brightness, config.brightness).to(self.device) * 255
        grey = image.mean(dim=1, keepdim=True)
        mean = grey.mean(dim=(2, 3), keepdim=True)
        gain, sat, shift = (v.view(n, 1, 1, 1) for v in (gain, sat, shift))
        image = (image - grey) * (sat * gain) + (grey - mean) * gain + mean + shift
        if config.blur_p and config.blur_sigma > 0:
            image = self._blur(image)
        image = torch.clamp(image + 0.5, 0, 255).floor()
        if config.resample_p:
            image = self._resample(image)
        return image.to(torch.uint8)

    def _blur(self, image: torch.Tensor) -> torch.Tensor:
        """A Gaussian blur of the crops drawn for it (a separable, per-crop kernel)."""
        config, n = self.augment, image.shape[0]
        blurred = self._uniform(n) < config.blur_p
        sigma = self._uniform(n, min(0.1, config.blur_sigma), config.blur_sigma)
        radius = math.ceil(4 * config.blur_sigma)
        x = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (x[None] / sigma[:, None]) ** 2)
        kernel = kernel / kernel.sum(dim=1, keepdim=True)
        delta = (x == 0).float().expand(n, -1)
        kernel = torch.where(blurred[:, None], kernel, delta).to(self.device)
        weight = kernel.repeat_interleave(3, dim=0)[:, None]  # (3n, 1, k)
        h, w = image.shape[2:]
        flat = image.reshape(1, 3 * n, h, w)
        flat = F.conv2d(
            F.pad(flat, (0, 0, radius, radius), mode="reflect"), weight[..., None], groups=3 * n
        )
        flat = F.conv2d(
            F.pad(flat, (radius, radius, 0, 0), mode="reflect"), weight[:, :, None], groups=3 * n
        )
        return flat.view(n, 3, h, w)

    def _resample(self, image: torch.Tensor) -> torch.Tensor:
        """The area-down, bilinear-up round trip of the crops drawn for it."""
        config = self.augment
        chosen = torch.nonzero(self._uniform(image.shape[0]) < config.resample_p)[:, 0]
        factors = self._uniform(len(chosen), 1.0, config.resample_max)
        size = image.shape[2:]
        for i, factor in zip(chosen.tolist(), factors.tolist(), strict=True):
            small = [max(round(s / factor), 1) for s in size]
            down = F.interpolate(image[i : i + 1], size=small, mode="area")
            up = F.interpolate(down, size=size, mode="bilinear", align_corners=False)
            image[i] = up[0].round().clamp(0, 255)
        return image


def _cross_max(x: torch.Tensor) -> torch.Tensor:
    """Maximum over each pixel and its 4 neighbours, the border repeated (scipy's "nearest")."""
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    centre = p[..., 1:-1, 1:-1]
    neighbours = (p[..., :-2, 1:-1], p[..., 2:, 1:-1], p[..., 1:-1, :-2], p[..., 1:-1, 2:])
    out = centre
    for neighbour in neighbours:
        out = torch.maximum(out, neighbour)
    return out
