"""Post-processing thresholds chosen on data, like StarDist's ``optimize_thresholds``.

The model runs once per image; every point of a small grid of
:func:`~wsi_pipeline.segment.instances.instances_from_probabilities` arguments (the marker
threshold of the model's target mode, foreground threshold, minimum size) is then scored at the
images' own resolution, exactly as ``evaluate`` scores. Of the points whose mean ``monitor`` is
within ``TIE_TOLERANCE`` of the best, the one with the best mean ``TIE_BREAK`` wins: AJI weighs
objects by area, so it hardly notices slivers smaller than any nucleus that PQ and F1 count as
false nuclei (v4: min_size 5 against 20 px, AJI +0.0006, PQ -0.014). Exact ties keep the earlier
point of the grid. ``write=True`` stores the winner in the checkpoint's model card, so that
``segment``, ``evaluate`` and validation all use it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline.checkpoint import (
    CARD,
    PostProcess,
    load_checkpoint,
    read_card,
    resolve_checkpoint,
)
from wsi_pipeline.forward import choose_device
from wsi_pipeline.metrics import score_image, summarize
from wsi_pipeline.progress import progress
from wsi_pipeline.segment.instances import instances_from_probabilities
from wsi_pipeline.storage import write_bytes_atomic
from wsi_pipeline.train.evaluation import SCORES, predict_probabilities, scored_entries
from wsi_pipeline.train.ingest import read_entry
from wsi_pipeline.train.store import resize_labels

TIE_TOLERANCE = 0.002  # of the monitor: points this close to the best count as tied
TIE_BREAK = "pq"  # decides among the tied

# The foreground and size axes every mode searches.
_EXTENT: dict[str, tuple[float, ...]] = {
    "foreground_threshold": (0.4, 0.5, 0.6),
    "min_size": (5, 10, 20),
}
GRID: dict[str, tuple[float, ...]] = {
    "interior_threshold": (0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
    **_EXTENT,
}
# Markers of the distance mode come from the distance channel, not the interior class.
DISTANCE_GRID: dict[str, tuple[float, ...]] = {
    "distance_threshold": (0.2, 0.3, 0.4, 0.5, 0.6, 0.7),
    **_EXTENT,
}


def default_grid(mode: str) -> dict[str, tuple[float, ...]]:
    """The grid ``tune`` searches for a model of target ``mode``."""
    return DISTANCE_GRID if mode == "distance" else GRID


def grid_points(grid: dict[str, Sequence[float]]) -> list[dict[str, float]]:
    """Every combination of the grid's values, as keyword arguments."""
    names = list(grid)
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*grid.values())]


def best_postprocess(
    images: Sequence[tuple[np.ndarray, np.ndarray]],
    mode: str,
    *,
    base: dict[str, Any] | None = None,
    grid: dict[str, Sequence[float]] | None = None,
    monitor: str = "aji",
) -> tuple[dict[str, Any], dict[str, float]]:
    """The post-processing with the best mean ``monitor`` over ``(probs, true labels)`` pairs,
    near-ties decided by ``TIE_BREAK`` (see the module's docstring).

    Each point of ``grid`` (default: :func:`default_grid` of ``mode``) is applied on top of
    ``base`` (a card's post-processing; defaults if None).
    ``probs`` is (K, h, w) at the model's resolution; the instances are resized (nearest) to the
    true labels' shape before scoring. Returns ``(full post-processing arguments, mean scores)``.
    """
    if monitor not in SCORES:
        raise ValueError(f"monitor {monitor!r} is not one of {list(SCORES)}")
    scored = []
    for point in grid_points(default_grid(mode) if grid is None else grid):
        settings = PostProcess(**{**(base or {}), **point}).model_dump()
        scores = summarize([_score(probs, true, mode, settings) for probs, true in images])
        scored.append((settings, scores))
    if not scored:
        raise ValueError("empty grid")
    best = max(scores[monitor] for _, scores in scored)
    tied = [item for item in scored if item[1][monitor] >= best - TIE_TOLERANCE]
    return max(tied, key=lambda item: (item[1][TIE_BREAK], item[1][monitor]))


def _score(probs: np.ndarray, true: np.ndarray, mode: str, settings: dict[str, Any]) -> dict:
    """Scores of one image under ``settings``, the arguments a card's post-processing holds."""
    labels = instances_from_probabilities(probs, mode, **settings)  # type: ignore[arg-type]
    return score_image(true, resize_labels(labels, true.shape))


def tune_checkpoint(
    checkpoint: str | Path,
    data_dir: str | Path,
    *,
    splits: list[str] | None = None,
    monitor: str = "aji",
    mpp_source: float | None = None,
    split_field: str | None = None,
    device: str = "auto",
    write: bool = False,
) -> dict[str, Any]:
    """Choose a checkpoint's post-processing on a folder dataset; optionally write it to the card.

    Returns one JSON-able dict: the previous and the chosen arguments with their scores.
    """
    checkpoint = resolve_checkpoint(str(checkpoint))
    torch_device = choose_device(device)
    model, card = load_checkpoint(checkpoint, device=torch_device)
    entries = scored_entries(
        data_dir, mpp_source=mpp_source, split_field=split_field, splits=splits
    )
    images = []
    for entry in progress(entries, "tune: predict", unit="images"):
        rgb, true = read_entry(entry)
        images.append((predict_probabilities(model, card, rgb, entry.mpp, torch_device), true))  # type: ignore[arg-type]
    previous = card.postprocess.model_dump()
    before = summarize([_score(p, t, card.target_mode, previous) for p, t in images])
    chosen, after = best_postprocess(images, card.target_mode, base=previous, monitor=monitor)
    if write:
        _write_postprocess(checkpoint, chosen)
    rounded = {k: round(v, 4) for k, v in after.items() if k in SCORES}
    return {
        "checkpoint": str(checkpoint),
        "data": str(data_dir),
        "splits": splits,
        "n_images": len(images),
        "monitor": monitor,
        "tie_break": f"{TIE_BREAK} among points within {TIE_TOLERANCE} {monitor} of the best",
        "previous": previous,
        "previous_scores": {k: round(v, 4) for k, v in before.items() if k in SCORES},
        "postprocess": chosen,
        "scores": rounded,
        "written": write,
    }


def _write_postprocess(checkpoint: Path, postprocess: dict[str, Any]) -> None:
    card = read_card(checkpoint).model_copy(update={"postprocess": PostProcess(**postprocess)})
    write_bytes_atomic(str(checkpoint / CARD), card.model_dump_json(indent=2).encode())
