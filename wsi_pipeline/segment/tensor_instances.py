"""Instance extraction as tensor operations, for a batch of tiles where the probabilities are.

The same steps as :func:`~wsi_pipeline.segment.instances.instances_from_probabilities` (scipy and
scikit-image, one tile at a time on a CPU), written in torch so that a GPU predictor hands on
compact labels instead of probabilities; the same code runs on a CPU:

- markers are the 4-connected components of ``interior > threshold`` on the foreground,
  without those under ``marker_min_size`` pixels;
- seeded growth: each foreground pixel takes the marker whose flood reaches it at the lowest
  level, the flood of a priority-queue watershed on ``taxicab distance to the markers * 1e-3 -
  interior`` (the minimax path cost, relaxed in parallel until nothing changes);
- foreground components no marker reached become instances of their own;
- holes enclosed by a single instance are filled, instances under ``min_size`` pixels dropped,
  and the rest numbered 1..N in the order scipy's labelling gives them.

Connected components use hooking and pointer jumping (a few passes on every tile measured,
even for a component that spans the tile). Where two floods reach a pixel at exactly the same
level the watershed's queue order is not reproduced (a fixed neighbour order decides), so
touching nuclei may trade a boundary pixel; ``tests/test_tensor_instances.py`` measures how
close the two paths are on real tiles.
Only the ``"3class"`` and ``"distance"`` target modes are supported (``TENSOR_MODES``).
"""

from __future__ import annotations

from functools import reduce

import torch
import torch.nn.functional as F

from wsi_pipeline.segment.quantize import LEVELS, TENSOR_MODES

_TIE_BREAK = 1e-3  # elevation per taxicab px from the markers, as the scipy path has it
_LOWEST = -round(1 / _TIE_BREAK) * LEVELS  # the lowest elevation's numerator (on a marker)
_STEP_BITS = 24  # a flood path's steps fit in 24 bits: tiles up to 4096² px (MAX_TILE)
_CHECK_EVERY = 4  # flood iterations between convergence checks (each check synchronises)
# A pixel's neighbours above, below, left and right, as slices of the tile padded by one.
_NEIGHBOURS = (
    (slice(None, -2), slice(1, -1)),
    (slice(2, None), slice(1, -1)),
    (slice(1, -1), slice(None, -2)),
    (slice(1, -1), slice(2, None)),
)


@torch.no_grad()
def tensor_instances(
    probs: torch.Tensor,
    mode: str,
    *,
    min_size: int = 10,
    interior_threshold: float = 0.5,
    foreground_threshold: float = 0.5,
    marker_min_size: int = 4,
    fill_holes: bool = True,
    distance_threshold: float = 0.5,
    split_touching: bool = True,
    peak_min_distance: int = 5,
) -> torch.Tensor:
    """``(B, K, H, W)`` probabilities (quantised to :data:`LEVELS`, as the scipy path sees them)
    → ``(B, H, W)`` int32 instance labels, 0 = background, 1..N per tile.

    The keyword arguments are a card's ``postprocess`` fields; ``split_touching`` and
    ``peak_min_distance`` belong to the ``"binary"`` mode and are ignored.
    """
    del split_touching, peak_min_distance  # the binary mode's
    if mode not in TENSOR_MODES:
        raise ValueError(f"tensor instances support modes '3class' and 'distance', not {mode!r}")
    channels = {"3class": 3, "distance": 4}[mode]
    shape = tuple(probs.shape)
    if probs.ndim != 4 or probs.shape[1] != channels:
        raise ValueError(f"mode {mode!r} needs (B, {channels}, H, W) probabilities, got {shape}")
    if probs.shape[2] * probs.shape[3] > 1 << _STEP_BITS:
        raise ValueError(f"tiles of over {1 << _STEP_BITS} px have no tensor path: {shape}")
    interior = probs[:, 1] if mode == "3class" else probs[:, 3]
    threshold = interior_threshold if mode == "3class" else distance_threshold
    foreground = (1.0 - probs[:, 0]) > foreground_threshold
    markers = _markers(interior, foreground, threshold, marker_min_size)
    labels = _flood(interior, markers, foreground)
    labels = _label_unmarked(labels, foreground)
    if fill_holes:
        labels = _fill_enclosed_holes(labels)
    return _remove_small_and_relabel(labels, min_size)


def _markers(
    interior: torch.Tensor, foreground: torch.Tensor, threshold: float, min_size: int
) -> torch.Tensor:
    """Marker components labelled by their first pixel's flat index + 1 (0: none)."""
    seeds = (interior > threshold) & foreground
    markers = connected_components(seeds) + 1
    if min_size > 1:
        sizes = torch.bincount(markers.flatten(), minlength=markers.numel() + 1)
        markers = torch.where(sizes[markers] >= min_size, markers, 0)
    return markers


