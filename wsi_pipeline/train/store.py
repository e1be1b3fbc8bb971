"""The training store (Zarr v3): annotated images and their instance labels at one mpp.

Filled by :mod:`~wsi_pipeline.train.ingest` (folder datasets, QuPath GeoJSON on slides); read by
training, evaluation and the crop pipeline.

Layout of a training store::

    <store>/
      zarr.json                    attributes "wsi_pipeline_training": format, version, mpp,
                                   datasets {name: source, kind, split field, licence...},
                                   items {key: dataset, id, split, height, width, source_mpp,
                                   n_nuclei, uid (new on every write)}
      items/<dataset>/<id>/image   uint8 (H, W, 3) at the store mpp, chunks 256², Blosc-zstd
      items/<dataset>/<id>/labels  int32 (H, W) instance labels at the store mpp

Images are resampled with area averaging (PIL BOX; bilinear when upsampling) and labels with
nearest neighbour. An item's arrays are written before it is listed in the attributes, so an
interrupted ingest never leaves a half-written item in the index; ingesting a dataset again
replaces its items. Crops for training are cut from the store by :mod:`wsi_pipeline.train.augment`.
"""

from __future__ import annotations

import logging
import math
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from PIL import Image
from zarr.codecs import BloscCodec

from wsi_pipeline import __version__
from wsi_pipeline.config import ConfigError

logger = logging.getLogger(__name__)


ATTRS = "wsi_pipeline_training"


FORMAT = 1


CHUNK = 256


@dataclass(frozen=True)
class StoreItem:
    """One annotated image of a training store."""

    key: str
    dataset: str
    id: str
    split: str
    height: int
    width: int
    source_mpp: float
    n_nuclei: int
    uid: str = ""  # new on every write, so that caches of the pixels can tell versions apart


