"""Ray Data graphs over slide archives: the tiling job (slides → OME-Zarr stores).

The tiling job::

    slides ──plan_slide (one Ray task per slide)──▶ a TilePlan each, on the driver
           ──rows (slide, shard, its tissue chunks)──map(write_shard_row)──▶ one status row
             per shard ──▶ driver

Planning opens the slide, finds its tissue and creates or reopens its store;
writing (one task per shard) reads the shard's tissue tiles at the target mpp and writes the
shard at every pyramid level, so every Zarr shard has exactly one writer. The driver only counts
status rows: when all shards of a slide have landed it marks the store complete (atomically).
A failure is a status row, never an exception, so one bad slide does not stop the batch;
re-running skips complete stores and writes only the shards an interrupted run left undone.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from wsi_pipeline import storage
from wsi_pipeline.batch import COMPLETE, FAILED, SKIPPED, SlideResult, error_line
from wsi_pipeline.config import TileConfig, save_config
from wsi_pipeline.progress import Progress
from wsi_pipeline.slides.image_store import COMPLETE as STORE_COMPLETE
from wsi_pipeline.slides.image_store import (
    StoreLayout,
    create_store,
    done_shards,
    is_complete,
    mark_complete,
    pyramid_levels,
    read_layout,
    write_shard,
)
from wsi_pipeline.slides.inputs import fingerprint_mismatch, slide_stem, source_fingerprint
from wsi_pipeline.slides.slide import Slide, open_slide
from wsi_pipeline.slides.tiling import Box, grid_size
from wsi_pipeline.slides.tissue import detect_tissue

logger = logging.getLogger(__name__)

# How a slide or a shard stands while the job runs (a slide ends as a batch Status).
PENDING, WRITTEN = "pending", "written"


@dataclass
class TileResult(SlideResult):
    """One slide's outcome in a tiling batch (a row of ``summary.csv``)."""

    output: str = ""
    shards: int = 0
    tiles: int = 0  # tissue tiles of the store, however many runs wrote them
    tiles_written: int = 0  # by this run
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list, repr=False)


def store_path(out_dir: str, slide: str) -> str:
    return storage.join(out_dir, f"{slide_stem(slide)}.ome.zarr")


def _layout_for(slide_path: str, config: TileConfig) -> tuple[StoreLayout, Any]:
    slide = open_slide(slide_path, config.backend, mpp_override=config.mpp_override)
    downsample = slide.downsample_for(config.mpp)
    width, height = grid_size(*slide.dimensions, downsample)
    layout = StoreLayout(
        source=slide_path,
        backend=slide.backend,
        level0_width=slide.dimensions[0],
        level0_height=slide.dimensions[1],
        source_mpp=slide.mpp,
        mpp=config.mpp,
        width=width,
        height=height,
        tile=config.tile,
        shard=config.tile * config.shard_tiles,
        levels=pyramid_levels(width, height, config.tile),
    )
    return layout, slide


@dataclass
class TilePlan:
    """What is left to write of one slide: its layout and its shards with tissue chunks."""

    slide: str
    store: str
    layout: StoreLayout | None = None
    shards: list[tuple[int, int, list[tuple[int, int]]]] = field(default_factory=list)
    shards_total: int = 0
    tiles_total: int = 0
    reason: str = ""


