"""Nothing lost, nothing silent: the bad-input battery and the fault cases, as a user meets them.

One ``segment`` batch with good slides among bad inputs; reruns into the same ``--out``; a
different slide with a taken name; a killed ``tile`` run; outputs that cannot be written; bad
configs and checkpoints; a failed re-ingest. Each asserts the exit code, one line per failure,
the good slides' nuclei and that no temporary file is left behind.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from test_datasets import write_folder_dataset

from wsi_pipeline.cli.main import main
from wsi_pipeline.storage import TMP_PREFIX

pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.slow]

GOOD = ["synthetic.tiff", "slide é 1.tiff", "linked.tiff"]


def summary(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "summary.csv", newline="") as f:
        return {Path(row["slide"]).name: row for row in csv.DictReader(f)}


def dead_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid += 1


@pytest.fixture(scope="module")
def battery(tmp_path_factory: pytest.TempPathFactory, slide_path: Path) -> Path:
    """Good slides (a copy with unicode and spaces, a symlink) among every kind of bad input."""
    root = tmp_path_factory.mktemp("battery")
    shutil.copy(slide_path, root / "synthetic.tiff")
    shutil.copy(slide_path, root / "slide é 1.tiff")
    (root / "linked.tiff").symlink_to(root / "synthetic.tiff")
    (root / "zero.svs").write_bytes(b"")
    (root / "text.svs").write_text("this is not a slide\n")
    (root / "truncated.tiff").write_bytes(slide_path.read_bytes()[:3000])
    Image.new("RGB", (64, 64), "white").save(root / "png-as.tif", format="PNG")
    # A 1 x 300,000 px TIFF: absurd proportions, no tissue anywhere.
    tifffile.imwrite(
        root / "absurd.tiff",
        np.full((1, 300_000, 3), 255, np.uint8),
        resolution=(40_000, 40_000),
        resolutionunit="CENTIMETER",
    )
    tifffile.imwrite(  # blank glass
        root / "no-tissue.tiff",
        np.full((1024, 1024, 3), 250, np.uint8),
        tile=(256, 256),
        resolution=(40_000, 40_000),
        resolutionunit="CENTIMETER",
    )
    return root


def inputs(root: Path) -> list[str]:
    bad = ["zero.svs", "text.svs", "truncated.tiff", "png-as.tif", "absurd.tiff"]
    return [str(root / n) for n in [*GOOD, *bad, "no-tissue.tiff"]] + [str(root / "missing.svs")]


def test_battery_then_rerun_then_another_slide_with_a_taken_name(
    battery: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results"
    out.mkdir()
    live = out / f"{TMP_PREFIX}{os.getpid()}-abcd1234-x.geojson"  # another run's, still alive
    dead = out / f"{TMP_PREFIX}{dead_pid()}-abcd1234-y.geojson"  # a killed run's
    live.write_text("{}")
    dead.write_text("{}")

    assert main(["segment", *inputs(battery), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    rows = summary(out)
    assert len(rows) == len(inputs(battery))
    for name in GOOD:
        assert rows[name]["status"] == "complete", rows[name]
    nuclei = {int(rows[name]["nuclei"]) for name in GOOD}
    assert len(nuclei) == 1 and nuclei.pop() > 50  # the same pixels: the same nuclei
    assert (
        rows["no-tissue.tiff"]["status"] == "complete" and rows["no-tissue.tiff"]["nuclei"] == "0"
    )
    for name in ["zero.svs", "text.svs", "truncated.tiff", "png-as.tif", "missing.svs"]:
        row = rows[name]
        assert row["status"] == "failed" and row["reason"] and "\n" not in row["reason"], row
    assert rows["absurd.tiff"]["status"] in ("complete", "failed")
    assert "\n" not in rows["absurd.tiff"]["reason"]
    assert live.exists() and not dead.exists()
    live.unlink()
    assert not list(out.glob(f"{TMP_PREFIX}*"))
    first = {name: rows[name]["nuclei"] for name in GOOD}

    # A rerun skips the finished slides and keeps their figures in the summary.
    assert main(["segment", *inputs(battery)[:3], "--out", str(out)]) == 0
    rows = summary(out)
    assert all(rows[n]["status"] == "skipped" and rows[n]["nuclei"] == first[n] for n in GOOD)
    assert rows["text.svs"]["status"] == "failed"  # earlier rows are kept, not dropped

    # A different slide with a name already in --out is refused, and nothing is overwritten.
    other = tmp_path / "elsewhere" / "synthetic.tiff"
    other.parent.mkdir()
    shutil.copy(battery / "png-as.tif", other)
    before = (out / "synthetic.json").read_bytes()
    assert main(["segment", str(other), "--out", str(out)]) == 1
    assert (out / "synthetic.json").read_bytes() == before
    with open(out / "summary.csv", newline="") as f:
        reasons = [r["reason"] for r in csv.DictReader(f) if r["slide"] == str(other)]
    assert len(reasons) == 1 and "another slide with the same name" in reasons[0]


def test_segmenting_a_store_left_by_a_killed_tile_run_is_refused(
    slide_path: Path, tmp_path: Path
) -> None:
    tiles = tmp_path / "tiles"
    assert main(["tile", str(slide_path), "--out", str(tiles)]) == 0
    store = tiles / "synthetic.ome.zarr"
    (store / "COMPLETE.json").unlink()  # as if the tile run had been killed
    out = tmp_path / "results"
    assert main(["segment", str(store), "--out", str(out)]) == 1
    row = summary(out)["synthetic.ome.zarr"]
    assert row["status"] == "failed" and "incomplete tiling store" in row["reason"]
    assert not (out / "synthetic.geojson.gz").exists()


@pytest.fixture()
def corrupt_checkpoint(tmp_path: Path) -> Path:
    from wsi_pipeline.checkpoint import resolve_checkpoint

    path = tmp_path / "corrupt"
    shutil.copytree(resolve_checkpoint(None), path)
    (path / "model.pt").write_bytes(b"PK\x03\x04 truncated")
    return path


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        (["--tile", "500"], "not a multiple of 16"),
        (["--tile", "256", "--overlap", "256"], "overlap 256 must be smaller than tile 256"),
        (["--tile", "100000"], "less than or equal to 4096"),
        (["--checkpoint", "CORRUPT"], "cannot load the weights"),
        (["--checkpoint", "no-such-model"], "shipped models: nuclei-unet16"),
        (["--out", "NOT-A-DIR/results"], "not writable"),
    ],
)
def test_bad_configs_are_one_line_before_any_work(
    flags: list[str],
    reason: str,
    slide_path: Path,
    tmp_path: Path,
    corrupt_checkpoint: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    flags = [
        f.replace("CORRUPT", str(corrupt_checkpoint)).replace("NOT-A-DIR", str(a_file))
        for f in flags
    ]
    out = tmp_path / "results"
    argv = ["segment", str(slide_path), "--out", str(out), *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and reason in err[0], err
    assert not (out / "summary.csv").exists()  # no work was done


def test_weights_that_do_not_fit_their_card_fail_in_one_line_with_nothing_written(
    slide_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The driver checks checkpoints without torch; weights of another width pass that check,
    fail in the predictors, and are then reported in one line."""
    from wsi_pipeline.checkpoint import resolve_checkpoint

    wider = tmp_path / "wider"
    shutil.copytree(resolve_checkpoint(None), wider)
    card = json.loads((wider / "model.json").read_text())
    card["kwargs"]["base_channels"] *= 2
    (wider / "model.json").write_text(json.dumps(card))
    out = tmp_path / "results"
    argv = ["segment", str(slide_path), "--out", str(out), "--checkpoint", str(wider)]
    assert main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot load the weights" in errors[0], errors
    assert "do not match" in errors[0]
    assert not (out / "summary.csv").exists()
    assert not list(out.glob("*.geojson*")) and not list(out.glob(f"{TMP_PREFIX}*"))


