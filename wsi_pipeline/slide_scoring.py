"""Scoring the whole-slide path: annotated images as one mosaic slide, segmented by the job.

A mosaic slide is built from a folder dataset's images (each cell one image under one of the 8
square symmetries), so its ground truth is exact. The ``segment`` job's GeoJSON is rasterised
back at pixel centres and scored cell by cell, as ``evaluate`` scores image by image. Used by
``benchmarks/accuracy.py`` and ``benchmarks/seams.py``.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import numpy as np

from wsi_pipeline import synthetic
from wsi_pipeline.config import SegmentConfig
from wsi_pipeline.metrics import score_image, summarize
from wsi_pipeline.segment.geojson import read_features
from wsi_pipeline.segment.job import segment_slides
from wsi_pipeline.segment.label_store import rasterize_shard
from wsi_pipeline.slides.tiling import Box
from wsi_pipeline.train.evaluation import SCORES, scored_entries
from wsi_pipeline.train.ingest import read_entry
from wsi_pipeline.train.store import resample, resize_labels, resized_shape


def load_sources(
    data: str | Path, splits: list[str] | None
) -> tuple[list[tuple[np.ndarray, np.ndarray]], float]:
    """The images of ``splits`` of a folder dataset at one µm/px (the median of theirs), and it.

    Images recorded at another mpp (MoNuSeg's range from 0.2468 to 0.2527) are resampled to it:
    a slide has one resolution.
    """
    entries = scored_entries(data, splits=splits or None)
    mpp = float(statistics.median(float(e.mpp) for e in entries))  # type: ignore[arg-type]
    sources = []
    for entry in entries:
        rgb, labels = read_entry(entry)
        if abs(float(entry.mpp) / mpp - 1) > 1e-3:  # type: ignore[arg-type]
            rgb, labels = resample(rgb, labels, float(entry.mpp) / mpp)  # type: ignore[arg-type]
        sources.append((rgb, labels))
    return sources, mpp


def build_mosaic(
    sources: list[tuple[np.ndarray, np.ndarray]], cells: int | None = None, seed: int = 0
) -> synthetic.MosaicSlide:
    """A square, all-tissue mosaic of ``cells`` x ``cells`` images (default: enough for all)."""
    cells = cells or math.ceil(math.sqrt(len(sources)))
    side = min(min(image.shape[:2]) for image, _ in sources) * cells
    return synthetic.MosaicSlide(sources, side, side, seed=seed, tissue_fraction=1.0)


def rasterize_geojson(path: str | Path, width: int, height: int) -> np.ndarray:
    """Level-0 label image of a GeoJSON's polygons (pixel centres inside, QuPath's frame)."""
    labels = np.zeros((height, width), dtype=np.int32)
    polygons = [
        (i, np.asarray(f["geometry"]["coordinates"][0], dtype=np.float64))
        for i, f in enumerate(read_features(path), start=1)
    ]
    rasterize_shard(labels, Box(0, 0, width, height), polygons)
    return labels


def segment_labels(
    slide: str, mosaic: synthetic.MosaicSlide, config: SegmentConfig, out: str
) -> np.ndarray:
    """Level-0 labels of the segment job's GeoJSON for ``slide`` (Ray must be initialised)."""
    (outcome,) = segment_slides([slide], out, config)
    if outcome.status != "complete":
        raise RuntimeError(f"segment failed: {outcome.reason}")
    return rasterize_geojson(outcome.geojson, mosaic.width, mosaic.height)


def score_cells(mosaic: synthetic.MosaicSlide, truth: np.ndarray, pred: np.ndarray) -> dict:
    """Scores averaged over tissue cells, each cell scored like one ``evaluate`` image."""
    scores = []
    for _, box in mosaic.tissue_cells():
        box = box.clip(mosaic.width, mosaic.height)
        window = (slice(box.y0, box.y1), slice(box.x0, box.x1))
        scores.append(score_image(truth[window].astype(np.int64), pred[window]))
    return {k: round(v, 4) for k, v in summarize(scores).items() if k in SCORES}


def oracle_ceiling(labels: list[np.ndarray], source_mpp: float, model_mpp: float) -> dict:
    """What the model's pixel grid costs: true labels resized to ``model_mpp`` (nearest) and
    back, scored against themselves (1.0 where the model runs at the images' own mpp)."""
    scores = []
    for truth in labels:
        small = resize_labels(truth, resized_shape(truth.shape, source_mpp / model_mpp))
        scores.append(score_image(truth.astype(np.int64), resize_labels(small, truth.shape)))
    return {k: round(v, 4) for k, v in summarize(scores).items() if k in SCORES}


def whole_slide_scores(
    data: str | Path,
    splits: list[str] | None,
    config: SegmentConfig,
    workdir: str | Path,
    *,
    cells: int | None = None,
    seed: int = 0,
    quality: int = 90,
) -> dict:
    """Segment a mosaic of ``splits`` with the job and score it cell by cell.

    The slide is written as a JPEG pyramid at ``quality``, as scanners write them.
    """
    sources, mpp = load_sources(data, splits)
    mosaic = build_mosaic(sources, cells, seed)
    Path(workdir).mkdir(parents=True, exist_ok=True)
    slide = str(Path(workdir) / "mosaic.tiff")
    synthetic.write_tiff(mosaic, slide, mpp=mpp, quality=quality)
    pred = segment_labels(slide, mosaic, config, str(Path(workdir) / "out"))
    truth = mosaic.render_labels(Box(0, 0, mosaic.width, mosaic.height))
    return {"cells": sum(1 for _ in mosaic.tissue_cells()), **score_cells(mosaic, truth, pred)}
