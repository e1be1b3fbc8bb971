from __future__ import annotations

from pathlib import Path

import pytest

from wsi_pipeline.config import (
    ConfigError,
    SegmentConfig,
    TileConfig,
    load_config,
    merge_overrides,
    parse_assignments,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_shipped_tile_config_loads() -> None:
    config = load_config(TileConfig, CONFIGS / "tile.yaml")
    assert config.mpp == 0.5 and config.tile == 512 and config.tissue.mask_mpp == 4.0


def test_overrides_win_flags_not_given_are_ignored_and_set_null_is_null(tmp_path: Path) -> None:
    flags = {"mpp": 0.25, "tile": None, "workers": None}  # tile and workers: flags not given
    sets = parse_assignments(["workers=3", "tissue.min_area_um2=500"])
    config = load_config(TileConfig, CONFIGS / "tile.yaml", merge_overrides(flags, sets))
    assert (config.mpp, config.tile, config.workers) == (0.25, 512, 3)
    assert config.tissue.min_area_um2 == 500 and config.tissue.min_saturation == 0.07
    path = tmp_path / "segment.yaml"
    path.write_text("mpp_override: 0.5\ntile: 256\n")
    config = load_config(
        SegmentConfig, path, merge_overrides({}, parse_assignments(["mpp_override=null"]))
    )
    assert config.mpp_override is None and config.tile == 256


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("mpp: 0.5\ntiel: 256\n", "config error: tiel: unknown key"),
        ("tissue:\n  min_fractoin: 0.1\n", "config error: tissue.min_fractoin: unknown key"),
        ("mpp: -1\n", "config error: mpp: Input should be greater than 0 (got -1)"),
        ("backend: pillow\n", "config error: backend:"),
        ("- a\n- b\n", "expected a mapping"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(TileConfig, path)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(TileConfig, "nope.yaml")


def test_assignments_parse_nested_yaml_scalars() -> None:
    assert parse_assignments(["tissue.min_fraction=0.2", "overwrite=true"]) == {
        "tissue": {"min_fraction": 0.2},
        "overwrite": True,
    }
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_assignments(["mpp"])