def plan_slide(slide_path: str, store: str, config: TileConfig) -> TilePlan:
    """Open a slide, find its tissue, create or reopen its store, list the shards still to write.

    Never raises: a broken slide is a plan with a ``reason``.
    """
    try:
        layout, slide = _layout_for(slide_path, config)
        tissue = detect_tissue(slide, **config.tissue.model_dump(exclude={"min_fraction"}))
        resumable = storage.exists(storage.join(store, "zarr.json")) and _same_layout(store, layout)
        done = done_shards(store) if resumable else set()
        if not resumable:
            create_store(store, layout, tissue.mask, tissue.mpp, name=slide_stem(slide_path))
    except Exception as exc:  # any broken slide is a failed plan, never a crash
        return TilePlan(slide_path, store, reason=error_line(exc))
    shards = layout.shards
    tissue_shards = []
    for col, srow in shards:
        chunks = [
            (b.x0 // layout.tile, b.y0 // layout.tile)
            for b in shards.chunks(col, srow, layout.tile)
            if tissue.has_tissue(b, layout.mpp, config.tissue.min_fraction)
        ]
        if chunks:
            tissue_shards.append((col, srow, chunks))
    return TilePlan(
        slide_path,
        store,
        layout,
        shards=[s for s in tissue_shards if (s[0], s[1]) not in done],
        shards_total=len(tissue_shards),
        tiles_total=sum(len(chunks) for _, _, chunks in tissue_shards),
    )


def _same_layout(store: str, layout: StoreLayout) -> bool:
    try:
        return read_layout(store) == layout
    except (KeyError, TypeError, ValueError, FileNotFoundError):
        return False


def write_shard_row(
    row: dict[str, Any], layouts: dict[str, StoreLayout], mpp_override: float | None
) -> dict[str, Any]:
    """Read one shard's tissue tiles from the slide and write the shard; its status row."""
    start = time.perf_counter()
    layout = layouts[row["slide"]]
    status = {"slide": row["slide"], "status": WRITTEN, "reason": "", "seconds": 0.0, "tiles": 0}
    try:
        slide = open_slide(row["slide"], layout.backend, mpp_override=mpp_override)
        pixels = read_shard(slide, layout, row["col"], row["row"], row["chunks"])
        write_shard(row["store"], layout, row["col"], row["row"], pixels)
    except Exception as exc:  # reported per slide in the summary; the batch goes on
        return {**status, "status": FAILED, "reason": error_line(exc)}
    return {**status, "seconds": time.perf_counter() - start, "tiles": len(row["chunks"])}


def read_shard(
    slide: Slide, layout: StoreLayout, col: int, row: int, chunks: Sequence[Sequence[int]]
) -> np.ndarray:
    """The ``(3, shard, shard)`` pixels of a shard: listed tissue chunks read, the rest white."""
    s, t = layout.shard, layout.tile
    pixels = np.full((3, s, s), 255, dtype=np.uint8)
    ds = layout.downsample
    for cx, cy in chunks:
        box = Box(cx * t, cy * t, (cx + 1) * t, (cy + 1) * t)
        tile = slide.read_region(box.x0 * ds, box.y0 * ds, t, t, mpp=layout.mpp)
        y, x = box.y0 - row * s, box.x0 - col * s
        pixels[:, y : y + t, x : x + t] = np.moveaxis(tile, -1, 0)
    return pixels


def previous_result(slide: str, store: str) -> TileResult:
    """A complete store's figures, skipped; failed if the store was made from another slide."""
    complete = storage.join(store, STORE_COMPLETE)
    try:
        recorded = json.loads(storage.read_bytes(complete))
    except (OSError, ValueError) as exc:
        reason = f"{complete}: unreadable ({error_line(exc)})"
        return TileResult(slide, FAILED, reason, output=store)
    mismatch = fingerprint_mismatch(recorded.get("source_fingerprint"), slide)
    if mismatch:
        reason = f"{store} {mismatch}; use another --out, or --overwrite to replace it"
        return TileResult(slide, FAILED, reason, output=store)
    figures = {k: recorded[k] for k in ("shards", "tiles") if k in recorded}
    return TileResult(slide, SKIPPED, "already complete", output=store, **figures)


class _Tracker:
    """Counts shard status rows per slide on the driver and completes stores as they land."""

    def __init__(self, slides: list[str], out_dir: str) -> None:
        self.results = {s: TileResult(s, PENDING, output=store_path(out_dir, s)) for s in slides}
        self._left: dict[str, int] = {}

    def expect(self, plan: TilePlan) -> None:
        """Start tracking a planned slide (finished at once if nothing is left to write)."""
        result = self.results[plan.slide]
        if plan.layout is None:
            result.errors.append(plan.reason)
            self._finish(result)
            return
        result.shards, result.tiles = plan.shards_total, plan.tiles_total
        self._left[plan.slide] = len(plan.shards)
        if not plan.shards:
            self._finish(result)

    def add(self, row: dict[str, Any]) -> None:
        result = self.results[row["slide"]]
        if row["status"] == FAILED:
            result.errors.append(row["reason"])
        result.seconds += row["seconds"]
        result.tiles_written += row["tiles"]
        self._left[row["slide"]] -= 1
        if not self._left[row["slide"]]:
            self._finish(result)

    def _finish(self, result: TileResult) -> None:
        if result.errors:
            result.status, result.reason = FAILED, result.errors[0]
            logger.warning("%s: failed: %s", result.slide, result.reason)
            return
        mark_complete(
            result.output,
            {
                "slide": result.slide,
                "shards": result.shards,
                "tiles": result.tiles,
                "source_fingerprint": source_fingerprint(result.slide),
            },
        )
        result.status = COMPLETE
        logger.info("%s: complete (%d shards)", result.slide, result.shards)


def tile_slides(slides: list[str], out_dir: str, config: TileConfig) -> list[TileResult]:
    """Tile every slide into ``out_dir/<name>.ome.zarr`` with Ray Data; one result per slide.

    Uses the Ray cluster already initialised (``ray.init()``), or starts a local one.
    ``tile-config.yaml`` in ``out_dir`` records the configuration.
    """
    import ray

    storage.makedirs(out_dir)
    save_config(config, storage.join(out_dir, "tile-config.yaml"))
    tracker = _Tracker(slides, out_dir)
    todo = []
    for slide in slides:
        store = store_path(out_dir, slide)
        if is_complete(store) and not config.overwrite:
            tracker.results[slide] = previous_result(slide, store)
            continue
        todo.append((slide, store))
    # Plans are small and gathered first, so that the shards of one slide are written in
    # parallel rather than one after another in its planning task.
    plan_task = ray.remote(num_cpus=1)(plan_slide)
    plans: list[TilePlan] = ray.get([plan_task.remote(s, store, config) for s, store in todo])
    rows = []
    for plan in plans:
        tracker.expect(plan)
        rows += [
            {"slide": plan.slide, "store": plan.store, "col": c, "row": r, "chunks": chunks}
            for c, r, chunks in plan.shards
        ]
    if rows:
        layouts = {plan.slide: plan.layout for plan in plans if plan.layout is not None}
        compute = ray.data.TaskPoolStrategy(size=config.workers) if config.workers else None
        written = ray.data.from_items(rows, override_num_blocks=len(rows)).map(
            write_shard_row,
            fn_kwargs={"layouts": layouts, "mpp_override": config.mpp_override},
            compute=compute,
            num_cpus=1,
        )
        shards = Progress(len(rows), f"tile {len(layouts)} slides", unit="shards")
        for row in written.iter_rows():
            tracker.add(row)
            shards.update()
        shards.close()
    for result in tracker.results.values():
        if result.status == PENDING:  # planned shards that never reported back
            result.status, result.reason = FAILED, "not all shards were written"
    return list(tracker.results.values())
