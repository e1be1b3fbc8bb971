"""The house: no import cycle, declared dependencies used, formats checked by outside tools,
CLI flags that cannot drift from the config defaults."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest
import zarr

from wsi_pipeline.cli.main import build_parser, main
from wsi_pipeline.config import SegmentConfig, TileConfig

PACKAGE = Path(__file__).resolve().parents[1] / "wsi_pipeline"
PYPROJECT = PACKAGE.parent / "pyproject.toml"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every module of the package and the package modules it imports (lazy imports too)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x / from .x import y
                    base = ".".join(
                        [*package.split(".")[: len(package.split(".")) - node.level + 1], base]
                    ).rstrip(".")
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of ``graph`` as a path, or [] if there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_modules() -> None:
    graph = import_graph()
    assert "wsi_pipeline.segment.job" in graph and len(graph) > 40
    assert find_cycle(graph) == []


def test_no_import_cycle_between_subpackages() -> None:
    """The folders are layers: slides → segment → train → cli, over a small core."""

    def folder(module: str) -> str:
        return ".".join(module.split(".")[:2])

    graph: dict[str, set[str]] = {}
    for module, targets in import_graph().items():
        graph.setdefault(folder(module), set()).update(
            folder(t) for t in targets if folder(t) != folder(module)
        )
    assert find_cycle(graph) == []
    assert "wsi_pipeline.segment" not in graph["wsi_pipeline.slides"]
    assert "wsi_pipeline.train" not in graph["wsi_pipeline.segment"]
    assert "wsi_pipeline.cli" not in set().union(*(v for k, v in graph.items() if "cli" not in k))


# Distributions whose import name differs, and the two that are never imported by name:
# openslide-bin ships the native library openslide-python loads; imagecodecs is tifffile's
# JPEG/JPEG 2000 codec.
IMPORT_NAMES = {
    "openslide-python": "openslide",
    "scikit-image": "skimage",
    "pillow": "PIL",
    "pyyaml": "yaml",
    "openslide-bin": None,
    "imagecodecs": None,
}


def test_every_declared_dependency_is_imported() -> None:
    declared = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    names = [re.split(r"[\[<>=~ ]", spec, maxsplit=1)[0].lower() for spec in declared]
    imported = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported.add(node.module.split(".")[0])
    unused = [
        n
        for n in names
        if IMPORT_NAMES.get(n, n) is not None and IMPORT_NAMES.get(n, n) not in imported
    ]
    assert unused == []


def test_both_stores_pass_the_ome_ngff_validator(tmp_path: Path) -> None:
    from ome_zarr_models.v05 import Image, ImageLabel

    from wsi_pipeline.segment.label_store import create_label_store
    from wsi_pipeline.slides.image_store import StoreLayout, create_store, pyramid_levels

    layout = StoreLayout(
        source="s.svs",
        backend="tiffslide",
        level0_width=2048,
        level0_height=1024,
        source_mpp=0.25,
        mpp=0.5,
        width=1024,
        height=512,
        tile=256,
        shard=512,
        levels=pyramid_levels(1024, 512, 256),
    )
    create_store(str(tmp_path / "a.ome.zarr"), layout, np.ones((4, 8), bool), 8.0, name="a")
    image = Image.from_zarr(zarr.open_group(tmp_path / "a.ome.zarr", mode="r"))
    scales = [
        d.coordinateTransformations[0].scale for d in image.ome_attributes.multiscales[0].datasets
    ]
    assert scales == [[1.0, 0.5, 0.5], [1.0, 1.0, 1.0], [1.0, 2.0, 2.0]]
    create_label_store(
        str(tmp_path / "l.zarr"), 1024, 512, mpp=0.5, chunk=256, shard=512, source="s.svs"
    )
    label = ImageLabel.from_zarr(zarr.open_group(tmp_path / "l.zarr", mode="r"))
    assert label.ome_attributes.image_label.source.image == "s.svs"


def _subparser(name: str):
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices[name]


@pytest.mark.parametrize(("command", "model"), [("tile", TileConfig), ("segment", SegmentConfig)])
def test_flag_help_states_the_config_default(command: str, model: type) -> None:
    checked = 0
    for action in _subparser(command)._actions:
        field = model.model_fields.get(action.dest)
        if field is None or field.default is None or action.dest == "gzip":
            continue
        assert f"(default {field.default})" in (action.help or ""), action.option_strings
        checked += 1
    assert checked >= 4


def test_tile_has_no_overlap_flag_and_old_stores_with_one_still_load(tmp_path: Path) -> None:
    from wsi_pipeline.slides.image_store import read_layout

    with pytest.raises(SystemExit):
        build_parser().parse_args(["tile", "s.svs", "--out", "o", "--overlap", "8"])
    group = zarr.open_group(tmp_path / "old.ome.zarr", mode="w", zarr_format=3)
    attrs = {
        "source": "s.svs", "backend": "tiffslide", "level0_width": 100, "level0_height": 80,
        "source_mpp": 0.25, "mpp": 0.5, "width": 50, "height": 40, "tile": 32, "overlap": 0,
        "shard": 64, "levels": 1, "downsample": 2.0,
    }  # fmt: skip
    group.attrs["wsi_pipeline"] = attrs
    assert read_layout(str(tmp_path / "old.ome.zarr")).tile == 32


@pytest.mark.parametrize("command", ["tile", "segment"])
def test_url_outputs_are_refused_in_one_line_before_any_work(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main([command, str(tmp_path / "missing.svs"), "--out", "s3://bucket/results"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1 and "URL outputs are not supported" in err[0]


def test_processes_that_run_no_model_import_no_torch() -> None:
    """The segment job's read and post-process tasks, and the command line, import what they
    run without torch (hundreds of MB per Ray worker process)."""
    import subprocess
    import sys

    code = (
        "import sys, wsi_pipeline.segment.job, wsi_pipeline.cli.main, wsi_pipeline.slides.tile_job;"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"