def test_the_segment_driver_runs_without_torch_and_reports_only_its_progress(
    slide_path: Path, tmp_path: Path
) -> None:
    """The command line's process plans, stitches and writes; only the predictors load torch.
    Run with torch made unimportable in the driver, joined to the tests' Ray. Its stderr has
    the job's progress in tiles, not Ray Data's per-operator progress logs."""
    import subprocess
    import sys

    import ray

    code = (
        "import sys; sys.modules['torch'] = None;"
        "from wsi_pipeline.cli.main import main; sys.exit(main(sys.argv[1:]))"
    )
    out = tmp_path / "results"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    argv = [sys.executable, "-c", code, "segment", str(slide_path), "--out", str(out)]
    start = time.perf_counter()
    run = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    seconds = time.perf_counter() - start
    assert run.returncode == 0, run.stderr[-2000:]
    # The profile's start-up: the command's seconds before the job, then to its first tile.
    profile = json.loads((out / "synthetic.json").read_text())["profile"]
    assert 0 < profile["before_job_s"] < profile["before_job_s"] + profile["first_tile_s"] < seconds
    row = summary(out)["synthetic.tiff"]
    assert row["status"] == "complete" and int(row["nuclei"]) > 0
    assert f"segment 1 slides: {row['tiles']}/{row['tiles']} tiles (100 %)" in run.stderr
    assert "Dataset" not in run.stderr and "Progress" not in run.stderr, run.stderr


