"""Whole-slide instance labels as an OME-Zarr v0.5 label image, written shard by shard.

``<slide>.labels.zarr`` holds a uint32 ``(y, x)`` image at the model's mpp whose value ``i`` is
the nucleus with ``properties.label == i`` in the slide's GeoJSON (0 is background). While the
GeoJSON is written, each final nucleus is appended to a small spill file per label shard it
touches (:class:`ShardBuckets`); afterwards one Ray task per shard rasterises its bucket and
writes that shard, so every shard has exactly one writer and memory stays bounded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from shapely.geometry import Polygon
from zarr.codecs import BloscCodec

from wsi_pipeline import __version__, ngff
from wsi_pipeline.segment.polygons import rasterize
from wsi_pipeline.slides.tiling import Box, ShardGrid

BUCKETS = ".buckets"


def create_label_store(
    path: str, width: int, height: int, *, mpp: float, chunk: int, shard: int, source: str
) -> None:
    """An empty label image (all background) with OME-Zarr label metadata."""
    group = zarr.open_group(path, mode="w", zarr_format=3)
    group.create_array(
        "0",
        shape=(height, width),
        dtype="uint32",
        chunks=(chunk, chunk),
        shards=(shard, shard),
        compressors=BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"),
        fill_value=0,
        dimension_names=("y", "x"),
    )
    group.attrs.update(
        {
            "ome": ngff.label_image(mpp=mpp, source=source),
            "wsi_pipeline": {"mpp": mpp, "source": source, "version": __version__},
        }
    )


class ShardBuckets:
    """Spill files of ``(label, polygon in grid px)`` per label shard, on local disk."""

    def __init__(self, store: str, width: int, height: int, shard: int) -> None:
        self.shards = ShardGrid(width, height, shard)
        self.directory = Path(store) / BUCKETS
        self.directory.mkdir(parents=True, exist_ok=True)

    def add(self, label: int, polygon: Polygon, downsample: float) -> None:
        """File a level-0 polygon under every shard its bounding box meets."""
        xy = np.asarray(polygon.exterior.coords) / downsample
        s = self.shards.shard
        x0, y0 = np.floor(xy.min(axis=0) / s).astype(int)
        x1, y1 = np.floor(xy.max(axis=0) / s).astype(int)
        line = json.dumps({"label": label, "xy": np.round(xy, 3).tolist()}) + "\n"
        for row in range(max(y0, 0), min(y1, self.shards.rows - 1) + 1):
            for col in range(max(x0, 0), min(x1, self.shards.cols - 1) + 1):
                with open(self.directory / f"{col}_{row}.jsonl", "a") as f:
                    f.write(line)

    def items(self) -> list[dict[str, Any]]:
        """One work item per non-empty shard."""
        items = []
        for bucket in sorted(self.directory.glob("*.jsonl")):
            col, row = (int(v) for v in bucket.stem.split("_"))
            items.append({"bucket": str(bucket), "col": col, "row": row})
        return items

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def rasterize_shard(labels: np.ndarray, box: Box, polygons: list[tuple[int, np.ndarray]]) -> None:
    """Paint each ``(label, xy in grid px)`` into ``labels``, the pixels of ``box``.

    A pixel belongs to a polygon when its centre lies inside it (QuPath's pixel-corner frame).
    """
    for label, xy in polygons:
        labels[rasterize(Polygon(xy), labels.shape, origin=(box.x0, box.y0))] = label


def write_label_shard(item: dict[str, Any], store: str, shard: int) -> dict[str, Any]:
    """Ray task: rasterise one bucket into its shard of the label image."""
    array = zarr.open_array(f"{store}/0", mode="r+")
    height, width = array.shape
    box = ShardGrid(width, height, shard).box(item["col"], item["row"])
    with open(item["bucket"]) as f:
        polygons = [(d["label"], np.asarray(d["xy"])) for d in map(json.loads, f)]
    labels = np.zeros((box.height, box.width), dtype=np.uint32)
    rasterize_shard(labels, box, polygons)
    array[box.y0 : box.y1, box.x0 : box.x1] = labels
    return {"bucket": item["bucket"], "nuclei": len(polygons)}
