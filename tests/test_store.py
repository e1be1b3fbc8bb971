from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from wsi_pipeline.slides import image_store as store
from wsi_pipeline.slides.tiling import Box


def layout(**kw) -> store.StoreLayout:
    base = dict(
        source="x.svs",
        backend="openslide",
        level0_width=1000,
        level0_height=600,
        source_mpp=0.25,
        mpp=0.5,
        width=500,
        height=300,
        tile=64,
        shard=128,
        levels=3,
    )
    return store.StoreLayout(**{**base, **kw})


def test_pyramid_levels_stop_at_tile_and_min_chunk() -> None:
    assert store.pyramid_levels(500, 300, 512) == 1
    assert store.pyramid_levels(20000, 20000, 512) == 5  # chunk 512 >> 4 = 32
    assert store.pyramid_levels(3000, 3000, 512) == 4  # 3000 >> 3 = 375 <= 512
    assert store.pyramid_levels(5000, 5000, 96) == 2  # 96 / 4 = 24 < MIN_CHUNK


def test_ome_attributes_and_arrays(tmp_path: Path) -> None:
    path = str(tmp_path / "s.ome.zarr")
    lay = layout()
    store.create_store(path, lay, np.ones((10, 20), bool), 8.0, name="s")
    group = zarr.open_group(path, mode="r")
    ome = group.attrs["ome"]
    assert ome["version"] == "0.5"
    axes = [a["name"] for a in ome["multiscales"][0]["axes"]]
    assert axes == ["c", "y", "x"]
    scales = [d["coordinateTransformations"][0]["scale"] for d in ome["multiscales"][0]["datasets"]]
    assert scales == [[1.0, 0.5, 0.5], [1.0, 1.0, 1.0], [1.0, 2.0, 2.0]]
    meta = group.attrs["wsi_pipeline"]
    assert meta["downsample"] == 2.0 and meta["source"] == "x.svs" and meta["tissue"]["mpp"] == 8.0
    assert group["0"].shape == (3, 300, 500) and group["0"].chunks == (3, 64, 64)
    assert group["0"].shards == (3, 128, 128) and group["1"].shards == (3, 64, 64)
    assert group["2"].shape == (3, 75, 125)
    assert store.read_layout(path) == lay


def test_write_shard_all_levels_and_resume_markers(tmp_path: Path) -> None:
    path = str(tmp_path / "s.ome.zarr")
    lay = layout()
    store.create_store(path, lay, np.ones((4, 4), bool), 8.0)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (3, 128, 128), dtype=np.uint8)
    store.write_shard(path, lay, 3, 2, pixels)  # x 384..500 (cut), y 256..300 (cut)
    got = store.read_region(path, Box(384, 256, 512, 384))
    assert np.array_equal(got[:44, :116], np.moveaxis(pixels, 0, -1)[:44, :116])
    assert (got[44:] == 255).all() and (got[:, 116:] == 255).all()
    level1 = store.read_region(path, Box(192, 128, 250, 150), level=1)
    expected = np.moveaxis(store.downsample2(pixels), 0, -1)[:22, :58]
    assert np.array_equal(level1, expected)
    assert store.done_shards(path) == {(3, 2)}
    store.mark_complete(path, {"ok": True})
    assert store.is_complete(path) and store.done_shards(path) == set()


def test_downsample2_is_rounded_mean() -> None:
    image = np.array([[[0, 1], [2, 3]]], dtype=np.uint8)
    assert store.downsample2(image).tolist() == [[[2]]]  # (0+1+2+3+2)//4
