"""Annotated nuclei in → one training store (Zarr v3) at one training mpp.

Two sources:

- a **folder dataset**: ``images/<id>.png|jpg|tif`` + ``masks/<id>.png`` (16-bit instance labels,
  0 = background) with an optional ``manifest.json`` (``items[]`` with ``id``, per-item ``mpp`` /
  ``approx_mpp`` / ``mpp_from_xml`` and a split field such as MoNuSeg's ``kumar2017_split``);
- **QuPath GeoJSON** on a slide: nucleus polygons in level-0 px, pixel-corner frame (pixel ``i``
  spans ``[i, i + 1)``), rasterised at pixel centres into instance labels for each annotated
  region (see :func:`ingest_qupath`).

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
replaces its items. Crops for training are cut from the store by :mod:`wsi_pipeline.augment`.
"""

from __future__ import annotations

import json
import logging
import math
import re
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely
import zarr
from PIL import Image
from shapely import affinity
from shapely.geometry import Polygon
from shapely.geometry.base import BaseGeometry
from zarr.codecs import BloscCodec

from wsi_pipeline import __version__
from wsi_pipeline.config import ConfigError
from wsi_pipeline.export import read_features
from wsi_pipeline.polygons import largest_polygon, rasterize
from wsi_pipeline.synthetic import IMAGE_SUFFIXES

logger = logging.getLogger(__name__)

ATTRS = "wsi_pipeline_training"
FORMAT = 1
CHUNK = 256
_ITEM_MPP_KEYS = ("mpp", "approx_mpp", "mpp_from_xml", "microns_per_pixel")
_MPP_TEXT = re.compile(r"^\s*(?:about|approx\.?|approximately|~)?\s*([0-9]*\.?[0-9]+)")


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


# --- the store ------------------------------------------------------------------------------


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


def _open_for_writing(path: str, mpp: float) -> zarr.Group:
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


