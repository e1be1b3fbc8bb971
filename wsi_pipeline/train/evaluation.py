"""Scores of nuclei segmentations on a folder dataset: Dice, IoU, AJI, PQ, DQ, SQ, F1.

Two sources of predictions, scored the same way against ``masks/<id>.png``:

- a checkpoint: each image is resampled to the model's mpp, predicted whole (padded to the
  model's size divisor), turned into instances by :func:`instances_from_probabilities` with the
  card's post-processing, and the labels are resampled back (nearest) to the image's own pixels;
- a folder of label images made by any tool, with the dataset's file names (``.png``, ``.tif``,
  ``.tiff`` or ``.npy``), at the dataset's resolution.

Scores are computed per image at the dataset's resolution and averaged over images
(:func:`wsi_pipeline.metrics.summarize`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from wsi_pipeline.checkpoint import Normalization, load_checkpoint
from wsi_pipeline.config import ConfigError
from wsi_pipeline.forward import choose_device, forward, probabilities
from wsi_pipeline.metrics import score_image, summarize
from wsi_pipeline.progress import progress
from wsi_pipeline.segment.instances import instances_from_probabilities
from wsi_pipeline.train.ingest import FolderEntry, folder_entries, read_entry
from wsi_pipeline.train.store import resize_image, resize_labels, resized_shape
from wsi_pipeline.train.targets import TargetMode, make_target

logger = logging.getLogger(__name__)

PRED_SUFFIXES = (".png", ".tif", ".tiff", ".npy")
SCORES = ("dice", "iou", "aji", "pq", "dq", "sq", "f1")


def predict_logits(
    model: nn.Module,
    rgb: np.ndarray,
    normalization: Normalization,
    device: torch.device,
    *,
    autocast: bool = False,
) -> torch.Tensor:
    """(1, K, H, W) float32 logits of one whole image, padded (reflect) to the size divisor."""
    divisor = int(getattr(model, "size_divisor", 32))
    h, w = rgb.shape[:2]
    pad = ((0, -h % divisor), (0, -w % divisor), (0, 0))
    padded = np.pad(rgb, pad, mode="reflect" if min(h, w) > max(pad[0][1], pad[1][1]) else "edge")
    images = torch.from_numpy(np.ascontiguousarray(padded[None])).to(device)
    return forward(model, images, normalization, autocast=autocast)[..., :h, :w].float()


def _tiles(length: int, tile: int) -> list[slice]:
    return [slice(start, min(start + tile, length)) for start in range(0, length, tile)]


@torch.no_grad()
def score_tiles(
    model: nn.Module,
    rgb: np.ndarray,
    labels: np.ndarray,
    *,
    target_mode: TargetMode,
    normalization: Normalization,
    postprocess: dict[str, Any],
    device: torch.device,
    autocast: bool = False,
    tile: int = 1024,
    loss_fn: nn.Module | None = None,
    boundary_width: int = 1,
) -> Iterator[dict[str, float]]:
    """Scores (and the loss, with ``loss_fn``) of each ``tile`` x ``tile`` part of an image."""
    for ys in _tiles(labels.shape[0], tile):
        for xs in _tiles(labels.shape[1], tile):
            logits = predict_logits(model, rgb[ys, xs], normalization, device, autocast=autocast)
            probs = probabilities(logits, target_mode)[0].cpu().numpy()
            pred = instances_from_probabilities(probs, target_mode, **postprocess)
            scores = score_image(labels[ys, xs], pred)
            result = {s: float(scores[s]) for s in SCORES}
            if loss_fn is not None:
                target = make_target(labels[ys, xs], target_mode, boundary_width)
                result["loss"] = float(loss_fn(logits, torch.from_numpy(target[None]).to(device)))
            yield result


def _select(
    entries: list[FolderEntry], splits: list[str] | None, field: str | None
) -> list[FolderEntry]:
    if not splits:
        return entries
    if field is None:
        raise ConfigError("--split needs a split field in the dataset's manifest.json")
    chosen = [e for e in entries if e.split in splits]
    if not chosen:
        raise ConfigError(f"no images in splits {splits} (field {field!r})")
    return chosen


def report(pairs: Iterable[tuple[str, np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Means over images of every score, plus the per-image list under ``images``."""
    images = []
    for name, true, pred in pairs:
        images.append({"name": name, **score_image(true, pred)})
        logger.debug("%s: aji %.3f", name, images[-1]["aji"])
    summary: dict[str, Any] = summarize(
        [{k: v for k, v in s.items() if k != "name"} for s in images]
    )
    return {**summary, "images": images}


