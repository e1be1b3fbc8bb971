"""Annotated nuclei in → a training store: folder datasets and QuPath GeoJSON on slides.

- a **folder dataset**: ``images/<id>.png|jpg|tif`` + ``masks/<id>.png`` (16-bit instance labels,
  0 = background) with an optional ``manifest.json`` (``items[]`` with ``id``, per-item ``mpp`` /
  ``approx_mpp`` / ``mpp_from_xml`` and a split field such as MoNuSeg's ``kumar2017_split``);
- **QuPath GeoJSON** on a slide: nucleus polygons in level-0 px, pixel-corner frame (pixel ``i``
  spans ``[i, i + 1)``), rasterised at pixel centres into instance labels for each annotated
  region (see :func:`ingest_qupath`).

Items are written into the store with :mod:`wsi_pipeline.train.store`.
"""

from __future__ import annotations

import json
import logging
import math
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from PIL import Image
from shapely import affinity
from shapely.geometry import Polygon
from shapely.geometry.base import BaseGeometry

from wsi_pipeline.batch import error_line
from wsi_pipeline.config import ConfigError
from wsi_pipeline.progress import progress
from wsi_pipeline.segment.geojson import read_features
from wsi_pipeline.segment.polygons import largest_polygon, rasterize
from wsi_pipeline.train.store import (
    CHUNK,
    Staging,
    StoreItem,
    new_uid,
    resample,
    staged_items,
)

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


class DataError(ValueError):
    """An annotated input that cannot be ingested; the message is one line naming it."""


_ITEM_MPP_KEYS = ("mpp", "approx_mpp", "mpp_from_xml", "microns_per_pixel")


_MPP_TEXT = re.compile(r"^\s*(?:about|approx\.?|approximately|~)?\s*([0-9]*\.?[0-9]+)")


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
    try:
        rgb = np.asarray(Image.open(entry.image).convert("RGB"))
        mask = np.asarray(Image.open(entry.mask))
    except OSError as exc:
        raise DataError(f"{entry.id}: cannot read its image or mask ({error_line(exc)})") from None
    if mask.ndim != 2:
        raise DataError(
            f"{entry.mask}: a mask must be one channel of instance labels, got {mask.shape[2]} "
            "channels (an RGB picture of the labels?)"
        )
    if mask.shape != rgb.shape[:2]:
        h, w = rgb.shape[:2]
        raise DataError(
            f"{entry.mask}: mask is {mask.shape[1]}x{mask.shape[0]} px, its image {w}x{h} px"
        )
    return rgb, mask.astype(np.int32)


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
    items = []
    with staged_items(str(store), mpp) as staging:
        for entry in progress(entries, "ingest", unit="images"):
            source_mpp = float(entry.mpp)  # type: ignore[arg-type]
            rgb, labels = resample(*read_entry(entry), source_mpp / mpp)
            key = f"{dataset}/{entry.id}"
            staging.write_item(key, rgb, labels)
            split = str(entry.split) if entry.split is not None else fallback[entry.id]
            h, w = labels.shape
            nuclei = count_nuclei(labels)
            item = StoreItem(key, dataset, entry.id, split, h, w, source_mpp, nuclei, new_uid())
            items.append(item)
            logger.debug("ingested %s (%s, %dx%d px)", key, split, w, h)
        info = {
            "kind": "folder",
            "source": str(root.resolve()),
            "split_field": field_name if any(e.split is not None for e in entries) else None,
            "val_fraction": None if any(e.split is not None for e in entries) else val_fraction,
            "license": str(_manifest(root).get("license", "")),
        }
        staging.commit(dataset, info, items)
    return items


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
    bad = 0
    for feature in read_features(path):
        try:
            properties = feature.get("properties") or {}
            geometry = properties.get("nucleusGeometry") or feature.get("geometry")
            if not geometry or geometry.get("type") not in ("Polygon", "MultiPolygon"):
                continue
            geom = shapely.geometry.shape(geometry)
        except (AttributeError, TypeError, ValueError, shapely.errors.ShapelyError):
            bad += 1  # non-numeric coordinates, a 2-point ring...: skipped, not fatal
            continue
        if _class_name(properties).lower() in wanted:
            regions.append(geom)
        elif (polygon := largest_polygon(geom)) is not None:
            nuclei.append(polygon)
    if bad:
        logger.warning("%s: skipped %d malformed features", path, bad)
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
    from wsi_pipeline.slides.slide import open_slide

    if not Path(geojson).exists():
        raise FileNotFoundError(f"{geojson}: no such GeoJSON file")
    slide = open_slide(str(slide_path), mpp_override=mpp_override)
    nuclei, regions = read_qupath(geojson, region_classes)
    if not nuclei:
        raise ConfigError(f"{geojson}: no nucleus polygons")
    if not shapely.box(0, 0, *slide.dimensions).intersects(shapely.union_all(nuclei)):
        logger.warning(
            "%s: none of its %d nuclei lies on %s (%dx%d px): another slide's annotations, or "
            "coordinates that are not level-0 px?",
            geojson, len(nuclei), slide_path, *slide.dimensions,
        )  # fmt: skip
    boxes = region_boxes(nuclei, regions, slide.dimensions, margin_um / slide.mpp)
    tree = shapely.STRtree(nuclei)
    dataset = name or Path(slide_path).stem
    items = []
    with staged_items(str(store), mpp) as staging:
        for index, box in enumerate(progress(boxes, "ingest", unit="regions")):
            key = f"{dataset}/region-{index:03d}"
            present = _write_region(staging, key, box, slide, nuclei, tree, mpp, block)
            item_id = f"region-{index:03d}"
            h, w = staging.staged[f"items/{key}/labels"].shape
            items.append(
                StoreItem(key, dataset, item_id, split, h, w, slide.mpp, present, new_uid())
            )
            logger.debug("ingested %s at (%d, %d): %d nuclei", key, box[0], box[1], present)
        info = {
            "kind": "qupath",
            "source": str(slide_path),
            "annotations": str(geojson),
            "regions": [list(b) for b in boxes],
            "region_classes": list(region_classes),
            "split_field": None,
            "license": "",
        }
        staging.commit(dataset, info, items)
    return items


def _write_region(
    staging: Staging,
    key: str,
    region: tuple[float, float, float, float],
    slide: Any,
    nuclei: list[Polygon],
    tree: shapely.STRtree,
    mpp: float,
    block: int,
) -> int:
    """Read one region at ``mpp`` and rasterise its nuclei, block by block; nuclei present."""
    x0, y0, x1, y1 = region
    downsample = slide.downsample_for(mpp)
    width, height = math.ceil((x1 - x0) / downsample), math.ceil((y1 - y0) / downsample)
    image_array, labels_array = staging.create_item(key, height, width)
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
    return len(present)
