"""Seams cost nothing on real tissue: benchmarks/seams.py on a 2 x 2 mosaic of unseen MoNuSeg."""

from __future__ import annotations

import importlib.util

import pytest
from conftest import REPO, shared_path


def _seams_benchmark():
    spec = importlib.util.spec_from_file_location("seams", REPO / "benchmarks" / "seams.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.mark.usefixtures("ray_local")
def test_tiled_whole_slide_scores_as_well_as_one_seamless_tile() -> None:
    data = shared_path("monuseg_train")
    result = _seams_benchmark().measure(str(data), ["test_other_organ"], cells=2, tile=256)
    assert result["cells"] == 4
    # 256 px tiles put several seams through every 1000 px cell, yet the scores match the
    # seamless run: what stitching costs is below measurement noise.
    assert result["seam_ratio_aji"] >= 0.98, result
    assert result["seam_ratio_dice"] >= 0.995, result
    # The job's reads, tissue mask and polygons cost little against `evaluate`'s own code.
    assert result["pipeline_ratio_aji"] >= 0.97, result
    assert result["whole_slide"]["dice"] >= 0.75, result
