"""Benchmark the model zoo: one JSON line per model on stdout.

Each model is built from its recipe ``configs/train/<name>.yaml`` (the spec's configuration) and
measured in a fresh process, so peak memory is per model:

* ``params_m``: trainable parameters (millions);
* ``gflops_256``: forward FLOPs for one 256×256 tile (FlopCounterMode, 2 FLOPs per MAC);
* ``fp32_img_s`` / ``bf16_img_s``: eager forward throughput at ``--size``/``--batch``
  (bf16 = autocast), plus ``compiled_*`` with ``--compile``;
* ``peak_mem_mb``: CUDA peak allocated during the fp32 forward, or the process's peak RSS on
  CPU (which includes the ~0.3-0.5 GB of the Python/torch runtime).

Example: ``python benchmarks/models.py --device cpu --size 256 --batch 2 --iters 3``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from wsi_pipeline.models import list_models
from wsi_pipeline.train.config import load_train_config

RECIPES = Path(__file__).resolve().parents[1] / "configs" / "train"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=256, help="tile side in pixels")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3, help="timed forwards per mode")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads")
    parser.add_argument("--models", nargs="+", default=list_models(), choices=list_models())
    return parser.parse_args()


def gflops_per_tile(name: str, size: int = 256) -> float:
    with torch.device("meta"):
        model = load_train_config(RECIPES / f"{name}.yaml").build_model().eval()
        x = torch.empty(1, 3, size, size)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
    return counter.get_total_flops() / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    iters: int,
    dtype: torch.dtype | None,
) -> float:
    ctx: AbstractContextManager[Any] = (
        torch.autocast(x.device.type, dtype=dtype) if dtype else nullcontext()
    )
    with torch.inference_mode(), ctx:
        model(x)  # warm-up (and compilation for compiled models)
        _sync(x.device)
        start = time.perf_counter()
        for _ in range(iters):
            model(x)
        _sync(x.device)
    return round(iters * x.shape[0] / (time.perf_counter() - start), 3)


def bench_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = load_train_config(RECIPES / f"{name}.yaml").build_model().to(device).eval()
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    row: dict[str, Any] = {
        "model": name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "size": args.size,
        "batch": args.batch,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "gflops_256": round(gflops_per_tile(name), 2),
    }
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    row["fp32_img_s"] = images_per_second(model, x, args.iters, None)
    if device.type == "cuda":
        row["peak_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        row["peak_mem_kind"] = "cuda_max_allocated_fp32"
    else:
        row["peak_mem_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        row["peak_mem_kind"] = "cpu_max_rss"
    row["bf16_img_s"] = images_per_second(model, x, args.iters, torch.bfloat16)
    if args.compile:
        compiled = torch.compile(model)
        start = time.perf_counter()
        row["compiled_fp32_img_s"] = images_per_second(compiled, x, args.iters, None)
        row["compile_fp32_s"] = round(time.perf_counter() - start, 1)
        row["compiled_bf16_img_s"] = images_per_second(compiled, x, args.iters, torch.bfloat16)
    return row


def _run(name: str, args: argparse.Namespace) -> dict[str, Any]:
    try:
        return bench_model(name, args)
    except Exception as exc:  # report the failure and go on with the other models
        return {"model": name, "error": f"{type(exc).__name__}: {exc}"}


def main() -> None:
    args = parse_args()
    spawn = multiprocessing.get_context("spawn")
    # One fresh process per model keeps peak-memory readings and compile caches separate.
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn, max_tasks_per_child=1) as pool:
        for name in args.models:
            print(json.dumps(pool.submit(_run, name, args).result()), flush=True)


if __name__ == "__main__":
    main()
