"""The segment job: slides (or tiling stores) → QuPath GeoJSON nuclei per slide, on Ray Data.

Graph, streaming end to end::

    tile rows ──map(read_tile)──▶ RGB tiles (CPU tasks)
              ──map_batches(Predictor, ActorPoolStrategy)──▶ uint8 probabilities (GPU or CPU actors)
              ──map(postprocess_tile)──▶ owned nuclei as polygons (CPU tasks)
              ──▶ driver: SeamResolver → streaming GeoJSON writer, per slide

Planning reads each slide's thumbnail for its tissue tiles. The driver holds, per slide in flight,
one open GeoJSON file and the few nuclei waiting on a seam; memory is bounded by the batch sizes,
never by slide size or nuclei count. A slide is complete once ``<name>.json`` exists (written
last, atomically); re-running skips complete slides and redoes the others from scratch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from wsi_pipeline import __version__, storage
from wsi_pipeline.checkpoint import ModelCard, read_card, resolve_checkpoint
from wsi_pipeline.config import SegmentConfig
from wsi_pipeline.export import FeatureWriter
from wsi_pipeline.inference import (
    Predictor,
    dequantize,
    nuclei_from_json,
    nuclei_to_json,
    nucleus_json,
    tile_nuclei,
)
from wsi_pipeline.inputs import slide_stem
from wsi_pipeline.labels import ShardBuckets, create_label_store, write_label_shard
from wsi_pipeline.pipeline import COMPLETE, FAILED, SKIPPED  # one set of batch statuses
from wsi_pipeline.slide import SlideError, error_line, open_slide
from wsi_pipeline.stitching import SeamResolver, seam_neighbours
from wsi_pipeline.store import read_layout
from wsi_pipeline.store import read_region as read_store_region
from wsi_pipeline.tiling import TileGrid, grid_size
from wsi_pipeline.tissue import TissueMask, detect_tissue

logger = logging.getLogger(__name__)

MPP_TOLERANCE = 0.01
# Logical CPUs of a read task and of a post-process task. Half a CPU each lets one read, one
# predictor (1 CPU) and one post-process task run at once even on a 2-core laptop: with 1 CPU,
# post-processing waited there until every read had finished, and the predictor's output piled
# up in the object store in proportion to the slide's size.
READ_CPUS = 0.5
POSTPROCESS_CPUS = 0.5
LABEL_SHARD_TILES = 4


@dataclass(frozen=True)
class SlidePlan:
    """Where a slide's tiles come from and how they are laid out (grid px at the model's mpp)."""

    slide: str
    stem: str
    source: str  # "slide" or "store"
    path: str
    backend: str
    level0_mpp: float
    downsample: float
    width: int
    height: int
    tile: int
    overlap: int
    tissue_mm2: float
    tiles: list[tuple[int, int]] = field(default_factory=list)

    @property
    def grid(self) -> TileGrid:
        return TileGrid(self.width, self.height, self.tile, self.overlap)

    def row_json(self) -> str:
        """The plan as each tile's row carries it: without the tile list, which tasks never use
        and which would make a slide's rows grow with the square of its tile count."""
        return json.dumps({k: v for k, v in asdict(self).items() if k != "tiles"})


@dataclass
class SegmentResult:
    """One slide's outcome in a batch (a row of ``summary.csv``)."""

    slide: str
    status: str
    reason: str = ""
    nuclei: int = 0
    tiles: int = 0
    tissue_mm2: float = 0.0
    seconds: float = 0.0
    geojson: str = ""
    labels: str = ""


def output_paths(out_dir: str, stem: str, config: SegmentConfig) -> tuple[str, str]:
    suffix = ".geojson.gz" if config.gzip else ".geojson"
    return str(Path(out_dir) / f"{stem}{suffix}"), str(Path(out_dir) / f"{stem}.json")


def _is_store(path: str) -> bool:
    return path.rstrip("/").endswith(".zarr")


