"""Ray Data's helper actors asked for before the segment job plans (``segment/warm_start.py``)."""

from __future__ import annotations

import pytest

from wsi_pipeline.segment.warm_start import ray_data_helpers, start_ray_data_helpers

# Where Ray Data's executor looks its helpers up: name -> namespace.
HELPERS = {
    "datasets_stats_actor": "_dataset_stats_actor",
    "AutoscalingCoordinator": "AutoscalingCoordinator",
    "ActorLocationTracker": "ActorLocationTracker",
}


@pytest.mark.usefixtures("ray_local")
def test_the_helpers_ray_data_would_create_are_asked_for_by_name() -> None:
    import ray

    assert len(ray_data_helpers()) == 3, "Ray Data moved its helpers: the head start is lost"
    assert start_ray_data_helpers() == 3
    for name, namespace in HELPERS.items():
        assert ray.get_actor(name, namespace=namespace) is not None


@pytest.mark.usefixtures("ray_local")
def test_a_helper_that_fails_never_fails_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    calls = []

    def broken() -> None:
        calls.append("broken")
        raise RuntimeError("moved")

    assert start_ray_data_helpers([broken, lambda: calls.append("fine")]) == 1
    assert calls == ["broken", "fine"]
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    assert start_ray_data_helpers([broken]) == 0  # no Ray yet: nothing to start
    assert calls == ["broken", "fine"]


@pytest.mark.usefixtures("ray_local")
def test_waiting_returns_once_every_helper_has_started() -> None:
    import ray

    @ray.remote(num_cpus=0)
    class Slow:
        def __init__(self) -> None:
            import time

            time.sleep(1.0)

    actors: list = []
    assert start_ray_data_helpers([lambda: actors.append(Slow.remote()) or actors[-1]], wait=True)
    ready, _ = ray.wait([actors[0].__ray_ready__.remote()], timeout=0.2)
    assert ready, "start_ray_data_helpers(wait=True) returned before the helper had started"
    ray.kill(actors[0])


@pytest.mark.usefixtures("ray_local")
def test_the_commands_ask_for_the_helpers_once_ray_is_up(monkeypatch: pytest.MonkeyPatch) -> None:
    from wsi_pipeline.cli import batch

    asked: list[bool] = []
    monkeypatch.setattr(batch, "start_ray_data_helpers", lambda: asked.append(True))
    batch.init_ray(verbose=True)  # verbose: leaves Ray Data's logging as the session has it
    assert asked == [True]
