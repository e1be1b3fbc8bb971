"""The training input pipeline: random crops of a training store, augmented, on Ray Data.

:func:`crop_dataset` is a lazy Ray Dataset: every execution (every epoch) draws new crops. Items
are drawn in proportion to their area and a window around a random point is read, from a
per-process cache of whole items (bounded by ``cache_mb``) or else straight from Zarr, so memory
never depends on the size of an item beyond that budget.

A crop is cut from an item around a random centre, then, in this order: a small scale and
rotation (one affine resampling, bilinear for the image and nearest for the labels), one of the 8
flips/quarter turns, H&E stain jitter (scale and shift of the haematoxylin, eosin and DAB optical
densities, Tellez et al. 2018), brightness / contrast / saturation jitter, and a Gaussian blur.
Geometric steps move image and labels together; photometric steps touch the image only. Targets
are computed from the transformed labels, so nucleus boundaries stay one pixel wide.
"""

from __future__ import annotations

import io
import math
from collections import OrderedDict
from typing import Any

import numpy as np
from PIL import Image
from pydantic import Field
from scipy import ndimage as ndi
from skimage.color.colorconv import hed_from_rgb, rgb_from_hed

from wsi_pipeline.config import ConfigError, StrictModel
from wsi_pipeline.train.store import TrainingStore, open_store
from wsi_pipeline.train.targets import TargetMode, make_target


def square_symmetry(array: np.ndarray, symmetry: int) -> np.ndarray:
    """One of the 8 symmetries of the square: ``symmetry % 4`` quarter turns, then a flip if
    ``symmetry >= 4`` (the same as :func:`wsi_pipeline.synthetic.transform_polygon`)."""
    out = np.rot90(array, symmetry % 4)
    return out[:, ::-1] if symmetry >= 4 else out


class AugmentConfig(StrictModel):
    """Augmentation strengths; 0 switches a step off."""

    flips: bool = Field(True, description="random flips and quarter turns (8 symmetries)")
    affine_p: float = Field(0.5, ge=0, le=1, description="probability of scale + rotation")
    scale: float = Field(0.1, ge=0, lt=1, description="scale factor within 1 ± scale")
    rotate_deg: float = Field(15.0, ge=0, le=180, description="rotation within ± degrees")
    stain: float = Field(0.05, ge=0, description="H&E optical densities scaled by 1 ± stain")
    stain_shift: float = Field(0.01, ge=0, description="... and shifted by ± stain_shift")
    brightness: float = Field(0.1, ge=0, description="intensity shift of ± brightness x 255")
    contrast: float = Field(0.1, ge=0, description="contrast factor within 1 ± contrast")
    saturation: float = Field(0.1, ge=0, description="saturation factor within 1 ± saturation")
    blur_p: float = Field(0.2, ge=0, le=1, description="probability of a Gaussian blur")
    blur_sigma: float = Field(1.0, ge=0, description="blur sigma drawn from [0.1, blur_sigma] px")
    # The segment job reads JPEG-compressed pyramid levels and area-averages them to the model's
    # mpp: train on crops that went through the same.
    jpeg_p: float = Field(0.0, ge=0, le=1, description="probability of a JPEG round trip")
    jpeg_quality: int = Field(70, ge=1, le=95, description="its quality, drawn from [this, 95]")
    resample_p: float = Field(
        0.0, ge=0, le=1, description="probability of an area-down, bilinear-up round trip"
    )
    resample_max: float = Field(2.0, ge=1, description="its factor, drawn from [1, this]")


NO_AUGMENT = AugmentConfig(
    flips=False,
    affine_p=0,
    stain=0,
    stain_shift=0,
    brightness=0,
    contrast=0,
    saturation=0,
    blur_p=0,
    jpeg_p=0,
    resample_p=0,
)


def window_for(size: int, scale: float, angle: float) -> int:
    """Side of the source window that holds a ``size`` crop scaled and rotated by ``angle``."""
    return math.ceil(size * scale * (abs(math.cos(angle)) + abs(math.sin(angle)))) + 2


