"""Overlapping tiles over one image plane, reflection at the borders, and blending weights.

Coordinates: a plane of length ``L`` along an axis is conceptually reflected by a halo of a few
pixels on both sides (the model card's ``halo``), so border pixels see real-looking context instead of the
network's zero padding. Tiles live in those padded coordinates (they may start below 0 and end past
``L``); pixels outside ``[0, L)`` are read by reflection, never stored.

Blending: inside the overlap between two tiles, each tile first drops a margin of a quarter of the
overlap next to its inner edge (where its own zero padding corrupts it), then the two tiles are mixed
with a raised-cosine ramp. Accumulating ``weight * output`` and ``weight`` and dividing makes the
result exact wherever the model's receptive-field radius fits inside that margin: a tiled run then
equals an untiled one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def round_up(n: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is ``>= n``."""
    return -(-int(n) // multiple) * multiple


@dataclass(frozen=True)
class AxisPlan:
    """Tiles along one axis."""

    length: int
    tile: int
    starts: tuple[int, ...]
    halo: int

    @property
    def n(self) -> int:
        """Number of tiles along this axis."""
        return len(self.starts)


def plan_axis(length: int, tile: int, overlap: int, multiple: int, halo: int | None = None) -> AxisPlan:
    """Tile starts along one axis.

    Parameters
    ----------
    length : int
        Image length in pixels.
    tile : int
        Largest tile (a multiple of ``multiple``).
    overlap : int
        Overlap between neighbouring tiles.
    multiple : int
        The network's size multiple (32 for five 2× poolings).
    halo : int, optional
        Reflected context added at the image borders (default ``overlap // 2``).

    Notes
    -----
    The fewest tiles that cover the image are used, each shrunk to the smallest multiple of
    ``multiple`` that still covers it, so little work is spent on reflected pixels. With an overlap
    that is a multiple of ``multiple`` the stride is one too, and every tile sees the same pooling
    grid as an untiled run.
    """
    halo = overlap // 2 if halo is None else int(halo)
    padded = length + 2 * halo
    # One tile when the image fits, even if its border halo pushes it a little past the tile size:
    # a 2048² image with 2048 tiles runs as one 2080² pass, not four overlapping ones.
    if padded <= tile or (length <= tile and round_up(padded, multiple) - tile <= 2 * halo):
        return AxisPlan(length, round_up(padded, multiple), (-halo,), halo)
    n = -(-(padded - overlap) // (tile - overlap))
    size = round_up(-(-(padded + (n - 1) * overlap) // n), multiple)
    stride = size - overlap
    return AxisPlan(length, size, tuple(-halo + k * stride for k in range(n)), halo)


def axis_weights(plan: AxisPlan, k: int) -> np.ndarray:
    """Blending weight of tile ``k`` along its axis (1 at outer borders, margin + cosine ramp inside)."""
    w = np.ones(plan.tile, dtype=np.float64)
    starts = plan.starts
    if k > 0:
        ov = starts[k - 1] + plan.tile - starts[k]
        w[: max(ov, 0)] = _ramp(ov)
    if k < plan.n - 1:
        ov = starts[k] + plan.tile - starts[k + 1]
        w[plan.tile - max(ov, 0):] = np.minimum(w[plan.tile - max(ov, 0):], _ramp(ov)[::-1])
    return w


def _ramp(ov: int) -> np.ndarray:
    """0 over the first quarter, raised cosine to 1 over the middle half, 1 over the last quarter."""
    if ov <= 0:
        return np.ones(0)
    m = ov // 4
    n = ov - 2 * m
    u = (np.arange(ov) - m + 0.5) / max(n, 1)
    u = np.clip(u, 0.0, 1.0)
    return 0.5 - 0.5 * np.cos(np.pi * u)


def reflect_index(idx: np.ndarray, length: int) -> np.ndarray:
    """Map indices outside ``[0, length)`` back inside by mirror reflection without repeating the edge."""
    if length == 1:
        return np.zeros_like(idx)
    period = 2 * (length - 1)
    i = np.mod(idx, period)
    return np.where(i >= length, period - i, i)


def read_region(plane, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Read ``plane[..., y0:y1, x0:x1]`` in padded coordinates, reflecting outside the image.

    Only the rows and columns that are needed are read, so lazy (dask, zarr) planes stay lazy.
    """
    h, w = plane.shape[-2], plane.shape[-1]
    if y0 >= 0 and y1 <= h and x0 >= 0 and x1 <= w:
        return np.asarray(plane[..., y0:y1, x0:x1])
    ya, yb, xa, xb = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
    pads = ((ya - y0, y1 - yb), (xa - x0, x1 - xb))
    if yb - ya > max(pads[0]) and xb - xa > max(pads[1]):
        # One mirror reflection of the rows and columns read: one pass (the index path below takes two).
        block = np.asarray(plane[..., ya:yb, xa:xb])
        return np.pad(block, [(0, 0)] * (block.ndim - 2) + list(pads), mode="reflect")
    yi = reflect_index(np.arange(y0, y1), h)
    xi = reflect_index(np.arange(x0, x1), w)
    ya, yb = int(yi.min()), int(yi.max()) + 1
    xa, xb = int(xi.min()), int(xi.max()) + 1
    block = np.asarray(plane[..., ya:yb, xa:xb])
    return block[..., yi - ya, :][..., xi - xa]
