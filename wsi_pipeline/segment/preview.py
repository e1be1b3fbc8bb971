"""A PNG overlay of nuclei polygons on a slide region, for people who would rather look."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from wsi_pipeline.segment.geojson import read_features
from wsi_pipeline.slides.slide import Backend, open_slide
from wsi_pipeline.slides.tiling import Box

OUTLINE = (0, 230, 80)
ONLY_IN_COMPARED = (255, 0, 0)


def render_preview(
    slide_path: str,
    geojson: str | Path,
    out: str | Path,
    *,
    region: Box | None = None,
    max_size: int = 2048,
    backend: Backend = "auto",
    mpp_override: float | None = None,
    compare: str | Path | None = None,
) -> int:
    """Draw the outlines of ``geojson``'s polygons over ``region`` (level-0 px) of the slide and,
    in red and thicker, those of ``compare`` that ``geojson`` lacks (what a setting removed).

    The region (default: the whole slide) is read at the resolution that makes its longer side
    at most ``max_size`` px. Returns the number of nuclei drawn.
    """
    slide = open_slide(slide_path, backend, mpp_override=mpp_override)
    region = region or Box(0, 0, *slide.dimensions)
    if region.empty:
        raise ValueError(f"empty preview region {region}")
    scale = max(region.width, region.height) / max_size  # level-0 px per preview px
    mpp = slide.mpp * max(scale, 1.0)
    ds = mpp / slide.mpp
    w, h = max(1, round(region.width / ds)), max(1, round(region.height / ds))
    image = Image.fromarray(slide.read_region(region.x0, region.y0, w, h, mpp=mpp))
    draw = ImageDraw.Draw(image)
    rings = [_ring(f) for f in read_features(geojson)]
    only_compared = []
    if compare is not None:
        seen = {r.tobytes() for r in rings}
        only_compared = [r for r in map(_ring, read_features(compare)) if r.tobytes() not in seen]
    drawn = 0
    for ring_set, colour, width in ((rings, OUTLINE, 2), (only_compared, ONLY_IN_COMPARED, 3)):
        for ring in ring_set:
            if (
                ring[:, 0].max() < region.x0
                or ring[:, 0].min() > region.x1
                or ring[:, 1].max() < region.y0
                or ring[:, 1].min() > region.y1
            ):
                continue
            points = (ring - (region.x0, region.y0)) / ds
            draw.line([tuple(p) for p in points], fill=colour, width=width)
            drawn += 1
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    return drawn


def _ring(feature: dict) -> np.ndarray:
    return np.asarray(feature["geometry"]["coordinates"][0], dtype=np.float64)