def random_geometry(rng: np.random.Generator, config: AugmentConfig) -> tuple[float, float]:
    """``(scale, angle in radians)``; ``(1, 0)`` when no affine step is drawn."""
    if rng.random() >= config.affine_p or (config.scale == 0 and config.rotate_deg == 0):
        return 1.0, 0.0
    scale = math.exp(rng.uniform(-math.log1p(config.scale), math.log1p(config.scale)))
    return scale, math.radians(rng.uniform(-config.rotate_deg, config.rotate_deg))


def warp(
    rgb: np.ndarray, labels: np.ndarray, size: int, scale: float, angle: float
) -> tuple[np.ndarray, np.ndarray]:
    """The central ``size`` crop of a window after scaling by ``scale`` and rotating by ``angle``.

    A scale above 1 takes a larger source area into the crop (zoom out).
    """
    if scale == 1.0 and angle == 0.0:
        y0, x0 = (labels.shape[0] - size) // 2, (labels.shape[1] - size) // 2
        return rgb[y0 : y0 + size, x0 : x0 + size], labels[y0 : y0 + size, x0 : x0 + size]
    # PIL maps each output pixel centre (x, y) to the input point (a x + b y + c, d x + e y + f);
    # image and labels share the map, so they stay aligned.
    cos, sin = math.cos(angle) * scale, math.sin(angle) * scale
    h, w = labels.shape
    half = size / 2
    data = (
        cos,
        -sin,
        w / 2 - cos * half + sin * half,
        sin,
        cos,
        h / 2 - sin * half - cos * half,
    )
    image = Image.fromarray(np.ascontiguousarray(rgb)).transform(
        (size, size), Image.Transform.AFFINE, data, resample=Image.Resampling.BILINEAR
    )
    warped = Image.fromarray(np.ascontiguousarray(labels, dtype=np.int32)).transform(
        (size, size), Image.Transform.AFFINE, data, resample=Image.Resampling.NEAREST
    )
    return np.asarray(image), np.asarray(warped)


# log of the intensity of each uint8 value, floored where skimage's rgb2hed floors it
_LOG_RGB = np.log(np.maximum(np.arange(256, dtype=np.float32) / 255.0, 1e-6)).astype(np.float32)


