"""Segmentation throughput on one slide: end to end vs predictor only vs read only.

Prints one JSON line. In the same run, on the same slide and tissue tiles:

* ``read_tiles_per_s``: the Ray Data read stage alone (slide → RGB tiles);
* ``predictor_tiles_per_s``: the predictor alone, in this process, on tiles already in memory:
  the mean of its rate just before the job and just after (both in
  ``predictor_before_after_tiles_per_s``), as this VM's speed drifts by up to 30 % within an
  hour; on the same tiles each time, all of a small slide's or 16 batches of a large one's;
  the run before reads them in a process of its own, without Ray Data, so this process
  holds no model while the job runs;
* ``end_to_end_tiles_per_s``: the whole segment job (read → predict → post-process → GeoJSON),
  on a Ray that is up with Ray Data's helper actors, as a cluster's is between jobs (they are
  detached) and as a command's is soon after its Ray starts (``segment/warm_start.py``);
* ``ratio_e2e_vs_predictor``: how busy the job keeps the predictor (target ≥ 0.7 on a GPU host),
  and ``ratio_steady_vs_predictor``, the same once the first tile is back (start-up excluded);
* on a CPU, ``predictor_per_core_tiles_per_s``: one single-threaded model per core side by side
  (what the job runs there), and ``ratio_e2e_vs_per_core``;
* ``nuclei_per_s``, and the peak RSS of the driver and of the driver plus every Ray process,
  and that tree's peak PSS (shared pages divided among the processes mapping them);
  ``torch_processes``: how many of Ray's processes loaded torch, by title;
* ``profile_s``: where the job's seconds went (the slide's ``<slide>.json`` profile: planning,
  reads, forward, instance extraction, polygons, the driver's seams and writing, summed over
  tiles; and ``first_tile_s``, the start-up), ``cpu_busy_fraction`` (CPU seconds of the whole
  process tree, sampled every 0.2 s, / wall / cores) and ``gpu_busy_fraction`` (forward seconds,
  with the predictor's instance seconds, / wall, on a GPU).

By default the shipped model runs; ``--random-model NAME`` times any architecture with random
weights (its speed does not depend on them; the nuclei it finds then mean nothing). Example
(the README's figure):

    python benchmarks/segment.py --size 8192
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import resource
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from wsi_pipeline import synthetic
from wsi_pipeline.checkpoint import ModelCard, read_card, resolve_checkpoint, save_checkpoint
from wsi_pipeline.config import SegmentConfig
from wsi_pipeline.forward import choose_device
from wsi_pipeline.models import create_model
from wsi_pipeline.segment.job import (
    SlidePlan,
    plan_slide,
    predictor_pool,
    read_tile,
    resolve_for_hardware,
    segment_slides,
    smallest_node_cpus,
    tile_images,
)
from wsi_pipeline.segment.predictor import Predictor
from wsi_pipeline.segment.warm_start import start_ray_data_helpers


def _tree(root: int) -> dict[int, list[str]]:
    """The /proc/<pid>/stat fields (after the command name) of ``root`` and its descendants."""
    stats = _stats(int(entry) for entry in os.listdir("/proc") if entry.isdigit())
    family, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [p for p, s in stats.items() if int(s[1]) == parent and p not in family]
        family.update(children)
        frontier.extend(children)
    return {p: stats[p] for p in family if p in stats}


def _stats(pids: Iterable[int]) -> dict[int, list[str]]:
    """The /proc/<pid>/stat fields (after the command name) of those of ``pids`` still alive."""
    stats: dict[int, list[str]] = {}
    for pid in pids:
        try:
            stats[pid] = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
    return stats


def _pss(pid: int) -> int:
    """Proportional set size of ``pid`` in bytes (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _has_torch(pid: int) -> bool:
    """Whether ``pid`` has torch's C++ library mapped, i.e. has imported torch."""
    try:
        return "libtorch_cpu" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def _title(pid: int) -> str:
    """A process's title without the method it is running (Ray names its workers
    ``ray::<task or actor>[.<method>]``)."""
    try:
        title = Path(f"/proc/{pid}/cmdline").read_text().split("\0")[0].strip()
    except OSError:
        return str(pid)
    return re.sub(r"\)\.\w+$", ")", title) or str(pid)


class TreeSampler(threading.Thread):
    """Samples this process tree while the job runs: CPU seconds and peak RSS every 0.2 s; peak
    PSS and the Ray processes that load torch every second.

    RSS counts a page shared by several processes (Ray's object store, libraries) once per
    process; PSS divides it among them, so the sum of PSS is the memory the tree really holds.

    CPU is summed per process from each one's first to its last sample, so the work of Ray
    workers and actors that exit before the end (whose time no parent collects) still counts,
    all but their last 0.2 s.

    PSS is read less often because it costs: the kernel walks each process's page tables,
    ~3 ms a process on the dev VM, where a sample of everything every 0.2 s took a sixth of a
    core from the job it measured. For the same reason the tree's members are looked for among
    all of the machine's processes only then, once a second; the samples between read the
    members' own counters (a process that starts between counts from zero when it is found; one
    that lives less than a second may be missed, as one under 0.2 s always could be).
    """

    MEMORY_EVERY = 5  # samples: PSS and torch once a second

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_rss = 0
        self.peak_pss = 0
        self.torch_pids: dict[int, str] = {}  # the processes with torch loaded: their titles
        self._first: dict[int, int] = {}
        self._last: dict[int, int] = {}
        self._members: list[int] = []
        self._done = threading.Event()
        self._sample(initial=True)  # the processes already running count from now

    def _sample(self, initial: bool = False, memory: bool = True) -> None:
        tree = _tree(os.getpid()) if memory else _stats(self._members)
        self._members = list(tree)
        self.peak_rss = max(
            self.peak_rss, sum(int(s[21]) for s in tree.values()) * os.sysconf("SC_PAGE_SIZE")
        )
        if memory:
            self._sample_memory(tree)
        for pid, s in tree.items():
            ticks = sum(int(s[i]) for i in (11, 12))  # user + system of the process itself
            self._first.setdefault(pid, ticks if initial else 0)
            self._last[pid] = ticks

    def _sample_memory(self, tree: dict[int, list[str]]) -> None:
        self.peak_pss = max(self.peak_pss, sum(_pss(pid) for pid in tree))
        for pid in tree:
            if pid != os.getpid() and pid not in self.torch_pids and _has_torch(pid):
                self.torch_pids[pid] = _title(pid)

    def run(self) -> None:
        count = 0
        while not self._done.wait(0.2):
            count += 1
            self._sample(memory=count % self.MEMORY_EVERY == 0)

    def stop(self) -> float:
        """Stops sampling; the CPU seconds of the tree while it ran."""
        self._done.set()
        self.join()
        self._sample()
        ticks = sum(last - self._first[pid] for pid, last in self._last.items())
        return ticks / os.sysconf("SC_CLK_TCK")


def per_core_rate(checkpoint: str, images: list[np.ndarray], cores: int) -> float:
    """Tiles/s of ``cores`` single-threaded CPU models side by side (one Python thread each;
    torch releases the GIL), each on its share of ``images``, one tile per call: the forward-only
    ceiling of a CPU host whose cores each run a model."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        predictor = Predictor(checkpoint, device="cpu", threads=1)
        predictor.predict(images[0][None])  # warm-up
        shares = [images[i::cores] for i in range(cores)]
        workers = [
            threading.Thread(target=lambda share=share: [predictor.predict(x[None]) for x in share])
            for share in shares
        ]
        start = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return len(images) / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def predictor_rate(
    checkpoint: str, images: list[np.ndarray], device: str, tta: bool | None, batch: int
) -> float:
    """Tiles/s of the job's predictor alone, in this process, on tiles already in memory."""
    predictor = Predictor(checkpoint, device=device, tta=bool(tta))
    predictor.predict(np.stack(images[:batch]))  # warm-up
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        predictor.predict(np.stack(images[i : i + batch]))
    return len(images) / (time.perf_counter() - start)


def sample_size(tiles: int, batch: int) -> int:
    """How many tiles the predictor alone is timed on: a small slide's all, a large one's first
    16 batches (at least 80 tiles)."""
    return min(tiles, max(80, 16 * batch))


def rate_of_plan(
    checkpoint: str,
    plan: SlidePlan,
    rows: list[dict],
    mpp: float,
    mpp_override: float | None,
    device: str,
    tta: bool | None,
    batch: int,
) -> float:
    """:func:`predictor_rate` on ``rows``' tiles, read here without Ray Data."""
    images = [read_tile(plan, r["col"], r["row"], mpp, mpp_override) for r in rows]
    return predictor_rate(checkpoint, images, device, tta, batch)


def _checkpoint(args: argparse.Namespace, tmp: str) -> str:
    if not args.random_model:
        return str(resolve_checkpoint(args.checkpoint))
    kwargs = {"base_channels": args.base_channels} if args.base_channels else {}
    model = create_model(args.random_model, num_classes=3, **kwargs)
    card = ModelCard(architecture=args.random_model, kwargs=kwargs, mpp=0.5)
    return str(save_checkpoint(Path(tmp) / "model", model, card))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192, help="synthetic slide side, px at 0.25")
    parser.add_argument("--slide", help="an existing slide instead of a synthetic one")
    parser.add_argument("--checkpoint", help="checkpoint or shipped name (default: the default)")
    parser.add_argument("--random-model", help="time this architecture with random weights")
    parser.add_argument("--base-channels", type=int, help="width of the random model")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--batch-size", type=int, help="default: the job's (8 GPU, 1 CPU)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--predictor-threads", type=int, help="a CPU predictor's threads")
    parser.add_argument("--predictors", type=int, help="predictor actors (default: the job's)")
    parser.add_argument("--predictor-calls", type=int, help="a CPU actor's concurrent calls")
    parser.add_argument("--cpus-per-predictor", type=float, help="default: the job's")
    parser.add_argument(
        "--postprocess-in-predictor",
        action=argparse.BooleanOptionalAction,
        help="default: the job's (yes on a CPU, no on a GPU)",
    )
    parser.add_argument(
        "--tensor-instances",
        action=argparse.BooleanOptionalAction,
        help="default: the job's (yes where a GPU runs the model, no on a CPU)",
    )
    parser.add_argument(
        "--e2e-only", action="store_true", help="skip the read-only and predictor-only passes"
    )
    parser.add_argument(
        "--num-cpus",
        type=int,
        help="logical CPUs of the local Ray (default: the host's); e.g. 16 on a 2-core host to "
        "see the processes and memory of a 16-core node's layout (not its speed)",
    )
    args = parser.parse_args()

    import ray

    ray.init(logging_level="ERROR", include_dashboard=False, num_cpus=args.num_cpus)
    # Up before the job, as on a cluster where they outlive each job (the command asks for
    # them as soon as its Ray is up, too): the job's start-up is then its own.
    start_ray_data_helpers(wait=True)
    with tempfile.TemporaryDirectory() as tmp:
        slide = args.slide or str(Path(tmp) / "bench.tiff")
        if not args.slide:
            sources = synthetic.synthetic_sources(mpp=0.25)
            mosaic = synthetic.MosaicSlide(sources, args.size, args.size, seed=0)
            synthetic.write_tiff(mosaic, slide, mpp=0.25)
        checkpoint = _checkpoint(args, tmp)
        config = SegmentConfig(
            checkpoint=checkpoint,
            tile=args.tile,
            overlap=args.overlap,
            batch_size=args.batch_size,
            device=args.device,
            predictor_threads=args.predictor_threads,
            predictors=args.predictors,
            predictor_calls=args.predictor_calls,
            cpus_per_predictor=args.cpus_per_predictor,
            postprocess_in_predictor=args.postprocess_in_predictor,
            tensor_instances=args.tensor_instances,
        )
        card = read_card(checkpoint)
        resources = ray.cluster_resources()
        config = resolve_for_hardware(config, resources, card)  # TTA, tensor instances
        plan = plan_slide(slide, card, config)
        rows = plan.rows(slide)
        result: dict[str, object] = {
            "benchmark": "segment",
            "slide": os.path.basename(slide),
            "tiles": len(rows),
            "tile": args.tile,
            "model": card.architecture,
            "cpus": os.cpu_count(),
        }

        pool = predictor_pool(config, resources, smallest_node_cpus())
        batch = pool.batch_size
        sample = sample_size(len(rows), batch)
        if not args.e2e_only:  # the predictor alone, before the job too: this VM's speed drifts
            # In a process of its own, so that this one holds no model, tiles or CUDA context
            # while the job runs; its tiles read without Ray Data.
            spawn = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(1, mp_context=spawn) as executor:
                before = executor.submit(
                    rate_of_plan,
                    checkpoint,
                    plan.for_tasks(),
                    rows[:sample],
                    card.mpp,
                    config.mpp_override,
                    args.device,
                    config.tta,
                    batch,
                )
                rate_before = before.result()

        sampler = TreeSampler()
        sampler.start()
        start = time.perf_counter()
        (outcome,) = segment_slides([slide], str(Path(tmp) / "out"), config)
        seconds = time.perf_counter() - start
        cpu = sampler.stop()
        profile = json.loads(Path(outcome.geojson.replace(".geojson.gz", ".json")).read_text())
        result["profile_s"] = profile["profile"]
        cores = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
        result["cpu_busy_fraction"] = round(cpu / (seconds * cores), 3)
        # The GPU's share: the model, and the instances where the predictor finds them.
        forward = profile["profile"]["forward_s"] + profile["profile"]["predictor_instances_s"]
        result["gpu_busy_fraction"] = round(forward / seconds, 3) if pool.use_gpu else None
        result["batch_size"] = batch
        result["predictors"] = pool.size
        result["calls_per_predictor"] = pool.calls
        result["postprocess_in_predictor"] = pool.postprocess
        result["tensor_instances"] = config.tensor_instances
        result["pipeline_peak_rss_mb"] = round(sampler.peak_rss / 2**20, 1)
        result["pipeline_peak_pss_mb"] = round(sampler.peak_pss / 2**20, 1)
        result["torch_processes"] = dict(Counter(sampler.torch_pids.values()))
        assert outcome.status == "complete", outcome.reason
        result["end_to_end_s"] = round(seconds, 2)
        result["end_to_end_tiles_per_s"] = round(outcome.tiles / seconds, 2)
        result["nuclei"] = outcome.nuclei
        result["nuclei_per_s"] = round(outcome.nuclei / seconds, 1)
        result["driver_peak_rss_mb"] = round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
        )
        if not args.e2e_only:
            start = time.perf_counter()
            plans = {slide: plan.for_tasks()}
            tiles = tile_images(rows, plans, card.mpp, config.mpp_override, batch)
            images = [r["image"] for r in tiles.select_columns(["image"]).iter_rows()]
            result["read_tiles_per_s"] = round(len(images) / (time.perf_counter() - start), 2)

            rate_after = predictor_rate(checkpoint, images[:sample], args.device, config.tta, batch)
            # The mean of the rates before and after the job: what the predictor alone would
            # have done while the job ran, on a VM whose speed drifts within minutes.
            result["predictor_tiles_per_s"] = round((rate_before + rate_after) / 2, 2)
            result["predictor_before_after_tiles_per_s"] = [
                round(rate_before, 2),
                round(rate_after, 2),
            ]
            result["device"] = str(choose_device(args.device))
            if not pool.use_gpu:
                result["predictor_per_core_tiles_per_s"] = round(
                    per_core_rate(checkpoint, images, cores), 2
                )
            del images

            alone_rate = float(result["predictor_tiles_per_s"])
            result["ratio_e2e_vs_predictor"] = round(
                float(result["end_to_end_tiles_per_s"]) / alone_rate, 3
            )
            # After start-up: the tiles that came back after the first, over the time they took.
            steady = (outcome.tiles - 1) / (seconds - profile["profile"]["first_tile_s"])
            result["ratio_steady_vs_predictor"] = round(steady / alone_rate, 3)
            if "predictor_per_core_tiles_per_s" in result:
                result["ratio_e2e_vs_per_core"] = round(
                    float(result["end_to_end_tiles_per_s"])
                    / float(result["predictor_per_core_tiles_per_s"]),
                    3,
                )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
