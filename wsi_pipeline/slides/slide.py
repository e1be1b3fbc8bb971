"""The one way to open and read a whole-slide image, whatever the backend.

``open_slide`` returns a :class:`Slide` backed by OpenSlide (local files, every vendor format
OpenSlide knows) or tiffslide (TIFF-based formats, local or any fsspec URL). Reads are made at
an explicit resolution in µm/px, from the best pyramid level, with area averaging; pixels outside
the slide are white, identically on both backends.

Handles are not pickled: workers call :func:`open_slide` themselves (a per-process cache makes
repeated opens free), and both backends are safe to read from many threads.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
from PIL import Image

from wsi_pipeline.batch import error_line
from wsi_pipeline.storage import is_url

logger = logging.getLogger(__name__)

Backend = Literal["auto", "openslide", "tiffslide"]
BACKGROUND = 255
# A level is used for a read if its downsample is at most this much coarser than asked for:
# float noise in vendor downsamples (e.g. 2.000506) must not push reads to level 0.
_LEVEL_TOLERANCE = 1.01


class SlideError(Exception):
    """A slide cannot be opened or read; the message says which and why, in one line."""


class _Reader(Protocol):
    level_count: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    properties: Any

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Any: ...


@dataclass(frozen=True)
class SlideInfo:
    """What ``wsi-pipeline info`` prints about a slide."""

    path: str
    backend: str
    vendor: str | None
    level_count: int
    level_dimensions: list[tuple[int, int]]
    level_downsamples: list[float]
    mpp: float | None
    objective_power: float | None
    properties: dict[str, str] = field(repr=False, default_factory=dict)


class Slide:
    """An open slide. Create with :func:`open_slide`."""

    def __init__(self, path: str, backend: str, reader: _Reader, mpp: float | None) -> None:
        self.path = path
        self.backend = backend
        self._reader = reader
        self._mpp = mpp

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 ``(width, height)`` in pixels."""
        return tuple(self._reader.level_dimensions[0])  # type: ignore[return-value]

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return [tuple(d) for d in self._reader.level_dimensions]  # type: ignore[misc]

    @property
    def level_downsamples(self) -> list[float]:
        return [float(d) for d in self._reader.level_downsamples]

    @property
    def properties(self) -> dict[str, str]:
        return {str(k): str(v) for k, v in dict(self._reader.properties).items()}

    @property
    def mpp(self) -> float:
        """Level-0 resolution in µm/px; raises :class:`SlideError` if the slide does not say."""
        if self._mpp is None:
            raise SlideError(
                f"{self.path}: the slide records no resolution (µm/px); "
                "pass --mpp-override with its level-0 µm/px"
            )
        return self._mpp

    @property
    def has_mpp(self) -> bool:
        return self._mpp is not None

    def info(self) -> SlideInfo:
        props = self.properties
        objective = _first_float(props, "openslide.objective-power", "tiffslide.objective-power")
        vendor = props.get("openslide.vendor") or props.get("tiffslide.vendor")
        return SlideInfo(
            path=self.path,
            backend=self.backend,
            vendor=vendor or None,
            level_count=self._reader.level_count,
            level_dimensions=self.level_dimensions,
            level_downsamples=self.level_downsamples,
            mpp=self._mpp,
            objective_power=objective,
            properties=props,
        )

    def downsample_for(self, mpp: float) -> float:
        """Level-0 pixels per pixel at ``mpp``."""
        if mpp <= 0:
            raise ValueError(f"mpp must be positive, got {mpp}")
        return mpp / self.mpp

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample`` (within tolerance)."""
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= downsample * _LEVEL_TOLERANCE:
                best = level if ds >= self.level_downsamples[best] else best
        return best

    def read_region(self, x: float, y: float, width: int, height: int, *, mpp: float) -> np.ndarray:
        """Read ``width x height`` pixels at ``mpp`` whose top-left corner is level-0 ``(x, y)``.

        The region spans ``width * mpp / slide_mpp`` level-0 pixels across. It is read from the
        best pyramid level and resized with area averaging (bilinear when upsampling). Pixels
        outside the slide are white.

        Returns:
            ``uint8`` array of shape ``(height, width, 3)``.
        """
        if width <= 0 or height <= 0:
            raise ValueError(f"region size must be positive, got {width}x{height}")
        downsample = self.downsample_for(mpp)
        level = self.best_level(downsample)
        level_ds = self.level_downsamples[level]
        # The region in the chosen level's pixel frame (floats).
        lx0, ly0 = x / level_ds, y / level_ds
        lx1, ly1 = (x + width * downsample) / level_ds, (y + height * downsample) / level_ds
        ix0, iy0 = math.floor(lx0), math.floor(ly0)
        ix1, iy1 = math.ceil(lx1 - 1e-6), math.ceil(ly1 - 1e-6)
        patch = self._read_level_box(level, ix0, iy0, ix1 - ix0, iy1 - iy0)
        if patch.shape[1] == width and patch.shape[0] == height and lx0 == ix0 and ly0 == iy0:
            return patch
        box = (lx0 - ix0, ly0 - iy0, lx1 - ix0, ly1 - iy0)
        upsampling = width > (lx1 - lx0) + 1e-6
        resample = Image.Resampling.BILINEAR if upsampling else Image.Resampling.BOX
        out = Image.fromarray(patch).resize((width, height), resample=resample, box=box)
        return np.asarray(out)

    def _read_level_box(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Pixels ``[x, x+w) x [y, y+h)`` of ``level``, white outside the level's bounds."""
        out = np.full((h, w, 3), BACKGROUND, dtype=np.uint8)
        lw, lh = self._reader.level_dimensions[level]
        cx0, cy0, cx1, cy1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        if cx1 <= cx0 or cy1 <= cy0:
            return out
        ds = self.level_downsamples[level]
        location = (round(cx0 * ds), round(cy0 * ds))
        try:
            region = self._reader.read_region(location, level, (cx1 - cx0, cy1 - cy0))
        except Exception as exc:  # backends raise their own types; one message for the user
            reason = str(exc).strip() and error_line(exc)
            reason = reason or f"{type(exc).__name__}; the file may be truncated or corrupt"
            raise SlideError(
                f"{self.path}: cannot read level {level} at {location}: {reason}"
            ) from exc
        out[cy0 - y : cy1 - y, cx0 - x : cx1 - x] = _to_rgb(region)
        return out

    def thumbnail(self, mpp: float, *, block: int = 256) -> np.ndarray:
        """The whole slide at ``mpp``, read in blocks so memory stays bounded by the output."""
        from wsi_pipeline.slides.tiling import ShardGrid, grid_size

        downsample = self.downsample_for(mpp)
        width, height = grid_size(*self.dimensions, downsample)
        out = np.empty((height, width, 3), dtype=np.uint8)
        blocks = ShardGrid(width, height, block)
        for col, row in blocks:
            b = blocks.box(col, row)
            out[b.y0 : b.y1, b.x0 : b.x1] = self.read_region(
                b.x0 * downsample, b.y0 * downsample, b.width, b.height, mpp=mpp
            )
        return out


