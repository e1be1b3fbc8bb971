"""The segment job: slides (or tiling stores) → QuPath GeoJSON nuclei per slide, on Ray Data.

Graph, streaming end to end::

    tile rows (slide, col, row) ──map_batches(read_tiles)──▶ RGB tiles (CPU tasks, a block each)
              ──map_batches(Predictor, ActorPoolStrategy)──▶ uint8 probabilities (GPU actors)
              ──map(postprocess_tile)──▶ owned nuclei (CPU tasks)
              ──▶ driver: SeamResolver → streaming GeoJSON writer, per slide
              ──▶ optionally one Ray task per label shard (``--labels``), awaited without blocking

On a CPU host the predictor and post-process stages are one: single-threaded actors, up to one
per core, run the model and post-process each tile themselves (:class:`PredictThenPostprocess`),
so only nuclei leave them (:func:`predictor_pool` says why).

Rows carry only a slide, a tile index and arrays; each task gets the slides' plans and the model
card once, as arguments, and nuclei near a seam travel exactly (pickled shapely polygons).

Planning reads each slide's thumbnail for its tissue tiles. The driver holds, per slide in flight,
one open GeoJSON file and the few nuclei waiting on a seam; memory is bounded by the batch sizes,
never by slide size or nuclei count. A slide is complete once ``<name>.json`` exists (written
last, atomically; the label image is written under a temporary name and renamed before it);
re-running skips complete slides and redoes the others from scratch.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr

from wsi_pipeline import __version__, storage
from wsi_pipeline.batch import COMPLETE, FAILED, SKIPPED, SlideResult, Status, error_line
from wsi_pipeline.checkpoint import (
    CheckpointError,
    ModelCard,
    check_checkpoint,
    load_checkpoint,
    read_card,
)
from wsi_pipeline.config import ConfigError, SegmentConfig, save_config
from wsi_pipeline.progress import Progress
from wsi_pipeline.segment.geojson import FeatureWriter
from wsi_pipeline.segment.label_store import ShardBuckets, create_label_store, write_label_shard
from wsi_pipeline.segment.nuclei import (
    nucleus_json,
    pack_nuclei,
    tile_nuclei,
    unpack_nuclei,
)
from wsi_pipeline.segment.quantize import TENSOR_MODES, dequantize
from wsi_pipeline.segment.stitching import Nucleus, SeamResolver, near_seams
from wsi_pipeline.segment.warm_start import start_ray_data_helpers
from wsi_pipeline.slides.image_store import COMPLETE as STORE_COMPLETE
from wsi_pipeline.slides.image_store import is_complete as is_store_complete
from wsi_pipeline.slides.image_store import read_layout
from wsi_pipeline.slides.image_store import read_region as read_store_region
from wsi_pipeline.slides.inputs import fingerprint_mismatch, slide_stem, source_fingerprint
from wsi_pipeline.slides.slide import SlideError, open_slide
from wsi_pipeline.slides.tiling import Tile, TileGrid, grid_size
from wsi_pipeline.slides.tissue import TissueMask, detect_tissue, on_tissue, window_side

logger = logging.getLogger(__name__)

MPP_TOLERANCE = 0.01
# Logical CPUs of a read task and of a post-process task. Half a CPU each lets one read, one
# predictor (1 CPU) and one post-process task run at once even on a 2-core laptop: with 1 CPU,
# post-processing waited there until every read had finished, and the predictor's output piled
# up in the object store in proportion to the slide's size.
READ_CPUS = 0.5
POSTPROCESS_CPUS = 0.5
# Logical CPUs of a predictor actor: a GPU's feeds it; on a CPU, per single-threaded model it runs
# with its reads and post-processing on about one core, leaving a quarter of a share for label
# shards and the driver.
GPU_PREDICTOR_CPUS, CPU_PREDICTOR_CPUS = 1.0, 0.75
# Concurrent calls (single-threaded models) of a CPU predictor actor. Two in one process instead of
# one process each saves an actor's start-up (~2.8 CPU-s of imports) and memory; more would queue
# on the GIL that post-processing holds for part of each tile.
CPU_CALLS_PER_ACTOR = 2
LABEL_SHARD_TILES = 4
GPU_BATCH_SIZE, CPU_BATCH_SIZE = 8, 1
# Where a slide's seconds go: planning (tissue), reads, the model, instance extraction (by the
# predictor with tensor_instances, else by post-processing), polygons and GeoJSON text (summed
# over tiles), seams and writing (the driver), and how long after the job's start its first
# tile came back.
PROFILE = (
    "plan_s",
    "read_s",
    "forward_s",
    "predictor_instances_s",
    "instances_s",
    "polygons_s",
    "driver_s",
    "first_tile_s",
    "before_job_s",
)


@dataclass(frozen=True)
class SlidePlan:
    """Where a slide's tiles come from and how they are laid out (grid px at the model's mpp)."""

    slide: str
    stem: str
    source: Literal["slide", "store"]
    path: str
    backend: str
    level0_mpp: float
    downsample: float
    width: int
    height: int
    tile: int
    overlap: int
    tissue_mm2: float
    tissue_mpp: float = 0.0  # tasks' copy of tissue.mpp (0: nuclei are not filtered)
    tiles: list[tuple[int, int]] = field(default_factory=list)
    tissue: TissueMask | None = None  # grown by the margin nuclei may lie off the tissue

    @property
    def grid(self) -> TileGrid:
        return TileGrid(self.width, self.height, self.tile, self.overlap)

    @property
    def grid_mpp(self) -> float:
        return self.level0_mpp * self.downsample

    def for_tasks(self) -> SlidePlan:
        """The plan as tasks get it: the tile list and tissue mask are the driver's alone, and
        would make what every task receives grow with the slides' sizes; tasks keep the mask's
        mpp, to read the window each row carries (:meth:`rows`)."""
        tissue_mpp = self.tissue.mpp if self.tissue is not None else 0.0
        return dataclasses.replace(self, tiles=[], tissue=None, tissue_mpp=tissue_mpp)

    def rows(self, slide: str) -> list[dict[str, Any]]:
        """The graph's rows of this plan's tiles (``slide`` as the user named it). Each row
        carries the tissue under its tile (packed bits) when nuclei off the tissue are dropped."""
        rows = []
        for col, row in self.tiles:
            item: dict[str, Any] = {"slide": slide, "col": col, "row": row, "error": ""}
            if self.tissue is not None:
                window = self.tissue.window(self.grid.tile_at(col, row).box, self.grid_mpp)
                item["tissue"] = np.packbits(window).tobytes()
            rows.append(item)
        return rows


@dataclass
class SegmentResult(SlideResult):
    """One slide's outcome in a segment batch (a row of ``summary.csv``)."""

    nuclei: int = 0
    tiles: int = 0
    tissue_mm2: float = 0.0
    seconds: float = 0.0
    oversize: int = 0
    geojson: str = ""
    labels: str = ""
    source: str = ""  # the slide a tiling store was made from ("" for slides)


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
    if not is_store_complete(path):
        raise SlideError(
            f"{path}: incomplete tiling store (no {STORE_COMPLETE}; its tile run did not finish): "
            "run wsi-pipeline tile again to complete it"
        )
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
    """The plan with the tiles whose core holds tissue (cores partition the slide) and, unless
    every nucleus is kept, the tissue mask grown by the margin nuclei may lie off it."""
    min_fraction = config.tissue.min_fraction
    tiles = [(t.col, t.row) for t in plan.grid if tissue.has_tissue(t.core, card.mpp, min_fraction)]
    if config.tissue_margin_um is None:
        return dataclasses.replace(plan, tiles=tiles)
    return dataclasses.replace(plan, tiles=tiles, tissue=tissue.grown(config.tissue_margin_um))


