"""Segment throughput with 1, 2, 4... worker nodes on one host: how the CPU stages scale.

A Ray cluster on this machine, started as on VMs (``ray start`` per node, its own temp dir and
session each, token authentication on): a head with no CPUs (this script is the driver), one
"GPU node" with ``--predictors`` CPUs (and the host's GPU with ``--device cuda``) for the
predictor actors, and N "CPU nodes" of ``--cpus-per-node`` CPUs for slide reads and
post-processing. Nodes are added one after another; at each N the same two synthetic slides are
segmented (a small one, then a large one) and the steady rate is the difference quotient

    tiles_per_s = (tiles_large - tiles_small) / (seconds_large - seconds_small)

which cancels the start-up both runs pay (actor pool, model load, CUDA init). The scaling
efficiency of the CPU stages at N nodes is ``rate(N) / (N * rate(1))``; ``predictor_tiles_per_s``
(the model alone, in this process, on tiles in memory) tells whether the GPU is the ceiling.
Prints one JSON line. The figure for the README (16-core host, one GPU):

    python benchmarks/scaling.py --nodes 1 2 4 --cpus-per-node 3 --device cuda

A smoke run on a small CPU machine:

    python benchmarks/scaling.py --nodes 1 2 --cpus-per-node 1 --device cpu --size 4096 \\
        --small-size 2048 --tile 256 --overlap 32 --base-channels 4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline import synthetic
from wsi_pipeline.checkpoint import ModelCard, read_card, save_checkpoint
from wsi_pipeline.config import SegmentConfig
from wsi_pipeline.models import create_model
from wsi_pipeline.segment.job import plan_slide, read_tile, segment_slides
from wsi_pipeline.segment.predictor import Predictor

RAY = Path(sys.executable).parent / "ray"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_family(sessions: set[int]) -> list[int]:
    """Pids of the processes in ``sessions`` and of their descendants (Linux /proc)."""
    parent, session = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parent[int(entry.name)], session[int(entry.name)] = int(stat[1]), int(stat[3])
    members = {pid for pid, sid in session.items() if sid in sessions}
    while more := {pid for pid, ppid in parent.items() if ppid in members} - members:
        members |= more
    return sorted(members)


class LoopbackCluster:
    """Ray nodes on this host, one ``ray start --block`` per node, each in its own session."""

    def __init__(self, root: Path, object_store_bytes: int) -> None:
        self.root = root
        self.object_store_bytes = object_store_bytes
        self.gcs_port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update(
            PATH=f"{RAY.parent}{os.pathsep}{self.env.get('PATH', '')}",
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=secrets.token_hex(24),
            RAY_USAGE_STATS_ENABLED="0",
        )
        self.nodes: list[subprocess.Popen[bytes]] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def add_node(self, *args: str) -> None:
        head = not self.nodes
        temp = self.root / f"node{len(self.nodes)}"
        temp.mkdir(parents=True)
        where = [f"--port={self.gcs_port}", "--include-dashboard=false"] if head else []
        command = [
            str(RAY),
            "start",
            "--block",
            "--head" if head else f"--address={self.address}",
            *where,
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={temp}",
            f"--object-store-memory={self.object_store_bytes}",
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            "--min-worker-port=0",
            "--max-worker-port=0",
            "--disable-usage-stats",
            *args,
        ]
        log = open(temp / "ray-start.log", "wb")  # noqa: SIM115 - lives with the node
        self.nodes.append(
            subprocess.Popen(
                command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        )

    def wait_for(self, count: int, timeout: float = 120.0) -> None:
        import ray

        deadline = time.monotonic() + timeout
        while sum(n["Alive"] for n in ray.nodes()) < count:
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.nodes):
                raise RuntimeError(f"{count} Ray nodes did not come up; logs in {self.root}")
            time.sleep(0.5)

    def stop(self) -> None:
        for pid in session_family({p.pid for p in self.nodes}):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for process in self.nodes:
            process.wait(timeout=30)


def make_checkpoint(args: argparse.Namespace, root: Path) -> str:
    if args.checkpoint:
        return args.checkpoint
    kwargs = {"base_channels": args.base_channels}
    model = create_model(args.model, num_classes=3, **kwargs)
    card = ModelCard(architecture=args.model, kwargs=kwargs, mpp=0.5)
    return str(save_checkpoint(root / "model", model, card))


def make_slide(path: Path, size: int) -> str:
    sources = synthetic.synthetic_sources(mpp=0.25)
    synthetic.write_tiff(synthetic.MosaicSlide(sources, size, size, seed=0), path, mpp=0.25)
    return str(path)


def predictor_rate(slide: str, config: SegmentConfig, tiles: int) -> tuple[float, str]:
    """Tiles/s of the model alone on ``tiles`` tiles already in memory, and its device."""
    assert config.checkpoint
    card = read_card(config.checkpoint)
    plan = plan_slide(slide, card, config)
    images = np.stack([read_tile(plan, c, r, card.mpp, None) for c, r in plan.tiles[:tiles]])
    predictor = Predictor(config.checkpoint, device=config.device)
    predictor.predict(images[: config.batch_size])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(images), config.batch_size):
        predictor.predict(images[i : i + config.batch_size])
    return len(images) / (time.perf_counter() - start), str(predictor.device)


def timed_run(slide: str, out: Path, config: SegmentConfig) -> tuple[int, float]:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    (result,) = segment_slides([slide], str(out), config)
    seconds = time.perf_counter() - start
    if result.status != "complete":
        raise RuntimeError(f"{slide}: {result.reason}")
    return result.tiles, seconds


def efficiency(runs: list[dict[str, Any]], key: str) -> dict[str, float | None]:
    """``rate(N) / (N * rate(1))`` per node count N (None where a rate is missing)."""
    base = runs[0][key]
    return {
        str(r["nodes"]): round(r[key] / (r["nodes"] * base), 3) if base and r[key] else None
        for r in runs
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--cpus-per-node", type=int, default=3)
    parser.add_argument("--predictors", type=int, default=1, help="predictor actors (GPUs)")
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--size", type=int, default=16384, help="large slide side, px at 0.25")
    parser.add_argument("--small-size", type=int, default=4096, help="small slide side")
    parser.add_argument("--checkpoint", help="a real checkpoint (default: an untrained model)")
    parser.add_argument("--model", default="unet")
    parser.add_argument("--base-channels", type=int, default=16)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--object-store-mb", type=int, default=1024, help="per node")
    args = parser.parse_args()
    if sorted(args.nodes) != args.nodes or args.nodes[0] < 1:
        parser.error("--nodes must be increasing, from 1")

    root = Path(tempfile.mkdtemp(prefix="wsi-scaling-", dir="/tmp"))  # short socket paths
    cluster = LoopbackCluster(root, args.object_store_mb * 2**20)
    try:
        large = make_slide(root / "large.tiff", args.size)
        small = make_slide(root / "small.tiff", args.small_size)
        config = SegmentConfig(
            checkpoint=make_checkpoint(args, root),
            tile=args.tile,
            overlap=args.overlap,
            batch_size=args.batch_size,
            device=args.device,
            predictors=args.predictors,
            # The layout of a GPU host (CPU tasks post-process), also with --device cpu: the
            # benchmark measures how the CPU nodes' stages scale.
            postprocess_in_predictor=False,
        )
        rate, device = predictor_rate(large, config, tiles=8 * args.batch_size)
        result: dict[str, Any] = {
            "benchmark": "scaling",
            "cpu_count": os.cpu_count(),
            "device": device,
            "model": read_card(config.checkpoint or "").architecture,
            "tile": args.tile,
            "cpus_per_node": args.cpus_per_node,
            "predictors": args.predictors,
            "predictor_tiles_per_s": round(rate, 2),
            "runs": [],
        }
        os.environ.update({k: v for k, v in cluster.env.items() if k.startswith("RAY_")})
        import ray

        cluster.add_node("--num-cpus=0")
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        gpus = ["--num-gpus=1"] if args.device == "cuda" else []
        cluster.add_node(f"--num-cpus={args.predictors}", *gpus)
        cpu_nodes = 0
        for count in args.nodes:
            while cpu_nodes < count:
                cluster.add_node(f"--num-cpus={args.cpus_per_node}")
                cpu_nodes += 1
            cluster.wait_for(2 + count)
            timed_run(small, root / "warm-up", config)  # imports, file caches
            small_tiles, small_s = timed_run(small, root / "small-out", config)
            large_tiles, large_s = timed_run(large, root / "large-out", config)
            # Noise can swamp the difference on a busy or tiny machine: then no steady rate.
            seconds = large_s - small_s
            steady = (large_tiles - small_tiles) / seconds if seconds > 1.0 else None
            result["runs"].append(
                {
                    "nodes": count,
                    "cpus": count * args.cpus_per_node,
                    "tiles": large_tiles,
                    "small_tiles": small_tiles,
                    "end_to_end_s": round(large_s, 2),
                    "small_s": round(small_s, 2),
                    "end_to_end_tiles_per_s": round(large_tiles / large_s, 2),
                    "tiles_per_s": round(steady, 2) if steady else None,
                    "tiles_per_s_per_cpu": (
                        round(steady / (count * args.cpus_per_node), 2) if steady else None
                    ),
                }
            )
        result["efficiency"] = efficiency(result["runs"], "tiles_per_s")
        result["end_to_end_efficiency"] = efficiency(result["runs"], "end_to_end_tiles_per_s")
        ray.shutdown()
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