def _create_item(
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


def _write_item(group: zarr.Group, key: str, rgb: np.ndarray, labels: np.ndarray) -> None:
    image_array, labels_array = _create_item(group, key, *labels.shape)
    image_array[:] = rgb
    labels_array[:] = labels.astype(np.int32)


def _register(
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


def _uid() -> str:
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


# --- folder datasets ------------------------------------------------------------------------


@dataclass(frozen=True)
class FolderEntry:
    """One image of a folder dataset, before it is read."""

    id: str
    image: Path
    mask: Path
    mpp: float | None
    split: str | None


def parse_mpp(value: Any) -> float | None:
    """A µm/px value from a number or text such as ``"about 0.25 (...)"``; ``None`` otherwise."""
    if isinstance(value, int | float) and value > 0:
        return float(value)
    if isinstance(value, str) and (match := _MPP_TEXT.match(value)):
        number = float(match.group(1))
        return number if number > 0 else None
    return None


def _item_mpp(item: dict[str, Any], manifest: dict[str, Any]) -> float | None:
    for key in _ITEM_MPP_KEYS:
        if (mpp := parse_mpp(item.get(key))) is not None:
            return mpp
    for key in ("mpp", "microns_per_pixel"):
        if (mpp := parse_mpp(manifest.get(key))) is not None:
            return mpp
    return None


def _detect_split_field(items: list[dict[str, Any]]) -> str | None:
    keys = {k for item in items for k in item if k == "split" or k.endswith("_split")}
    return sorted(keys)[0] if keys else None


def _manifest(root: Path) -> dict[str, Any]:
    path = root / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {}


def folder_entries(
    directory: str | Path, *, mpp_source: float | None = None, split_field: str | None = None
) -> tuple[list[FolderEntry], str | None]:
    """The images of a folder dataset with their mpp and split, and the split field used.

    Args:
        directory: folder with ``images/`` and ``masks/`` (and optionally ``manifest.json``).
        mpp_source: µm/px of every image, overriding the manifest.
        split_field: manifest item field holding the split; by default ``split`` or the first
            field ending in ``_split``, if the manifest has one.

    Raises:
        FileNotFoundError: no images, or an image without a mask.
        ConfigError: an explicitly named split field is missing on an item.
    """
    root = Path(directory)
    images = sorted(p for p in (root / "images").glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise FileNotFoundError(f"{root}: no images/ with .png/.jpg/.tif files")
    manifest = _manifest(root)
    by_id = {str(item.get("id")): item for item in manifest.get("items", [])}
    field_name = split_field or _detect_split_field(list(by_id.values()))
    entries = []
    for image in images:
        mask = root / "masks" / f"{image.stem}.png"
        if not mask.exists():
            raise FileNotFoundError(f"{mask}: missing mask for {image.name}")
        item = by_id.get(image.stem, {})
        if split_field is not None and split_field not in item:
            raise ConfigError(f"{root}: item {image.stem} has no split field {split_field!r}")
        split = item.get(field_name) if field_name else None
        mpp = mpp_source if mpp_source is not None else _item_mpp(item, manifest)
        entries.append(FolderEntry(image.stem, image, mask, mpp, split))
    return entries, field_name


def hash_split(ids: list[str], val_fraction: float, seed: int = 0) -> dict[str, str]:
    """A deterministic train/val split: the ``val_fraction`` of ids with the lowest hashes."""
    n_val = math.ceil(len(ids) * val_fraction) if len(ids) > 1 else 0
    ranked = sorted(ids, key=lambda i: zlib.crc32(f"{seed}:{i}".encode()))
    val = set(ranked[:n_val])
    return {i: "val" if i in val else "train" for i in ids}


def read_entry(entry: FolderEntry) -> tuple[np.ndarray, np.ndarray]:
    """``(rgb uint8, labels int32)`` of a folder dataset image at its own resolution."""
    rgb = np.asarray(Image.open(entry.image).convert("RGB"))
    labels = np.asarray(Image.open(entry.mask)).astype(np.int32)
    if labels.shape != rgb.shape[:2]:
        raise ValueError(f"{entry.mask}: mask {labels.shape} does not match image {rgb.shape}")
    return rgb, labels


def count_nuclei(labels: np.ndarray) -> int:
    """Number of distinct non-zero labels."""
    return int(np.count_nonzero(np.bincount(labels.ravel())[1:])) if labels.any() else 0


def ingest_folder(
    directory: str | Path,
    store: str | Path,
    *,
    mpp: float = 0.5,
    mpp_source: float | None = None,
    split_field: str | None = None,
    val_fraction: float = 0.2,
    name: str | None = None,
) -> list[StoreItem]:
    """Add a folder dataset to a training store, resampled to ``mpp``.

    Items keep the manifest's split (``split_field``); without one, a deterministic
    ``val_fraction`` of them is ``val`` and the rest ``train``.

    Raises:
        ConfigError: an image whose mpp is unknown (pass ``mpp_source``), or a store at another mpp.
    """
    root = Path(directory)
    entries, field_name = folder_entries(root, mpp_source=mpp_source, split_field=split_field)
    unknown = [e.id for e in entries if e.mpp is None]
    if unknown:
        raise ConfigError(
            f"{root}: no mpp recorded for {len(unknown)} images (e.g. {unknown[0]}); "
            "pass --mpp-source"
        )
    fallback = hash_split([e.id for e in entries], val_fraction)
    dataset = name or root.name
    group = _open_for_writing(str(store), mpp)
    items = []
    for entry in entries:
        source_mpp = float(entry.mpp)  # type: ignore[arg-type]
        rgb, labels = resample(*read_entry(entry), source_mpp / mpp)
        key = f"{dataset}/{entry.id}"
        _write_item(group, key, rgb, labels)
        split = str(entry.split) if entry.split is not None else fallback[entry.id]
        h, w = labels.shape
        items.append(
            StoreItem(key, dataset, entry.id, split, h, w, source_mpp, count_nuclei(labels), _uid())
        )
        logger.debug("ingested %s (%s, %dx%d px)", key, split, w, h)
    info = {
        "kind": "folder",
        "source": str(root.resolve()),
        "split_field": field_name if any(e.split is not None for e in entries) else None,
        "val_fraction": None if any(e.split is not None for e in entries) else val_fraction,
        "license": str(_manifest(root).get("license", "")),
    }
    _register(group, dataset, info, items)
    return items


# --- QuPath GeoJSON on a slide -------------------------------------------------------------


def _class_name(properties: dict[str, Any]) -> str:
    classification = properties.get("classification")
    if isinstance(classification, dict):
        return str(classification.get("name", ""))
    return str(classification or "")


def read_qupath(
    path: str | Path, region_classes: tuple[str, ...] = ("Region",)
) -> tuple[list[Polygon], list[BaseGeometry]]:
    """``(nuclei, regions)`` from a QuPath GeoJSON export, level-0 px.

    Features classified as one of ``region_classes`` (case-insensitive) are annotated regions;
    every other polygon feature is a nucleus (a QuPath cell contributes its ``nucleusGeometry``).
    Multi-part or invalid nucleus outlines keep their largest valid polygon.
    """
    wanted = {c.lower() for c in region_classes}
    nuclei: list[Polygon] = []
    regions: list[BaseGeometry] = []
    for feature in read_features(path):
        properties = feature.get("properties") or {}
        geometry = properties.get("nucleusGeometry") or feature.get("geometry")
        if not geometry or geometry.get("type") not in ("Polygon", "MultiPolygon"):
            continue
        geom = shapely.geometry.shape(geometry)
        if _class_name(properties).lower() in wanted:
            regions.append(geom)
        elif (polygon := largest_polygon(geom)) is not None:
            nuclei.append(polygon)
    return nuclei, regions


def region_boxes(
    nuclei: list[Polygon],
    regions: list[BaseGeometry],
    slide_size: tuple[int, int],
    margin: float,
) -> list[tuple[int, int, int, int]]:
    """Integer level-0 boxes ``(x0, y0, x1, y1)`` of the regions (bounding boxes), clipped to the
    slide; without regions, one box around all nuclei grown by ``margin`` level-0 px."""
    if regions:
        bounds = [r.bounds for r in regions]
    elif nuclei:
        b = np.array([p.bounds for p in nuclei])
        bounds = [
            (
                b[:, 0].min() - margin,
                b[:, 1].min() - margin,
                b[:, 2].max() + margin,
                b[:, 3].max() + margin,
            )
        ]
    else:
        return []
    width, height = slide_size
    boxes = []
    for x0, y0, x1, y1 in bounds:
        box = (
            max(math.floor(x0), 0),
            max(math.floor(y0), 0),
            min(math.ceil(x1), width),
            min(math.ceil(y1), height),
        )
        if box[2] > box[0] and box[3] > box[1]:
            boxes.append(box)
    return boxes


def rasterize_nuclei(
    nuclei: list[Polygon],
    ids: list[int],
    origin: tuple[float, float],
    downsample: float,
    shape: tuple[int, int],
) -> np.ndarray:
    """Instance labels (int32) of a ``shape`` pixel grid at ``downsample`` level-0 px per pixel
    whose top-left corner is level-0 ``origin``; a pixel belongs to a nucleus if its centre does.
    Later nuclei overwrite earlier ones where outlines overlap."""
    labels = np.zeros(shape, dtype=np.int32)
    ox, oy = origin
    for polygon, label in zip(nuclei, ids, strict=True):
        local = affinity.affine_transform(
            polygon, [1 / downsample, 0, 0, 1 / downsample, -ox / downsample, -oy / downsample]
        )
        x0, y0, x1, y1 = local.bounds
        wx0, wy0 = max(math.floor(x0), 0), max(math.floor(y0), 0)
        wx1, wy1 = min(math.ceil(x1), shape[1]), min(math.ceil(y1), shape[0])
        if wx1 <= wx0 or wy1 <= wy0:
            continue
        window = affinity.translate(local, -wx0, -wy0)
        mask = rasterize(window, (wy1 - wy0, wx1 - wx0))
        labels[wy0:wy1, wx0:wx1][mask] = label
    return labels


def ingest_qupath(
    slide_path: str | Path,
    geojson: str | Path,
    store: str | Path,
    *,
    mpp: float = 0.5,
    mpp_override: float | None = None,
    region_classes: tuple[str, ...] = ("Region",),
    margin_um: float = 10.0,
    split: str = "train",
    name: str | None = None,
    block: int = 4 * CHUNK,
) -> list[StoreItem]:
    """Add the annotated regions of a slide to a training store, at ``mpp``.

    Each region (the bounding box of a feature classified as one of ``region_classes``, or, if
    there is none, the box around all nuclei grown by ``margin_um``) becomes one item: its pixels
    read at ``mpp`` and the nuclei rasterised at pixel centres, written block by block so memory
    stays bounded by ``block``. Every pixel of a region counts as annotated: nuclei missing from
    the GeoJSON are background.

    Raises:
        SlideError: the slide cannot be read or has no mpp (pass ``mpp_override``).
        FileNotFoundError: no GeoJSON file.
        ConfigError: no nuclei in the GeoJSON, or a store at another mpp.
    """
    from wsi_pipeline.slide import open_slide

    if not Path(geojson).exists():
        raise FileNotFoundError(f"{geojson}: no such GeoJSON file")
    slide = open_slide(str(slide_path), mpp_override=mpp_override)
    nuclei, regions = read_qupath(geojson, region_classes)
    if not nuclei:
        raise ConfigError(f"{geojson}: no nucleus polygons")
    downsample = slide.downsample_for(mpp)
    boxes = region_boxes(nuclei, regions, slide.dimensions, margin_um / slide.mpp)
    tree = shapely.STRtree(nuclei)
    dataset = name or Path(slide_path).stem
    group = _open_for_writing(str(store), mpp)
    items = []
    for index, (x0, y0, x1, y1) in enumerate(boxes):
        width, height = math.ceil((x1 - x0) / downsample), math.ceil((y1 - y0) / downsample)
        key = f"{dataset}/region-{index:03d}"
        image_array, labels_array = _create_item(group, key, height, width)
        present: set[int] = set()
        for by in range(0, height, block):
            for bx in range(0, width, block):
                h, w = min(block, height - by), min(block, width - bx)
                ox, oy = x0 + bx * downsample, y0 + by * downsample
                box = shapely.box(ox, oy, ox + w * downsample, oy + h * downsample)
                hits = sorted(int(i) for i in tree.query(box))
                labels = rasterize_nuclei(
                    [nuclei[i] for i in hits], [i + 1 for i in hits], (ox, oy), downsample, (h, w)
                )
                image_array[by : by + h, bx : bx + w] = slide.read_region(ox, oy, w, h, mpp=mpp)
                labels_array[by : by + h, bx : bx + w] = labels
                present.update(np.unique(labels[labels > 0]).tolist())
        items.append(
            StoreItem(
                key,
                dataset,
                f"region-{index:03d}",
                split,
                height,
                width,
                slide.mpp,
                len(present),
                _uid(),
            )
        )
        logger.debug("ingested %s at (%d, %d): %d nuclei", key, x0, y0, len(present))
    info = {
        "kind": "qupath",
        "source": str(slide_path),
        "annotations": str(geojson),
        "regions": [list(b) for b in boxes],
        "region_classes": list(region_classes),
        "split_field": None,
        "license": "",
    }
    _register(group, dataset, info, items)
    return items


def iter_items(
    store: TrainingStore, keys: list[str]
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """``(key, rgb, labels)`` of whole items, one at a time."""
    for key in keys:
        yield (key, *store.read(key))
