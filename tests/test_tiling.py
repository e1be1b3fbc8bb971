from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsi_pipeline.slides.tiling import Box, ShardGrid, TileGrid, grid_size

grids = st.builds(
    lambda w, h, t, frac: TileGrid(w, h, t, int(t * frac)),
    st.integers(1, 700),
    st.integers(1, 700),
    st.integers(8, 256),
    st.floats(0, 0.6),
)


@settings(max_examples=150, deadline=None)
@given(grids)
def test_cores_partition_the_grid(grid: TileGrid) -> None:
    owners = np.zeros((grid.height, grid.width), dtype=np.int32)
    for tile in grid:
        core = tile.core
        owners[core.y0 : core.y1, core.x0 : core.x1] += 1
    assert (owners == 1).all(), "every grid pixel must be owned by exactly one core"


@settings(max_examples=150, deadline=None)
@given(grids)
def test_core_keeps_half_overlap_margin_and_owner_agrees(grid: TileGrid) -> None:
    margin = grid.overlap // 2
    for tile in grid:
        box, core = tile.box, tile.core
        assert box.x0 <= core.x0 and core.x1 <= box.x1
        if tile.col > 0:
            assert core.x0 - box.x0 >= margin
        if tile.col < grid.cols - 1:
            assert box.x1 - core.x1 >= margin
        if tile.row < grid.rows - 1:
            assert box.y1 - core.y1 >= margin
        if not core.empty:
            for x, y in [(core.x0, core.y0), (core.x1 - 1, core.y1 - 1)]:
                assert grid.owner(x + 0.5, y + 0.5) == (tile.col, tile.row)


@pytest.mark.parametrize(("size", "tile", "overlap"), [(5, 512, 64), (512, 512, 64), (513, 512, 0)])
def test_small_and_exact_sizes(size: int, tile: int, overlap: int) -> None:
    grid = TileGrid(size, size, tile, overlap)
    expected = 1 if size <= tile else 2
    assert (grid.cols, grid.rows) == (expected, expected)
    last = grid.tile_at(grid.cols - 1, grid.rows - 1)
    assert last.box.x1 >= size and last.core.x1 == size


def test_stride_and_counts() -> None:
    grid = TileGrid(1000, 600, 256, 32)
    assert grid.stride == 224
    assert grid.cols == 1 + -(-(1000 - 256) // 224) == 5
    assert grid.tile_at(1, 0).box == Box(224, 0, 480, 256)
    assert grid.tile_at(1, 0).core == Box(240, 0, 464, 240)


def test_invalid_grids_raise() -> None:
    with pytest.raises(ValueError, match="overlap"):
        TileGrid(100, 100, 64, 64)
    with pytest.raises(ValueError, match="positive"):
        TileGrid(0, 100, 64, 0)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 900), st.integers(1, 900), st.sampled_from([64, 128, 256]), st.integers(1, 4))
def test_shard_chunks_cover_image_once(w: int, h: int, chunk: int, per_shard: int) -> None:
    shards = ShardGrid(w, h, chunk * per_shard)
    seen = np.zeros((h, w), dtype=np.int32)
    for col, row in shards:
        shard_box = shards.box(col, row)
        for b in shards.chunks(col, row, chunk):
            assert shard_box.x0 <= b.x0 and b.x1 <= shard_box.x1
            seen[b.y0 : b.y1, b.x0 : b.x1] += 1
    assert (seen == 1).all()


def test_grid_size_rounds_up_but_not_for_float_noise() -> None:
    assert grid_size(2220, 2967, 2.0) == (1110, 1484)
    assert grid_size(2221, 2967, 2.0) == (1111, 1484)
    assert grid_size(1000, 1000, 0.5 / 0.499) == (998, 998)  # 1000 * 0.499 / 0.5
    assert grid_size(1001, 1000, 0.5 / 0.499) == (999, 998)  # 998.998 rounds up


@settings(max_examples=60, deadline=None)
@given(grids, st.lists(st.floats(-50, 800), min_size=1, max_size=40))
def test_owners_of_many_points_are_each_points_owner(grid: TileGrid, values: list[float]) -> None:
    xs, ys = np.array(values), np.array(values[::-1])
    cols, rows = grid.owners(xs, ys)
    owners = [grid.owner(x, y) for x, y in zip(xs, ys, strict=True)]
    assert list(zip(cols.tolist(), rows.tolist(), strict=True)) == owners