def plan_slide(slide_path: str, card: ModelCard, config: SegmentConfig) -> SlidePlan:
    """Open a slide or tiling store and list its tissue tiles at the model's mpp."""
    if _is_store(slide_path):
        return _plan_store(slide_path, card, config)
    slide = open_slide(slide_path, config.backend, mpp_override=config.mpp_override)
    downsample = slide.downsample_for(card.mpp)
    width, height = grid_size(*slide.dimensions, downsample)
    tissue = detect_tissue(slide, **config.tissue.model_dump(exclude={"min_fraction"}))
    plan = SlidePlan(
        slide=slide_path,
        stem=slide_stem(slide_path),
        source="slide",
        path=slide_path,
        backend=slide.backend,
        level0_mpp=slide.mpp,
        downsample=downsample,
        width=width,
        height=height,
        tile=config.tile,
        overlap=config.overlap,
        tissue_mm2=tissue.area_mm2(),
    )
    return _with_tissue_tiles(plan, tissue, card, config)


def _plan_store(path: str, card: ModelCard, config: SegmentConfig) -> SlidePlan:
    if not storage.exists(storage.join(path, "zarr.json")):
        raise SlideError(f"{path}: not a tiling store (no zarr.json)")
    layout = read_layout(path)
    if abs(layout.mpp - card.mpp) > MPP_TOLERANCE * card.mpp:
        raise SlideError(
            f"{path}: tiled at {layout.mpp} µm/px but the model runs at {card.mpp} µm/px; "
            f"re-tile with --mpp {card.mpp} or segment the slide itself"
        )
    group = zarr.open_group(path, mode="r")
    tissue_mpp = group.attrs["wsi_pipeline"]["tissue"]["mpp"]
    tissue = TissueMask(group["tissue"][:] > 0, tissue_mpp, layout.source_mpp)
    plan = SlidePlan(
        slide=layout.source,
        stem=slide_stem(path),
        source="store",
        path=path,
        backend=layout.backend,
        level0_mpp=layout.source_mpp,
        downsample=layout.downsample,
        width=layout.width,
        height=layout.height,
        tile=config.tile,
        overlap=config.overlap,
        tissue_mm2=tissue.area_mm2(),
    )
    return _with_tissue_tiles(plan, tissue, card, config)


def _with_tissue_tiles(
    plan: SlidePlan, tissue: TissueMask, card: ModelCard, config: SegmentConfig
) -> SlidePlan:
    """The plan with the tiles whose core holds tissue (cores partition the slide)."""
    min_fraction = config.tissue.min_fraction
    tiles = [(t.col, t.row) for t in plan.grid if tissue.has_tissue(t.core, card.mpp, min_fraction)]
    return dataclasses.replace(plan, tiles=tiles)


def read_tile(row: dict[str, Any], mpp: float, mpp_override: float | None) -> dict[str, Any]:
    """Add the tile's RGB pixels (white outside the slide) to its row."""
    plan = SlidePlan(**json.loads(row["plan"]))
    tile = plan.grid.tile_at(row["col"], row["row"])
    box = tile.box
    try:
        if plan.source == "store":
            image = read_store_region(plan.path, box)
        else:
            slide = open_slide(plan.path, plan.backend, mpp_override=mpp_override)
            ds = plan.downsample
            image = slide.read_region(box.x0 * ds, box.y0 * ds, box.width, box.height, mpp=mpp)
    except Exception as exc:  # reported for the slide; the batch goes on
        row["error"] = error_line(exc)
        image = np.full((plan.tile, plan.tile, 3), 255, dtype=np.uint8)
    row["image"] = image
    return row


