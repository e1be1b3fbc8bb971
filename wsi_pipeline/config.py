"""Job configuration: pydantic models loaded from YAML, with command-line overrides.

Every model forbids unknown keys, so a typo is an error naming the key. Units are explicit in the
field names (``mpp`` is µm per pixel, ``*_um2`` square micrometres).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ModelT = TypeVar("ModelT", bound=BaseModel)
# Tiles larger than this would need GBs per predictor batch (probabilities are float32 x K).
MAX_TILE = 4096


class ConfigError(ValueError):
    """A configuration file or override is wrong; the message is one line naming the key."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TissueConfig(StrictModel):
    """Tissue detection on a thumbnail."""

    mask_mpp: float = Field(4.0, gt=0, description="resolution of the tissue mask, µm/px")
    min_saturation: float = Field(0.07, ge=0, le=1, description="floor of the Otsu threshold")
    max_saturation: float = Field(
        0.15, ge=0, le=1, description="ceiling of the Otsu threshold (regions with no glass)"
    )
    min_area_um2: float = Field(
        2_000.0, ge=0, description="drop tissue specks smaller than this, µm²"
    )
    min_fraction: float = Field(
        0.0, ge=0, le=1, description="a tile is kept if at least this share is tissue (0: any)"
    )


class TileConfig(StrictModel):
    """``wsi-pipeline tile``: slides → one OME-Zarr image per slide."""

    mpp: float = Field(0.5, gt=0, description="target resolution, µm/px")
    tile: int = Field(512, ge=32, description="tile (= Zarr chunk) size in px at mpp")
    shard_tiles: int = Field(4, ge=1, description="tiles per shard side (one writer per shard)")
    backend: Literal["auto", "openslide", "tiffslide"] = "auto"
    mpp_override: float | None = Field(
        None, gt=0, description="level-0 µm/px, if the slide lacks it"
    )
    tissue: TissueConfig = TissueConfig()
    workers: int | None = Field(
        None, ge=1, description="concurrent shard tasks (default: all CPUs)"
    )
    overwrite: bool = Field(False, description="rewrite stores that are already complete")


def _format_error(error: ValidationError) -> str:
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "config"
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    value = first.get("input")
    whole = not first["loc"]  # a check across fields: its input is the whole config
    shown = "" if whole or first["type"] in {"extra_forbidden", "missing"} else f" (got {value!r})"
    message = message.removeprefix("Value error, ")
    more = len(error.errors()) - 1
    return f"config error: {key}: {message}{shown}" + (f"; and {more} more" if more else "")


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config error: {dotted}: {part} is not a section")
    node[leaf] = value


def parse_assignments(assignments: list[str]) -> dict[str, Any]:
    """``["tissue.min_fraction=0.1", ...]`` → nested dict, values parsed as YAML scalars."""
    data: dict[str, Any] = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"config error: {item!r}: expected KEY=VALUE")
        _set_dotted(data, key.strip(), yaml.safe_load(raw))
    return data


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def merge_overrides(flags: dict[str, Any], assignments: dict[str, Any]) -> dict[str, Any]:
    """Flags, then ``--set`` assignments, deeper: ``--set data.x=1`` changes one key of a
    ``data`` section a flag set, instead of replacing the section. A flag left at ``None`` was
    not given and is dropped; ``--set key=null`` sets a null."""
    given = {k: v for k, v in flags.items() if v is not None}
    return _merge(given, assignments)