def connected_components(mask: torch.Tensor) -> torch.Tensor:
    """4-connected components of a ``(B, H, W)`` bool mask: each pixel on it gets the flat index
    (into the whole batch) of its component's first pixel in raster order; others -1.

    Hooking and pointer jumping: every pixel points at the smallest pointer among its
    neighbours', the roots adopt it, and pointers are followed to their roots, until no pointer
    changes (pointers only decrease, so it ends). Pointer jumping halves the paths each time:
    a few passes sufficed for every tile measured, even for a component that spans the tile.
    """
    n = mask.numel()
    parent = torch.arange(n, device=mask.device)
    on = mask.flatten()
    while True:
        pointers = torch.where(mask, parent.view(mask.shape), n)
        smallest = torch.minimum(pointers, _neighbour_min(pointers, n)).flatten()
        smallest = torch.where(on, smallest, parent)
        hooked = parent.clone()
        hooked.scatter_reduce_(0, parent, smallest, reduce="amin")  # roots adopt it
        hooked = torch.minimum(hooked, smallest)
        hooked = _jump_to_roots(hooked)
        if torch.equal(hooked, parent):
            return torch.where(mask, parent.view(mask.shape), -1)
        parent = hooked


def _jump_to_roots(parent: torch.Tensor) -> torch.Tensor:
    """Each pointer replaced by its root's (pointers lead down to a pixel pointing at itself)."""
    while True:
        grand = parent[parent]
        if torch.equal(grand, parent):
            return parent
        parent = grand


def _neighbour_min(values: torch.Tensor, fill: int) -> torch.Tensor:
    """The smallest of each pixel's four neighbours (``fill`` beyond the tile's edge)."""
    padded = _padded(values, fill)
    return reduce(torch.minimum, (padded[:, rows, cols] for rows, cols in _NEIGHBOURS))


def _padded(values: torch.Tensor, fill: int) -> torch.Tensor:
    """``(B, H, W)`` → ``(B, H + 2, W + 2)`` with a border of ``fill`` (passed as a float: exact
    for the integers used here: 0, a batch's pixel count, 2**62)."""
    return F.pad(values.unsqueeze(1), (1, 1, 1, 1), value=fill).squeeze(1)


def taxicab_distance(seeds: torch.Tensor) -> torch.Tensor:
    """``(B, H, W)`` city-block distance of every pixel to the nearest ``True`` pixel of its tile
    (``H + W`` where a tile has none): two exact 1-D passes per axis, each a running minimum."""
    far = seeds.shape[1] + seeds.shape[2]
    distance = torch.full(seeds.shape, far, dtype=torch.float64, device=seeds.device)
    distance.masked_fill_(seeds, 0)
    for axis in (2, 1):
        distance = _line_distance(distance, axis)
    return distance.clamp_(max=far)


def _line_distance(values: torch.Tensor, axis: int) -> torch.Tensor:
    """``min_j values[j] + |i - j|`` along ``axis``: a forward and a backward running minimum."""
    shape = [1, 1, 1]
    shape[axis] = values.shape[axis]
    i = torch.arange(values.shape[axis], device=values.device, dtype=values.dtype).view(shape)
    forward = torch.cummin(values - i, dim=axis).values + i
    backward = torch.cummin((values + i).flip(axis), dim=axis).values.flip(axis) - i
    return torch.minimum(forward, backward)


def _flood(interior: torch.Tensor, markers: torch.Tensor, foreground: torch.Tensor) -> torch.Tensor:
    """Seeded growth over the foreground: each pixel takes the label of the neighbour its flood
    comes from, the one with the lowest flood level (the minimax path cost from a marker) and,
    of those, the fewest steps from its marker (the queue's first-come order, roughly; without
    it, equal neighbours could hand labels back and forth for ever).

    A pixel's (level, steps) is one integer, so one comparison orders both: the elevation
    ``taxicab * 1e-3 - interior`` is ``(taxicab * LEVELS - 1000 * k) / (1000 * LEVELS)`` for an
    interior of ``k / LEVELS``, exactly, so the numerator orders the levels as scipy's does.
    """
    interior_steps = torch.round(interior * LEVELS).to(torch.int64)
    taxicab = taxicab_distance(markers > 0).to(torch.int64)
    elevation = taxicab * LEVELS - round(1 / _TIE_BREAK) * interior_steps - _LOWEST
    elevation = elevation << _STEP_BITS  # level in the high bits, steps (0 here) in the low
    unreached = 1 << 62  # above every key; a float pads it exactly
    free = foreground & (markers == 0)
    key = torch.where(markers > 0, elevation, unreached)
    labels = markers
    for iteration in range(1, markers.shape[1] * markers.shape[2] + 1):
        lowest, label = _lowest_neighbour(key, labels, unreached)
        reached = free & (lowest != unreached)
        # The pixel's own level if higher than its upstream neighbour's; one step further.
        new_key = torch.where(reached, torch.maximum(lowest, elevation) + 1, key)
        new_labels = torch.where(reached, label, labels)
        check = iteration % _CHECK_EVERY == 0
        if check and torch.equal(new_key, key) and torch.equal(new_labels, labels):
            break
        key, labels = new_key, new_labels
    return labels


