"""benchmarks/segment.py: its JSON line, on a small synthetic slide (figures from the same run)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.slow
def test_the_segment_benchmark_reports_rates_ratios_and_where_the_seconds_went() -> None:
    argv = [sys.executable, str(REPO / "benchmarks" / "segment.py"), "--size", "2048"]
    argv += ["--tile", "256", "--overlap", "32"]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    line = json.loads(run.stdout.strip().splitlines()[-1])
    assert line["tiles"] > 4 and line["nuclei"] > 0
    seconds, profile = line["end_to_end_s"], line["profile_s"]
    assert 0 < profile["first_tile_s"] < seconds
    assert profile["forward_s"] > 0 and profile["polygons_s"] > 0 and profile["read_s"] > 0
    assert line["end_to_end_tiles_per_s"] == pytest.approx(line["tiles"] / seconds, abs=0.01)
    before, after = line["predictor_before_after_tiles_per_s"]
    assert line["predictor_tiles_per_s"] == pytest.approx((before + after) / 2, abs=0.01)
    ratio = line["end_to_end_tiles_per_s"] / line["predictor_tiles_per_s"]
    assert line["ratio_e2e_vs_predictor"] == pytest.approx(ratio, abs=0.002)
    assert 0 < line["cpu_busy_fraction"] <= 1.2 and line["gpu_busy_fraction"] is None
    # The model runs in one actor; no other process of the job imports torch.
    assert list(line["torch_processes"].values()) == [1]
    assert "PredictThenPostprocess" in next(iter(line["torch_processes"]))
