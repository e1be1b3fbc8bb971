"""Ray Data graphs over slide archives: the tiling job (slides → OME-Zarr stores).

The tiling graph::

    slides ──flat_map(plan_slide)──▶ one row per level-0 shard still to write
           ──map(write_shard_row)──▶ one small status row per shard ──▶ driver

Planning (one task per slide) opens the slide, finds its tissue and creates or reopens its store;
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
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from wsi_pipeline import storage
from wsi_pipeline.config import TileConfig
from wsi_pipeline.inputs import slide_stem
from wsi_pipeline.slide import error_line, open_slide
from wsi_pipeline.store import (
    StoreLayout,
    create_store,
    done_shards,
    is_complete,
    mark_complete,
    pyramid_levels,
    read_layout,
    write_shard,
)
from wsi_pipeline.tiling import Box, grid_size
from wsi_pipeline.tissue import detect_tissue

logger = logging.getLogger(__name__)

COMPLETE, SKIPPED, FAILED = "complete", "skipped", "failed"


@dataclass
class SlideResult:
    """One slide's outcome in a batch."""

    slide: str
    output: str
    status: str
    reason: str = ""
    shards: int = 0
    tiles: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list, repr=False)


def store_path(out_dir: str, slide: str) -> str:
    return storage.join(out_dir, f"{slide_stem(slide)}.ome.zarr")


def _row(slide: str, store: str, status: str, **extra: Any) -> dict[str, Any]:
    """A row of the tiling graph; every row has every key so Arrow sees one schema."""
    row = {
        "slide": slide,
        "store": store,
        "status": status,
        "reason": "",
        "shard_col": -1,
        "shard_row": -1,
        "shards_total": 0,
        "shards_done": 0,
        "chunks": "[]",
        "layout": "{}",
        "seconds": 0.0,
    }
    row.update(extra)
    return row


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
        overlap=config.overlap,
        shard=config.tile * config.shard_tiles,
        levels=pyramid_levels(width, height, config.tile),
    )
    return layout, slide


