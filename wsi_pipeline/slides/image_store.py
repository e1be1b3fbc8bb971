"""The slide image store: one OME-Zarr v0.5 (Zarr v3) image per slide at the tiling mpp.

Layout of ``<name>.ome.zarr``::

    zarr.json         group; attributes "ome" (multiscales, axes c/y/x in µm) and "wsi_pipeline"
    0/ 1/ …           uint8 (3, H, W) pyramid levels, level l downsampled 2**l by area averaging;
                      chunks = tile >> l, shards = shard >> l, so one level-0 shard maps onto
                      exactly one shard of every level
    tissue/           uint8 (h, w) tissue mask at its own coarse mpp
    progress/         one marker per finished level-0 shard (resume), removed on completion
    COMPLETE.json     written last, atomically: the store is complete

Zarr shards are read-modify-write, so a shard has exactly one writer: the task that owns the
level-0 shard writes that shard region at every level (:func:`write_shard`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from wsi_pipeline import __version__, ngff, storage
from wsi_pipeline.slides.tiling import Box, ShardGrid

COMPLETE = "COMPLETE.json"
PROGRESS = "progress"
MIN_CHUNK = 32
MAX_LEVELS = 6


@dataclass(frozen=True)
class StoreLayout:
    """Everything that fixes a store's arrays and records where its pixels came from."""

    source: str
    backend: str
    level0_width: int
    level0_height: int
    source_mpp: float
    mpp: float
    width: int
    height: int
    tile: int
    shard: int
    levels: int

    @property
    def downsample(self) -> float:
        """Level-0 slide pixels per store pixel."""
        return self.mpp / self.source_mpp

    @property
    def shards(self) -> ShardGrid:
        return ShardGrid(self.width, self.height, self.shard)

    def level_shape(self, level: int) -> tuple[int, int, int]:
        f = 2**level
        return (3, -(-self.height // f), -(-self.width // f))


def pyramid_levels(width: int, height: int, tile: int) -> int:
    """Levels until the image fits one tile; every level's chunk is exact and ≥ ``MIN_CHUNK`` px."""
    levels = 1
    while (
        levels < MAX_LEVELS
        and max(width, height) >> (levels - 1) > tile
        and tile >> levels >= MIN_CHUNK
        and tile % 2**levels == 0
    ):
        levels += 1
    return levels


def create_store(
    path: str, layout: StoreLayout, tissue: np.ndarray, tissue_mpp: float, *, name: str = ""
) -> zarr.Group:
    """Create (or recreate) an empty store with its arrays and attributes."""
    group = zarr.open_group(path, mode="w", zarr_format=3)
    # zstd level 1: the ratio of level 5 on H&E at a quarter of the write time.
    compressor = BloscCodec(cname="zstd", clevel=1, shuffle="noshuffle")
    for level in range(layout.levels):
        chunk, shard = layout.tile >> level, layout.shard >> level
        group.create_array(
            str(level),
            shape=layout.level_shape(level),
            dtype="uint8",
            chunks=(3, chunk, chunk),
            shards=(3, shard, shard),
            compressors=compressor,
            fill_value=255,
            dimension_names=("c", "y", "x"),
        )
    group.create_array(
        "tissue",
        data=tissue.astype(np.uint8),
        chunks=tissue.shape or (1, 1),
        compressors=compressor,
    )
    group.attrs.update(
        {
            "ome": ngff.multiscales(
                mpp=layout.mpp,
                levels=layout.levels,
                channels=True,
                name=name,
                type="area averaging (2x2 mean)",
            ),
            "wsi_pipeline": {
                **asdict(layout),
                "downsample": layout.downsample,
                "tissue": {"path": "tissue", "mpp": tissue_mpp, "fraction": float(tissue.mean())},
                "version": __version__,
            },
        }
    )
    return group


def read_layout(path: str) -> StoreLayout:
    """The layout recorded in a store's attributes."""
    attrs = dict(zarr.open_group(path, mode="r").attrs)["wsi_pipeline"]
    fields = StoreLayout.__dataclass_fields__
    return StoreLayout(**{k: v for k, v in attrs.items() if k in fields})


def downsample2(image: np.ndarray, *, channels_last: bool = False) -> np.ndarray:
    """2x2 area average (rounded) of a uint8 image with even height and width.

    The image is ``(C, H, W)``, or ``(H, W, C)`` with ``channels_last``.
    """
    u = image.astype(np.uint16)
    if channels_last:
        total = u[0::2, 0::2] + u[1::2, 0::2] + u[0::2, 1::2] + u[1::2, 1::2]
    else:
        total = u[..., 0::2, 0::2] + u[..., 1::2, 0::2] + u[..., 0::2, 1::2] + u[..., 1::2, 1::2]
    return ((total + 2) // 4).astype(np.uint8)


def write_shard(path: str, layout: StoreLayout, col: int, row: int, pixels: np.ndarray) -> None:
    """Write level-0 shard ``(col, row)`` from ``pixels`` (3, shard, shard), and every level below.

    ``pixels`` covers the full shard square (white beyond the image); only the part inside each
    level's array is written.
    """
    group = zarr.open_group(path, mode="r+")
    image = pixels
    for level in range(layout.levels):
        if level:
            image = downsample2(image)
        s = layout.shard >> level
        _, h, w = layout.level_shape(level)
        box = Box(col * s, row * s, (col + 1) * s, (row + 1) * s).clip(w, h)
        if box.empty:
            continue
        group[str(level)][:, box.y0 : box.y1, box.x0 : box.x1] = image[:, : box.height, : box.width]
    mark_shard_done(path, col, row)


def _shard_marker(path: str, col: int, row: int) -> str:
    return storage.join(path, PROGRESS, f"{col}_{row}")


def mark_shard_done(path: str, col: int, row: int) -> None:
    storage.write_bytes_atomic(_shard_marker(path, col, row), b"")


def done_shards(path: str) -> set[tuple[int, int]]:
    """Level-0 shards already written (for resuming)."""
    marker_dir = storage.join(path, PROGRESS)
    if not storage.exists(marker_dir):
        return set()
    fs, inner = storage.filesystem(marker_dir)
    done = set()
    for name in fs.ls(inner, detail=False):
        stem = name.rstrip("/").rsplit("/", 1)[-1]
        col, _, row = stem.partition("_")
        if col.isdigit() and row.isdigit():
            done.add((int(col), int(row)))
    return done


def is_complete(path: str) -> bool:
    return storage.exists(storage.join(path, COMPLETE))


def mark_complete(path: str, summary: dict[str, Any]) -> None:
    """Declare the store complete (atomic), then drop the per-shard markers."""
    storage.write_bytes_atomic(storage.join(path, COMPLETE), json.dumps(summary, indent=2).encode())
    storage.remove_tree(storage.join(path, PROGRESS))


def read_region(path: str, box: Box, level: int = 0) -> np.ndarray:
    """Store pixels of ``box`` (store px at ``level``) as ``(h, w, 3)`` uint8, white outside."""
    array = zarr.open_array(storage.join(path, str(level)), mode="r")
    _, h, w = array.shape
    out = np.full((box.height, box.width, 3), 255, dtype=np.uint8)
    inside = box.clip(w, h)
    if not inside.empty:
        data = array[:, inside.y0 : inside.y1, inside.x0 : inside.x1]
        out[inside.y0 - box.y0 : inside.y1 - box.y0, inside.x0 - box.x0 : inside.x1 - box.x0] = (
            np.moveaxis(data, 0, -1)
        )
    return out
