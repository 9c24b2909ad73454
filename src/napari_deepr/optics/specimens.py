"""Procedural fluorescent specimens (in-focus emitter densities) for simulation.

Each generator returns a float32 emitter-density map ``>= 0`` with its bright structures near 1.
Sizes are in micrometres and converted with the pixel size, so the same ``kind`` looks alike at
0.1625 and 0.325 µm/px. The maps are *objects* (what a perfect microscope would see); the
optics module blurs them with a physical PSF.

All generators are vectorised (no per-pixel Python loops) because the trainer draws a fresh
specimen for every training pair.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

__all__ = ["SPECIMEN_KINDS", "bandpass_noise", "make_specimen", "splat_points"]


def splat_points(
    shape: tuple[int, int], yx: np.ndarray, weights: np.ndarray | float = 1.0
) -> np.ndarray:
    """Accumulate point emitters at sub-pixel positions with bilinear weights.

    Bilinear splatting integrates a point over the pixel footprint to first order, so sub-pixel
    positions shift the centroid continuously (important for registration tests).

    Parameters
    ----------
    shape : tuple of int
        Output shape ``(H, W)``.
    yx : numpy.ndarray
        ``(N, 2)`` point coordinates in pixels (row, column).
    weights : array-like or float
        Brightness per point.

    Returns
    -------
    numpy.ndarray
        float64 image.
    """
    h, w = shape
    yx = np.asarray(yx, dtype=float).reshape(-1, 2)
    wts = np.broadcast_to(np.asarray(weights, dtype=float), (len(yx),))
    y0 = np.floor(yx[:, 0]).astype(int)
    x0 = np.floor(yx[:, 1]).astype(int)
    fy = yx[:, 0] - y0
    fx = yx[:, 1] - x0
    out = np.zeros(shape, dtype=float)
    for dy, dx, wgt in (
        (0, 0, (1 - fy) * (1 - fx)),
        (0, 1, (1 - fy) * fx),
        (1, 0, fy * (1 - fx)),
        (1, 1, fy * fx),
    ):
        yy, xx = y0 + dy, x0 + dx
        ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        np.add.at(out, (yy[ok], xx[ok]), (wts * wgt)[ok])
    return out


def bandpass_noise(
    shape: tuple[int, int], rng: np.random.Generator, low_px: float, high_px: float
) -> np.ndarray:
    """Gaussian random field band-limited to structures between ``low_px`` and ``high_px``.

    Made by filtering white noise in the Fourier domain with a difference of Gaussians;
    returned with zero mean and unit standard deviation.
    """
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    f2 = fy**2 + fx**2
    # a structure of size s px lives near spatial frequency 1/s; Gaussian envelopes in f
    filt = np.exp(-f2 * (np.pi * low_px) ** 2 / 2) - np.exp(-f2 * (np.pi * high_px) ** 2 / 2)
    noise = np.fft.irfft2(np.fft.rfft2(rng.standard_normal(shape)) * filt, s=shape)
    noise -= noise.mean()
    sd = noise.std()
    return noise / sd if sd > 0 else noise


def _beads(shape, px, rng, density_per_100um2: float = 0.6, diameter_um: float = 0.2):
    area = shape[0] * shape[1] * px**2
    n = rng.poisson(density_per_100um2 * area / 100.0)
    yx = rng.uniform([0, 0], shape, size=(n, 2))
    # clusters: a fifth of the beads get 1-3 touching neighbours, as in real bead slides
    n_cl = n // 5
    if n_cl:
        parents = yx[rng.integers(0, n, n_cl)]
        k = rng.integers(1, 4, n_cl)
        parents = np.repeat(parents, k, axis=0)
        ang = rng.uniform(0, 2 * np.pi, len(parents))
        d = diameter_um / px * rng.uniform(1.0, 1.5, len(parents))
        yx = np.concatenate([yx, parents + np.c_[d * np.sin(ang), d * np.cos(ang)]])
    bright = rng.normal(1.0, 0.15, len(yx)).clip(0.5, 1.5)
    r_px = diameter_um / 2 / px
    if r_px <= 0.7:
        # unresolved beads sit on pixel centres: bilinear splatting would convolve every bead
        # with a 1-px triangle and widen its image beyond the PSF (biasing FWHM measurements)
        yx = np.floor(yx) + 0.0
    img = splat_points(shape, yx, bright)
    if r_px > 0.7:
        # beads resolved by the pixel grid: spread each point over its projected sphere
        rad = int(np.ceil(r_px))
        yy, xx = np.mgrid[-rad : rad + 1, -rad : rad + 1]
        kern = np.sqrt(np.clip(r_px**2 - yy**2 - xx**2, 0, None))
        img = ndimage.convolve(img, kern / kern.sum(), mode="constant")
    return img


def _filaments(shape, px, rng, n_per_1000um2: float = 3.0, persistence_um: float = 15.0):
    area = shape[0] * shape[1] * px**2
    n = max(1, rng.poisson(n_per_1000um2 * area / 1000.0))
    length_um = rng.uniform(10, 60, n)
    step = 0.5  # px; sampling dense enough for continuous lines after splatting
    pts, wts = [], []
    for i in range(n):
        m = int(length_um[i] / px / step)
        # worm-like chain: heading diffuses with step variance step_um / persistence
        dtheta = rng.normal(0, np.sqrt(step * px / persistence_um), m)
        theta = rng.uniform(0, 2 * np.pi) + np.cumsum(dtheta)
        start = rng.uniform([0, 0], shape)
        yx = start + np.cumsum(np.c_[np.sin(theta), np.cos(theta)] * step, axis=0)
        pts.append(yx)
        wts.append(np.full(m, rng.uniform(0.4, 1.0) * step))
    img = splat_points(shape, np.concatenate(pts), np.concatenate(wts))
    # filaments ~ 0.25 µm thick: below the 20x resolution but not a single pixel at 40x
    return ndimage.gaussian_filter(img, max(0.3, 0.1 / px)) * 1.6


def _nuclei(shape, px, rng, n_per_1000um2: float = 1.2, radius_um: tuple = (4.0, 7.0)):
    h, w = shape
    area = h * w * px**2
    n = max(1, rng.poisson(n_per_1000um2 * area / 1000.0))
    texture = bandpass_noise(shape, rng, 0.4 / px, 2.0 / px)
    img = np.zeros(shape)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(n):
        cy, cx = rng.uniform([0, 0], shape)
        a = rng.uniform(*radius_um) / px
        b = a * rng.uniform(0.6, 1.0)
        phi = rng.uniform(0, np.pi)
        rad = int(a + 3)
        y0, y1 = max(0, int(cy) - rad), min(h, int(cy) + rad + 1)
        x0, x1 = max(0, int(cx) - rad), min(w, int(cx) + rad + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        dy, dx = yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx
        u = (dx * np.cos(phi) + dy * np.sin(phi)) / a
        v = (-dx * np.sin(phi) + dy * np.cos(phi)) / b
        r = np.sqrt(u**2 + v**2)
        # soft edge ~1 px wide, and a projected-thickness profile (brighter centre)
        edge = np.clip((1 - r) * a, 0, 1)
        body = edge * (0.55 + 0.45 * np.sqrt(np.clip(1 - r**2, 0, 1)))
        chrom = 1 + 0.35 * texture[y0:y1, x0:x1]
        nuc = body * chrom * rng.uniform(0.5, 1.0)
        # nucleoli are dark holes in DNA stains
        for _k in range(rng.integers(1, 4)):
            ny, nx_ = rng.uniform(-0.5, 0.5, 2)
            rr = np.sqrt((u - nx_) ** 2 + (v - ny) ** 2)
            nuc *= 1 - 0.6 * np.exp(-((rr / rng.uniform(0.12, 0.2)) ** 2))
        img[y0:y1, x0:x1] = np.maximum(img[y0:y1, x0:x1], nuc)
    return img


def _tissue(shape, px, rng):
    # fibre network: zero crossings of band-pass noise are thin curvilinear ridges
    field = bandpass_noise(shape, rng, 2.0 / px, 8.0 / px)
    fibres = np.exp(-((field / 0.12) ** 2))
    envelope = 0.5 + 0.5 * np.tanh(1.5 * bandpass_noise(shape, rng, 15.0 / px, 60.0 / px))
    background = 0.25 * (1 + np.tanh(bandpass_noise(shape, rng, 2.0 / px, 20.0 / px)))
    nuclei = _nuclei(shape, px, rng, n_per_1000um2=0.8, radius_um=(2.5, 5.0))
    return (0.6 * fibres + 0.3 * background) * envelope + nuclei


def _mixed(shape, px, rng):
    parts = [_beads, _filaments, _nuclei, _tissue]
    pick = rng.random(len(parts)) < 0.5
    if not pick.any():
        pick[rng.integers(len(parts))] = True
    img = np.zeros(shape)
    for use, f in zip(pick, parts):
        if use:
            img += rng.uniform(0.4, 1.0) * f(shape, px, rng)
    return img


def _cells(shape, px, rng):
    # cytoplasm-like smooth blobs with a brighter nucleus and speckled organelles
    mask_field = bandpass_noise(shape, rng, 8.0 / px, 30.0 / px)
    cyto = np.clip(mask_field - 0.3, 0, None)
    cyto *= 1 + 0.5 * bandpass_noise(shape, rng, 0.5 / px, 3.0 / px)
    organelles = _beads(shape, px, rng, density_per_100um2=4.0, diameter_um=0.5)
    organelles *= cyto > 0
    return 0.5 * np.clip(cyto, 0, None) + 0.6 * organelles + 0.7 * _nuclei(shape, px, rng, 0.5)


def _cytoplasm(shape, px, rng, cell_diameter_um: tuple = (15.0, 35.0)):
    # a confluent monolayer with a cytoplasmic stain: Voronoi cell bodies, each a smooth dome (projected
    # thickness) with a dark unstained nucleus, faint reticular texture and slightly brighter membranes
    h, w = shape
    d = rng.uniform(*cell_diameter_um) / px
    n = max(2, rng.poisson(h * w / (0.8 * d * d)))
    seeds = rng.uniform([0, 0], shape, size=(n, 2))
    seed_img = _seed_image(shape, seeds)
    _, (iy, ix) = ndimage.distance_transform_edt(seed_img == 0, return_indices=True)
    owner = seed_img[iy, ix]
    bright = rng.uniform(0.4, 1.0, n + 1)
    # distance to the nearest boundary: where the owning seed changes
    boundary = np.zeros(shape, bool)
    boundary[:-1] |= owner[:-1] != owner[1:]
    boundary[:, :-1] |= owner[:, :-1] != owner[:, 1:]
    to_edge = ndimage.distance_transform_edt(~boundary)
    dome = np.sqrt(np.clip(to_edge / (0.35 * d), 0, 1))
    reticulum = 1 + 0.3 * bandpass_noise(shape, rng, 0.4 / px, 2.0 / px)
    membrane = 0.4 * np.exp(-((to_edge * px / 0.3) ** 2))
    img = bright[owner] * (dome * reticulum + membrane)
    # nucleus: an unstained ellipse near each seed
    nuc = np.zeros(shape)
    r = 0.22 * d
    yy, xx = np.ogrid[0:h, 0:w]
    for cy, cx in seeds + rng.normal(0, 0.1 * d, seeds.shape):
        e = rng.uniform(0.7, 1.0)
        nuc = np.maximum(nuc, np.clip(1 - np.hypot((yy - cy) / (r * e), (xx - cx) / r), 0, 1) * 4)
    img *= 1 - 0.85 * np.clip(nuc, 0, 1)
    return np.clip(img, 0, None)


def _texture(shape, px, rng):
    # Domain randomization for texture statistics: a log-normal field with a power-law spectrum
    # 1/f^beta (beta 0.5 = pixel-scale speckle ... 3.5 = smooth clouds) and random contrast, seen
    # through smooth random patches (cells, tissue regions) of random coverage. Real stains span
    # this range, and a network that meets only a few spectra learns their blur as the object's.
    h, w = shape
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fy**2 + fx**2)
    f[0, 0] = 1.0 / max(h, w)
    beta = rng.uniform(0.5, 3.5)
    g = np.fft.irfft2(np.fft.rfft2(rng.standard_normal(shape)) * f ** (-beta / 2), s=shape)
    g = (g - g.mean()) / max(g.std(), 1e-12)
    field = np.exp(rng.uniform(0.3, 1.2) * g)
    scale_um = rng.uniform(5.0, 25.0)
    patches = bandpass_noise(shape, rng, 0.5 * scale_um / px, 2.0 * scale_um / px)
    edge = rng.uniform(0.05, 0.5)  # soft to sharp patch borders
    mask = 1.0 / (1.0 + np.exp(-(patches - rng.uniform(-1.0, 1.0)) / edge))
    img = field * mask
    top = np.percentile(img, 99.5)
    return np.clip(img / top if top > 0 else img, 0, None)


def _mitochondria(shape, px, rng, cell_diameter_um: tuple = (25.0, 50.0)):
    # Reserve held-out family (never trained on): spread cells whose cytoplasm holds a network of
    # short curved tubules (mitochondria, 1-5 µm long, ~0.3 µm wide), densest around the nucleus,
    # a few vesicles and a dim diffuse cytosol; the nucleus itself is unstained.
    h, w = shape
    cells = np.zeros(shape)
    tubules_yx, tubules_w, vesicles_yx = [], [], []
    d_mean = np.mean(cell_diameter_um) / px
    n_cells = max(1, rng.poisson(h * w / (1.2 * d_mean * d_mean)))
    yy, xx = np.ogrid[0:h, 0:w]
    step = 0.5
    for _ in range(n_cells):
        cy, cx = rng.uniform([0, 0], shape)
        r = rng.uniform(*cell_diameter_um) / 2 / px
        # irregular outline: radius modulated by a few angular harmonics
        ang = np.arctan2(yy - cy, xx - cx)
        rr = r * (1 + sum(rng.uniform(0, 0.18) * np.cos(k * ang + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5)))
        dist = np.hypot(yy - cy, xx - cx)
        cells = np.maximum(cells, np.clip((rr - dist) / 3.0, 0, 1) * rng.uniform(0.5, 1.0))
        n_tub = rng.poisson(0.12 * r * r * px * px)
        for _t in range(n_tub):
            # positions denser near the centre (perinuclear), outside the nucleus
            rho = r * (0.3 + 0.65 * rng.beta(1.3, 2.0))
            phi = rng.uniform(0, 2 * np.pi)
            start = np.array([cy + rho * np.sin(phi), cx + rho * np.cos(phi)])
            m = max(2, int(rng.uniform(1.0, 5.0) / px / step))
            theta = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, np.sqrt(step * px / 2.0), m))
            tubules_yx.append(start + np.cumsum(np.c_[np.sin(theta), np.cos(theta)] * step, axis=0))
            tubules_w.append(np.full(m, rng.uniform(0.5, 1.0) * step))
        n_ves = rng.poisson(0.01 * r * r * px * px)
        if n_ves:
            rho = r * rng.uniform(0.3, 0.95, n_ves)
            phi = rng.uniform(0, 2 * np.pi, n_ves)
            vesicles_yx.append(np.c_[cy + rho * np.sin(phi), cx + rho * np.cos(phi)])
    img = 0.08 * cells
    if tubules_yx:
        tub = splat_points(shape, np.concatenate(tubules_yx), np.concatenate(tubules_w))
        img += 1.4 * ndimage.gaussian_filter(tub, max(0.4, 0.13 / px)) * (cells > 0)
    if vesicles_yx:
        ves = splat_points(shape, np.concatenate(vesicles_yx), rng.uniform(0.3, 1.0, sum(len(v) for v in vesicles_yx)))
        img += ndimage.gaussian_filter(ves, max(0.5, 0.15 / px)) * (cells > 0)
    return img


def _seed_image(shape, seeds) -> np.ndarray:
    """Label image with seed ``k`` at its pixel as ``k + 1`` (0 elsewhere)."""
    lab = np.zeros(shape, np.int32)
    iy = np.clip(seeds[:, 0].astype(int), 0, shape[0] - 1)
    ix = np.clip(seeds[:, 1].astype(int), 0, shape[1] - 1)
    lab[iy, ix] = np.arange(1, len(seeds) + 1)
    return lab


_GENERATORS: dict[str, Callable] = {
    "beads": _beads,
    "filaments": _filaments,
    "nuclei": _nuclei,
    "tissue": _tissue,
    "cells": _cells,
    "cytoplasm": _cytoplasm,
    "mixed": _mixed,
    "texture": _texture,
    "mitochondria": _mitochondria,
}

#: Names accepted by :func:`make_specimen`.
SPECIMEN_KINDS: tuple[str, ...] = tuple(_GENERATORS)


def make_specimen(
    kind: str,
    shape: tuple[int, int] | int,
    pixel_size_um: float = 0.325,
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """Draw a random in-focus fluorescent specimen.

    Parameters
    ----------
    kind : str
        One of :data:`SPECIMEN_KINDS`: ``"beads"`` (sub-resolution beads, 0.2 µm, with
        clusters), ``"filaments"`` (worm-like chains, e.g. microtubules or actin),
        ``"nuclei"`` (DNA stain with chromatin texture and dark nucleoli), ``"tissue"``
        (fibre network with sparse nuclei, like autofluorescent tissue sections), ``"cells"``
        (cytoplasm, organelles and nuclei), ``"cytoplasm"`` (confluent stained cell bodies),
        ``"texture"`` (log-normal power-law textures of random spectral slope and contrast in
        random patches), ``"mitochondria"`` (spread cells with short curved tubules and vesicles
        around an unstained nucleus; the bundled model's reserve held-out family, never trained
        on) or ``"mixed"`` (a random sum of the first four).
    shape : int or tuple of int
        Image shape ``(H, W)`` (an int means square).
    pixel_size_um : float
        Sample-space pixel size in micrometres.
    rng : numpy.random.Generator or int, optional
        Random generator or seed.

    Returns
    -------
    numpy.ndarray
        float32 emitter density ``>= 0``; bright structures are near 1.
    """
    if kind not in _GENERATORS:
        raise ValueError(f"Unknown specimen kind {kind!r}; choose one of {SPECIMEN_KINDS}.")
    if isinstance(shape, (int, np.integer)):
        shape = (int(shape), int(shape))
    shape = (int(shape[0]), int(shape[1]))
    if min(shape) < 8:
        raise ValueError(f"Specimen shape {shape} is too small (minimum 8 px per side).")
    if pixel_size_um <= 0:
        raise ValueError("pixel_size_um must be positive.")
    rng = np.random.default_rng(rng)
    img = _GENERATORS[kind](shape, float(pixel_size_um), rng)
    return np.clip(img, 0, None).astype(np.float32)
