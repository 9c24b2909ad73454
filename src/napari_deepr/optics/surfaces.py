"""Defocus maps of non-flat samples: tilted planes, random smooth surfaces, cylinders and spheres.

Each returns a float64 ``(H, W)`` map of defocus in micrometres, the ``dpm_um`` that
:func:`napari_deepr.optics.simulate.defocus_map` images a sample on.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _centred_coords(shape: tuple[int, int], pixel_size_um: float) -> tuple[np.ndarray, np.ndarray]:
    h, w = shape
    y = (np.arange(h) - (h - 1) / 2) * pixel_size_um
    x = (np.arange(w) - (w - 1) / 2) * pixel_size_um
    return y[:, None], x[None, :]


def tilt_dpm(
    shape: tuple[int, int],
    pixel_size_um: float,
    angle_deg: float,
    direction_deg: float = 90.0,
    center_um: float = 0.0,
) -> np.ndarray:
    """Defocus map of a flat sample tilted by ``angle_deg``.

    Parameters
    ----------
    shape : tuple of int
        ``(H, W)``.
    pixel_size_um : float
        Pixel size in micrometres.
    angle_deg : float
        Tilt angle. 1.5° over 512 px at 0.325 µm gives δz = 4.36 µm, as in the Deep-R paper.
    direction_deg : float
        Direction of steepest ascent in the image plane, counter-clockwise from the +x (column)
        axis towards +y (row index increasing, i.e. downwards on screen). 90 (default) tilts
        along the rows, so defocus changes from the top row to the bottom row.
    center_um : float
        Defocus at the image centre.

    Returns
    -------
    numpy.ndarray
        float32 map in micrometres.
    """
    y, x = _centred_coords(shape, pixel_size_um)
    d = np.deg2rad(direction_deg)
    dist = x * np.cos(d) + y * np.sin(d)
    return (center_um + np.tan(np.deg2rad(angle_deg)) * dist).astype(np.float32)


def random_surface_dpm(shape: tuple[int, int], span_um: float, rng: np.random.Generator | int | None = None) -> np.ndarray:
    """A random smooth sample surface: zero-mean defocus map whose peak-to-peak is ``span_um``.

    A random mix of a tilt (random direction), a quadratic bowl or saddle (random axes and
    signs) and a smooth random field a few features across, so that training sees the
    tilted, curved and wavy samples the DPM is meant to map, not only uniform defocus.

    Parameters
    ----------
    shape : tuple of int
        ``(H, W)``.
    span_um : float
        Peak-to-peak defocus over the map, in micrometres (0 gives a flat map).
    rng : numpy.random.Generator or int or None
        Random generator or seed.

    Returns
    -------
    numpy.ndarray
        float32 map in micrometres, mean 0.
    """
    rng = np.random.default_rng(rng)
    h, w = shape
    side = float(max(h, w))
    y = (np.arange(h)[:, None] - (h - 1) / 2) / side
    x = (np.arange(w)[None, :] - (w - 1) / 2) / side
    d = rng.uniform(0, 2 * np.pi)
    plane = x * np.cos(d) + y * np.sin(d)
    a = rng.uniform(0, np.pi)
    u, v = x * np.cos(a) + y * np.sin(a), -x * np.sin(a) + y * np.cos(a)
    quad = rng.uniform(-1, 1) * u**2 + rng.uniform(-1, 1) * v**2
    # Smooth field: white noise low-passed to a few cycles across the map.
    noise = rng.standard_normal((h, w))
    sigma = side / rng.uniform(3.0, 8.0)
    wavy = ndimage.gaussian_filter(noise, sigma, mode="reflect")
    parts = [plane, quad, wavy]
    weights = rng.dirichlet(np.ones(3))
    surf = np.zeros((h, w))
    for wgt, part in zip(weights, parts, strict=True):
        ptp = float(np.ptp(part))
        if ptp > 1e-12:
            surf += wgt * part / ptp
    ptp = float(np.ptp(surf))
    if ptp < 1e-12 or span_um <= 0:
        return np.zeros((h, w), np.float32)
    surf = surf / ptp * float(span_um)
    return (surf - surf.mean()).astype(np.float32)


def cylinder_dpm(
    shape: tuple[int, int],
    pixel_size_um: float,
    radius_um: float,
    axis_deg: float = 0.0,
    center_um: float = 0.0,
    convex: bool = True,
) -> np.ndarray:
    """Defocus map of a sample lying on a cylinder (e.g. a curved capillary or bent section).

    The sag ``R - sqrt(R² - d²)`` at distance ``d`` from the cylinder axis (through the image
    centre, at ``axis_deg`` from +x) is added to ``center_um``; ``convex=True`` bends the sample
    away from the focal plane towards negative defocus at the edges (sample edges below the
    focal plane), ``False`` the opposite.
    """
    if radius_um <= 0:
        raise ValueError("radius_um must be positive.")
    y, x = _centred_coords(shape, pixel_size_um)
    a = np.deg2rad(axis_deg)
    d = -x * np.sin(a) + y * np.cos(a)
    sag = radius_um - np.sqrt(np.clip(radius_um**2 - d**2, 0, None))
    sign = 1.0 if convex else -1.0
    return (center_um + sign * sag).astype(np.float32)


def sphere_dpm(
    shape: tuple[int, int],
    pixel_size_um: float,
    radius_um: float,
    center_um: float = 0.0,
    convex: bool = True,
) -> np.ndarray:
    """Defocus map of a sample on a spherical cap centred in the field (see :func:`cylinder_dpm`)."""
    if radius_um <= 0:
        raise ValueError("radius_um must be positive.")
    y, x = _centred_coords(shape, pixel_size_um)
    d2 = x**2 + y**2
    sag = radius_um - np.sqrt(np.clip(radius_um**2 - d2, 0, None))
    sign = 1.0 if convex else -1.0
    return (center_um + sign * sag).astype(np.float32)
