"""Paths that may be local or fsspec URLs: joining, existence, atomic small writes.

Outputs are atomic: a file appears under its final name only once complete. Locally that is a
temporary file and a rename; on object stores a single ``put`` is already all-or-nothing.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import tempfile
from typing import Any

import fsspec

from wsi_pipeline.slide import is_url


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for local paths and URLs alike."""
    if is_url(base):
        return "/".join([base.rstrip("/"), *parts])
    return os.path.join(base, *parts)


def filesystem(path: str) -> tuple[Any, str]:
    """The fsspec filesystem and the in-filesystem path of ``path``."""
    return fsspec.core.url_to_fs(path)


def exists(path: str) -> bool:
    fs, inner = filesystem(path)
    return bool(fs.exists(inner))


def makedirs(path: str) -> None:
    fs, inner = filesystem(path)
    fs.makedirs(inner, exist_ok=True)


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write ``data`` so that ``path`` is never seen half-written."""
    if is_url(path):
        fs, inner = filesystem(path)
        fs.pipe_file(inner, data)
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_bytes(path: str) -> bytes:
    fs, inner = filesystem(path)
    return bytes(fs.cat_file(inner))


def remove_tree(path: str) -> None:
    fs, inner = filesystem(path)
    if fs.exists(inner):
        fs.rm(inner, recursive=True)


def write_results_csv(results: list[Any], path: str, *, exclude: tuple[str, ...] = ()) -> None:
    """A batch summary: one CSV row per result dataclass, its fields as columns."""
    rows = [{k: v for k, v in dataclasses.asdict(r).items() if k not in exclude} for r in results]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)
