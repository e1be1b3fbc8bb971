"""``wsi-pipeline evaluate``: one JSON line of scores for predictions or a checkpoint."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_datasets import write_folder_dataset

from wsi_pipeline.checkpoint import ModelCard, build_model, save_checkpoint
from wsi_pipeline.cli import train as cli_train
from wsi_pipeline.config import ConfigError
from wsi_pipeline.train.evaluation import evaluate_checkpoint

KEYS = {"dice", "iou", "aji", "pq", "dq", "sq", "f1"}


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    parser = argparse.ArgumentParser()
    cli_train.add_commands(parser.add_subparsers())
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])


def write_labels(path: Path, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(labels.astype(np.uint16)).save(path)


def test_perfect_predictions_score_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_folder_dataset(tmp_path / "ds", n=3, size=64)
    shutil.copytree(data / "masks", tmp_path / "pred")
    result = run_cli(["evaluate", "--pred", str(tmp_path / "pred"), "--data", str(data)], capsys)
    assert {k: result[k] for k in KEYS} == dict.fromkeys(KEYS, 1.0)
    assert result["n_images"] == 3 and [i["name"] for i in result["images"]] == [
        "tile0",
        "tile1",
        "tile2",
    ]


def test_hand_computed_case(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two nuclei of 4 and 2 px; the prediction finds the first (one pixel too large) only."""
    root = tmp_path / "ds"
    true = np.zeros((6, 6), dtype=np.uint16)
    true[1:3, 1:3] = 1  # 4 px
    true[4, 4:6] = 2  # 2 px
    pred = np.zeros_like(true)
    pred[1:3, 1:3] = 7
    pred[3, 1] = 7  # 5 px, IoU 4/5 with nucleus 1
    (root / "images").mkdir(parents=True)
    Image.fromarray(np.full((6, 6, 3), 200, dtype=np.uint8)).save(root / "images" / "a.png")
    write_labels(root / "masks" / "a.png", true)
    write_labels(tmp_path / "pred" / "a.png", pred)

    result = run_cli(["evaluate", "--pred", str(tmp_path / "pred"), "--data", str(root)], capsys)
    # pixels: |T| = 6, |P| = 5, |T ∩ P| = 4
    assert result["dice"] == pytest.approx(2 * 4 / 11)
    assert result["iou"] == pytest.approx(4 / 7)
    # AJI: matched pair 1↔7 (4 / 5) plus the unmatched true nucleus 2 in the union: 4 / (5 + 2)
    assert result["aji"] == pytest.approx(4 / 7)
    # one match at IoU 0.8, one missed nucleus: F1 = DQ = 2 / 3, SQ = 0.8, PQ = 0.8 * 2 / 3
    assert result["f1"] == pytest.approx(2 / 3) and result["dq"] == pytest.approx(2 / 3)
    assert result["sq"] == pytest.approx(0.8) and result["pq"] == pytest.approx(0.8 * 2 / 3)


def test_prediction_files_must_match(tmp_path: Path) -> None:
    data = write_folder_dataset(tmp_path / "ds", n=2, size=64)
    (tmp_path / "pred").mkdir()
    with pytest.raises(FileNotFoundError, match="tile0"):
        cli_train.cmd_evaluate(_args(pred=str(tmp_path / "pred"), data=str(data)))
    write_labels(tmp_path / "pred" / "tile0.png", np.zeros((5, 5)))
    np.save(tmp_path / "pred" / "tile1.npy", np.zeros((64, 64), dtype=np.int32))
    with pytest.raises(ConfigError, match="shape"):
        cli_train.cmd_evaluate(_args(pred=str(tmp_path / "pred"), data=str(data)))


def _args(**kwargs: object) -> argparse.Namespace:
    defaults = {
        "checkpoint": None,
        "pred": None,
        "mpp_source": None,
        "split_field": None,
        "split": None,
        "device": "cpu",
        "output": None,
    }
    return argparse.Namespace(**{**defaults, **kwargs})


@pytest.fixture()
def checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    card = ModelCard(architecture="unet", kwargs={"base_channels": 4}, mpp=0.5)
    return save_checkpoint(tmp_path / "ckpt", build_model(card), card)


def test_checkpoint_evaluation_json(
    tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    splits = ["train", "test", "test"]
    data = write_folder_dataset(tmp_path / "ds", n=3, size=60, mpp=0.25, splits=splits)
    out = tmp_path / "scores.json"
    argv = ["evaluate", "--checkpoint", str(checkpoint), "--data", str(data), "--split", "test"]
    result = run_cli([*argv, "--device", "cpu", "--output", str(out)], capsys)
    assert set(result) >= KEYS and result["n_images"] == 2 and result["mpp"] == 0.5
    assert [image["name"] for image in result["images"]] == ["tile1", "tile2"]
    assert all(0.0 <= result[k] <= 1.0 for k in KEYS)
    assert json.loads(out.read_text()) == result
    again = evaluate_checkpoint(checkpoint, data, splits=["test"], device="cpu")
    assert again["aji"] == result["aji"]  # deterministic


def test_checkpoint_evaluation_needs_the_images_mpp(tmp_path: Path, checkpoint: Path) -> None:
    data = write_folder_dataset(tmp_path / "ds", n=1, size=64, mpp=None)
    with pytest.raises(ConfigError, match="--mpp-source"):
        evaluate_checkpoint(checkpoint, data, device="cpu")
    result = evaluate_checkpoint(checkpoint, data, mpp_source=0.5, device="cpu")
    assert result["n_images"] == 1


def test_evaluate_accepts_a_shipped_model_name_like_segment_and_tune(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's own command: ``evaluate --checkpoint nuclei-unet16``."""
    from wsi_pipeline.checkpoint import DEFAULT_MODEL, resolve_checkpoint
    from wsi_pipeline.cli.main import main

    data = write_folder_dataset(tmp_path / "ds", n=1, size=64, mpp=0.5)
    argv = ["evaluate", "--checkpoint", DEFAULT_MODEL, "--data", str(data), "--device", "cpu"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n_images"] == 1 and result["mpp"] == 0.5
    by_path = evaluate_checkpoint(resolve_checkpoint(DEFAULT_MODEL), data, device="cpu")
    assert by_path["aji"] == result["aji"]


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "cannot load the weights"), (b"not a zip file at all", "cannot load the weights")],
)
def test_a_corrupt_checkpoint_is_one_line(
    tmp_path: Path, checkpoint: Path, content: bytes, reason: str, capsys
) -> None:
    from wsi_pipeline.cli.main import main

    (checkpoint / "model.pt").write_bytes(content)
    data = write_folder_dataset(tmp_path / "ds", n=1, size=64, mpp=0.5)
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and reason in err[0] and "model.pt" in err[0]
