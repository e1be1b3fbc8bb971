"""Shared fixtures: synthetic slides made on the fly, the real data when present, local Ray."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from wsi_pipeline import synthetic

# The tests control their Ray fully: a RAY_ADDRESS in the environment (a stray or a user's
# cluster) must neither break them nor receive their jobs.
os.environ.pop("RAY_ADDRESS", None)
# A loaded 2-core machine starts Ray Train worker groups slowly: give them time instead of
# failing the run (Ray's processes inherit this environment).
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("WSI_SHARED_DATA", REPO.parent / "shared" / "data"))
SLIDE_MPP = 0.25


NO_DATA = "needs the real data"


def shared_path(*parts: str) -> Path:
    """A path under the real data (``$WSI_SHARED_DATA``, default ``../shared/data``), skipping
    the test when it is absent (a user's clone)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{NO_DATA}: {path} not available (set WSI_SHARED_DATA)")
    return path


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line saying how many tests skipped for want of the real data, and where to put it."""
    skipped = terminalreporter.stats.get("skipped", [])
    missing = sum(NO_DATA in str(getattr(report, "longrepr", "")) for report in skipped)
    if missing:
        terminalreporter.write_line(
            f"{missing} tests skipped for want of the real data: set WSI_SHARED_DATA to a folder "
            f"like ../shared/data (looked in {SHARED_DATA})"
        )


@pytest.fixture(scope="session")
def mosaic() -> synthetic.MosaicSlide:
    """A 3000 x 2000 px synthetic slide at 0.25 µm/px with known nuclei, 3 pyramid levels."""
    sources = synthetic.synthetic_sources(4, 512, mpp=SLIDE_MPP, seed=0)
    return synthetic.MosaicSlide(sources, 3000, 2000, seed=1, tissue_fraction=0.6)


@pytest.fixture(scope="session")
def slide_path(tmp_path_factory: pytest.TempPathFactory, mosaic: synthetic.MosaicSlide) -> Path:
    path = tmp_path_factory.mktemp("slides") / "synthetic.tiff"
    synthetic.write_tiff(mosaic, path, mpp=SLIDE_MPP)
    return path


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (2 CPUs, no dashboard)."""
    import ray

    if not ray.is_initialized():
        # address="local": always a new instance of our own, never another Ray on the machine;
        # its own temp dir, so that Ray Train's look-up of "the" cluster finds this one.
        temp_dir = tempfile.mkdtemp(prefix="ray-tests-")
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            logging_level="WARNING",
            _temp_dir=temp_dir,
        )
    yield ray
    ray.shutdown()
