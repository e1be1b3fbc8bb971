"""One tile's probabilities → the nuclei it owns, as level-0 polygons with QuPath measurements.

Runs in the segment job's CPU post-process tasks. Nuclei near a seam travel to the driver
exactly (shapely pickles polygons as WKB): no rounding, no repair.
"""

from __future__ import annotations

import math
import pickle
import time

import numpy as np
import shapely

from wsi_pipeline.checkpoint import ModelCard
from wsi_pipeline.segment.geojson import encode_feature, nucleus_feature
from wsi_pipeline.segment.instances import (
    foreground_probability,
    instance_means,
    instances_from_probabilities,
)
from wsi_pipeline.segment.polygons import polygon_array
from wsi_pipeline.segment.stitching import Nucleus, owned_instances
from wsi_pipeline.slides.tiling import Tile, TileGrid

# Labels are unique across a slide without coordination: tile index * LABELS_PER_TILE + k.
# uint32 then holds 262,144 tiles of up to 16,383 nuclei each.
LABELS_PER_TILE = 2**14


def shape_measurements(polygons: np.ndarray, mpp: float) -> list[dict[str, float]]:
    """QuPath measurements of each level-0 polygon of a shapely array: area µm², perimeter µm,
    circularity, solidity (shapely's array functions: one GEOS call per measure for all)."""
    areas = shapely.area(polygons).tolist()
    lengths = shapely.length(polygons).tolist()
    hulls = shapely.area(shapely.convex_hull(polygons)).tolist()
    return [_measurements(a, n, h, mpp) for a, n, h in zip(areas, lengths, hulls, strict=True)]


def _measurements(area_px: float, length_px: float, hull_px: float, mpp: float) -> dict[str, float]:
    area, perimeter = area_px * mpp**2, length_px * mpp
    return {
        "Area µm^2": round(area, 3),
        "Perimeter µm": round(perimeter, 3),
        "Circularity": round(min(1.0, 4 * math.pi * area / perimeter**2), 4) if perimeter else 0.0,
        "Solidity": round(area_px / hull_px, 4) if hull_px else 0.0,
    }


def tile_nuclei(
    probs: np.ndarray,
    tile: Tile,
    grid: TileGrid,
    *,
    card: ModelCard,
    downsample: float,
    level0_mpp: float,
    simplify: float = 0.0,
    clock: dict[str, float] | None = None,
    subpixel: bool = False,
    labels: np.ndarray | None = None,
) -> tuple[list[Nucleus], int]:
    """The nuclei a tile owns, from its ``(K, T, T)`` probabilities, with level-0 polygons, and
    the number of instances lost for being wider than the overlap (see
    :func:`~wsi_pipeline.segment.stitching.owned_instances`).

    Args:
        probs: float probabilities of the tile.
        tile: the tile in ``grid`` (grid px at the model's mpp).
        card: the model card (target mode and post-processing parameters).
        downsample: level-0 px per grid px.
        level0_mpp: µm per level-0 px, for the measurements.
        simplify: polygon simplification tolerance in grid px (0: none).
        clock: if given, ``clock["instances"]`` gets the seconds of instance extraction.
        subpixel: outlines from the nucleus probability at its threshold (sub-pixel where a
            nucleus meets background), not from the labels on the model's pixel grid.
        labels: the tile's instances, if the predictor found them
            (:mod:`~wsi_pipeline.segment.tensor_instances`); ``probs`` is then the background
            channel alone, ``(1, T, T)``.
    """
    start = time.perf_counter()
    if labels is None:
        post = card.postprocess.model_dump()
        labels = instances_from_probabilities(probs, card.target_mode, **post)
        nucleus = foreground_probability(probs)
    else:
        labels = labels.astype(np.int32, copy=False)
        nucleus = 1.0 - probs[0]  # as foreground_probability has it for these modes
    keep, oversize = owned_instances(labels, tile, grid)
    if clock is not None:
        clock["instances"] = time.perf_counter() - start
    if not keep:
        return [], oversize
    mean_prob = instance_means(labels, nucleus)
    owned = np.isin(labels, keep)
    field = None
    if subpixel:  # instances this tile does not own are another nucleus, not background: 0
        field = np.where(owned | (labels == 0), nucleus, 0)
    labels = np.where(owned, labels, 0)
    offset = (tile.box.x0 * downsample, tile.box.y0 * downsample)
    first_label = (tile.row * grid.cols + tile.col) * LABELS_PER_TILE
    ids, polygons = polygon_array(
        labels,
        offset=offset,
        scale=downsample,
        simplify=simplify,
        field=field,
        level=card.postprocess.foreground_threshold,
    )
    centres = shapely.centroid(polygons)
    xs, ys = shapely.get_x(centres).tolist(), shapely.get_y(centres).tolist()
    probabilities = mean_prob[ids - 1].tolist()
    nuclei = []
    for k, (polygon, measurements, x, y, probability) in enumerate(
        zip(
            polygons.tolist(),
            shape_measurements(polygons, level0_mpp),
            xs,
            ys,
            probabilities,
            strict=True,
        ),
        start=1,
    ):
        measurements["Nucleus probability"] = round(probability, 4)
        centroid = (x / downsample, y / downsample)
        nuclei.append(
            Nucleus(polygon, centroid, (tile.col, tile.row), measurements, first_label + k)
        )
    return nuclei, oversize


def nucleus_json(nucleus: Nucleus) -> str:
    """One nucleus as a QuPath GeoJSON feature (with a fresh UUID and its label), serialised."""
    feature = nucleus_feature(nucleus.polygon, nucleus.properties)
    feature["properties"]["label"] = nucleus.label
    return encode_feature(feature)


def pack_nuclei(nuclei: list[Nucleus]) -> bytes:
    """A tile's seam nuclei as one exact binary value for a Ray Data row (read by
    :func:`unpack_nuclei` on the driver; both ends are this package's own code)."""
    return pickle.dumps(nuclei, protocol=pickle.HIGHEST_PROTOCOL)


def unpack_nuclei(data: bytes) -> list[Nucleus]:
    return list(pickle.loads(data))  # noqa: S301 (written by pack_nuclei in our own tasks)