def read_tile(
    plan: SlidePlan, col: int, row: int, mpp: float, mpp_override: float | None
) -> np.ndarray:
    """The RGB pixels of one tile (white outside the slide)."""
    box = plan.grid.tile_at(col, row).box
    if plan.source == "store":
        return read_store_region(plan.path, box)
    slide = open_slide(plan.path, plan.backend, mpp_override=mpp_override)  # cached per process
    ds = plan.downsample
    return slide.read_region(box.x0 * ds, box.y0 * ds, box.width, box.height, mpp=mpp)


def read_tiles(
    batch: dict[str, np.ndarray],
    plans: dict[str, SlidePlan],
    mpp: float,
    mpp_override: float | None,
) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: add the RGB pixels of each row's tile.

    One task reads a block of neighbouring tiles, so Ray's per-task cost is paid per block, not
    per tile. A tile that cannot be read is white, and its row carries the error for its slide.
    """
    errors = [str(e) for e in batch["error"]]
    images, seconds = [], []
    for i, (slide, col, row) in enumerate(
        zip(batch["slide"], batch["col"], batch["row"], strict=True)
    ):
        start = time.perf_counter()
        plan = plans[slide]
        try:
            images.append(read_tile(plan, int(col), int(row), mpp, mpp_override))
        except Exception as exc:  # reported for the slide; the batch goes on
            errors[i] = error_line(exc)
            images.append(np.full((plan.tile, plan.tile, 3), 255, dtype=np.uint8))
        seconds.append(time.perf_counter() - start)
    return {
        **batch,
        "error": np.array(errors, dtype=object),
        "image": np.stack(images),
        "read_s": np.array(seconds),
    }


def postprocess_tile(
    row: dict[str, Any],
    plans: dict[str, SlidePlan],
    card: ModelCard,
    simplify: float,
    seam_margin: float,
    keep_all: bool,
    subpixel: bool = False,
) -> dict[str, Any]:
    """Replace a tile's probabilities by the nuclei it owns.

    Nuclei no other tile can have claimed leave as finished GeoJSON text (``features``, so the
    driver only copies them); those near a seam leave exactly (``seam``) for the driver's
    :class:`SeamResolver`. With ``keep_all`` every nucleus goes the second way. ``oversize``
    counts the instances lost for being wider than the overlap.
    """
    start = time.perf_counter()
    probs = row.pop("probs")
    labels = row.pop("labels", None)  # found by the predictor, if it does (tensor_instances)
    tissue = row.pop("tissue", b"")
    row["features"], row["count"], row["seam"], row["oversize"] = "", 0, pack_nuclei([]), 0
    row["instances_s"], row["polygons_s"] = 0.0, 0.0
    if row["error"]:
        return row
    plan = plans[row["slide"]]
    grid = plan.grid
    tile = grid.tile_at(row["col"], row["row"])
    clock: dict[str, float] = {}
    try:
        nuclei, row["oversize"] = tile_nuclei(
            dequantize(probs),
            tile,
            grid,
            card=card,
            downsample=plan.downsample,
            level0_mpp=plan.level0_mpp,
            simplify=simplify,
            clock=clock,
            subpixel=subpixel,
            labels=labels,
        )
    except Exception as exc:
        row["error"] = error_line(exc)
        return row
    if plan.tissue_mpp:
        nuclei = on_tissue_nuclei(nuclei, tissue, plan, tile)
    on_seam = [True] * len(nuclei) if keep_all else near_seams(grid, nuclei, seam_margin).tolist()
    final = [n for n, seam in zip(nuclei, on_seam, strict=True) if not seam]
    row["features"] = ",\n".join(nucleus_json(n) for n in final)
    row["count"] = len(final)
    row["seam"] = pack_nuclei([n for n, seam in zip(nuclei, on_seam, strict=True) if seam])
    row["instances_s"] = clock.get("instances", 0.0)
    row["polygons_s"] = time.perf_counter() - start - row["instances_s"]
    return row


def on_tissue_nuclei(
    nuclei: list[Nucleus], tissue: bytes, plan: SlidePlan, tile: Tile
) -> list[Nucleus]:
    """The nuclei whose centre lies on the tile's tissue window (packed by
    :meth:`SlidePlan.rows`)."""
    side = window_side(plan.tile, plan.grid_mpp, plan.tissue_mpp)
    # count= pads with zeros: a bytes column may have lost its trailing NULs (no tissue).
    bits = np.unpackbits(np.frombuffer(tissue, dtype=np.uint8), count=side * side)
    window = bits.reshape(side, side).astype(bool)
    scale = plan.grid_mpp / plan.tissue_mpp
    return [n for n in nuclei if on_tissue(window, tile.box, scale, *n.centroid)]


class SlideOutputs:
    """One slide's outputs, fed tile by tile on the driver.

    :meth:`finish` closes the GeoJSON; with ``--labels`` it starts one Ray task per label shard
    and :meth:`complete` (once :attr:`pending` are done) renames the label image into place.
    The slide's ``<stem>.json`` is written last of all.
    """

    def __init__(self, plan: SlidePlan, out_dir: str, card: ModelCard, config: SegmentConfig):
        self.plan, self.card, self.config = plan, card, config
        self.geojson, self.summary = output_paths(out_dir, plan.stem, config)
        self.resolver = SeamResolver(plan.grid, margin=config.seam_margin)
        self.writer = FeatureWriter(self.geojson).open()
        self.buckets: ShardBuckets | None = None
        self.label_store = ""
        if config.labels:
            self.label_store = str(Path(out_dir) / f"{plan.stem}.labels.zarr")
            self.label_tmp = storage.temporary_path(self.label_store)
            shard = plan.tile * LABEL_SHARD_TILES
            create_label_store(
                self.label_tmp,
                plan.width,
                plan.height,
                mpp=card.mpp,
                chunk=plan.tile,
                shard=shard,
                source=plan.slide,
            )
            self.buckets = ShardBuckets(self.label_tmp, plan.width, plan.height, shard)
        self.pending: list[Any] = []
        self.profile = dict.fromkeys(PROFILE, 0.0)
        self.received = 0
        self.oversize = 0
        self.errors: list[str] = []
        self.start = time.perf_counter()

    @property
    def done(self) -> bool:
        return self.received >= len(self.plan.tiles)

    def add(self, row: dict[str, Any]) -> None:
        start = time.perf_counter()
        self.received += 1
        if row["error"]:
            self.errors.append(row["error"])
        self.oversize += row["oversize"]
        self.writer.write_raw(row["features"], row["count"])
        self._write(self.resolver.add((row["col"], row["row"]), unpack_nuclei(row["seam"])))
        for key in ("read_s", "forward_s", "predictor_instances_s", "instances_s", "polygons_s"):
            self.profile[key] += row.get(key, 0.0)  # a stand-in predictor may not time itself
        self.profile["driver_s"] += time.perf_counter() - start

    def _write(self, nuclei: list[Any]) -> None:
        for nucleus in nuclei:
            self.writer.write_raw(nucleus_json(nucleus), 1)
            if self.buckets is not None:
                self.buckets.add(nucleus.label, nucleus.polygon, self.plan.downsample)

    def finish(self) -> SegmentResult | None:
        """Close the GeoJSON; the result, or ``None`` while label shards are still written."""
        if self.errors:
            self.abort()
            return self.result(FAILED, self.errors[0], tiles=self.received)
        self._write(self.resolver.finish())
        self.writer.close()
        if self.buckets is not None:
            self.pending = self._start_label_shards()
            if self.pending:
                return None
        return self.complete()

    def result(self, status: Status, reason: str = "", **figures: Any) -> SegmentResult:
        plan = self.plan
        source = plan.slide if plan.source == "store" else ""
        return SegmentResult(plan.path, status, reason, source=source, **figures)

    def _start_label_shards(self) -> list[Any]:
        import ray

        assert self.buckets is not None
        task = ray.remote(num_cpus=POSTPROCESS_CPUS)(write_label_shard)
        shard = self.buckets.shards.shard
        return [task.remote(item, self.label_tmp, shard) for item in self.buckets.items()]

    def abort(self) -> None:
        """Remove what this slide wrote so far; nothing appears under a final name."""
        self.writer.abort()
        if self.label_store:
            shutil.rmtree(self.label_tmp, ignore_errors=True)

    def complete(self) -> SegmentResult:
        """Put the label image in place and write ``<stem>.json``: the slide is complete."""
        if self.buckets is not None:
            self.buckets.remove()
            shutil.rmtree(self.label_store, ignore_errors=True)
            os.replace(self.label_tmp, self.label_store)
        seconds = time.perf_counter() - self.start
        result = self.result(
            COMPLETE,
            nuclei=self.writer.count,
            tiles=self.received,
            tissue_mm2=round(self.plan.tissue_mm2, 4),
            seconds=round(seconds, 3),
            oversize=self.oversize,
            geojson=self.geojson,
            labels=self.label_store,
        )
        if self.oversize:
            logger.warning(
                "%s: %d instances were wider than the overlap (%d px) and were dropped; "
                "segment again with a larger --overlap",
                self.plan.slide,
                self.oversize,
                self.plan.overlap,
            )
        summary = {
            **asdict(result),
            "density_per_mm2": round(result.nuclei / result.tissue_mm2, 2)
            if result.tissue_mm2
            else None,
            "duplicates_dropped": self.resolver.dropped,
            "oversize_dropped": self.oversize,
            # Seconds summed over tiles per stage (CPU or device time), and the driver's own.
            "profile": {k: round(v, 3) for k, v in self.profile.items()},
            "source_fingerprint": source_fingerprint(self.plan.path),
            "plan": asdict(self.plan.for_tasks()),
            "model": self.card.model_dump(mode="json"),
            "config": self.config.model_dump(mode="json"),
            "version": __version__,
        }
        storage.write_bytes_atomic(self.summary, json.dumps(summary, indent=2).encode())
        logger.info("%s: %d nuclei in %.1f s", self.plan.slide, result.nuclei, seconds)
        return result


def previous_result(out_dir: str, slide: str, config: SegmentConfig) -> SegmentResult:
    """A complete slide's figures, skipped; failed if the outputs are another slide's."""
    _, summary_path = output_paths(out_dir, slide_stem(slide), config)
    try:
        summary = json.loads(Path(summary_path).read_text())
    except (OSError, ValueError) as exc:
        return SegmentResult(slide, FAILED, f"{summary_path}: unreadable ({error_line(exc)})")
    mismatch = fingerprint_mismatch(summary.get("source_fingerprint"), slide)
    if mismatch:
        reason = f"{summary_path} {mismatch}; use another --out, or --overwrite to replace it"
        return SegmentResult(slide, FAILED, reason)
    figures = {k: summary[k] for k in ("nuclei", "tiles", "tissue_mm2", "seconds", "oversize",
                                       "geojson", "labels", "source") if k in summary}  # fmt: skip
    return SegmentResult(slide, SKIPPED, "already complete", **figures)


def is_complete(out_dir: str, stem: str, config: SegmentConfig) -> bool:
    geojson, summary = output_paths(out_dir, stem, config)
    return Path(summary).exists() and Path(geojson).exists()


def prepare_config(config: SegmentConfig) -> SegmentConfig:
    """Fail fast, in one line, on what would fail every slide; the config with the checkpoint
    that will run (path or shipped name resolved).

    Checks without torch (the driver runs no model) what a checkpoint's card and archive can
    show (:func:`~wsi_pipeline.checkpoint.check_checkpoint`); weights that do not fit their
    architecture are reported by :func:`segment_slides` when the predictors fail to load them.

    Raises:
        CheckpointError: the checkpoint is missing, corrupt or not a model's.
        ConfigError: the tile does not fit the model.
    """
    checkpoint, card = check_checkpoint(config.checkpoint)
    divisor = card.size_divisor or _architecture_divisor(checkpoint, card)
    if config.tile % divisor:
        raise ConfigError(
            f"config error: tile: {config.tile} is not a multiple of {divisor}, which "
            f"{card.architecture} needs (try {config.tile // divisor * divisor or divisor})"
        )
    return config.model_copy(update={"checkpoint": str(checkpoint.resolve())})


def _architecture_divisor(checkpoint: Path, card: ModelCard) -> int:
    """The size divisor of a card written before cards recorded it: from the architecture's
    class (which imports torch)."""
    from wsi_pipeline.models import size_divisor  # registers the architectures

    try:
        return size_divisor(card.architecture)
    except ValueError as exc:
        raise CheckpointError(f"{checkpoint}: {error_line(exc)}") from None


def segment_slides(
    slides: list[str],
    out_dir: str,
    config: SegmentConfig,
    *,
    predictor: type | None = None,
    started: float | None = None,
) -> list[SegmentResult]:
    """Segment every slide into ``out_dir``; one result per slide, in input order.

    Args:
        slides: slide paths/URLs or tiling stores (``*.ome.zarr``).
        out_dir: local output directory; ``segment-config.yaml`` there records what ran.
        config: the job's configuration (no ``checkpoint``: the shipped default model).
        predictor: the callable class that turns tile batches into probabilities (default:
            :class:`ModelPredictor`, the checkpoint's model).
        started: when the command began (``time.time()``); each profile's ``before_job_s``
            is the seconds from then to the job's start (imports, checks, Ray's start).

    Raises:
        CheckpointError: the predictors could not load the checkpoint (checked again here
            when the job fails, so that the user reads why in one line).
    """
    import ray

    start_ray_data_helpers()  # their processes start while this driver checks and plans
    config = prepare_config(config)
    resources = ray.cluster_resources() if ray.is_initialized() else {}
    card = read_card(config.checkpoint)
    config = resolve_for_hardware(config, resources, card)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    save_config(config, storage.join(out_dir, "segment-config.yaml"))
    storage.remove_stale_temporaries(out_dir)  # from a driver that was killed
    batch = _Batch(out_dir, card, config, started)
    try:
        rows = batch.plan(slides)
        if rows:
            plans = {slide: w.plan.for_tasks() for slide, w in batch.writing.items()}
            tiles = Progress(len(rows), f"segment {len(batch.writing)} slides", unit="tiles")
            graph = _graph(rows, plans, card, config, predictor or ModelPredictor)
            for row in graph.iter_rows():
                tiles.update()
                batch.add(row)
            tiles.close()
        batch.finish_all()
    except BaseException as exc:
        batch.abort()  # nothing of this run is left under a temporary name
        if predictor is None and isinstance(exc, Exception):
            _raise_if_the_weights_are_why(config.checkpoint, exc)
        raise
    return [batch.results[s] for s in slides]


def _raise_if_the_weights_are_why(checkpoint: str | None, failure: Exception) -> None:
    """Load the checkpoint here after the job failed: if its weights do not load, that (one
    line) is the error; otherwise the job's own failure stands."""
    try:
        load_checkpoint(checkpoint)
    except CheckpointError as bad:
        raise bad from failure
    except Exception:  # not why the job failed: its own error is re-raised
        logger.debug("checking the checkpoint after the job failed raised", exc_info=True)