def _yaml_reason(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where (PyYAML's own text spans lines)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{problem}, line {mark.line + 1} column {mark.column + 1}" if mark else problem


def load_config(
    model: type[ModelT], path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> ModelT:
    """Build ``model`` from a YAML file (optional) updated with ``overrides`` (a ``None`` sets a
    null; :func:`merge_overrides` drops flags that were not given).

    Raises:
        ConfigError: missing or malformed file, unknown key, or invalid value.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config error: {path}: no such file") from None
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"config error: {path}: not valid YAML ({_yaml_reason(exc)})"
            ) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config error: {path}: expected a mapping at the top level")
        data = loaded or {}
    try:
        return model.model_validate(_merge(data, overrides or {}))
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from None


def dump_config(config: BaseModel) -> str:
    """The resolved config as YAML, to save beside every output it produced."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def save_config(config: BaseModel, path: str) -> None:
    """Write :func:`dump_config` atomically to a local path or URL."""
    from wsi_pipeline import storage

    storage.write_bytes_atomic(path, dump_config(config).encode())


def flag_help(model: type[BaseModel], name: str) -> str:
    """A command-line flag's help from its config field: the description and the default, so
    the two can never drift apart."""
    field = model.model_fields[name]
    default = "" if field.default is None else f" (default {field.default})"
    return f"{field.description or name}{default}"


class SegmentConfig(StrictModel):
    """``wsi-pipeline segment``: slides (or tiling stores) → nuclei polygons per slide."""

    checkpoint: str | None = Field(
        None, description="checkpoint directory or shipped model name (default: the default model)"
    )
    tile: int = Field(512, ge=64, le=MAX_TILE, description="tile size in px at the model's mpp")
    overlap: int = Field(
        64, ge=0, description="px at the model's mpp; at least the largest nucleus diameter"
    )
    batch_size: int | None = Field(
        None,
        ge=1,
        description="tiles per predictor call (default: 8 on a GPU; 1 on a CPU, where single "
        "tiles run faster and the first one is back sooner)",
    )
    tta: bool | None = Field(
        None,
        description="flip test-time augmentation (3x the model's compute); "
        "null: on where a GPU runs the model, off on a CPU",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where the model runs")
    predictors: int | None = Field(
        None,
        ge=1,
        description="predictor actors (default: one per GPU; on a CPU, up to one per "
        "predictor_calls cores, started as tiles queue, or one without "
        "postprocess_in_predictor); with postprocess_in_predictor, the most the pool grows to",
    )
    cpus_per_predictor: float | None = Field(
        None,
        gt=0,
        description="logical CPUs of a predictor actor (default: 1 on a GPU host; on a CPU "
        "host 0.75 per concurrent call)",
    )
    predictor_calls: int | None = Field(
        None,
        ge=1,
        description="concurrent calls, each a model, of a CPU predictor actor that "
        "post-processes (default: 2 where every node has 2 CPUs or more and predictor_threads "
        "is at most 1, else 1)",
    )
    predictor_threads: int | None = Field(
        None,
        ge=1,
        description="a CPU predictor's torch threads per call (default: 1 when it "
        "post-processes, else all cores of its node)",
    )
    postprocess_in_predictor: bool | None = Field(
        None,
        description="read and post-process each tile in the predictor actor that makes its "
        "probabilities (default: on a CPU, where one single-threaded model per core does more "
        "work per core than one on every core; on a GPU, CPU tasks read and post-process "
        "while the GPU runs)",
    )
    tensor_instances: bool | None = Field(
        None,
        description="find the instances as tensor operations in the predictor, beside the "
        "probabilities, so only labels and the background probability leave it (null: where "
        "a GPU runs a model of the '3class' or 'distance' target mode; on a CPU scipy's "
        "watershed is ~10x faster)",
    )
    backend: Literal["auto", "openslide", "tiffslide"] = "auto"
    mpp_override: float | None = Field(
        None, gt=0, description="level-0 µm/px, if the slide lacks it"
    )
    tissue: TissueConfig = TissueConfig()
    tissue_margin_um: float | None = Field(
        16.0,
        ge=0,
        description="drop nuclei whose centre lies farther than this outside the tissue mask "
        "(specks on the glass); null keeps every nucleus",
    )
    simplify: float = Field(0.0, ge=0, description="polygon simplification, px at the model's mpp")
    subpixel: bool = Field(
        True,
        description="outlines from the nucleus probability (sub-pixel), not the model's pixel grid",
    )
    seam_margin: float = Field(8.0, ge=0, description="px around core edges checked for duplicates")
    gzip: bool = Field(True, description="write <slide>.geojson.gz rather than .geojson")
    labels: bool = Field(False, description="also write <slide>.labels.zarr (uint32 instances)")
    overwrite: bool = Field(False, description="redo slides that are already complete")

    @model_validator(mode="after")
    def _overlap_inside_tile(self) -> SegmentConfig:
        if self.overlap >= self.tile:
            raise ValueError(f"overlap {self.overlap} must be smaller than tile {self.tile}")
        return self