def stain_matrix(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(A, c)`` with ``log(rgb') = log(rgb) @ A + c`` for H, E, D densities scaled by ``alpha``
    and shifted by ``beta`` (skimage's rgb2hed / hed2rgb, without the clip at zero density)."""
    log_adjust = np.log(1e-6)
    a = hed_from_rgb @ np.diag(alpha) @ rgb_from_hed
    c = log_adjust * (beta @ rgb_from_hed)
    return a.astype(np.float32), c.astype(np.float32)


def photometric(rgb: np.ndarray, rng: np.random.Generator, config: AugmentConfig) -> np.ndarray:
    """Stain, colour and blur jitter of a uint8 RGB image."""
    if config.stain or config.stain_shift:
        alpha = rng.uniform(1 - config.stain, 1 + config.stain, 3)
        beta = rng.uniform(-config.stain_shift, config.stain_shift, 3)
        a, c = stain_matrix(alpha, beta)
        image = np.exp(_LOG_RGB[rgb] @ a + c) * np.float32(255.0)
    else:
        image = rgb.astype(np.float32)
    # brightness, contrast and saturation are one affine map of each pixel and its grey value
    gain = 1.0 + rng.uniform(-config.contrast, config.contrast)
    sat = 1.0 + rng.uniform(-config.saturation, config.saturation)
    shift = rng.uniform(-config.brightness, config.brightness) * 255.0
    if gain != 1.0 or sat != 1.0 or shift:
        grey = image.mean(axis=-1, keepdims=True)
        mean = float(grey.mean())
        image = (image - grey) * np.float32(sat * gain) + (grey - mean) * np.float32(gain)
        image += np.float32(mean + shift)
    if config.blur_p and config.blur_sigma > 0 and rng.random() < config.blur_p:
        sigma = rng.uniform(min(0.1, config.blur_sigma), config.blur_sigma)
        image = ndi.gaussian_filter(image, sigma=(sigma, sigma, 0))
    out = np.clip(image + 0.5, 0, 255).astype(np.uint8)
    if config.resample_p and rng.random() < config.resample_p:
        out = resample_round_trip(out, rng.uniform(1.0, config.resample_max))
    if config.jpeg_p and rng.random() < config.jpeg_p:
        out = jpeg_round_trip(out, int(rng.integers(config.jpeg_quality, 96)))
    return out


def jpeg_round_trip(rgb: np.ndarray, quality: int) -> np.ndarray:
    """``rgb`` compressed as JPEG at ``quality`` and decoded again (as slide pyramids store it)."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


def resample_round_trip(rgb: np.ndarray, factor: float) -> np.ndarray:
    """``rgb`` area-averaged down by ``factor`` and brought back with bilinear interpolation:
    the detail lost when the job reads a coarser pyramid level than the training data had."""
    h, w = rgb.shape[:2]
    small = (max(round(w / factor), 1), max(round(h / factor), 1))
    image = Image.fromarray(rgb).resize(small, Image.Resampling.BOX)
    return np.asarray(image.resize((w, h), Image.Resampling.BILINEAR))


def augment_window(
    rgb: np.ndarray,
    labels: np.ndarray,
    size: int,
    geometry: tuple[float, float],
    rng: np.random.Generator,
    config: AugmentConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """A ``size`` crop of a source window (of side :func:`window_for`), fully augmented."""
    image, crop = warp(rgb, labels, size, *geometry)
    if config.flips:
        t = int(rng.integers(8))
        image, crop = square_symmetry(image, t), square_symmetry(crop, t)
    return photometric(np.ascontiguousarray(image), rng, config), np.ascontiguousarray(crop)


# --- crops on Ray Data -------------------------------------------------------------------------


class ItemCache:
    """Whole items in process memory, least recently used out first, within a byte budget.

    Reading a window from Zarr costs milliseconds of decoding per crop; training stores of
    annotated regions are small, so a worker process keeps the items it samples from.
    """

    def __init__(self, budget_bytes: int = 0) -> None:
        self.budget = budget_bytes
        self._items: OrderedDict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]] = (
            OrderedDict()
        )
        self._bytes = 0

    def get(self, store: TrainingStore, key: str) -> tuple[np.ndarray, np.ndarray] | None:
        """``(rgb, labels)`` of an item if it fits the budget (read on a miss), else ``None``."""
        item = store.items[key]
        ident = (store.path, key, item.uid)
        if ident in self._items:
            self._items.move_to_end(ident)
            return self._items[ident]
        size = item.height * item.width * 7  # uint8 RGB + int32 labels
        if size > self.budget:
            return None
        arrays = store.read(key)
        self._items[ident] = arrays
        self._bytes += size
        while self._bytes > self.budget:
            _, (rgb, _labels) = self._items.popitem(last=False)
            self._bytes -= rgb.shape[0] * rgb.shape[1] * 7
        return arrays


_CACHE = ItemCache()


def sample_crop(
    store: TrainingStore,
    key: str,
    size: int,
    rng: np.random.Generator,
    augment: AugmentConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """One augmented ``size`` crop ``(rgb, labels)`` of an item, read as a window from Zarr."""
    item = store.items[key]
    geometry = random_geometry(rng, augment)
    side = window_for(size, *geometry)
    y0, ys = _window_start(item.height, side, rng)
    x0, xs = _window_start(item.width, side, rng)
    window = np.s_[y0 : y0 + ys, x0 : x0 + xs]
    if (cached := _CACHE.get(store, key)) is not None:
        rgb, labels = cached[0][window], cached[1][window]
    else:
        rgb, labels = store.array(key, "image")[window], store.array(key, "labels")[window]
    if ys < side or xs < side:  # item smaller than the window: mirror it out
        pad = ((0, side - ys), (0, side - xs))
        rgb = np.pad(rgb, (*pad, (0, 0)), mode="symmetric")
        labels = np.pad(labels, pad, mode="symmetric")
    return augment_window(rgb, labels, size, geometry, rng, augment)


def _window_start(length: int, side: int, rng: np.random.Generator) -> tuple[int, int]:
    """Start and read length of a window of ``side`` along an axis of ``length``."""
    if length <= side:
        return 0, length
    return int(rng.integers(0, length - side + 1)), side


def crop_batch(
    batch: dict[str, np.ndarray],
    *,
    store: str,
    keys: list[str],
    weights: list[float],
    size: int,
    augment: dict[str, Any],
    target_mode: TargetMode,
    boundary_width: int,
    cache_mb: float = 1024,
    seed: int | None = None,
) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: one augmented crop and its target per input row.

    Items are drawn with probability ``weights`` (their area share), so every training pixel is
    equally likely to be seen. Crops differ between epochs (fresh entropy) unless ``seed`` is
    set: then they are a function of the seed and the row ids, the same in every epoch. Each
    worker process keeps up to ``cache_mb`` of whole items in memory.
    """
    _CACHE.budget = int(cache_mb * 2**20)
    n = len(next(iter(batch.values())))
    first = int(batch["id"][0]) if "id" in batch and n else 0
    rng = np.random.default_rng(None if seed is None else [seed, first])
    source = open_store(store)
    config = AugmentConfig(**augment)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    channels = (2,) if target_mode == "distance" else ()
    targets = np.empty((n, *channels, size, size), dtype=np.uint8)
    for i, index in enumerate(rng.choice(len(keys), size=n, p=weights)):
        rgb, labels = sample_crop(source, keys[index], size, rng, config)
        images[i] = rgb
        targets[i] = make_target(labels, target_mode, boundary_width)
    return {"image": images, "target": targets}


def area_weights(store: TrainingStore, keys: list[str]) -> list[float]:
    """Sampling probability of each item: its share of the total area."""
    areas = np.array([store.items[k].height * store.items[k].width for k in keys], dtype=float)
    return (areas / areas.sum()).tolist()


def crop_dataset(
    store: TrainingStore,
    keys: list[str],
    num_samples: int,
    *,
    size: int,
    augment: AugmentConfig,
    target_mode: TargetMode = "3class",
    boundary_width: int = 1,
    rows_per_task: int = 16,
    num_cpus: float = 1.0,
    concurrency: int | None = None,
    cache_mb: float = 1024,
    seed: int | None = None,
) -> Any:
    """A Ray Dataset of ``num_samples`` augmented crops (``image`` uint8 NHWC, ``target`` uint8).

    The dataset is lazy: each execution (each epoch) draws new crops, unless ``seed`` fixes them.
    """
    import ray.data

    if not keys:
        raise ConfigError(f"{store.path}: no training items in the requested splits")
    blocks = max(1, math.ceil(num_samples / rows_per_task))
    # from_items, not range(): range() runs read tasks that each want a whole CPU, which a
    # small machine already busy with training workers may never have free.
    ids = [{"id": i} for i in range(num_samples)]
    compute = ray.data.TaskPoolStrategy(size=concurrency) if concurrency else None
    return ray.data.from_items(ids, override_num_blocks=blocks).map_batches(
        crop_batch,
        batch_size=rows_per_task,
        fn_kwargs={
            "store": store.path,
            "keys": keys,
            "weights": area_weights(store, keys),
            "size": size,
            "augment": augment.model_dump(),
            "target_mode": target_mode,
            "boundary_width": boundary_width,
            "cache_mb": cache_mb,
            "seed": seed,
        },
        num_cpus=num_cpus,
        compute=compute,
    )