class _Batch:
    """The driver's side of a segment run: per-slide outputs, fed row by row."""

    def __init__(
        self, out_dir: str, card: ModelCard, config: SegmentConfig, started: float | None
    ) -> None:
        self.out_dir, self.card, self.config = out_dir, card, config
        self.start = time.perf_counter()
        self.before_job = 0.0 if started is None else max(time.time() - started, 0.0)
        self.results: dict[str, SegmentResult] = {}
        self.writing: dict[str, SlideOutputs] = {}
        self.labelling: dict[str, SlideOutputs] = {}

    def plan(self, slides: list[str]) -> list[dict[str, Any]]:
        """Plan every slide still to do; the tile rows of the graph."""
        rows: list[dict[str, Any]] = []
        for slide in slides:
            stem = slide_stem(slide)
            if is_complete(self.out_dir, stem, self.config) and not self.config.overwrite:
                self.results[slide] = previous_result(self.out_dir, slide, self.config)
                continue
            try:
                start = time.perf_counter()
                plan = plan_slide(slide, self.card, self.config)
                self.writing[slide] = SlideOutputs(plan, self.out_dir, self.card, self.config)
                self.writing[slide].profile["plan_s"] = time.perf_counter() - start
                self.writing[slide].profile["before_job_s"] = self.before_job
            except Exception as exc:  # any broken slide is a failed row, never a crash
                self._fail(slide, error_line(exc))
                continue
            rows += plan.rows(slide)
        for slide in [s for s, w in self.writing.items() if not w.plan.tiles]:
            self.finish(slide)
        return rows

    def add(self, row: dict[str, Any]) -> None:
        outputs = self.writing[row["slide"]]
        if not outputs.received:  # start-up: from the job's start to this slide's first tile
            outputs.profile["first_tile_s"] = time.perf_counter() - self.start
        try:
            outputs.add(row)
        except OSError as exc:  # e.g. a full disk: this slide fails, the batch goes on
            outputs.errors.append(error_line(exc))
        if outputs.done:
            self.finish(row["slide"])
        self.complete_labelled(wait=False)

    def finish(self, slide: str) -> None:
        outputs = self.writing.pop(slide)
        try:
            result = outputs.finish()
        except OSError as exc:
            outputs.abort()
            result = outputs.result(FAILED, error_line(exc), tiles=outputs.received)
        if result is None:
            self.labelling[slide] = outputs
        else:
            self.results[slide] = result

    def finish_all(self) -> None:
        for slide, outputs in list(self.writing.items()):  # tiles that never came back
            outputs.errors.append("not all tiles were processed")
            self.finish(slide)
        self.complete_labelled(wait=True)

    def complete_labelled(self, *, wait: bool) -> None:
        """Complete the slides whose label shards are all written (all of them with ``wait``)."""
        import ray

        for slide, outputs in list(self.labelling.items()):
            timeout = None if wait else 0
            ready, _ = ray.wait(outputs.pending, num_returns=len(outputs.pending), timeout=timeout)
            if len(ready) < len(outputs.pending):
                continue
            del self.labelling[slide]
            try:
                ray.get(outputs.pending)
                self.results[slide] = outputs.complete()
            except Exception as exc:  # a shard that failed fails its slide, not the batch
                outputs.abort()
                self.results[slide] = outputs.result(
                    FAILED, error_line(exc), tiles=outputs.received
                )

    def abort(self) -> None:
        for outputs in [*self.writing.values(), *self.labelling.values()]:
            outputs.abort()

    def _fail(self, slide: str, reason: str) -> None:
        self.results[slide] = SegmentResult(slide, FAILED, reason)
        logger.warning("%s: failed: %s", slide, reason)


