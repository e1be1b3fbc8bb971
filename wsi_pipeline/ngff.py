"""OME-NGFF 0.5 metadata, built in one place for the image stores and the label images.

Both are Zarr v3 groups whose ``ome`` attribute holds a ``multiscales`` list with micrometre
axes; level ``i`` is a 2^i downsample of level 0 in y and x. The tests check both against an
outside validator (``ome-zarr-models``).
"""

from __future__ import annotations

from typing import Any

VERSION = "0.5"
_SPACE = [
    {"name": "y", "type": "space", "unit": "micrometer"},
    {"name": "x", "type": "space", "unit": "micrometer"},
]


def multiscales(
    *, mpp: float, levels: int = 1, channels: bool = False, name: str = "", **extra: Any
) -> dict[str, Any]:
    """The ``ome`` attribute of an image of ``levels`` levels at ``mpp`` µm/px at level 0.

    Args:
        channels: a leading ``c`` axis (RGB images); labels have none.
        extra: more keys of the multiscale (e.g. ``type``, the downsampling method).
    """
    lead = [1.0] if channels else []
    datasets = [
        {
            "path": str(level),
            "coordinateTransformations": [
                {"type": "scale", "scale": [*lead, mpp * 2**level, mpp * 2**level]}
            ],
        }
        for level in range(levels)
    ]
    axes = ([{"name": "c", "type": "channel"}] if channels else []) + _SPACE
    multiscale = {"axes": axes, "datasets": datasets, **extra}
    if name:
        multiscale = {"name": name, **multiscale}
    return {"version": VERSION, "multiscales": [multiscale]}


def label_image(*, mpp: float, source: str) -> dict[str, Any]:
    """The ``ome`` attribute of a one-level label image at ``mpp`` of the image at ``source``."""
    return {
        **multiscales(mpp=mpp),
        "image-label": {"version": VERSION, "source": {"image": source}},
    }
