"""Ray Train on CPU: a 2-worker run, resume from the last epoch, recovery from a worker failure.

One local Ray session for all of them; a narrow U-Net on 64 px crops of a synthetic store.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from test_datasets import write_folder_dataset

from wsi_pipeline.checkpoint import load_checkpoint, read_card
from wsi_pipeline.cli.main import main
from wsi_pipeline.config import ConfigError, dump_config
from wsi_pipeline.train import ingest
from wsi_pipeline.train.config import TrainConfig, load_train_config
from wsi_pipeline.train.loop import _Progress, warmup_cosine
from wsi_pipeline.train.trainer import run_training

pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
STEPS = 8


def tiny_config(**overrides: Any) -> TrainConfig:
    base = {
        "name": "tiny",
        "model": {"name": "unet", "kwargs": {"base_channels": 8}},
        "optimizer": {"lr": 1e-2, "warmup_epochs": 0},
        "data": {
            "input_size": 64,
            "batch_size": 4,
            "steps_per_epoch": STEPS,
            "loader_cpus": 0.25,
            "rows_per_task": 16,
            "crop_seed": 0,
        },
        "epochs": 3,
        "monitor": "val_dice",
        "workers": 2,
        "cpus_per_worker": 0.5,
        "max_failures": 0,
        "keep_checkpoints": 1,
    }
    return TrainConfig.model_validate({**base, **overrides})


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("train-data")
    splits = ["train"] * 6 + ["val"] * 2
    data = write_folder_dataset(root / "synthetic", n=8, size=96, splits=splits)
    ingest.ingest_folder(data, root / "train.zarr")
    return str(root / "train.zarr")


def epoch_log(path: Path) -> Any:
    """A step callback that appends ``epoch`` to ``path`` on rank 0 (pickled by value)."""

    def record(epoch: int, step: int, rank: int) -> None:
        if rank == 0:
            with open(path, "a") as f:
                f.write(f"{epoch}\n")

    return record


def logged_epochs(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()]


def rows(out: Path) -> list[dict[str, str]]:
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def first_run(store: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("run")
    summary = run_training(tiny_config(), store, out)
    return out, summary


def test_two_workers_write_the_best_checkpoint_and_improve(first_run: tuple[Path, dict]) -> None:
    out, summary = first_run
    history = rows(out)
    assert [int(r["epoch"]) for r in history] == [0, 1, 2]
    dice = [float(r["val_dice"]) for r in history]
    assert max(dice) > dice[0] + 0.05, dice
    assert summary["metrics"]["val_dice"] == pytest.approx(max(dice))

    model, card = load_checkpoint(out / "best")
    assert (card.architecture, card.num_classes, card.target_mode) == ("unet", 3, "3class")
    assert card.kwargs == {"base_channels": 8} and card.mpp == 0.5
    assert card.split["val"] == ["synthetic/tile6", "synthetic/tile7"]
    assert card.datasets[0].startswith("synthetic: ") and card.license == "test data"
    assert set(card.metrics) >= {"val_dice", "val_aji", "val_pq", "val_loss", "train_loss"}
    assert card.training["workers"] == 2 and card.training["epoch"] == summary["best_epoch"]
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3, 32, 32)
    assert (out / "train-config.yaml").exists()
    assert json.loads((out / "summary.json").read_text()) == summary


def test_resume_continues_after_the_last_epoch(
    first_run: tuple[Path, dict], store: str, tmp_path: Path
) -> None:
    out, _ = first_run
    log = tmp_path / "epochs.txt"
    summary = run_training(tiny_config(epochs=4), store, out, step_callback=epoch_log(log))
    assert logged_epochs(log) == [3] * STEPS  # epochs 0-2 were not run again
    assert [int(r["epoch"]) for r in rows(out)] == [0, 1, 2, 3]
    assert summary["last_epoch"] == 3
    assert read_card(out / "best").training["epoch"] == summary["best_epoch"]


def test_a_failing_worker_is_restarted_from_the_checkpoint(store: str, tmp_path: Path) -> None:
    log, marker = tmp_path / "epochs.txt", tmp_path / "failed-once"

    def fail_once(epoch: int, step: int, rank: int) -> None:
        if rank == 0:
            with open(log, "a") as f:
                f.write(f"{epoch}\n")
        if epoch == 1 and step == 2 and rank == 1 and not marker.exists():
            marker.touch()
            raise RuntimeError("injected worker failure")

    config = tiny_config(epochs=2, max_failures=1)
    summary = run_training(config, store, tmp_path / "run", step_callback=fail_once)
    assert marker.exists() and summary["last_epoch"] == 1
    epochs = logged_epochs(log)
    assert epochs.count(0) == STEPS  # epoch 0 ran once: the restart resumed from its checkpoint
    assert STEPS + 1 <= epochs.count(1) <= STEPS + 3
    assert [int(r["epoch"]) for r in rows(tmp_path / "run")] == [0, 1]


def test_train_command_with_the_smoke_config_and_a_ray_of_its_own(
    store: str, tmp_path: Path
) -> None:
    """As a user runs it, with a Ray of its own. Ray Train's placement-group cleaner watches the
    run's controller through the state API, which needs the dashboard; without it the cleaner
    warns every second and cannot clean up. After the command, the same process asks that API
    about its Ray's actors, with the address given (the tests' own Ray is a second instance)."""
    import subprocess
    import sys

    code = (
        "import sys, ray; from ray.util.state import list_actors;"
        "from wsi_pipeline.cli.main import main; code = main(sys.argv[1:]);"
        "list_actors(address=ray.get_runtime_context().gcs_address); sys.exit(code)"
    )
    smoke = str(REPO / "configs" / "train" / "smoke.yaml")
    argv = [sys.executable, "-c", code, "train", "--config", smoke, "--data", store]
    argv += ["--out", str(tmp_path / "run"), "--epochs", "1", "--workers", "1"]
    argv += ["--set", "monitor=epoch"]  # a fixed schedule: the last epoch's checkpoint
    # A user's environment: no address, and no auth mode (the tests' Ray set one in this process).
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    run = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "best checkpoint:" in run.stdout and "(epoch 0, the last)" in run.stdout
    assert "State API" not in run.stderr, run.stderr[-2000:]
    assert "Token authentication" not in run.stderr  # Ray's note, without --verbose
    card = read_card(tmp_path / "run" / "best")
    assert card.architecture == "unet" and card.training["config"]["data"]["store"] == store
    assert main(["train", "--config", smoke, "--data", str(tmp_path / "none.zarr")]) == 2


def test_smoke_config_and_model_configs_load() -> None:
    smoke = load_train_config(REPO / "configs" / "train" / "smoke.yaml")
    assert smoke.epochs <= 3 and smoke.data.input_size <= 128
    recipes = {p.stem for p in (REPO / "configs" / "train").glob("*.yaml")}
    # default*.yaml are the shipped model's recipe and its 0.25 µm/px counterpart.
    names = {stem for stem in recipes if stem != "smoke" and not stem.startswith("default")}
    from wsi_pipeline.models import list_models

    assert names == set(list_models())
    for name in names:
        config = load_train_config(REPO / "configs" / "train" / f"{name}.yaml")
        assert config.model.name == name and config.num_classes == 3
    default = load_train_config(REPO / "configs" / "train" / "default.yaml")  # the shipped model
    assert default.model.name == "unet" and default.num_classes == 3
    v2 = load_train_config(REPO / "configs" / "train" / "default-v2.yaml")  # its successor
    assert v2.model == default.model and v2.ema_decay > 0 and v2.data.augment.jpeg_p > 0
    at_40x = load_train_config(REPO / "configs" / "train" / "default-40x.yaml")
    assert at_40x.model == default.model and at_40x.data.input_size > default.data.input_size


def test_config_errors_name_the_key(store: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="monitor"):
        load_train_config(None, {"monitor": "val_accuracy"})
    with pytest.raises(ConfigError, match="data.bach_size: unknown key"):
        load_train_config(None, {"data": {"bach_size": 2}})
    with pytest.raises(ConfigError, match="multiple of 32"):
        load_train_config(None, {"model": {"name": "lanet"}, "data": {"input_size": 48}})
    with pytest.raises(ConfigError, match="validation items"):
        run_training(tiny_config(data={"val_splits": ["nope"]}), store, tmp_path)


def test_set_changes_one_key_of_a_section_the_flags_set(tmp_path: Path, capsys) -> None:
    """``--data X --set data.steps_per_epoch=5`` trains on X, not on the default store."""
    missing = str(tmp_path / "mine.zarr")
    assert main(["train", "--data", missing, "--set", "data.steps_per_epoch=5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and missing in err[0] and "train.zarr" not in err[0]


def test_postprocess_is_strict_and_declares_every_argument() -> None:
    import inspect

    from wsi_pipeline.checkpoint import PostProcess
    from wsi_pipeline.segment.instances import instances_from_probabilities

    with pytest.raises(ConfigError, match="postprocess.interior_treshold: unknown key"):
        load_train_config(None, {"postprocess": {"interior_treshold": 0.3}})
    keyword_only = [
        name
        for name, p in inspect.signature(instances_from_probabilities).parameters.items()
        if p.kind is p.KEYWORD_ONLY
    ]
    assert sorted(PostProcess.model_fields) == sorted(keyword_only)
    for name, field in PostProcess.model_fields.items():
        default = inspect.signature(instances_from_probabilities).parameters[name].default
        assert field.default == default, name


def test_warmup_then_cosine() -> None:
    factors = [warmup_cosine(step, 100, 10, 0.01) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[-1] == pytest.approx(0.01, abs=1e-3)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))


def test_early_stopping_and_best_tracking() -> None:
    progress = _Progress(tiny_config(early_stopping_patience=2))
    for epoch, dice in enumerate([0.2, 0.5, 0.4, 0.45]):
        assert not progress.stopped
        progress.update({"epoch": epoch, "val_dice": dice})
    assert (progress.best, progress.best_epoch, progress.stopped) == (0.5, 1, True)
    restored = _Progress(tiny_config())
    restored.load(progress.state())
    assert restored.state() == progress.state()
    last = _Progress(tiny_config(monitor="epoch", early_stopping_patience=2))
    for epoch, dice in enumerate([0.2, 0.5, 0.4, 0.45]):
        last.update({"epoch": epoch, "val_dice": dice})
    assert (last.best_epoch, last.stopped) == (3, False)  # a fixed schedule never stalls


def test_init_from_fine_tunes_a_checkpoint_and_refuses_another_model(
    first_run: tuple[Path, dict], store: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out, _ = first_run
    start, _ = load_checkpoint(out / "best")
    start.requires_grad_(False)
    # A learning rate of ~0: the new run's weights are the ones it started from.
    still = tiny_config(epochs=1, workers=1, optimizer={"lr": 1e-12, "warmup_epochs": 0})
    recipe = tmp_path / "still.yaml"
    recipe.write_text(dump_config(still))
    run = tmp_path / "finetune"
    argv = ["train", "--config", str(recipe), "--data", store, "--out", str(run)]
    assert main([*argv, "--init-from", str(out / "best")]) == 0
    tuned, card = load_checkpoint(run / "best")
    for (name, a), b in zip(start.named_parameters(), tuned.parameters(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=name)
    # ...which are not what a fresh model starts from.
    fresh = still.build_model().requires_grad_(False).parameters()
    distance = sum(
        float((a - c).abs().sum()) for a, c in zip(start.parameters(), fresh, strict=True)
    )
    assert distance > 1.0
    assert card.training["config"]["init_from"] == str((out / "best").resolve())
    # A checkpoint of another width: one line, before any training.
    wide = tmp_path / "wide.yaml"
    wide.write_text(
        dump_config(tiny_config(model={"name": "unet", "kwargs": {"base_channels": 4}}))
    )
    other = ["train", "--config", str(wide), "--data", store, "--out", str(tmp_path / "wide")]
    capsys.readouterr()  # the first run's worker logs
    assert main([*other, "--init-from", str(out / "best")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "init_from" in err[0] and "base_channels" in err[0], err
    assert not (tmp_path / "wide").exists()  # refused before anything was written
    assert main([*other, "--init-from", str(tmp_path / "nothing")]) == 2


def test_a_run_of_another_model_is_not_resumed(store: str, tmp_path: Path) -> None:
    (tmp_path / "tiny").mkdir()
    (tmp_path / "train-config.yaml").write_text(dump_config(tiny_config()))
    other = tiny_config(model={"name": "lanet"})
    with pytest.raises(ConfigError, match="another model"):
        run_training(other, store, tmp_path)


def test_ema_checkpoints_hold_the_averaged_weights_and_resume(store: str, tmp_path: Path) -> None:
    """With ema_decay the checkpoint is the moving average, and a resumed run keeps both the
    raw weights (to go on training) and the average."""
    config = tiny_config(ema_decay=0.9, epochs=1, monitor="epoch")  # a fixed schedule
    out = tmp_path / "ema"
    run_training(config, store, out)
    first = read_card(out / "best")
    state = torch.load(next((out / config.name).glob("epoch-*/train_state.pt")), weights_only=True)
    averaged = torch.load(out / "best" / "model.pt", weights_only=True)
    raw = state["raw_model"]
    assert state["ema_steps"] >= 1
    assert raw.keys() == averaged.keys()
    assert any(not torch.equal(raw[k].float(), averaged[k].float()) for k in raw)
    again = run_training(tiny_config(ema_decay=0.9, epochs=2, monitor="epoch"), store, out)
    assert again["last_epoch"] == 1 and first.training["epoch"] == 0
    assert again["best_epoch"] == 1  # "epoch" keeps the last, whatever the scores did


def test_distance_mode_trains_tunes_and_segments(
    store: str, tmp_path: Path, slide_path: Path
) -> None:
    """The distance target mode as a user meets it: train, tune, then segment a slide."""
    smoke = str(REPO / "configs" / "train" / "smoke.yaml")
    out = tmp_path / "distance"
    argv = ["train", "--config", smoke, "--data", store, "--out", str(out)]
    assert main([*argv, "--set", "data.target_mode=distance", "--set", "epochs=1"]) == 0
    card = read_card(out / "best")
    assert (card.target_mode, card.num_classes) == ("distance", 4)
    model, _ = load_checkpoint(out / "best")
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 4, 64, 64)
    data = write_folder_dataset(tmp_path / "tune", n=2, size=96)
    assert main(["tune", "--checkpoint", str(out / "best"), "--data", str(data), "--write"]) == 0
    assert read_card(out / "best").postprocess.distance_threshold in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
    segmented = tmp_path / "segmented"
    argv = ["segment", str(slide_path), "--out", str(segmented), "--checkpoint", str(out / "best")]
    assert main([*argv, "--tile", "256", "--overlap", "48"]) == 0
    summary = json.loads((segmented / "synthetic.json").read_text())
    assert summary["model"]["target_mode"] == "distance"


def test_the_device_loader_trains_on_two_workers(store: str, tmp_path: Path) -> None:
    """``data.loader: device``: no Ray Data pipeline, each worker draws crops on its device."""
    smoke = str(REPO / "configs" / "train" / "smoke.yaml")
    out = tmp_path / "device"
    argv = ["train", "--config", smoke, "--data", store, "--out", str(out)]
    assert main([*argv, "--set", "data.loader=device"]) == 0
    history = rows(out)
    assert [int(r["epoch"]) for r in history] == [0, 1]
    assert float(history[-1]["train_loss"]) < float(history[0]["train_loss"])
    assert read_card(out / "best").training["config"]["data"]["loader"] == "device"