def postprocess_tile(
    row: dict[str, Any], card_json: str, simplify: float, seam_margin: float, keep_all: bool
) -> dict[str, Any]:
    """Replace a tile's probabilities by the nuclei it owns.

    Nuclei no other tile can have claimed leave as finished GeoJSON text (``features``, so the
    driver only copies them); those near a seam leave as polygons (``nuclei``) for the driver's
    :class:`SeamResolver`. With ``keep_all`` every nucleus goes the second way.
    """
    probs = row.pop("probs")
    row["features"], row["count"], row["nuclei"] = "", 0, "[]"
    if row["error"]:
        return row
    plan = SlidePlan(**json.loads(row["plan"]))
    card = ModelCard.model_validate_json(card_json)
    grid = plan.grid
    try:
        nuclei = tile_nuclei(
            dequantize(probs),
            grid.tile_at(row["col"], row["row"]),
            grid,
            card=card,
            downsample=plan.downsample,
            level0_mpp=plan.level0_mpp,
            simplify=simplify,
        )
    except Exception as exc:
        row["error"] = error_line(exc)
        return row
    on_seam = [keep_all or bool(seam_neighbours(grid, n, seam_margin)) for n in nuclei]
    final = [n for n, seam in zip(nuclei, on_seam, strict=True) if not seam]
    row["features"] = ",\n".join(nucleus_json(n) for n in final)
    row["count"] = len(final)
    row["nuclei"] = nuclei_to_json([n for n, seam in zip(nuclei, on_seam, strict=True) if seam])
    return row


class SlideOutputs:
    """One slide's outputs, fed tile by tile on the driver."""

    def __init__(self, plan: SlidePlan, out_dir: str, card: ModelCard, config: SegmentConfig):
        self.plan, self.card, self.config = plan, card, config
        self.geojson, self.summary = output_paths(out_dir, plan.stem, config)
        self.resolver = SeamResolver(plan.grid, margin=config.seam_margin)
        self.writer = FeatureWriter(self.geojson).open()
        self.buckets: ShardBuckets | None = None
        if config.labels:
            self.label_store = str(Path(out_dir) / f"{plan.stem}.labels.zarr")
            shard = config.tile * LABEL_SHARD_TILES
            create_label_store(
                self.label_store,
                plan.width,
                plan.height,
                mpp=card.mpp,
                chunk=config.tile,
                shard=shard,
                source=plan.slide,
            )
            self.buckets = ShardBuckets(self.label_store, plan.width, plan.height, shard)
        self.received = 0
        self.errors: list[str] = []
        self.start = time.perf_counter()

    @property
    def done(self) -> bool:
        return self.received >= len(self.plan.tiles)

    def add(self, row: dict[str, Any]) -> None:
        self.received += 1
        if row["error"]:
            self.errors.append(row["error"])
        self.writer.write_raw(row["features"], row["count"])
        nuclei = nuclei_from_json(row["nuclei"])
        self._write(self.resolver.add((row["col"], row["row"]), nuclei))

    def _write(self, nuclei: list[Any]) -> None:
        for nucleus in nuclei:
            self.writer.write_raw(nucleus_json(nucleus), 1)
            if self.buckets is not None:
                self.buckets.add(nucleus.label, nucleus.polygon, self.plan.downsample)

    def _write_labels(self) -> None:
        import ray.data

        assert self.buckets is not None
        items = self.buckets.items()
        if items:
            kwargs = {"store": self.label_store, "shard": self.buckets.shards.shard}
            ray.data.from_items(items, override_num_blocks=len(items)).map(
                write_label_shard, fn_kwargs=kwargs
            ).materialize()
        self.buckets.remove()

    def finish(self) -> SegmentResult:
        seconds = time.perf_counter() - self.start
        if self.errors:
            self.writer.abort()
            return SegmentResult(self.plan.slide, FAILED, self.errors[0], tiles=self.received)
        self._write(self.resolver.finish())
        self.writer.close()
        if self.buckets is not None:
            self._write_labels()
        result = SegmentResult(
            self.plan.slide,
            COMPLETE,
            nuclei=self.writer.count,
            tiles=self.received,
            tissue_mm2=round(self.plan.tissue_mm2, 4),
            seconds=round(seconds, 3),
            geojson=self.geojson,
            labels=self.label_store if self.buckets is not None else "",
        )
        summary = {
            **asdict(result),
            "density_per_mm2": round(result.nuclei / result.tissue_mm2, 2)
            if result.tissue_mm2
            else None,
            "duplicates_dropped": self.resolver.dropped,
            "plan": {k: v for k, v in asdict(self.plan).items() if k != "tiles"},
            "model": self.card.model_dump(mode="json"),
            "config": self.config.model_dump(mode="json"),
            "version": __version__,
        }
        storage.write_bytes_atomic(self.summary, json.dumps(summary, indent=2).encode())
        logger.info("%s: %d nuclei in %.1f s", self.plan.slide, result.nuclei, seconds)
        return result


