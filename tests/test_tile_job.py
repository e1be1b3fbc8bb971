"""The tiling job as a user meets it: ``wsi-pipeline tile`` on local Ray."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import shared_path

from wsi_pipeline.cli.main import main
from wsi_pipeline.slides import image_store as store
from wsi_pipeline.slides.slide import open_slide
from wsi_pipeline.slides.tiling import Box
from wsi_pipeline.slides.tissue import TissueMask

pytestmark = pytest.mark.usefixtures("ray_local")


def summary(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "summary.csv") as f:
        return {Path(row["slide"]).name: row for row in csv.DictReader(f)}


def tissue_chunks(store_path: Path) -> list[Box]:
    """Chunks of a store that the tissue mask keeps (the only ones the job reads)."""
    group = zarr.open_group(store_path, mode="r")
    layout = store.read_layout(str(store_path))
    tissue = TissueMask(group["tissue"][:] > 0, group.attrs["wsi_pipeline"]["tissue"]["mpp"], 0)
    t = layout.tile
    boxes = [
        Box(x, y, x + t, y + t)
        for y in range(0, layout.height, t)
        for x in range(0, layout.width, t)
    ]
    return [b for b in boxes if tissue.has_tissue(b, layout.mpp, 0)]


def assert_store_matches_slide(store_path: Path, slide_file: Path, **open_kw) -> None:
    layout = store.read_layout(str(store_path))
    chunks = tissue_chunks(store_path)
    assert chunks
    # Compared with the backend the store was read with: at levels whose downsample is not an
    # integer OpenSlide resamples at sub-pixel offsets while tiffslide returns raw pixels.
    slide = open_slide(slide_file, layout.backend, **open_kw)
    for box in chunks[:: max(1, len(chunks) // 4)]:
        expected = slide.read_region(
            box.x0 * layout.downsample,
            box.y0 * layout.downsample,
            box.width,
            box.height,
            mpp=layout.mpp,
        )
        got = store.read_region(str(store_path), box)
        assert np.abs(got.astype(int) - expected).mean() <= 2, (layout.backend, box)


def test_batch_with_bad_slides(tmp_path: Path, slide_path: Path, capsys) -> None:
    text = tmp_path / "text.svs"
    text.write_text("not a slide")
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes(slide_path.read_bytes()[: slide_path.stat().st_size // 3])
    out = tmp_path / "tiles"
    argv = [str(slide_path), str(text), str(truncated), str(tmp_path / "missing.svs")]
    status = main(["tile", *argv, "--out", str(out), "--mpp", "0.5", "--tile", "256"])
    assert status == 1
    rows = summary(out)
    assert rows["synthetic.tiff"]["status"] == "complete"
    assert int(rows["synthetic.tiff"]["tiles"]) > 0
    for name, reason in [
        ("text.svs", "not a readable slide"),
        ("truncated.svs", "truncated.svs"),
        ("missing.svs", "no such file"),
    ]:
        assert rows[name]["status"] == "failed"
        assert reason in rows[name]["reason"] and "\n" not in rows[name]["reason"]
    store_path = out / "synthetic.ome.zarr"
    assert store.is_complete(str(store_path))
    assert_store_matches_slide(store_path, slide_path)
    # Background tiles were never written: the corner chunk is absent, read back as white.
    assert (store.read_region(str(store_path), Box(0, 0, 64, 64)) == 255).all()
    assert "1 complete, 0 skipped, 3 failed" in capsys.readouterr().out


def test_resume_finishes_only_missing_shards(tmp_path: Path, slide_path: Path) -> None:
    out = tmp_path / "tiles"
    args = ["tile", str(slide_path), "--out", str(out), "--tile", "128", "--shard-tiles", "2"]
    assert main(args) == 0
    tiles = int(summary(out)["synthetic.tiff"]["tiles"])
    assert int(summary(out)["synthetic.tiff"]["tiles_written"]) == tiles > 8
    path = out / "synthetic.ome.zarr"
    reference = {k: zarr.open_array(path / k, mode="r")[:] for k in ("0", "1", "2")}
    layout = store.read_layout(str(path))
    assert layout.shards.cols * layout.shards.rows > 6

    # Simulate a run killed midway: not complete, two written shards lost with their markers.
    (path / store.COMPLETE).unlink()
    all_shards = list(layout.shards)
    lost = [all_shards[len(all_shards) // 2], all_shards[len(all_shards) // 2 + 1]]
    for col, row in all_shards:
        if (col, row) not in lost:
            store.mark_shard_done(str(path), col, row)
    for col, row in lost:
        for level in ("0", "1", "2"):
            shard_file = path / level / "c" / "0" / str(row) / str(col)
            shard_file.unlink(missing_ok=True)

    assert main(args) == 0
    rows = summary(out)
    assert rows["synthetic.tiff"]["status"] == "complete"
    assert int(rows["synthetic.tiff"]["tiles_written"]) <= 2 * 4  # only the lost shards redone
    assert int(rows["synthetic.tiff"]["tiles"]) == tiles  # the summary counts the whole store
    for level, expected in reference.items():
        assert np.array_equal(zarr.open_array(path / level, mode="r")[:], expected), level

    assert main(args) == 0  # a third run skips the complete slide
    assert summary(out)["synthetic.tiff"]["status"] == "skipped"


def test_user_errors_are_one_line(tmp_path: Path, slide_path: Path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["tile", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "no slides" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("mpp: 0.5\ntile_size: 256\n")
    assert main(["tile", str(slide_path), "--out", str(tmp_path / "o"), "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: config error: tile_size: unknown key"


def test_info_cli(slide_path: Path, capsys) -> None:
    assert main(["info", str(slide_path)]) == 0
    out = capsys.readouterr().out
    assert "3000x2000" in out and "0.25 µm/px" in out and "tissue" in out


@pytest.mark.shared_data
def test_real_slides(tmp_path: Path, capsys) -> None:
    cmu = shared_path("slides", "CMU-1-Small-Region.svs")
    tcga = shared_path("slides", "TCGA-CR-7395-01A-01-TS1.svs")
    assert main(["info", "--json", str(cmu)]) == 0
    info = capsys.readouterr().out
    assert '"mpp": 0.499' in info and '"level_dimensions": [[2220, 2967]]' in info

    for backend in ("openslide", "tiffslide"):
        out = tmp_path / backend
        argv = ["tile", str(cmu), str(tcga), "--out", str(out), "--backend", backend]
        assert main([*argv, "--mpp", "1.0"]) == 1
        rows = summary(out)
        assert rows["CMU-1-Small-Region.svs"]["status"] == "complete"
        assert "--mpp-override" in rows["TCGA-CR-7395-01A-01-TS1.svs"]["reason"]
        assert_store_matches_slide(out / "CMU-1-Small-Region.ome.zarr", cmu)

        tcga_argv = ["tile", str(tcga), "--out", str(out), "--backend", backend]
        assert main([*tcga_argv, "--mpp", "4.0", "--mpp-override", "2.0"]) == 0
        tcga_store = out / "TCGA-CR-7395-01A-01-TS1.ome.zarr"
        assert store.read_layout(str(tcga_store)).backend == backend
        assert_store_matches_slide(tcga_store, tcga, mpp_override=2.0)
