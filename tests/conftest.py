"""Shared fixtures: synthetic slides made on the fly, the real data when present, local Ray."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from wsi_pipeline import synthetic

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("WSI_SHARED_DATA", REPO.parent / "shared" / "data"))
SLIDE_MPP = 0.25


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data, skipping the test when it is absent (a user's clone)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path


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
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()
