"""The predictor (a Ray Data callable class) and tile post-processing into nuclei.

The predictor loads a checkpoint once per actor and turns batches of RGB tiles into class
probabilities, on the GPU when there is one (bf16 autocast, ``channels_last``) and on the CPU
otherwise, with the same code. Probabilities travel as uint8 (1/255 steps) to keep the object
store small. Post-processing (CPU tasks) turns one tile's probabilities into the nuclei that tile
owns, as level-0 polygons with QuPath measurements.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import torch
from shapely.geometry import Polygon

from wsi_pipeline.checkpoint import ModelCard, choose_device, load_checkpoint, normalize
from wsi_pipeline.export import nucleus_feature
from wsi_pipeline.instances import instances_from_probabilities, mean_class_probability
from wsi_pipeline.polygons import label_polygons, largest_polygon
from wsi_pipeline.stitching import Nucleus, owned_instances
from wsi_pipeline.tiling import Tile, TileGrid

# Labels are unique across a slide without coordination: tile index * LABELS_PER_TILE + k.
# uint32 then holds 262,144 tiles of up to 16,383 nuclei each.
LABELS_PER_TILE = 2**14


class Predictor:
    """Batches of tiles → class probabilities. Use with ``map_batches`` and an actor pool.

    Args:
        checkpoint: checkpoint directory (see :mod:`wsi_pipeline.checkpoint`).
        device: ``"auto"`` (CUDA if available), ``"cuda"`` or ``"cpu"``.
        tta: average over horizontal and vertical flips (3x the compute).
    """

    def __init__(self, checkpoint: str, *, device: str = "auto", tta: bool = False) -> None:
        self.device = choose_device(device)
        model, self.card = load_checkpoint(checkpoint, device=self.device)
        self.model = model.to(memory_format=torch.channels_last)
        self.tta = tta

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch.pop("image")
        batch["probs"] = quantize(self.predict(images))
        return batch

    @torch.inference_mode()
    def predict(self, images: np.ndarray) -> np.ndarray:
        """``(B, H, W, 3)`` uint8 → ``(B, K, H, W)`` float32 probabilities."""
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        x = normalize(x, self.card.normalization)
        x = x.contiguous(memory_format=torch.channels_last)
        probs = self._probabilities(x)
        if self.tta:
            probs = probs + self._probabilities(x.flip(-1)).flip(-1)
            probs = (probs + self._probabilities(x.flip(-2)).flip(-2)) / 3
        return probs.float().cpu().numpy()

    def _probabilities(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"
        ):
            logits = self.model(x)
        logits = logits.float()
        return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


def quantize(probs: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(probs * 255), 0, 255).astype(np.uint8)


def dequantize(probs: np.ndarray) -> np.ndarray:
    return probs.astype(np.float32) / 255


def shape_measurements(polygon: Any, mpp: float) -> dict[str, float]:
    """QuPath measurements of a level-0 polygon: area µm², perimeter µm, circularity, solidity."""
    area, perimeter = polygon.area * mpp**2, polygon.length * mpp
    hull = polygon.convex_hull.area
    return {
        "Area µm^2": round(area, 3),
        "Perimeter µm": round(perimeter, 3),
        "Circularity": round(min(1.0, 4 * math.pi * area / perimeter**2), 4) if perimeter else 0.0,
        "Solidity": round(polygon.area / hull, 4) if hull else 0.0,
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
) -> list[Nucleus]:
    """The nuclei a tile owns, from its ``(K, T, T)`` probabilities, with level-0 polygons.

    Args:
        probs: float probabilities of the tile.
        tile: the tile in ``grid`` (grid px at the model's mpp).
        card: the model card (target mode and post-processing parameters).
        downsample: level-0 px per grid px.
        level0_mpp: µm per level-0 px, for the measurements.
        simplify: polygon simplification tolerance in grid px (0: none).
    """
    post = card.postprocess.model_dump()
    labels = instances_from_probabilities(probs, card.target_mode, **post)
    keep = owned_instances(labels, tile, grid)
    if not keep:
        return []
    mean_prob = mean_class_probability(labels, probs)
    labels = np.where(np.isin(labels, keep), labels, 0)
    offset = (tile.box.x0 * downsample, tile.box.y0 * downsample)
    first_label = (tile.row * grid.cols + tile.col) * LABELS_PER_TILE
    polygons = label_polygons(labels, offset=offset, scale=downsample, simplify=simplify)
    nuclei = []
    for k, (label, polygon) in enumerate(polygons, start=1):
        c = polygon.centroid
        measurements = shape_measurements(polygon, level0_mpp)
        measurements["Nucleus probability"] = round(float(mean_prob[label - 1]), 4)
        centroid = (c.x / downsample, c.y / downsample)
        tile_index = (tile.col, tile.row)
        nuclei.append(Nucleus(polygon, centroid, tile_index, measurements, first_label + k))
    return nuclei


def nucleus_json(nucleus: Nucleus) -> str:
    """One nucleus as a QuPath GeoJSON feature (with a fresh UUID and its label), serialised."""
    feature = nucleus_feature(nucleus.polygon, nucleus.properties)
    feature["properties"]["label"] = nucleus.label
    return json.dumps(feature, separators=(",", ":"))


def nuclei_to_json(nuclei: list[Nucleus]) -> str:
    """Compact JSON for moving a tile's nuclei through Ray Data."""
    return json.dumps(
        [
            {
                "xy": np.round(np.asarray(n.polygon.exterior.coords), 2).tolist(),
                "c": n.centroid,
                "t": n.tile,
                "m": n.properties,
                "l": n.label,
            }
            for n in nuclei
        ],
        separators=(",", ":"),
    )


def nuclei_from_json(text: str) -> list[Nucleus]:
    nuclei = []
    for d in json.loads(text):
        # Rounding coordinates can, rarely, make a thin polygon invalid: repair it.
        polygon = largest_polygon(Polygon(d["xy"]))
        if polygon is not None:
            nuclei.append(Nucleus(polygon, tuple(d["c"]), tuple(d["t"]), d["m"], d["l"]))
    return nuclei
