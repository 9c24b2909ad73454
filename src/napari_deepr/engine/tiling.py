"""Overlapping tiles over one image plane, reflection at the borders, blending, and the band of
tile rows being blended (:class:`Band`).

Coordinates: a plane of length ``L`` along an axis is conceptually reflected by a halo of a few
pixels on both sides (the model card's ``halo``), so border pixels see real-looking context instead of the
network's zero padding. Tiles live in those padded coordinates (they may start below 0 and end past
``L``); pixels outside ``[0, L)`` are read by reflection, never stored.

Blending: inside the overlap between two tiles, each tile first drops a margin of a quarter of the
overlap next to its inner edge (where its own zero padding corrupts it), then the two tiles are mixed
with a raised-cosine ramp. The ramps of neighbouring tiles sum to one, so accumulating
``weight * output`` is already the blend: nothing is divided, and the result is exact wherever the
model's receptive-field radius fits inside that margin (a tiled run equals an untiled one). Plans
whose weights do not sum to one (tiles too small for their overlap) also accumulate the weight sum
and divide by it; :func:`partition_of_unity` tells which.

The band: tiles arrive row by row (batches of a tile row, left to right). A :class:`Band` keeps one
tile row's accumulators; when the next tile row starts, the rows of the previous one that no later
tile touches are finished (handed out as :class:`Rows`) and its overlap with the next row is carried
over. Memory is one tile row, whatever the image's height.
"""

from __future__ import annotations

from collections.abc import Callable
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


def partition_of_unity(plan: AxisPlan, weights) -> bool:
    """Whether the tiles' ``weights`` along an axis sum to one at every image pixel."""
    total = np.zeros(plan.length, dtype=np.float64)
    for start, wt in zip(plan.starts, weights, strict=True):
        a, b = max(start, 0), min(start + plan.tile, plan.length)
        if b > a:
            total[a:b] += wt[a - start:b - start]
    return bool(np.allclose(total, 1.0, atol=1e-5))