def is_complete(out_dir: str, stem: str, config: SegmentConfig) -> bool:
    geojson, summary = output_paths(out_dir, stem, config)
    return Path(summary).exists() and Path(geojson).exists()


def segment_slides(
    slides: list[str],
    out_dir: str,
    config: SegmentConfig,
    *,
    predictor: type = Predictor,
) -> list[SegmentResult]:
    """Segment every slide into ``out_dir``; one result per slide, in input order.

    Args:
        slides: slide paths/URLs or tiling stores (``*.ome.zarr``).
        out_dir: local output directory.
        config: the job's configuration (no ``checkpoint``: the shipped default model).
        predictor: the callable class that turns tile batches into probabilities.
    """

    checkpoint = resolve_checkpoint(config.checkpoint)
    config = config.model_copy(update={"checkpoint": str(checkpoint)})
    card = read_card(checkpoint)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for leftover in Path(out_dir).glob(".tmp-*.geojson"):  # from a driver that was killed
        leftover.unlink()
    results: dict[str, SegmentResult] = {}
    writers: dict[str, SlideOutputs] = {}
    rows: list[dict[str, Any]] = []
    for slide in slides:
        stem = slide_stem(slide)
        if is_complete(out_dir, stem, config) and not config.overwrite:
            results[slide] = SegmentResult(slide, SKIPPED, "already complete")
            continue
        try:
            plan = plan_slide(slide, card, config)
        except Exception as exc:  # any broken slide is a failed row, never a crash
            results[slide] = SegmentResult(slide, FAILED, error_line(exc))
            logger.warning("%s: failed: %s", slide, results[slide].reason)
            continue
        writers[slide] = SlideOutputs(plan, out_dir, card, config)
        plan_json = plan.row_json()
        rows += [
            {"slide": slide, "plan": plan_json, "col": c, "row": r, "error": ""}
            for c, r in plan.tiles
        ]
        if not plan.tiles:
            results[slide] = writers.pop(slide).finish()
    if rows:
        for row in _graph(rows, card, config, predictor).iter_rows():
            writer = writers[row["slide"]]
            writer.add(row)
            if writer.done:
                results[row["slide"]] = writers.pop(row["slide"]).finish()
    for slide, writer in writers.items():  # tiles that never came back
        writer.errors.append("not all tiles were processed")
        results[slide] = writer.finish()
    return [results[s] for s in slides]


def _graph(rows: list[dict[str, Any]], card: ModelCard, config: SegmentConfig, predictor: type):
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = config.device == "cuda" or (config.device == "auto" and gpus > 0)
    size = config.predictors or (max(int(gpus), 1) if use_gpu else 1)
    predictor_kwargs = {"checkpoint": config.checkpoint, "device": config.device, "tta": config.tta}
    return (
        ray.data.from_items(rows, override_num_blocks=min(len(rows), 4096))
        # Reads are light (decode + resize). Their resources differ from the predictor's, so Ray
        # Data keeps them in parallel tasks instead of fusing them into the predictor actors.
        .map(
            read_tile,
            fn_kwargs={"mpp": card.mpp, "mpp_override": config.mpp_override},
            num_cpus=READ_CPUS,
        )
        .map_batches(
            predictor,
            fn_constructor_kwargs=predictor_kwargs,
            batch_size=config.batch_size,
            compute=ray.data.ActorPoolStrategy(size=size),
            num_gpus=1 if use_gpu else 0,
            num_cpus=config.cpus_per_predictor,
        )
        .map(
            postprocess_tile,
            fn_kwargs={
                "card_json": card.model_dump_json(),
                "simplify": config.simplify,
                "seam_margin": config.seam_margin,
                "keep_all": config.labels,  # the label image needs every polygon on the driver
            },
            num_cpus=POSTPROCESS_CPUS,
        )
    )