def test_a_failed_reingest_leaves_the_store_as_it_was(tmp_path: Path, capsys) -> None:
    from wsi_pipeline.train.store import open_store

    data = write_folder_dataset(tmp_path / "ds", n=3, size=64)
    store = str(tmp_path / "train.zarr")
    assert main(["ingest", str(data), "--out", store]) == 0
    before = open_store(store)
    pixels = {key: before.read(key)[0].copy() for key in before.keys(splits=None)}
    # Re-ingest after the images changed size, with one mask that no longer matches.
    for i in range(3):
        Image.new("RGB", (80, 80), "white").save(data / "images" / f"tile{i}.png")
        Image.fromarray(np.zeros((80, 80), np.uint16)).save(data / "masks" / f"tile{i}.png")
    Image.fromarray(np.zeros((50, 50, 3), np.uint8)).save(data / "masks" / "tile2.png")
    assert main(["ingest", str(data), "--out", store]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tile2.png" in err[-1] and "one channel" in err[-1]
    after = open_store(store)
    assert after.items == before.items
    for key in after.keys(splits=None):
        rgb, labels = after.read(key)
        assert rgb.shape[:2] == labels.shape == (after.items[key].height, after.items[key].width)
        assert np.array_equal(rgb, pixels[key])
    assert not [p for p in Path(store).iterdir() if p.name.startswith(".staging")]


def test_qupath_ingest_skips_malformed_features_and_refuses_malformed_json(
    slide_path: Path, tmp_path: Path, capsys, caplog: pytest.LogCaptureFixture
) -> None:
    good = {"type": "Polygon", "coordinates": [[[100, 100], [140, 100], [140, 140], [100, 100]]]}
    features = [
        {"type": "Feature", "geometry": good, "properties": {}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[["a", 1]]]}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]}},
    ]
    path = tmp_path / "nuclei.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    store = str(tmp_path / "q.zarr")
    assert main(["ingest-qupath", str(slide_path), str(path), "--out", store]) == 0
    assert "skipped 2 malformed features" in caplog.text
    path.write_text('{"type": "FeatureCollection", "features": [')
    assert main(["ingest-qupath", str(slide_path), str(path), "--out", store]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not valid GeoJSON" in err[0]


def test_one_line_reasons_for_configs_previews_and_info(
    slide_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("tile: 512\n  overlap: [1,\n")
    bad_geojson = tmp_path / "bad.geojson"
    bad_geojson.write_text("{not json")
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes(slide_path.read_bytes()[:3000])
    calls = [
        (["segment", str(slide_path), "--out", str(tmp_path / "o"), "--config", str(bad_yaml)],
         "not valid YAML"),
        (["preview", str(slide_path), str(bad_geojson), "--out", str(tmp_path / "p.png")],
         "not valid GeoJSON"),
        (["preview", str(slide_path), str(bad_geojson), "--out", str(tmp_path / "p.png"),
          "--region", "0,0,0,10"], "must be positive"),
        (["info", str(truncated)], "truncated.svs"),
    ]  # fmt: skip
    for argv, reason in calls:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and reason in err[0], (argv, err)