def by_rows(pool, fn: Callable[[int, int], None], rows: int, min_rows: int = 128) -> None:
    """Call ``fn(a, b)`` on row ranges covering ``0..rows``, spread over ``pool`` when it is worth it.

    Host passes over tiles are split by rows over the cores (numpy releases the GIL in them); the
    results do not depend on the split, since every pass is element by element.
    """
    if pool is None or rows < 2 * min_rows:
        fn(0, rows)
        return
    parts = min(pool._max_workers, rows // min_rows)
    edges = np.linspace(0, rows, parts + 1).astype(int)
    for f in [pool.submit(fn, int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]:
        f.result()


def blend_into(acc, out, wy, wx, flat_y: bool, flat_x: bool, tmp) -> None:
    """``acc += out * wy[:, None] * wx[None, :]`` in as few passes as the weights allow."""
    if flat_y and flat_x:
        acc += out
        return
    if flat_y:
        np.multiply(out, wx[None, None, :], out=tmp)
    elif flat_x:
        np.multiply(out, wy[None, :, None], out=tmp)
    else:
        np.multiply(out, wy[None, :, None], out=tmp)
        tmp *= wx[None, None, :]
    acc += tmp


@dataclass
class Rows:
    """Finished rows of one tile row: plane rows ``y0 + r0 .. y0 + r1``, every column of the image.

    Attributes
    ----------
    y0 : int
        The tile row's first row in plane coordinates (negative within the halo).
    r0, r1 : int
        The finished rows within the tile row.
    """

    y0: int
    r0: int
    r1: int
    _acc: np.ndarray
    _wacc: np.ndarray | None
    _dacc: np.ndarray | None
    _cols: slice

    def image(self, a: int, b: int) -> np.ndarray:
        """The blended network output of finished rows ``r0 + a .. r0 + b`` (C, rows, X), z-scored units."""
        blk = self._acc[:, self.r0 + a:self.r0 + b, self._cols]
        if self._wacc is not None:
            blk = blk / self._wacc[self.r0 + a:self.r0 + b, self._cols]
        return blk

    def dpm(self) -> np.ndarray:
        """The blended DPM of the finished rows (rows, X), µm."""
        d = self._dacc[self.r0:self.r1, self._cols]
        if self._wacc is not None:
            d = d / self._wacc[self.r0:self.r1, self._cols]
        return d


class Band:
    """Blends the tiles of one plane tile row by tile row and hands out the rows that are finished.

    Parameters
    ----------
    plan_y, plan_x : AxisPlan
        The plane's tiling.
    channels : int
        Channels of the network's output.
    with_dpm : bool
        Also blend the DPM (one channel).
    pool : ThreadPoolExecutor, optional
        Host threads the blending is split over (by rows).
    first_row : int
        Rows of tile rows before this one are not handed out (a strip's warm-up row rebuilds only
        the overlap it shares with the strip below).
    """

    def __init__(self, plan_y: AxisPlan, plan_x: AxisPlan, channels: int, with_dpm: bool, pool=None,
                 first_row: int = 0):
        self.py, self.px = plan_y, plan_x
        self.wy = [axis_weights(plan_y, k).astype(np.float32) for k in range(plan_y.n)]
        self.wx = [axis_weights(plan_x, k).astype(np.float32) for k in range(plan_x.n)]
        # The weight sum is kept only for plans whose ramps do not sum to one (tiny tiles, odd overlaps).
        self.unity = partition_of_unity(plan_y, self.wy) and partition_of_unity(plan_x, self.wx)
        self.single = (plan_y.n == 1 and plan_x.n == 1 and self.unity
                       and bool(np.all(self.wy[0] == 1) and np.all(self.wx[0] == 1)))
        self.flat_y = [bool(np.all(v == 1)) for v in self.wy]
        self.flat_x = [bool(np.all(v == 1)) for v in self.wx]
        self.c, self.with_dpm, self.pool, self.first_row = channels, with_dpm, pool, first_row
        self.x_lo = plan_x.starts[0]
        self.width = plan_x.starts[-1] + plan_x.tile - self.x_lo
        self._tmp = np.empty((channels, plan_y.tile, plan_x.tile), dtype=np.float32)
        self._row = None
        self._acc = self._wacc = self._dacc = self._carry = None

    def add(self, ky: int, tiles, out: np.ndarray, dpm: np.ndarray | None) -> list[Rows]:
        """Blend a batch of tiles of tile row ``ky``; returns the rows a new tile row finished.

        Parameters
        ----------
        tiles : list of (int, int)
            ``(kx, x0)`` of each tile of the batch, in the order of ``out``.
        out, dpm : numpy.ndarray
            The network's outputs for the batch (N, C, H, W) and (N, 1, H, W).
        """
        if self.single:  # one tile, weight one everywhere: the network's output is the blend
            self._row, self._acc = ky, out[0]
            self._dacc = dpm[0, 0] if self.with_dpm else None
            return []
        finished = []
        if ky != self._row:
            if self._row is not None:
                finished = self._finish(self._row)
            self._start(ky)
        ty, tx = self.py.tile, self.px.tile
        acc, wacc, dacc, tmp = self._acc, self._wacc, self._dacc, self._tmp
        wy, fy = self.wy[ky], self.flat_y[ky]
        for j, (kx, x0) in enumerate(tiles):
            sl = slice(x0 - self.x_lo, x0 - self.x_lo + tx)
            vx, fx = self.wx[kx], self.flat_x[kx]

            def blend(a, b, j=j, sl=sl, vx=vx, fx=fx):
                vy = wy[a:b]
                blend_into(acc[:, a:b, sl], out[j][:, a:b], vy, vx, fy, fx, tmp[:, a:b])
                if wacc is not None:
                    wacc[a:b, sl] += vy[:, None] * vx[None, :]
                if dacc is not None:
                    blend_into(dacc[None, a:b, sl], dpm[j, :1, a:b], vy, vx, fy, fx, tmp[:1, a:b])

            by_rows(self.pool, blend, ty)
        return finished

    def close(self) -> list[Rows]:
        """The rows of the last tile row (call once the plane's last batch is added)."""
        if self._row is None:
            return []
        row, self._row = self._row, None
        return self._finish(row)

    def _start(self, ky: int) -> None:
        ty = self.py.tile
        self._row = ky
        self._acc = np.zeros((self.c, ty, self.width), dtype=np.float32)
        self._wacc = None if self.unity else np.zeros((ty, self.width), dtype=np.float32)
        self._dacc = np.zeros((ty, self.width), dtype=np.float32) if self.with_dpm else None
        if self._carry is not None:
            # The overlap rows accumulated by the previous tile row.
            keep = ty - (self.py.starts[ky] - self.py.starts[ky - 1])
            acc, wacc, dacc = self._carry
            self._acc[:, :keep] = acc
            if self._wacc is not None:
                self._wacc[:keep] = wacc
            if self._dacc is not None:
                self._dacc[:keep] = dacc
            self._carry = None

    def _finish(self, ky: int) -> list[Rows]:
        """Hand out the rows of tile row ``ky`` that no later tile touches; carry the rest over."""
        py = self.py
        y0 = py.starts[ky]
        last = ky == py.n - 1
        fin_end = py.tile if last else py.starts[ky + 1] - y0
        r0, r1 = max(0, -y0), min(fin_end, py.length - y0)
        done = []
        if r1 > r0 and ky >= self.first_row:  # rows of a warm-up row belong to the strip above
            cols = slice(-self.x_lo, -self.x_lo + self.px.length)
            done.append(Rows(y0, r0, r1, self._acc, self._wacc, self._dacc, cols))
        if not last:
            s = py.starts[ky + 1] - y0
            self._carry = (self._acc[:, s:].copy(), None if self._wacc is None else self._wacc[s:].copy(),
                           self._dacc[s:].copy() if self._dacc is not None else None)
        return done
