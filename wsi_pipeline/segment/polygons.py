"""Instance labels → nucleus polygons in level-0 pixels, QuPath's convention.

Convention: the origin is the top-left corner of the top-left pixel, so pixel ``i`` spans
``[i, i + 1)`` and its centre is ``i + 0.5``. Outlines are the 0.5 iso-contour of each object's
mask (sub-pixel, through the midpoints between inside and outside pixel centres); rasterising a
polygon back at pixel centres reproduces its mask. Every polygon returned is valid and a single
``Polygon``: invalid outlines are repaired with ``make_valid`` and the largest part is kept.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import shapely
from scipy import ndimage as ndi
from shapely.geometry import Polygon
from skimage import measure


def largest_polygon(geometry: shapely.Geometry) -> Polygon | None:
    """The largest polygon of ``geometry`` after ``make_valid``, or ``None`` if it has no area."""
    if not geometry.is_valid:
        geometry = shapely.make_valid(geometry)
    parts = [g for g in getattr(geometry, "geoms", [geometry]) if isinstance(g, Polygon)]
    nested = [p for g in getattr(geometry, "geoms", []) if hasattr(g, "geoms") for p in g.geoms]
    parts += [p for p in nested if isinstance(p, Polygon)]
    parts = [p for p in parts if not p.is_empty and p.area > 0]
    return max(parts, key=lambda p: p.area) if parts else None


def mask_polygon(
    mask: np.ndarray,
    *,
    simplify: float = 0.0,
    field: np.ndarray | None = None,
    level: float = 0.5,
    offset: tuple[float, float] = (0.0, 0.0),
    scale: float = 1.0,
) -> Polygon | None:
    """Outline of the largest object of a boolean mask, in the mask's pixel-corner frame
    (scaled by ``scale``, then moved by ``offset``).

    With ``field`` (a value per pixel, e.g. the nucleus probability; 0 on other objects), the
    outline is its ``level`` iso-contour instead of the mask's: sub-pixel where the object meets
    background, and never crossing the mask's pixel centres (inside values are kept above
    ``level``, outside ones below). ``simplify`` is in mask pixels.
    """
    # A zero frame, so that objects touching the edge close; written in place (np.pad's generic
    # path costs more than the contour itself for the many small masks of a tile).
    padded = np.zeros((mask.shape[0] + 2, mask.shape[1] + 2), dtype=np.float32)
    inner = padded[1:-1, 1:-1]
    if field is None:
        inner[mask] = 1.0
    else:
        eps = np.float32(1e-3)
        np.copyto(
            inner, np.where(mask, np.maximum(field, level + eps), np.minimum(field, level - eps))
        )
    contours = measure.find_contours(padded, level)
    if not contours:
        return None
    contour = max(contours, key=len)
    if len(contour) < 4:
        return None
    # find_contours gives (row, col) at pixel centres of the padded array: shift by -1 (pad) and
    # +0.5 (centre → corner frame).
    xy = contour[:, ::-1] - 0.5
    if simplify <= 0:  # one shapely construction, already in the output frame
        return largest_polygon(Polygon(xy * scale + offset))
    # Douglas-Peucker in mask px, then scaled and moved: its ties at the tolerance do not
    # depend on the output frame.
    polygon = largest_polygon(Polygon(xy))
    if polygon is not None:
        polygon = largest_polygon(polygon.simplify(simplify, preserve_topology=True))
    if polygon is None:
        return None
    return shapely.transform(polygon, lambda c: c * scale + np.asarray(offset))


def label_polygons(
    labels: np.ndarray,
    *,
    offset: tuple[float, float] = (0.0, 0.0),
    scale: float = 1.0,
    simplify: float = 0.0,
    field: np.ndarray | None = None,
    level: float = 0.5,
) -> Iterator[tuple[int, Polygon]]:
    """``(label, polygon)`` for each object of an instance label image.

    Args:
        labels: integer instance labels, 0 = background.
        offset: level-0 position of the label image's top-left corner.
        scale: level-0 pixels per label pixel.
        simplify: Douglas-Peucker tolerance in label pixels (0: none).
        field: sub-pixel outlines from this ``(H, W)`` field's ``level`` iso-contour (e.g. the
            nucleus probability at its threshold; see :func:`mask_polygon`).
    """
    height, width = labels.shape
    for index, window in enumerate(ndi.find_objects(labels), start=1):
        if window is None:
            continue
        # One pixel of margin, so that a field's contour sees the background around the object.
        y0, x0 = max(window[0].start - 1, 0), max(window[1].start - 1, 0)
        y1, x1 = min(window[0].stop + 1, height), min(window[1].stop + 1, width)
        local = labels[y0:y1, x0:x1]
        mask = local == index
        values = None
        if field is not None:
            values = np.where(mask | (local == 0), field[y0:y1, x0:x1], 0).astype(np.float32)
        origin = (offset[0] + x0 * scale, offset[1] + y0 * scale)
        polygon = mask_polygon(
            mask, simplify=simplify, field=values, level=level, offset=origin, scale=scale
        )
        if polygon is not None:  # the outer ring alone: a repaired outline may have gained holes
            yield index, Polygon(polygon.exterior) if polygon.interiors else polygon


def rasterize(
    polygon: Polygon, shape: tuple[int, int], origin: tuple[float, float] = (0.0, 0.0)
) -> np.ndarray:
    """Boolean mask of the pixels whose centres fall inside ``polygon`` (pixel-corner frame).

    The one rasterisation of the project (training labels and the output label image alike).

    Args:
        polygon: in the same px as the mask.
        shape: ``(height, width)`` of the mask.
        origin: ``(x, y)`` of the mask's top-left corner in the polygon's frame.
    """
    mask = np.zeros(shape, dtype=bool)
    x0, y0, x1, y1 = polygon.bounds
    ox, oy = origin
    # Only pixels whose centre can be inside: centres at i + 0.5 within the bounds.
    c0, c1 = max(int(np.floor(x0 - ox)), 0), min(int(np.ceil(x1 - ox)), shape[1])
    r0, r1 = max(int(np.floor(y0 - oy)), 0), min(int(np.ceil(y1 - oy)), shape[0])
    if c0 >= c1 or r0 >= r1:
        return mask
    ys, xs = np.mgrid[r0:r1, c0:c1]
    mask[r0:r1, c0:c1] = shapely.contains_xy(polygon, xs + 0.5 + ox, ys + 0.5 + oy)
    return mask
