"""The shipped default model: listed, used by default, runs the demo, and keeps its accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import shared_path

from wsi_pipeline.checkpoint import DEFAULT_MODEL, read_card, resolve_checkpoint
from wsi_pipeline.cli.main import main


def test_default_model_ships_with_a_full_card(capsys) -> None:
    path = resolve_checkpoint(None)
    assert path.name == DEFAULT_MODEL
    assert (path / "model.pt").stat().st_size < 25 * 2**20
    card = read_card(path)
    assert card.mpp == 0.5 and card.num_classes == 4 and card.target_mode == "distance"
    assert "non-commercial" in card.license and card.metrics["test_other_organ_aji"] > 0.4
    assert main(["models"]) == 0
    assert f"{DEFAULT_MODEL} (default)" in capsys.readouterr().out


def test_demo_runs_its_steps_as_calls_and_stops_at_a_failed_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """The demo parses the command line once and checks the outcome of each step."""
    from wsi_pipeline.batch import FAILED
    from wsi_pipeline.cli import main as cli
    from wsi_pipeline.segment import job
    from wsi_pipeline.segment.job import SegmentResult

    parsed = []
    build_parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: parsed.append(1) or build_parser())
    monkeypatch.setattr(cli, "init_ray", lambda verbose=False: None)
    monkeypatch.setattr(
        job,
        "segment_slides",
        lambda slides, out, config: [SegmentResult(slides[0], FAILED, "boom")],
    )
    assert main(["demo", "--out", str(tmp_path), "--size", "512x512"]) == 1
    assert len(parsed) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: segmenting the demo slide failed: boom"]
    assert not (tmp_path / "demo-slide-overlay.png").exists()  # later steps did not run


@pytest.mark.usefixtures("ray_local")
def test_demo_end_to_end(tmp_path: Path, capsys) -> None:
    assert main(["demo", "--out", str(tmp_path), "--size", "2048x2048"]) == 0
    out = capsys.readouterr().out
    for name in ["demo-slide.tiff", "results/demo-slide.geojson.gz", "demo-slide-overlay.png"]:
        assert (tmp_path / name).exists(), name
    scores = json.loads(next(line for line in out.splitlines() if '"f1"' in line))
    # The synthetic slide's nuclei are easy: the default model finds nearly all of them.
    assert scores["f1"] > 0.9 and scores["mean_matched_iou"] > 0.8, scores
    assert "Import objects" in out


@pytest.mark.shared_data
def test_the_cards_scores_on_monuseg_images_are_what_evaluate_gives(capsys) -> None:
    """The card's test_other_organ scores reproduce (the default since v6 was trained on that
    split too, so they measure fit: the card's ``split`` lists what it saw)."""
    data = shared_path("monuseg_train")
    argv = ["evaluate", "--checkpoint", str(resolve_checkpoint(None)), "--data", str(data)]
    assert main([*argv, "--split", "test_other_organ"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    card = read_card(resolve_checkpoint(None))
    assert result["dice"] == pytest.approx(card.metrics["test_other_organ_dice"], abs=0.02)
    assert result["aji"] == pytest.approx(card.metrics["test_other_organ_aji"], abs=0.02)