def plan_slide(row: dict[str, Any], config: TileConfig) -> Iterator[dict[str, Any]]:
    """Rows for the shards of one slide still to write (or one row saying why there are none)."""
    slide_path, store = row["slide"], row["store"]
    try:
        layout, slide = _layout_for(slide_path, config)
        tissue = detect_tissue(slide, **config.tissue.model_dump(exclude={"min_fraction"}))
        resumable = storage.exists(storage.join(store, "zarr.json")) and _same_layout(store, layout)
        done = done_shards(store) if resumable else set()
        if not resumable:
            create_store(store, layout, tissue.mask, tissue.mpp, name=slide_stem(slide_path))
    except Exception as exc:  # any broken slide is a failed row, never a crash
        yield _row(slide_path, store, FAILED, reason=error_line(exc))
        return
    shards = layout.shards
    todo = []
    for col, srow in shards:
        chunks = [
            (b.x0 // layout.tile, b.y0 // layout.tile)
            for b in shards.chunks(col, srow, layout.tile)
            if tissue.has_tissue(b, layout.mpp, config.tissue.min_fraction)
        ]
        if chunks:
            todo.append((col, srow, chunks))
    total = len(todo)
    pending = [(c, r, ch) for c, r, ch in todo if (c, r) not in done]
    if not pending:
        # Nothing left to write (no tissue, or everything written before an interruption).
        yield _row(slide_path, store, COMPLETE, shards_total=total)
        return
    layout_json = json.dumps(asdict(layout))
    already = total - len(pending)
    for col, srow, chunks in pending:
        yield _row(
            slide_path,
            store,
            "todo",
            shard_col=col,
            shard_row=srow,
            shards_total=total,
            shards_done=already,
            chunks=json.dumps(chunks),
            layout=layout_json,
        )


def _same_layout(store: str, layout: StoreLayout) -> bool:
    try:
        return read_layout(store) == layout
    except (KeyError, TypeError, ValueError, FileNotFoundError):
        return False


def write_shard_row(row: dict[str, Any], config: TileConfig) -> dict[str, Any]:
    """Read one shard's tissue tiles from the slide and write the shard; returns its status row."""
    if row["status"] != "todo":
        return row
    start = time.perf_counter()
    try:
        layout = StoreLayout(**json.loads(row["layout"]))
        slide = open_slide(row["slide"], layout.backend, mpp_override=config.mpp_override)
        pixels = read_shard(
            slide, layout, row["shard_col"], row["shard_row"], json.loads(row["chunks"])
        )
        write_shard(row["store"], layout, row["shard_col"], row["shard_row"], pixels)
    except Exception as exc:  # reported per slide in the summary; the batch goes on
        return {**row, "status": FAILED, "reason": error_line(exc), "layout": "{}", "chunks": "[]"}
    return {**row, "status": "written", "seconds": time.perf_counter() - start, "layout": "{}"}


def read_shard(
    slide: Any, layout: StoreLayout, col: int, row: int, chunks: list[list[int]]
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


class _Tracker:
    """Counts status rows per slide on the driver and completes stores as their shards land."""

    def __init__(self, slides: list[str], out_dir: str) -> None:
        self.results = {s: SlideResult(s, store_path(out_dir, s), "pending") for s in slides}
        self._landed: dict[str, int] = {}

    def add(self, row: dict[str, Any]) -> None:
        result = self.results[row["slide"]]
        result.shards = row["shards_total"]
        if row["status"] == FAILED:
            result.errors.append(row["reason"])
        if row["status"] in (COMPLETE, FAILED) and row["shard_col"] < 0:
            self._finish(result)
            return
        if row["status"] == "written":
            result.tiles += len(json.loads(row["chunks"]))
            result.seconds += row["seconds"]
        landed = self._landed.get(row["slide"], row["shards_done"]) + 1
        self._landed[row["slide"]] = landed
        if landed >= result.shards:
            self._finish(result)

    def _finish(self, result: SlideResult) -> None:
        if result.errors:
            result.status, result.reason = FAILED, result.errors[0]
            logger.warning("%s: failed: %s", result.slide, result.reason)
            return
        mark_complete(result.output, {"slide": result.slide, "shards": result.shards})
        result.status = COMPLETE
        logger.info("%s: complete (%d shards)", result.slide, result.shards)


def tile_slides(slides: list[str], out_dir: str, config: TileConfig) -> list[SlideResult]:
    """Tile every slide into ``out_dir/<name>.ome.zarr`` with Ray Data; one result per slide.

    Uses the Ray cluster already initialised (``ray.init()``), or starts a local one.
    """
    import ray.data

    storage.makedirs(out_dir)
    tracker = _Tracker(slides, out_dir)
    todo = []
    for slide in slides:
        store = store_path(out_dir, slide)
        if is_complete(store) and not config.overwrite:
            tracker.results[slide].status = SKIPPED
            tracker.results[slide].reason = "already complete"
            continue
        todo.append(_row(slide, store, "plan"))
    if todo:
        # Plans are tiny (one row per shard) and gathered first, so that the shards of one slide
        # are written in parallel rather than fused into its planning task.
        planned = (
            ray.data.from_items(todo, override_num_blocks=len(todo))
            .flat_map(plan_slide, fn_kwargs={"config": config}, num_cpus=1)
            .take_all()
        )
        for row in planned:
            if row["status"] != "todo":
                tracker.add(row)
        shards = [row for row in planned if row["status"] == "todo"]
        if shards:
            compute = ray.data.TaskPoolStrategy(size=config.workers) if config.workers else None
            written = ray.data.from_items(shards, override_num_blocks=len(shards)).map(
                write_shard_row, fn_kwargs={"config": config}, compute=compute, num_cpus=1
            )
            for row in written.iter_rows():
                tracker.add(row)
    for result in tracker.results.values():
        if result.status == "pending":  # planned shards that never reported back
            result.status, result.reason = FAILED, "not all shards were written"
    return list(tracker.results.values())
