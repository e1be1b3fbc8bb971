"""benchmarks/accuracy.py: a checkpoint scored through the whole-slide path and ``evaluate``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from test_datasets import write_folder_dataset

from wsi_pipeline.slide_scoring import build_mosaic, load_sources, oracle_ceiling


def test_oracle_ceiling_is_what_the_pixel_grid_costs() -> None:
    labels = np.zeros((64, 64), dtype=np.int32)
    labels[10:13, 10:13] = 1  # 3 px across: coarser grids cannot hold it exactly
    labels[30:50, 30:50] = 2
    same = oracle_ceiling([labels], 0.5, 0.5)
    assert same["aji"] == 1.0 and same["dice"] == 1.0
    coarse = oracle_ceiling([labels], 0.25, 1.0)
    assert 0.3 < coarse["aji"] < 1.0


def test_mosaic_holds_every_split_image_size(tmp_path: Path) -> None:
    data = write_folder_dataset(tmp_path / "ds", n=5, size=96, splits=["a"] * 4 + ["b"])
    sources, mpp = load_sources(data, ["a"])
    assert len(sources) == 4 and mpp == 0.5
    mosaic = build_mosaic(sources)
    assert mosaic.width == mosaic.height == 2 * 96
    # Images of another mpp (MoNuSeg's vary by 2 %) are resampled to the median: one slide mpp.
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["items"][0]["mpp"] = 0.55
    (data / "manifest.json").write_text(json.dumps(manifest))
    sources, mpp = load_sources(data, ["a"])
    assert mpp == 0.5 and sources[0][0].shape[:2] == sources[0][1].shape == (106, 106)


@pytest.mark.slow
def test_accuracy_benchmark_prints_one_line_per_run(tmp_path: Path) -> None:
    data = write_folder_dataset(
        tmp_path / "ds", n=8, size=256, mpp=0.25, splits=["dev"] * 4 + ["test"] * 4
    )
    argv = [sys.executable, str(REPO / "benchmarks" / "accuracy.py"), "--data", str(data)]
    argv += ["--splits", "dev,test", "--tile", "256", "--overlap", "32", "--device", "cpu"]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["benchmark"] == "accuracy" and result["mpp"] == 0.5
    for split in ("dev", "test"):
        scores = result[split]
        assert scores["whole_slide"]["cells"] == 4
        # The shipped model on synthetic H&E: what it finds through the slide path is what
        # evaluate finds on the images; the 0.5 µm/px grid costs little on 0.25 µm/px images.
        assert scores["whole_slide"]["dice"] > 0.6 and scores["evaluate"]["dice"] > 0.6
        assert 0.7 < scores["ratio_whole_slide_vs_evaluate"] < 1.3
        assert 0.8 < scores["oracle"]["aji"] < 1.0
