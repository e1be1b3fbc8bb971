"""What the batch commands share: exit codes, user errors, Ray start-up, config and the summary.

``tile`` and ``segment`` run the same way: config from ``--config``, flags and ``--set``; the
inputs expanded; Ray started (or joined); the job; then ``summary.csv`` and one line per slide.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from wsi_pipeline.batch import Status
from wsi_pipeline.segment.warm_start import start_ray_data_helpers

EXIT_FAILED, EXIT_USAGE = 1, 2
logger = logging.getLogger(__name__)


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def init_ray(verbose: bool = False, *, dashboard: bool = False) -> None:
    """Connect to ``RAY_ADDRESS`` (or a Ray started on this machine with ``ray start``), else
    start a local Ray for this command; quiet unless ``verbose``. Ray Data's helper actors are
    asked for at once (:mod:`~wsi_pipeline.segment.warm_start`): they start while the command
    plans.

    The command's own Ray has a dashboard only with ``dashboard``: it lives as long as the
    command, and starting one cost 2-3 s of a 6-8 s start on the 2-core dev VM. Ray Train needs
    it (see ``cmd_train``). A Ray started with ``ray start --head`` has one, and the commands
    join it.
    """
    import ray

    if not verbose:  # Ray's note that a new local Ray has token auth on, as it should
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
            logging.ERROR
        )
    if not ray.is_initialized():
        # include_dashboard only applies when this call starts Ray; joining, Ray ignores it.
        context = ray.init(
            logging_level=logging.WARNING, log_to_driver=True, include_dashboard=dashboard
        )
        cpus = int(ray.cluster_resources().get("CPU", 0))
        where = os.environ.get("RAY_ADDRESS") or "this machine"
        logger.info("Ray: %s (%s; %d CPUs)", where, context.address_info["gcs_address"], cpus)
    if not verbose:
        quiet_ray_data()
    start_ray_data_helpers()


def quiet_ray_data() -> None:
    """No Ray Data progress in this process: the commands report their own, in tiles, shards or
    steps, and Ray Data's (bars on a terminal, else a block of log lines every 10 s per
    operator) would bury it. Ray Data's warnings still show (e.g. resources a stage can never
    get); ``--verbose`` keeps it all."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # not each execution's plan
    # Only the warning that progress bars are off, which is what was asked for.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def config_from_args(model: type, args: argparse.Namespace) -> Any:
    """``model`` from ``--config`` with every flag named like a field, and ``--set``, on top."""
    from wsi_pipeline.config import load_config, merge_overrides, parse_assignments

    flags = {name: getattr(args, name) for name in model.model_fields if hasattr(args, name)}
    return load_config(model, args.config, merge_overrides(flags, parse_assignments(args.set)))


# Less free space than this in --out is refused before any work.
MIN_FREE_BYTES = 64 * 2**20


def check_output(out: str) -> None:
    """Refuse an ``--out`` the jobs cannot write to, before any work."""
    import shutil

    from wsi_pipeline import storage

    if storage.is_url(out):
        raise CliError(
            f"--out {out}: URL outputs are not supported (stores and results are renamed into "
            "place atomically, which object stores cannot do); write to a local or mounted path"
        )
    try:
        storage.write_bytes_atomic(storage.join(out, ".write-test"), b"")
        os.unlink(storage.join(out, ".write-test"))
    except OSError as exc:
        raise CliError(f"--out {out}: not writable ({exc.strerror or exc})") from None
    free = shutil.disk_usage(out).free
    if free < MIN_FREE_BYTES:
        raise CliError(f"--out {out}: only {free // 2**20} MiB free; make room or choose another")


def run_batch(
    args: argparse.Namespace,
    model: type,
    run: Callable[..., list[Any]],
    describe: Callable[[Any], str],
    prepare: Callable[[Any], Any] | None = None,
) -> int:
    """Config, inputs, Ray, the job (which saves its resolved config), summary, report.

    Everything that can be checked before Ray starts is: the config, ``--out``, the inputs and,
    with ``prepare``, what the job itself can check without a cluster (e.g. the checkpoint).
    """
    from wsi_pipeline import storage
    from wsi_pipeline.batch import write_results_csv
    from wsi_pipeline.slides.inputs import expand_inputs

    check_output(args.out)
    config = config_from_args(model, args)
    if prepare is not None:
        config = prepare(config)
    slides = expand_inputs(args.inputs)
    init_ray(args.verbose)
    start = time.perf_counter()
    results = run(slides, args.out, config)
    summary = storage.join(args.out, "summary.csv")
    write_results_csv(results, summary, exclude=("errors",))
    for r in results:
        print(f"{r.status:>9}  {r.slide}  ({r.reason or describe(r)})")
    counts = {s: sum(r.status == s for r in results) for s in Status}
    print(
        f"{len(results)} slides in {time.perf_counter() - start:.1f} s: "
        f"{counts[Status.COMPLETE]} complete, {counts[Status.SKIPPED]} skipped, "
        f"{counts[Status.FAILED]} failed; summary: {summary}"
    )
    return EXIT_FAILED if counts[Status.FAILED] else 0