def _to_rgb(region: Any) -> np.ndarray:
    """RGB uint8 array from a backend's region; transparent pixels become white."""
    arr = np.asarray(region)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.shape[2] == 4:
        rgb = arr[..., :3].copy()
        rgb[arr[..., 3] == 0] = BACKGROUND
        return rgb
    return arr[..., :3]


def _first_float(props: Any, *keys: str) -> float | None:
    for key in keys:
        value = props.get(key)
        if value not in (None, ""):
            try:
                return float(value)
            except ValueError:
                continue
    return None


def _mpp_from_properties(props: Any) -> float | None:
    mpp = _first_float(props, "openslide.mpp-x", "tiffslide.mpp-x", "aperio.MPP")
    if mpp is not None and mpp > 0:
        return mpp
    # Generic TIFFs: resolution tags in pixels per centimetre or inch.
    res = _first_float(props, "tiff.XResolution")
    unit = str(props.get("tiff.ResolutionUnit", "")).lower()
    if res and res > 0 and unit in {"centimeter", "centimetre", "3"}:
        return 1e4 / res
    if res and res > 0 and unit in {"inch", "2"}:
        return 25400 / res
    return None


def _open_openslide(path: str) -> _Reader:
    import openslide

    return openslide.OpenSlide(path)


def _open_tiffslide(path: str) -> _Reader:
    import tiffslide

    return tiffslide.TiffSlide(path)


def _choose_backend(path: str, backend: Backend) -> str:
    if backend != "auto":
        if backend == "openslide" and is_url(path):
            raise SlideError(f"{path}: OpenSlide reads local files only; use backend 'tiffslide'")
        return backend
    if is_url(path):
        return "tiffslide"
    import openslide

    return "openslide" if openslide.OpenSlide.detect_format(path) else "tiffslide"


@functools.lru_cache(maxsize=32)
def _open_cached(path: str, backend: Backend, mpp_override: float | None) -> Slide:
    return _open_uncached(path, backend, mpp_override)


def _open_uncached(path: str, backend: Backend, mpp_override: float | None) -> Slide:
    if not is_url(path):
        path = path.removeprefix("file://")
        if not os.path.exists(path):
            raise SlideError(f"{path}: no such file")
        if os.path.isdir(path) and not path.endswith(".mrxs"):
            raise SlideError(f"{path}: is a directory, not a slide")
    try:
        chosen = _choose_backend(path, backend)
        reader = _open_openslide(path) if chosen == "openslide" else _open_tiffslide(path)
        # tiffslide parses lazily: touch the metadata now so a broken file fails here.
        _ = reader.level_dimensions, dict(reader.properties)
    except SlideError:
        raise
    except IndexError as exc:  # a TIFF whose directories hold no image (truncated, or not a slide)
        raise SlideError(f"{path}: not a readable slide (no image levels: truncated?)") from exc
    except Exception as exc:
        raise SlideError(f"{path}: not a readable slide ({error_line(exc)})") from exc
    mpp = mpp_override if mpp_override is not None else _mpp_from_properties(reader.properties)
    return Slide(path, chosen, reader, mpp)


def open_slide(
    path: str | os.PathLike[str],
    backend: Backend = "auto",
    *,
    mpp_override: float | None = None,
    cache: bool = True,
) -> Slide:
    """Open a slide from a local path or fsspec URL.

    Args:
        path: local file or fsspec URL (URLs always use tiffslide).
        backend: ``"openslide"``, ``"tiffslide"`` or ``"auto"`` (OpenSlide where it recognises
            the file, tiffslide otherwise).
        mpp_override: level-0 µm/px to use instead of (or in the absence of) the slide's own.
        cache: reuse an already open handle in this process (safe: reads are thread-safe).

    Raises:
        SlideError: the file is missing or is not a slide either backend can read.
    """
    if mpp_override is not None and mpp_override <= 0:
        raise ValueError(f"mpp_override must be positive, got {mpp_override}")
    opener = _open_cached if cache else _open_uncached
    return opener(os.fspath(path), backend, mpp_override)
