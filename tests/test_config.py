from __future__ import annotations

from pathlib import Path

import pytest

from wsi_pipeline.config import ConfigError, TileConfig, load_config, parse_assignments

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_shipped_tile_config_loads() -> None:
    config = load_config(TileConfig, CONFIGS / "tile.yaml")
    assert config.mpp == 0.5 and config.tile == 512 and config.tissue.mask_mpp == 8.0


def test_overrides_win_and_none_is_ignored() -> None:
    config = load_config(TileConfig, CONFIGS / "tile.yaml", {"mpp": 0.25, "tile": None})
    assert (config.mpp, config.tile) == (0.25, 512)


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
