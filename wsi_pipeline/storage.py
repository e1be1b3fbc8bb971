"""Paths that may be local or fsspec URLs: joining, existence, atomic small writes.

Outputs are atomic: a file appears under its final name only once complete. Locally that is a
temporary file and a rename; on object stores a single ``put`` is already all-or-nothing.
"""

from __future__ import annotations

import os
import shutil
import uuid
from typing import Any

import fsspec


def is_url(path: str) -> bool:
    """Whether ``path`` is an fsspec URL (``s3://``, ``gs://``, ``http://`` …), not a local file."""
    return "://" in path and not path.startswith("file://")


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


TMP_PREFIX = ".tmp-"


def temporary_path(path: str) -> str:
    """A fresh sibling name for writing ``path`` before it is renamed into place.

    The name holds this process's id, so that :func:`remove_stale_temporaries` never removes
    what a live run is still writing. Files created under it honour the umask (``mkstemp``'s
    would be private to their owner, and results on shared storage are read by others).
    """
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    return os.path.join(directory, f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}-{name}")


def remove_stale_temporaries(directory: str) -> None:
    """Remove the temporary files and folders that dead processes of this host left."""
    for name in os.listdir(directory):
        if not name.startswith(TMP_PREFIX):
            continue
        pid = name[len(TMP_PREFIX) :].partition("-")[0]
        if pid.isdigit() and _alive(int(pid)):
            continue
        path = os.path.join(directory, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write ``data`` so that ``path`` is never seen half-written."""
    if is_url(path):
        fs, inner = filesystem(path)
        fs.pipe_file(inner, data)
        return
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
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