def read_label_image(path: Path) -> np.ndarray:
    """Instance labels from a PNG/TIFF (any integer mode) or a ``.npy`` array."""
    if path.suffix == ".npy":
        labels = np.load(path, allow_pickle=False)
    elif path.suffix in (".tif", ".tiff"):
        import tifffile

        labels = tifffile.imread(path)
    else:
        labels = np.asarray(Image.open(path))
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError(
            f"{path}: expected a 2-D integer label image, got {labels.dtype} {labels.shape}"
        )
    return labels.astype(np.int64)


def _prediction_file(pred_dir: Path, stem: str) -> Path:
    for suffix in PRED_SUFFIXES:
        if (path := pred_dir / f"{stem}{suffix}").exists():
            return path
    raise FileNotFoundError(f"{pred_dir}: no prediction {stem}.png|.tif|.npy")


def evaluate_predictions(
    pred_dir: str | Path,
    data_dir: str | Path,
    *,
    split_field: str | None = None,
    splits: list[str] | None = None,
) -> dict[str, Any]:
    """Score label images in ``pred_dir`` against the dataset's masks (same file names)."""
    pred_root = Path(pred_dir)
    if not pred_root.is_dir():
        raise FileNotFoundError(f"{pred_root}: no such directory")
    entries, field = folder_entries(data_dir, split_field=split_field)
    entries = _select(entries, splits, field)

    def pairs() -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        for entry in progress(entries, "evaluate", unit="images"):
            true = np.asarray(Image.open(entry.mask)).astype(np.int64)
            pred_file = _prediction_file(pred_root, entry.id)
            pred = read_label_image(pred_file)
            if pred.shape != true.shape:
                raise ConfigError(
                    f"{pred_file}: shape {pred.shape} differs from the mask's {true.shape}"
                )
            yield entry.id, true, pred

    return {**report(pairs()), "pred": str(pred_root), "data": str(data_dir)}


@torch.inference_mode()
def predict_probabilities(
    model: nn.Module, card: Any, rgb: np.ndarray, source_mpp: float, device: torch.device
) -> np.ndarray:
    """(K, h, w) class probabilities of one image, predicted at the model's mpp."""
    shape = resized_shape(rgb.shape, source_mpp / card.mpp)
    logits = predict_logits(
        model, resize_image(rgb, shape), card.normalization, device, autocast=device.type == "cuda"
    )
    return probabilities(logits, card.target_mode)[0].cpu().numpy()


def predict_instances(
    model: nn.Module, card: Any, rgb: np.ndarray, source_mpp: float, device: torch.device
) -> np.ndarray:
    """Instance labels of one image at its own resolution, predicted at the model's mpp."""
    probs = predict_probabilities(model, card, rgb, source_mpp, device)
    labels = instances_from_probabilities(probs, card.target_mode, **card.postprocess.model_dump())
    return resize_labels(labels, rgb.shape[:2])


def scored_entries(
    data_dir: str | Path,
    *,
    mpp_source: float | None = None,
    split_field: str | None = None,
    splits: list[str] | None = None,
) -> list[FolderEntry]:
    """The images of a folder dataset in ``splits``, each with a known mpp.

    Raises:
        FileNotFoundError: not a folder dataset.
        ConfigError: an image of unknown mpp (pass ``mpp_source``), or no image in ``splits``.
    """
    entries, field = folder_entries(data_dir, mpp_source=mpp_source, split_field=split_field)
    entries = _select(entries, splits, field)
    unknown = [e.id for e in entries if e.mpp is None]
    if unknown:
        raise ConfigError(f"{data_dir}: no mpp recorded for {unknown[0]}; pass --mpp-source")
    return entries


def evaluate_checkpoint(
    checkpoint: str | Path,
    data_dir: str | Path,
    *,
    mpp_source: float | None = None,
    split_field: str | None = None,
    splits: list[str] | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Predict every image of a folder dataset with a checkpoint and score it.

    Raises:
        FileNotFoundError: not a checkpoint, or not a folder dataset.
        ConfigError: an image of unknown mpp (pass ``mpp_source``), or no image in ``splits``.
    """
    torch_device = choose_device(device)
    model, card = load_checkpoint(checkpoint, device=torch_device)
    entries = scored_entries(
        data_dir, mpp_source=mpp_source, split_field=split_field, splits=splits
    )

    def pairs() -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        for entry in progress(entries, "evaluate", unit="images"):
            rgb, true = read_entry(entry)
            yield entry.id, true, predict_instances(model, card, rgb, entry.mpp, torch_device)  # type: ignore[arg-type]

    result = report(pairs())
    return {**result, "checkpoint": str(checkpoint), "data": str(data_dir), "mpp": card.mpp}