@dataclass(frozen=True)
class TrainingStore:
    """An open training store (read-only view)."""

    path: str
    mpp: float
    datasets: dict[str, dict[str, Any]]
    items: dict[str, StoreItem]
    _arrays: dict[str, zarr.Array] = field(default_factory=dict, compare=False, repr=False)

    def keys(self, splits: list[str] | None = None, exclude: list[str] | None = None) -> list[str]:
        """Item keys whose split is in ``splits`` (all if ``None``) and not in ``exclude``."""
        return sorted(
            k
            for k, item in self.items.items()
            if (splits is None or item.split in splits) and item.split not in (exclude or [])
        )

    def array(self, key: str, name: str) -> zarr.Array:
        """The ``image`` or ``labels`` array of an item (opened once per store object)."""
        path = f"items/{key}/{name}"
        if path not in self._arrays:
            self._arrays[path] = zarr.open_array(self.path, path=path, mode="r")
        return self._arrays[path]

    def read(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """``(rgb, labels)`` of a whole item."""
        return self.array(key, "image")[:], self.array(key, "labels")[:]


def open_store(path: str | Path) -> TrainingStore:
    """Open a training store written by :func:`ingest_folder` or :func:`ingest_qupath`."""
    path = str(path)
    try:
        attrs = dict(zarr.open_group(path, mode="r").attrs)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        raise FileNotFoundError(f"{path}: no training store (run wsi-pipeline ingest)") from None
    if ATTRS not in attrs:
        raise FileNotFoundError(f"{path}: not a training store (no {ATTRS} attributes)")
    meta = attrs[ATTRS]
    items = {k: StoreItem(key=k, **v) for k, v in meta["items"].items()}
    return TrainingStore(path, float(meta["mpp"]), dict(meta["datasets"]), items)


def open_for_writing(path: str, mpp: float) -> zarr.Group:
    try:
        group = zarr.open_group(path, mode="r+")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        group = zarr.open_group(path, mode="w", zarr_format=3)
        group.attrs[ATTRS] = {
            "format": FORMAT,
            "version": __version__,
            "mpp": mpp,
            "datasets": {},
            "items": {},
        }
        return group
    meta = group.attrs.get(ATTRS)
    if meta is None:
        raise ConfigError(f"{path}: exists and is not a training store")
    if not math.isclose(meta["mpp"], mpp, rel_tol=1e-6):
        raise ConfigError(f"{path}: the store is at {meta['mpp']} µm/px, not {mpp}; use --mpp")
    return group


def create_item(
    group: zarr.Group, key: str, height: int, width: int
) -> tuple[zarr.Array, zarr.Array]:
    """Empty ``image`` and ``labels`` arrays of an item (replacing any earlier ones)."""
    compressor = BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")
    chunk = (min(CHUNK, height), min(CHUNK, width))
    item = group.require_group(f"items/{key}")
    image = item.create_array(
        "image",
        shape=(height, width, 3),
        dtype="uint8",
        chunks=(*chunk, 3),
        compressors=compressor,
        fill_value=255,
        overwrite=True,
    )
    labels = item.create_array(
        "labels",
        shape=(height, width),
        dtype="int32",
        chunks=chunk,
        compressors=compressor,
        fill_value=0,
        overwrite=True,
    )
    return image, labels


def write_item(group: zarr.Group, key: str, rgb: np.ndarray, labels: np.ndarray) -> None:
    image_array, labels_array = create_item(group, key, *labels.shape)
    image_array[:] = rgb
    labels_array[:] = labels.astype(np.int32)


def register_items(
    group: zarr.Group, dataset: str, info: dict[str, Any], items: list[StoreItem]
) -> None:
    """List ``items`` as the dataset's items, then drop the arrays of items no longer listed."""
    meta = dict(group.attrs[ATTRS])
    kept = {k: v for k, v in meta["items"].items() if v["dataset"] != dataset}
    kept.update({item.key: {k: v for k, v in asdict(item).items() if k != "key"} for item in items})
    dropped = set(meta["items"]) - set(kept)
    meta["items"] = dict(sorted(kept.items()))
    meta["datasets"] = {**meta["datasets"], dataset: info}
    meta["version"] = __version__
    group.attrs[ATTRS] = meta
    for key in dropped:
        del group[f"items/{key}"]


class Staging:
    """A dataset's items written beside the store's index, swapped in and indexed together.

    Use :func:`staged_items`: nothing of an ingest that fails (a bad mask, a full disk) reaches
    the index or replaces an item that was there before.
    """

    def __init__(self, path: str, group: zarr.Group) -> None:
        self.root, self.group = Path(path), group
        self.name = f".staging-{new_uid()}"
        self.staged = group.require_group(self.name)

    def create_item(self, key: str, height: int, width: int) -> tuple[zarr.Array, zarr.Array]:
        return create_item(self.staged, key, height, width)

    def write_item(self, key: str, rgb: np.ndarray, labels: np.ndarray) -> None:
        write_item(self.staged, key, rgb, labels)

    def commit(self, dataset: str, info: dict[str, Any], items: list[StoreItem]) -> None:
        """Move the staged items into place, then list them in the index."""
        self.group.require_group(f"items/{dataset}")
        for item in items:
            final = self.root / "items" / item.key
            if final.exists():
                replaced = self.root / self.name / "replaced" / item.key
                replaced.parent.mkdir(parents=True, exist_ok=True)
                final.rename(replaced)
            (self.root / self.name / "items" / item.key).rename(final)
        register_items(self.group, dataset, info, items)
        self.discard()

    def discard(self) -> None:
        shutil.rmtree(self.root / self.name, ignore_errors=True)


@contextmanager
def staged_items(path: str, mpp: float) -> Iterator[Staging]:
    """Stage a dataset's items for the (local) store at ``path``; discarded on any error."""
    staging = Staging(path, open_for_writing(path, mpp))
    try:
        yield staging
    finally:
        staging.discard()


def new_uid() -> str:
    return uuid.uuid4().hex[:12]


def resized_shape(shape: tuple[int, ...], factor: float) -> tuple[int, int]:
    """``(height, width)`` of an image of ``shape`` resized by ``factor`` (new / old px)."""
    return max(round(shape[0] * factor), 1), max(round(shape[1] * factor), 1)


def resize_image(rgb: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """RGB resized to ``(height, width)``: area averaging down, bilinear up."""
    if rgb.shape[:2] == shape:
        return rgb
    method = Image.Resampling.BOX if shape[0] < rgb.shape[0] else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(rgb).resize(shape[::-1], method))


def resize_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Instance labels (int32) resized to ``(height, width)`` with nearest neighbour."""
    if labels.shape == shape:
        return labels.astype(np.int32, copy=False)
    image = Image.fromarray(labels.astype(np.int32)).resize(shape[::-1], Image.Resampling.NEAREST)
    return np.asarray(image).astype(np.int32)


def resample(rgb: np.ndarray, labels: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """Resize by ``factor`` (new / old px): area averaging for the image, nearest for labels."""
    if math.isclose(factor, 1.0, rel_tol=1e-3):
        return rgb, labels
    shape = resized_shape(labels.shape, factor)
    return resize_image(rgb, shape), resize_labels(labels, shape)


def iter_items(
    store: TrainingStore, keys: list[str]
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """``(key, rgb, labels)`` of whole items, one at a time."""
    for key in keys:
        yield (key, *store.read(key))
