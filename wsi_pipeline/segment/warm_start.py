"""Ray Data's helper actors, asked for as soon as Ray is up, so their processes start then.

Ray Data creates three detached helper actors (its stats, autoscaling coordinator and actor
location tracker) when a dataset first executes, and the job's predictor actor starts beside
them. On a 2-core host that costs ~1 s before the first tile (`python benchmarks/segment.py
--size 8192`: first tile 5.2-5.5 s with them already running, 6.0-8.2 s without). Asking for
them first lets them start while the driver checks the checkpoint and plans the slides; the
executor later finds them by name. On a long-lived cluster they outlive each job (detached),
so only its first job ever waits for them. Ray Data's own functions create them, so this is
the same actor with the same options; they are private, so a Ray without them only loses the
head start.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)


def ray_data_helpers() -> list[Callable[[], Any]]:
    """Ray Data's get-or-create functions of its helper actors (empty where they moved)."""
    try:
        from ray.data._internal.cluster_autoscaler import get_or_create_autoscaling_coordinator
        from ray.data._internal.execution.node_trackers import (
            get_or_create_actor_location_tracker,
        )
        from ray.data._internal.stats import get_or_create_stats_actor
    except ImportError:
        return []
    return [
        get_or_create_stats_actor,
        get_or_create_autoscaling_coordinator,
        get_or_create_actor_location_tracker,
    ]


def start_ray_data_helpers(
    helpers: list[Callable[[], Any]] | None = None, *, wait: bool = False
) -> int:
    """Ask for each helper actor now; return how many were asked for. Nothing waits for their
    start unless ``wait`` (a benchmark that times a job as it runs on a cluster where they
    already live). Best effort: a failure only loses the head start."""
    import ray

    if not ray.is_initialized():
        return 0
    actors = []
    for create in ray_data_helpers() if helpers is None else helpers:
        try:
            actors.append(create())
        except Exception as exc:  # a private API: never fail a job over a head start
            logger.debug("Ray Data helper not started early: %s", exc)
    if wait:
        ray.get([actor.__ray_ready__.remote() for actor in actors])
    return len(actors)