def _lowest_neighbour(
    key: torch.Tensor, labels: torch.Tensor, fill: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pixel's smallest neighbouring key (``fill`` beyond the tile's edge) and that
    neighbour's label (ties: above, below, left, right, in that order)."""
    keys, names = _padded(key, fill), _padded(labels, 0)
    lowest, label = torch.full_like(key, fill), torch.zeros_like(labels)
    for rows, cols in _NEIGHBOURS:
        better = keys[:, rows, cols] < lowest
        lowest = torch.where(better, keys[:, rows, cols], lowest)
        label = torch.where(better, names[:, rows, cols], label)
    return lowest, label


def _label_unmarked(labels: torch.Tensor, foreground: torch.Tensor) -> torch.Tensor:
    """Foreground components no marker reached, as instances numbered after every marker's."""
    rest = foreground & (labels == 0)
    components = connected_components(rest)
    return torch.where(rest, components + 1 + labels.numel(), labels)


def _fill_enclosed_holes(labels: torch.Tensor) -> torch.Tensor:
    """Give each background component that does not reach the tile's edge the instance on its
    rim, where there is exactly one."""
    background = labels == 0
    holes = connected_components(background) + 1  # 0 off the background
    edge = torch.zeros_like(background)
    edge[:, [0, -1], :] = True
    edge[:, :, [0, -1]] = True
    reaches_edge = torch.zeros(holes.numel() + 1, dtype=torch.bool, device=labels.device)
    reaches_edge[holes[edge & background]] = True
    holes = torch.where(background & ~reaches_edge[holes], holes, 0)
    if not bool(holes.any()):
        return labels
    # Each instance pixel beside a hole pairs the largest such hole with its own label (as
    # grey_dilation with a cross does on the scipy path); single-instance holes are filled.
    rim = -_neighbour_min(-holes, 0)
    rim = torch.where(background, 0, rim).flatten()
    beside = rim > 0
    flat = labels.flatten()
    size = holes.numel() + 1
    low = torch.full((size,), torch.iinfo(flat.dtype).max, dtype=flat.dtype, device=flat.device)
    high = torch.zeros(size, dtype=flat.dtype, device=flat.device)
    low.scatter_reduce_(0, rim[beside], flat[beside], reduce="amin")
    high.scatter_reduce_(0, rim[beside], flat[beside], reduce="amax")
    fill = torch.where(low == high, high, 0)  # 0 for index 0: no rim pixel names it
    return torch.where(holes > 0, fill[holes], labels)


def _remove_small_and_relabel(labels: torch.Tensor, min_size: int) -> torch.Tensor:
    """Drop instances under ``min_size`` pixels; number the rest 1..N per tile in label order
    (markers by their first pixel, then unmarked components by theirs: scipy's order)."""
    values, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    kept = torch.nonzero((counts >= max(min_size, 1)) & (values > 0)).squeeze(1)
    # A label is a flat index into the batch (+1, and + numel for unmarked components).
    pixel = (values[kept] - 1) % labels.numel()
    tiles = torch.div(pixel, labels.shape[1] * labels.shape[2], rounding_mode="floor")
    order = torch.argsort(tiles, stable=True)
    by_tile = tiles[order]
    first_of_tile = torch.searchsorted(by_tile, by_tile)
    rank = torch.arange(by_tile.numel(), device=labels.device) - first_of_tile
    lut = torch.zeros(values.numel(), dtype=torch.int32, device=labels.device)
    lut[kept[order]] = (rank + 1).to(torch.int32)
    return lut[inverse]


def rounded_to_levels(probs: torch.Tensor) -> torch.Tensor:
    """Probabilities rounded to the :data:`LEVELS` steps the scipy path receives them in."""
    return torch.round(probs * LEVELS).clamp_(0, LEVELS) / LEVELS