def predictor_batch_size(batch_size: int | None, use_gpu: bool) -> int:
    """Tiles per predictor call: as configured, else 8 on a GPU and 1 on a CPU (a CPU forward
    of single 512² tiles ran 1.6× faster than of batches of 8 on the 2-core dev VM: their
    activations stay in cache; and the first tile is back after one tile's work, not 8's)."""
    return batch_size or (GPU_BATCH_SIZE if use_gpu else CPU_BATCH_SIZE)


@dataclass(frozen=True)
class PredictorPool:
    """How the model runs in a segment job (see :func:`predictor_pool`)."""

    use_gpu: bool
    size: int  # the most actors; a CPU pool starts with one and grows as tiles queue
    batch_size: int
    cpus: float  # logical CPUs per actor
    threads: int | None  # torch threads per call on a CPU (None: every core of its node)
    postprocess: bool  # the actor also post-processes its tiles
    calls: int = 1  # concurrent calls per actor (threads that share its model)

    @property
    def reads(self) -> bool:
        """Whether the actor reads its own tiles (no read tasks): a CPU actor that
        post-processes does the whole job of a tile."""
        return self.postprocess and not self.use_gpu


def predictor_pool(
    config: SegmentConfig, resources: dict[str, float], node_cpus: float | None = None
) -> PredictorPool:
    """The predictor actors for ``config`` on a cluster with ``resources`` (Ray's totals) whose
    smallest node with CPUs has ``node_cpus`` (None: one node, all of ``resources``).

    On a GPU, one actor per GPU runs the model, CPU tasks read its tiles and post-process them.
    On a CPU, by default, each actor reads, predicts *and* post-processes its tiles, in
    ``CPU_CALLS_PER_ACTOR`` concurrent calls of a single-threaded model where every node has
    the cores for them: a model on one thread does more work per core than on several (on the
    2-core dev VM two single-threaded models ran 7.0 tiles/s side by side, one model on both
    cores 6.3), no separate tasks compete with the models for the cores, and one process holds
    two models' work (one start-up, one copy of torch). There is a model per core (one more on
    an odd count: a thread that fills the gaps reads and post-processing leave), each asking for
    0.75 logical CPUs. ``predictor_calls`` and ``predictor_threads`` set the calls and their
    threads (threads > 1 alone: one call); a configured ``predictors`` is the pool's most actors.
    """
    gpus = resources.get("GPU", 0)
    use_gpu = config.device == "cuda" or (config.device == "auto" and gpus > 0)
    postprocess = (
        not use_gpu if config.postprocess_in_predictor is None else config.postprocess_in_predictor
    )
    cores = resources.get("CPU", 1)
    node = node_cpus or cores
    whole = postprocess and not use_gpu  # read, predict and post-process in one actor
    calls = _calls_per_actor(config, node) if whole else 1
    if use_gpu:
        default_cpus = GPU_PREDICTOR_CPUS
    elif whole:  # as many calls' shares as fit on the smallest node
        default_cpus = min(calls * CPU_PREDICTOR_CPUS, node)
    else:
        default_cpus = min(CPU_PREDICTOR_CPUS, max(cores - READ_CPUS, 0.25))
    cpus = config.cpus_per_predictor or default_cpus
    if config.predictors:
        size = config.predictors
    elif use_gpu:
        size = max(int(gpus), 1)
    elif whole:
        size = max(1, math.ceil(int(cores) / calls))  # a model per core
    else:
        size = 1
    threads = config.predictor_threads or (1 if whole else None)
    return PredictorPool(
        use_gpu=use_gpu,
        size=size,
        batch_size=predictor_batch_size(config.batch_size, use_gpu),
        cpus=cpus,
        threads=threads,
        postprocess=postprocess,
        calls=calls,
    )


