"""Slide inputs: paths, globs, directories, CSV manifests and fsspec URLs → a list of slides."""

from __future__ import annotations

import csv
import glob
import os
from pathlib import Path

from wsi_pipeline.storage import is_url

SLIDE_SUFFIXES = (
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".mrxs",
    ".scn",
    ".vms",
    ".vmu",
    ".bif",
    ".svslide",
)


STORE_SUFFIX = ".ome.zarr"


class InputError(ValueError):
    """The inputs name no slides at all (one line, saying where we looked)."""


def slide_stem(path: str) -> str:
    """A slide's name without directory and extension (``a/b/x.ome.tiff`` → ``x``)."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    for suffix in (STORE_SUFFIX, ".ome.tiff", ".ome.tif", *SLIDE_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _from_directory(directory: str) -> list[str]:
    names = [n for n in sorted(os.listdir(directory)) if not n.startswith(".")]
    found = [os.path.join(directory, n) for n in names if n.lower().endswith(SLIDE_SUFFIXES)]
    # A directory of tiling stores (``wsi-pipeline tile`` output) is also a set of inputs.
    found += [os.path.join(directory, n) for n in names if n.endswith(STORE_SUFFIX)]
    if not found:
        raise InputError(
            f"{directory}: no slides ({', '.join(SLIDE_SUFFIXES)}) or {STORE_SUFFIX} stores here"
        )
    return found


def _from_manifest(manifest: str) -> list[str]:
    """Slides listed in a CSV's ``path`` column (or its first column), relative to the CSV."""
    base = os.path.dirname(os.path.abspath(manifest))
    with open(manifest, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise InputError(f"{manifest}: empty manifest")
    header = [c.strip().lower() for c in rows[0]]
    column = header.index("path") if "path" in header else 0
    body = rows[1:] if "path" in header else rows
    paths = [r[column].strip() for r in body if r and r[column].strip()]
    if not paths:
        raise InputError(f"{manifest}: the manifest lists no slides")
    return [p if is_url(p) or os.path.isabs(p) else os.path.join(base, p) for p in paths]


def expand_inputs(items: list[str]) -> list[str]:
    """Every slide named by ``items``, in order, without duplicates.

    A path that does not exist is kept, so the batch reports it as a failed slide rather than
    dropping it silently. A glob that matches nothing, or a directory without slides, is an error.
    """
    slides: list[str] = []
    for item in items:
        if is_url(item):
            slides.append(item)
        elif any(ch in item for ch in "*?["):
            matches = sorted(glob.glob(item))
            if not matches:
                raise InputError(f"{item}: the pattern matches no files")
            slides.extend(matches)
        elif os.path.isdir(item) and not item.rstrip("/").endswith((".mrxs", STORE_SUFFIX)):
            slides.extend(_from_directory(item))
        elif item.lower().endswith(".csv") and os.path.isfile(item):
            slides.extend(_from_manifest(item))
        else:
            slides.append(item)
    if not slides:
        raise InputError("no slides given")
    unique = list(dict.fromkeys(slides))
    stems: dict[str, str] = {}
    for slide in unique:
        other = stems.setdefault(slide_stem(slide), slide)
        if other != slide:
            raise InputError(f"{slide} and {other} share the name {slide_stem(slide)!r}")
    return unique


def source_fingerprint(path: str) -> dict[str, object]:
    """What identifies a slide (or tiling store) between runs: its absolute path or URL, size and
    modification time. Resuming into an output whose fingerprint differs is refused."""
    from wsi_pipeline import storage

    fs, inner = storage.filesystem(path)
    target = storage.join(path, "zarr.json") if inner.rstrip("/").endswith(".zarr") else path
    try:
        info = fs.info(storage.filesystem(target)[1])
    except (OSError, ValueError):
        info = {}
    mtime = info.get("mtime") or info.get("LastModified") or info.get("created")
    return {
        "path": path if is_url(path) else os.path.abspath(path),
        "size": info.get("size"),
        "mtime": round(float(mtime), 3) if isinstance(mtime, int | float) else str(mtime or ""),
    }


def fingerprint_mismatch(recorded: dict[str, object] | None, path: str) -> str:
    """Why the output recorded for ``recorded`` is not this slide's (``""`` if it is, or if the
    output predates fingerprints)."""
    if not recorded:
        return ""
    current = source_fingerprint(path)
    if recorded.get("path") != current["path"]:
        return f"holds the results of another slide with the same name, {recorded.get('path')}"
    if (recorded.get("size"), recorded.get("mtime")) != (current["size"], current["mtime"]):
        return "was made from an earlier version of this slide (its size or time changed)"
    return ""
