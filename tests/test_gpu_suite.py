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

# Two architectures beside the default recipes (which always run): the smallest, and the one
# too large to export in fp16. Every architecture trains in test_models.py; this is the suite's
# code (train, tune, score, export, table), ~30 s per candidate on 2 cores.
SUITE_MODELS = ["unet", "leecau_net"]


@pytest.mark.slow
def test_tiny_suite_trains_scores_and_exports_every_candidate(tmp_path: Path) -> None:
    out = tmp_path / "suite"
    argv = [sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--out", str(out), "--tiny"]
    argv += ["--models", *SUITE_MODELS]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1])["tiny"] is True
    assert "[suite" in run.stdout  # progress on the terminal
    result = json.loads((out / "results.json").read_text())
    names = [row["name"] for row in result["models"]]
    assert set(SUITE_MODELS) <= set(list_models())
    assert sorted(names) == sorted([*SUITE_MODELS, "default", "default-v2", "default-v3"])
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


def test_augmentation_variants_switch_off_one_group_each() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_suite

    variants = gpu_suite.augmentation_variants(gpu=False, tiny=True)
    base = variants["aug-all"].data.augment.model_dump()
    assert base["stain"] > 0 and base["jpeg_p"] > 0 and base["resample_p"] > 0  # v3's recipe
    for name, config in variants.items():
        assert config.data.crop_seed == 0 and config.model == variants["aug-all"].model
        changed = {k for k, v in config.data.augment.model_dump().items() if v != base[k]}
        expected = set(gpu_suite.ABLATIONS[name.removeprefix("aug-")])
        if name == "aug-none":  # every step off; the strengths that only matter when on stay
            assert not config.data.augment.flips and config.data.augment.blur_p == 0
            continue
        assert changed == expected, name


@pytest.mark.slow
def test_tiny_augmentation_study_reports_the_change_against_all(tmp_path: Path) -> None:
    out = tmp_path / "augment"
    argv = [sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--out", str(out)]
    argv += ["--tiny", "--augmentations", "--variants", "none"]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert result["study"] == "augmentations"
    assert [row["name"] for row in result["models"]] == ["aug-all", "aug-none"]
    table = (out / "results.md").read_text()
    assert "Δ AJI" in table and "| aug-all |" in table and "+0.000 |" in table
    # The two trained on differently augmented crops of the same draws.
    weights = [
        torch.load(out / "checkpoints" / name / "model.pt", weights_only=True)
        for name in ("aug-all", "aug-none")
    ]
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