def _calls_per_actor(config: SegmentConfig, node_cpus: float) -> int:
    """Concurrent calls of a CPU actor that reads, predicts and post-processes."""
    if config.predictor_calls:
        return config.predictor_calls
    if config.predictor_threads and config.predictor_threads > 1:
        return 1  # one multi-threaded model, as asked
    return max(1, min(CPU_CALLS_PER_ACTOR, int(node_cpus)))


def smallest_node_cpus() -> float | None:
    """CPUs of the Ray cluster's smallest live node that has any (None: none has)."""
    import ray

    cpus = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    return min((c for c in cpus if c > 0), default=None)


def resolve_for_hardware(
    config: SegmentConfig, resources: dict[str, float], card: ModelCard
) -> SegmentConfig:
    """``config`` with what depends on where the model runs decided, as the job decides it:
    test-time augmentation and tensor instances."""
    return resolve_tensor_instances(resolve_tta(config, resources), resources, card)


def resolve_tta(config: SegmentConfig, resources: dict[str, float]) -> SegmentConfig:
    """``config`` with test-time augmentation decided: unless set, on where a GPU runs the
    model (its 3x forward is a few per cent of a GPU job: v5's unseen-organ AJI +0.003, PQ and
    F1 +0.010) and off on a CPU, where the model is most of the job."""
    if config.tta is not None:
        return config
    return config.model_copy(update={"tta": predictor_pool(config, resources).use_gpu})


