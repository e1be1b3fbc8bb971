"""``wsi-pipeline tune``: post-processing thresholds chosen on data and written to the card."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_datasets import write_folder_dataset
from test_evaluate import checkpoint, run_cli  # noqa: F401  (fixture)

from wsi_pipeline.checkpoint import read_card
from wsi_pipeline.train.evaluation import evaluate_checkpoint
from wsi_pipeline.train.targets import make_target, one_hot
from wsi_pipeline.train.tuning import TIE_TOLERANCE, best_postprocess, grid_points


def _touching_pair() -> tuple[np.ndarray, np.ndarray]:
    """Two touching 10 x 10 nuclei whose interior the 'model' gives only 0.65."""
    true = np.zeros((40, 40), dtype=np.int32)
    true[10:20, 5:15], true[10:20, 15:25] = 1, 2
    probs = one_hot(make_target(true), 3)
    interior = probs[1] > 0
    probs[1][interior], probs[2][interior] = 0.65, 0.35
    return probs, true


def test_grid_points_cover_every_combination() -> None:
    points = grid_points({"a": (1, 2), "b": (3, 4, 5)})
    assert len(points) == 6 and points[0] == {"a": 1, "b": 3} and points[-1] == {"a": 2, "b": 5}


def test_the_threshold_that_separates_touching_nuclei_wins() -> None:
    pair = [_touching_pair()]
    # Above the model's interior confidence no marker is seeded and the pair merges.
    _, merged = best_postprocess(pair, "3class", grid={"interior_threshold": (0.7,)})
    assert merged["aji"] < 0.6
    chosen, scores = best_postprocess(pair, "3class")
    assert chosen["interior_threshold"] < 0.65
    assert scores["aji"] > 0.9 and scores["f1"] == 1.0
    with pytest.raises(ValueError, match="monitor"):
        best_postprocess(pair, "3class", monitor="accuracy")


def test_tune_cli_writes_the_card_and_evaluate_reproduces_the_score(
    tmp_path: Path,
    checkpoint: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = write_folder_dataset(tmp_path / "ds", n=2, size=64, mpp=0.5, splits=["val", "val"])
    argv = ["tune", "--checkpoint", str(checkpoint), "--data", str(data), "--split", "val"]
    result = run_cli([*argv, "--device", "cpu", "--write"], capsys)
    assert result["n_images"] == 2 and result["written"] is True
    assert result["scores"]["aji"] >= result["previous_scores"]["aji"]
    card = read_card(checkpoint)
    assert card.postprocess.model_dump() == result["postprocess"]
    again = evaluate_checkpoint(checkpoint, data, splits=["val"], device="cpu")
    assert round(again["aji"], 4) == result["scores"]["aji"]


def test_the_distance_mode_tunes_its_marker_threshold() -> None:
    """A 'model' whose distance peaks only reach 0.45: markers need a threshold below it."""
    true = np.zeros((40, 40), dtype=np.int32)
    true[10:20, 5:15], true[10:20, 15:25] = 1, 2
    target = make_target(true, "distance")
    probs = np.concatenate([one_hot(target[0], 3), target[1:] / 255 * 0.45])
    _, missed = best_postprocess([(probs, true)], "distance", grid={"distance_threshold": (0.5,)})
    chosen, scores = best_postprocess([(probs, true)], "distance")
    assert chosen["interior_threshold"] == 0.5  # not searched: this mode's markers ignore it
    assert chosen["distance_threshold"] < 0.45 and scores["aji"] > 0.9 > missed["aji"]


def test_near_ties_in_aji_go_to_the_setting_with_fewer_false_nuclei() -> None:
    """AJI weighs by area: keeping a 14 px nucleus beats dropping two 6 px specks by 0.0006.
    PQ counts objects: two false nuclei cost more than one missed. The near-tie goes to PQ."""
    true = np.zeros((120, 120), np.int32)
    true[10:50, 10:50], true[10:50, 60:100] = 1, 2
    true[70:72, 10:17] = 3  # a small real nucleus, 14 px
    predicted = true.copy()
    predicted[90:92, 40:43], predicted[90:92, 80:83] = 4, 5  # two 6 px specks
    pair = [(one_hot(make_target(predicted), 3), true)]
    _, keep = best_postprocess(pair, "3class", grid={"min_size": (5,)})
    _, drop = best_postprocess(pair, "3class", grid={"min_size": (15,)})
    assert 0 < keep["aji"] - drop["aji"] < TIE_TOLERANCE and keep["pq"] < drop["pq"]
    chosen, scores = best_postprocess(pair, "3class", grid={"min_size": (5, 15)})
    assert chosen["min_size"] == 15 and scores["pq"] == drop["pq"]
