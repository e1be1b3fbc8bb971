"""benchmarks/gpu_suite.py --tiny: the GPU suite's code, end to end, on CPU and synthetic data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

from wsi_pipeline.models import list_models


@pytest.mark.slow
def test_tiny_suite_trains_scores_and_exports_every_candidate(tmp_path: Path) -> None:
    out = tmp_path / "suite"
    argv = [sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--out", str(out), "--tiny"]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1])["tiny"] is True
    assert "[suite" in run.stdout  # progress on the terminal
    result = json.loads((out / "results.json").read_text())
    names = [row["name"] for row in result["models"]]
    assert sorted(names) == sorted([*list_models(), "default", "default-v2", "default-v3"])
    for row in result["models"]:
        for scores in (row["whole_slide"], row["evaluate"]):
            assert 0.0 <= scores["aji"] <= scores["dice"] <= 1.0, row
        assert row["train_s"] > 0 and row["params_m"] > 0
        if row["params_m"] * 2 > 16 * 1.048576:  # too large to export in fp16
            assert row["checkpoint"] is None and row["name"] == "leecau_net"
            continue
        assert row["checkpoint_mb"] <= 16
        weights = torch.load(Path(row["checkpoint"]) / "model.pt", weights_only=True)
        assert all(v.dtype != torch.float32 for v in weights.values() if v.is_floating_point())
        card = json.loads((Path(row["checkpoint"]) / "model.json").read_text())
        assert card["postprocess"] == {**card["postprocess"], **row["tuned"]}  # tuned, written
    table = (out / "results.md").read_text().splitlines()
    assert len(table) == 2 + len(names) and all(f"| {n} |" in "\n".join(table) for n in names)