def resolve_tensor_instances(
    config: SegmentConfig, resources: dict[str, float], card: ModelCard
) -> SegmentConfig:
    """``config`` with ``tensor_instances`` decided: unless set, on where a GPU runs a model
    whose target mode the tensor path handles (there the CPUs are the job's bottleneck), off on
    a CPU (where scipy's watershed is ~10x faster than the same steps in torch).

    Raises:
        ConfigError: asked for, for a model of another target mode.
    """
    if config.tensor_instances is None:
        on = predictor_pool(config, resources).use_gpu and card.target_mode in TENSOR_MODES
        return config.model_copy(update={"tensor_instances": on})
    if config.tensor_instances and card.target_mode not in TENSOR_MODES:
        raise ConfigError(
            f"config error: tensor_instances: the model's target mode {card.target_mode!r} has "
            f"no tensor path (it has for {', '.join(TENSOR_MODES)}); leave it unset"
        )
    return config


class ModelPredictor:
    """The default predictor: a :class:`~wsi_pipeline.segment.predictor.Predictor`, imported
    by the actor that runs it, so that the driver never imports torch."""

    def __init__(self, **kwargs: Any) -> None:
        from wsi_pipeline.segment.predictor import Predictor

        self.predictor = Predictor(**kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.predictor(batch)


class PredictThenPostprocess:
    """A predictor actor that also post-processes its tiles (:func:`postprocess_tile`), so only
    nuclei leave it, and, given ``read_kwargs`` (those of :func:`read_tiles`), reads them first.
    Wraps any predictor class (see :func:`segment_slides`); concurrent calls share it."""

    def __init__(
        self,
        predictor: type,
        predictor_kwargs: dict[str, Any],
        postprocess_kwargs: dict[str, Any],
        read_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.predictor = predictor(**predictor_kwargs)
        self.postprocess_kwargs = postprocess_kwargs
        self.read_kwargs = read_kwargs

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.read_kwargs is not None:
            batch = read_tiles(batch, **self.read_kwargs)
        batch = self.predictor(batch)
        rows = [
            postprocess_tile(_row(batch, i), **self.postprocess_kwargs)
            for i in range(len(batch["slide"]))
        ]
        return {key: _column([row[key] for row in rows]) for key in rows[0]}


def _row(batch: dict[str, np.ndarray], i: int) -> dict[str, Any]:
    """Row ``i`` of a batch, with Python scalars (as ``map`` gives them)."""
    return {k: v[i].item() if isinstance(v[i], np.generic) else v[i] for k, v in batch.items()}


def _column(values: list[Any]) -> np.ndarray:
    # Text and bytes as objects: a fixed-width numpy bytes dtype would strip trailing NULs.
    if isinstance(values[0], (str, bytes)):
        return np.array(values, dtype=object)
    return np.asarray(values)


def _takes(cls: type, name: str) -> bool:
    """Whether ``cls(...)`` accepts the keyword ``name``."""
    parameters = inspect.signature(cls).parameters.values()
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in parameters)


def tile_rows(rows: list[dict[str, Any]], batch_size: int) -> Any:
    """The graph's input: the tile rows, one block per ``batch_size`` neighbouring tiles (one
    predictor batch)."""
    import ray

    blocks = max(1, min(math.ceil(len(rows) / batch_size), 4096))
    return ray.data.from_items(rows, override_num_blocks=blocks)


def tile_images(
    rows: list[dict[str, Any]],
    plans: dict[str, SlidePlan],
    mpp: float,
    mpp_override: float | None,
    batch_size: int,
) -> Any:
    """The graph's read stage: tile rows → the same rows with their RGB pixels (``image``),
    one read task per block of ``batch_size`` neighbouring tiles (one predictor batch)."""
    # Reads are light (decode + resize). Their resources differ from the predictor's, so Ray
    # Data keeps them in parallel tasks instead of fusing them into the predictor actors.
    return tile_rows(rows, batch_size).map_batches(
        read_tiles,
        fn_kwargs={"plans": plans, "mpp": mpp, "mpp_override": mpp_override},
        batch_size=batch_size,
        num_cpus=READ_CPUS,
    )


def _graph(
    rows: list[dict[str, Any]],
    plans: dict[str, SlidePlan],
    card: ModelCard,
    config: SegmentConfig,
    predictor: type,
) -> Any:
    import ray

    pool = predictor_pool(config, ray.cluster_resources(), smallest_node_cpus())
    predictor_kwargs: dict[str, Any] = {
        "checkpoint": config.checkpoint,
        "device": config.device,
        "tta": config.tta,
    }
    if pool.threads and _takes(predictor, "threads"):  # a stand-in model may not take it
        predictor_kwargs["threads"] = pool.threads
    if config.tensor_instances and _takes(predictor, "tensor_instances"):
        predictor_kwargs["tensor_instances"] = True
    postprocess_kwargs = {
        "plans": plans,
        "card": card,
        "simplify": config.simplify,
        "seam_margin": config.seam_margin,
        "keep_all": config.labels,  # the label image needs every polygon on the driver
        "subpixel": config.subpixel,
    }
    actors = {
        "batch_size": pool.batch_size,
        "num_gpus": 1 if pool.use_gpu else 0,
        "num_cpus": pool.cpus,
    }
    read_kwargs = None  # the actors read the tiles themselves, or read tasks before them do
    if pool.reads:
        tiles = tile_rows(rows, pool.batch_size)
        read_kwargs = {"plans": plans, "mpp": card.mpp, "mpp_override": config.mpp_override}
    else:
        tiles = tile_images(rows, plans, card.mpp, config.mpp_override, pool.batch_size)
    if pool.postprocess:
        return tiles.map_batches(
            PredictThenPostprocess,
            fn_constructor_kwargs={
                "predictor": predictor,
                "predictor_kwargs": predictor_kwargs,
                "postprocess_kwargs": postprocess_kwargs,
                "read_kwargs": read_kwargs,
            },
            compute=ray.data.ActorPoolStrategy(
                min_size=1,
                max_size=pool.size,
                initial_size=1,
                max_concurrent_calls_per_actor=pool.calls,
                enable_true_multi_threading=pool.calls > 1,
            ),
            **actors,
        )
    return tiles.map_batches(
        predictor,
        fn_constructor_kwargs=predictor_kwargs,
        compute=ray.data.ActorPoolStrategy(size=pool.size),
        **actors,
    ).map(postprocess_tile, fn_kwargs=postprocess_kwargs, num_cpus=POSTPROCESS_CPUS)
