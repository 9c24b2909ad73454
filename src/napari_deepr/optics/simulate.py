"""Physical defocus simulation: fluorescence (incoherent) and brightfield (partially coherent).

Fluorescence model
------------------
A thin fluorescent sample ``O`` imaged with its focal plane ``z`` micrometres away gives the
expected photon image ``s · (O ⊛ h_z) + b``, where ``h_z`` is the unit-sum physical PSF slice of
:func:`napari_deepr.optics.psf.defocus_psf`, ``s`` the exposure (photon scale) and ``b`` a uniform
background. The camera adds Poisson shot noise, Gaussian read noise (electrons) and an offset,
then digitises to uint16 (:func:`camera`).

*Exposure is fixed by the in-focus image*: ``s`` puts the 99.9th percentile of ``O ⊛ h_0`` at
``photons``. Defocus then lowers the peaks while conserving the total signal, exactly as on a
microscope with a fixed exposure time (focus measures depend on this).

Borders: the object is reflect-padded by the PSF half-width before a circular FFT convolution,
so no wrap-around leaks into the field. Spatially varying defocus (tilt, curvature, any DPM) is
simulated by convolving the object at a grid of depths and interpolating linearly per pixel
between the two nearest depths: exact at the sampled depths and smooth in between; the grid is
finer (0.25 µm by default) than the depth of field so the blending error is small.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import fft as sfft
from scipy import ndimage

from .psf import OPTICS_20X_075, Optics, defocus_psf, psf_size
from .specimens import SPECIMEN_KINDS, make_specimen

__all__ = [
    "Blurrer",
    "blur",
    "brightfield",
    "camera",
    "cylinder_dpm",
    "defocus",
    "defocus_map",
    "photon_scale",
    "random_surface_dpm",
    "random_training_pair",
    "simulate_stack",
    "sphere_dpm",
    "tilt_dpm",
    "write_sample_set",
]

_DEFAULT_TRAIN_KINDS = ("beads", "filaments", "nuclei", "tissue", "cells", "mixed")


class Blurrer:
    """Convolve one object with many PSFs, reusing the object's FFT.

    The object is reflect-padded by ``half`` pixels (at least the largest PSF half-width) up to a
    fast FFT size; a circular convolution of the padded array is then exact for every output
    pixel of the original field.

    Parameters
    ----------
    obj : numpy.ndarray
        2-D object.
    half : int
        Largest PSF half-width (pixels) that will be used.
    """

    def __init__(self, obj: np.ndarray, half: int) -> None:
        obj = np.asarray(obj, dtype=np.float64)
        if obj.ndim != 2:
            raise ValueError(f"Expected a 2-D object, got shape {obj.shape}.")
        self.shape = obj.shape
        self.half = int(half)
        h, w = obj.shape
        self.fshape = (
            sfft.next_fast_len(h + 2 * self.half, real=True),
            sfft.next_fast_len(w + 2 * self.half, real=True),
        )
        pad = ((self.half, self.fshape[0] - h - self.half), (self.half, self.fshape[1] - w - self.half))
        self._F = sfft.rfft2(np.pad(obj, pad, mode="reflect"))

    def blur(self, psf: np.ndarray, shift_px: tuple[float, float] | None = None) -> np.ndarray:
        """Return ``obj ⊛ psf`` (float64, object shape), optionally shifted by ``shift_px``.

        Parameters
        ----------
        psf : numpy.ndarray
            Odd-sized, centred PSF with half-width <= ``half``.
        shift_px : (float, float), optional
            Sub-pixel lateral translation (dy, dx) of the sample, applied as a Fourier phase ramp
            so it is exact for band-limited images.
        """
        s = psf.shape[0]
        c = s // 2
        if c > self.half:
            raise ValueError(f"PSF half-width {c} exceeds the padding {self.half}.")
        k = np.zeros(self.fshape)
        k[:s, :s] = psf
        k = np.roll(k, (-c, -c), axis=(0, 1))  # centre the kernel at the origin
        spec = self._F * sfft.rfft2(k)
        if shift_px is not None and any(shift_px):
            fy = sfft.fftfreq(self.fshape[0])[:, None]
            fx = sfft.rfftfreq(self.fshape[1])[None, :]
            spec = spec * np.exp(-2j * np.pi * (fy * shift_px[0] + fx * shift_px[1]))
        out = sfft.irfft2(spec, s=self.fshape)
        h, w = self.shape
        return out[self.half : self.half + h, self.half : self.half + w]


def blur(
    obj: np.ndarray, z_um: float | Sequence[float], optics: Optics | None = None
) -> np.ndarray:
    """Noiseless ``obj ⊛ PSF(z)`` (float32; 2-D for a scalar ``z``, 3-D for a sequence)."""
    optics = OPTICS_20X_075 if optics is None else optics
    zs = np.atleast_1d(np.asarray(z_um, dtype=float))
    b = Blurrer(obj, psf_size(float(np.abs(zs).max()), optics) // 2)
    out = np.stack([b.blur(defocus_psf(z, optics, copy=False)) for z in zs]).astype(np.float32)
    return out[0] if np.ndim(z_um) == 0 else out


def _percentile_scale(infocus: np.ndarray, photons: float) -> float:
    p = float(np.percentile(infocus, 99.9))
    top = float(infocus.max())
    if p <= 1e-3 * top:  # very sparse objects (a few beads): fall back to the maximum
        p = top
    if p <= 0:
        raise ValueError("The object is empty (no positive signal); nothing to image.")
    return photons / p


def photon_scale(obj: np.ndarray, optics: Optics | None = None, photons: float = 500.0) -> float:
    """Exposure factor that puts the 99.9th percentile of the in-focus image at ``photons``."""
    return _percentile_scale(blur(obj, 0.0, optics), photons)


def camera(
    expected_photons: np.ndarray,
    *,
    read_noise: float = 2.0,
    offset: float = 100.0,
    gain: float = 1.0,
    rng: np.random.Generator | int | None = None,
    noise: bool = True,
) -> np.ndarray:
    """sCMOS camera: Poisson shot noise, Gaussian read noise, gain, offset, uint16 clipping.

    Parameters
    ----------
    expected_photons : numpy.ndarray
        Expected detected photo-electrons per pixel.
    read_noise : float
        Read-noise standard deviation in electrons (1-2 e⁻ for an ORCA-Flash4.0).
    offset : float
        Camera offset in ADU.
    gain : float
        Electrons per ADU.
    rng : numpy.random.Generator or int, optional
        Random generator or seed.
    noise : bool
        If False return the noiseless expected ADU as float32 (no rounding, no clipping) so that
        tests and ground truths keep full precision.

    Returns
    -------
    numpy.ndarray
        uint16 ADU (``noise=True``) or float32 expected ADU (``noise=False``).
    """
    lam = np.clip(np.asarray(expected_photons, dtype=np.float64), 0, None)
    if not noise:
        return (lam / gain + offset).astype(np.float32)
    rng = np.random.default_rng(rng)
    electrons = rng.poisson(lam).astype(np.float64)
    adu = (electrons + rng.normal(0.0, read_noise, lam.shape)) / gain + offset
    return np.clip(np.rint(adu), 0, 65535).astype(np.uint16)


def defocus(
    obj: np.ndarray,
    z_um: float,
    optics: Optics | None = None,
    *,
    photons: float = 500.0,
    read_noise: float = 2.0,
    offset: float = 100.0,
    background: float = 0.0,
    gain: float = 1.0,
    rng: np.random.Generator | int | None = None,
    noise: bool = True,
) -> np.ndarray:
    """Uniformly defocused fluorescence image of a thin object.

    Parameters
    ----------
    obj : numpy.ndarray
        In-focus emitter density (2-D, >= 0), e.g. from :func:`make_specimen`.
    z_um : float
        Defocus in micrometres (positive: focal plane above the sample).
    optics : Optics, optional
        Optics (default 20x/0.75 dry, 0.325 µm pixels, 550 nm).
    photons : float
        Photons in the bright (99.9th percentile) pixels of the *in-focus* image: the exposure.
    read_noise, offset, gain : float
        Camera parameters, see :func:`camera`.
    background : float
        Uniform background in photons per pixel (out-of-focus haze, autofluorescence).
    rng : numpy.random.Generator or int, optional
        Random generator or seed.
    noise : bool
        False gives the noiseless expected ADU as float32.

    Returns
    -------
    numpy.ndarray
        uint16 image (float32 when ``noise=False``).
    """
    optics = OPTICS_20X_075 if optics is None else optics
    b = Blurrer(obj, psf_size(abs(float(z_um)), optics) // 2)
    scale = _percentile_scale(b.blur(defocus_psf(0.0, optics, copy=False)), photons)
    img = b.blur(defocus_psf(float(z_um), optics, copy=False))
    return camera(scale * img + background, read_noise=read_noise, offset=offset, gain=gain,
                  rng=rng, noise=noise)


def _depth_grid(zmin: float, zmax: float, n_depths: int | None, max_step_um: float) -> np.ndarray:
    if zmax - zmin < 1e-9:
        return np.array([zmin])
    n = n_depths if n_depths is not None else math.ceil((zmax - zmin) / max_step_um) + 1
    return np.linspace(zmin, zmax, max(2, int(n)))


def _blend(blurrer: Blurrer, dpm: np.ndarray, depths: np.ndarray, optics: Optics) -> np.ndarray:
    # Linear (hat-function) interpolation between depth-convolved images, accumulated one depth
    # at a time so memory stays at two images whatever the number of depths.
    if len(depths) == 1:
        return blurrer.blur(defocus_psf(float(depths[0]), optics, copy=False))
    step = depths[1] - depths[0]
    t = (dpm - depths[0]) / step
    out = np.zeros(dpm.shape)
    for k, z in enumerate(depths):
        wk = np.clip(1.0 - np.abs(t - k), 0.0, None)
        if not wk.any():
            continue
        out += wk * blurrer.blur(defocus_psf(float(z), optics, copy=False))
    return out


def defocus_map(
    obj: np.ndarray,
    dpm_um: np.ndarray,
    optics: Optics | None = None,
    *,
    n_depths: int | None = None,
    max_step_um: float = 0.25,
    photons: float = 500.0,
    read_noise: float = 2.0,
    offset: float = 100.0,
    background: float = 0.0,
    gain: float = 1.0,
    rng: np.random.Generator | int | None = None,
    noise: bool = True,
) -> np.ndarray:
    """Spatially varying defocus from a defocus map (tilt, curvature, anything).

    Each pixel's value is the linear interpolation, at that pixel's defocus, between the object
    convolved with the PSFs of the two nearest sampled depths. Exact at sampled depths; the
    default spacing (0.25 µm) is well below the depth of field (~1 µm at 20x/0.75).

    Parameters
    ----------
    obj : numpy.ndarray
        In-focus emitter density (2-D).
    dpm_um : numpy.ndarray
        Defocus per pixel in micrometres, same shape as ``obj``.
    optics : Optics, optional
        Optics.
    n_depths : int, optional
        Number of sampled depths between the map's minimum and maximum (overrides
        ``max_step_um``).
    max_step_um : float
        Largest spacing of the sampled depths.
    photons, read_noise, offset, background, gain, rng, noise
        As in :func:`defocus`.

    Returns
    -------
    numpy.ndarray
        uint16 image (float32 expected ADU when ``noise=False``).
    """
    optics = OPTICS_20X_075 if optics is None else optics
    dpm = np.asarray(dpm_um, dtype=np.float64)
    if dpm.shape != np.shape(obj):
        raise ValueError(f"DPM shape {dpm.shape} differs from the object shape {np.shape(obj)}.")
    if not np.all(np.isfinite(dpm)):
        raise ValueError("The defocus map contains NaN or infinite values.")
    depths = _depth_grid(float(dpm.min()), float(dpm.max()), n_depths, max_step_um)
    b = Blurrer(obj, psf_size(float(np.abs(depths).max()), optics) // 2)
    scale = _percentile_scale(b.blur(defocus_psf(0.0, optics, copy=False)), photons)
    img = _blend(b, dpm, depths, optics)
    return camera(scale * img + background, read_noise=read_noise, offset=offset, gain=gain,
                  rng=rng, noise=noise)


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


def simulate_stack(
    obj: np.ndarray,
    z_um: Sequence[float],
    optics: Optics | None = None,
    *,
    dpm_offset: np.ndarray | None = None,
    drift_px: float | np.ndarray = 0.0,
    rng: np.random.Generator | int | None = None,
    return_shifts: bool = False,
    max_step_um: float = 0.25,
    **noise: Any,
) -> tuple[np.ndarray, ...]:
    """Axial z-stack of a thin sample, with its ground truth and per-plane defocus maps.

    Parameters
    ----------
    obj : numpy.ndarray
        In-focus emitter density (2-D).
    z_um : sequence of float
        Stage defocus of each plane (micrometres).
    optics : Optics, optional
        Optics.
    dpm_offset : numpy.ndarray, optional
        Sample surface height map (µm) added to every plane's defocus, e.g. :func:`tilt_dpm`;
        None for a flat sample.
    drift_px : float or numpy.ndarray
        Lateral stage drift. A float is the standard deviation (pixels) of a random walk between
        consecutive planes, anchored at zero on the plane nearest z = 0; an array ``(Z, 2)``
        gives each plane's (dy, dx) shift of the sample explicitly.
    rng : numpy.random.Generator or int, optional
        Random generator or seed (noise and drift).
    return_shifts : bool
        Also return the ``(Z, 2)`` sample shifts.
    max_step_um : float
        Depth-grid spacing for spatially varying defocus (see :func:`defocus_map`).
    **noise
        ``photons``, ``read_noise``, ``offset``, ``background``, ``gain``, ``noise``
        (see :func:`defocus`). The exposure is fixed for the whole stack.

    Returns
    -------
    stack : numpy.ndarray
        uint16 ``(Z, Y, X)`` (float32 expected ADU with ``noise=False``).
    ground_truth : numpy.ndarray
        float32 ``(Y, X)``: the expected (noiseless) ADU of an in-focus exposure of the unshifted
        sample, ``obj ⊛ PSF(0)`` with the same exposure, background and offset.
    dpm : numpy.ndarray
        float32 ``(Z, Y, X)`` defocus per pixel of each plane (in the camera frame, i.e. shifted
        with the drift).
    shifts : numpy.ndarray
        Only with ``return_shifts``: float ``(Z, 2)`` sample shifts in pixels.
    """
    optics = OPTICS_20X_075 if optics is None else optics
    rng = np.random.default_rng(rng)
    obj = np.asarray(obj, dtype=np.float64)
    zs = np.asarray(z_um, dtype=float).ravel()
    if zs.size == 0:
        raise ValueError("z_um is empty.")
    photons = float(noise.pop("photons", 500.0))
    background = float(noise.pop("background", 0.0))
    cam = {
        "read_noise": float(noise.pop("read_noise", 2.0)),
        "offset": float(noise.pop("offset", 100.0)),
        "gain": float(noise.pop("gain", 1.0)),
        "noise": bool(noise.pop("noise", True)),
    }
    if noise:
        raise TypeError(f"Unexpected keyword arguments: {sorted(noise)}.")

    if np.ndim(drift_px) == 0:
        steps = rng.normal(0.0, float(drift_px), (zs.size, 2)) if drift_px else np.zeros((zs.size, 2))
        shifts = np.cumsum(steps, axis=0)
        shifts -= shifts[int(np.argmin(np.abs(zs)))]
    else:
        shifts = np.asarray(drift_px, dtype=float).reshape(zs.size, 2)

    offset_map = None if dpm_offset is None else np.asarray(dpm_offset, dtype=np.float64)
    if offset_map is not None and offset_map.shape != obj.shape:
        raise ValueError(f"dpm_offset shape {offset_map.shape} differs from {obj.shape}.")
    lo = float(zs.min() + (0 if offset_map is None else offset_map.min()))
    hi = float(zs.max() + (0 if offset_map is None else offset_map.max()))
    extra = math.ceil(np.abs(shifts).max()) + 2
    b = Blurrer(obj, psf_size(max(abs(lo), abs(hi)), optics) // 2 + extra)
    infocus = b.blur(defocus_psf(0.0, optics, copy=False))
    scale = _percentile_scale(infocus, photons)

    stack, dpms = [], []
    for k, z in enumerate(zs):
        sh = tuple(shifts[k])
        if offset_map is None:
            img = b.blur(defocus_psf(float(z), optics, copy=False), sh)
            dpm = np.full(obj.shape, z, dtype=np.float32)
        else:
            dpm = z + offset_map
            depths = _depth_grid(float(dpm.min()), float(dpm.max()), None, max_step_um)
            img = _blend(b, dpm, depths, optics)
            if any(sh):
                img = _fourier_shift(img, sh)
                dpm = ndimage.shift(dpm, sh, order=1, mode="nearest")
            dpm = dpm.astype(np.float32)
        stack.append(camera(scale * img + background, rng=rng, **cam))
        dpms.append(dpm)
    gt = (scale * infocus + background) / cam["gain"] + cam["offset"]
    out = (np.stack(stack), gt.astype(np.float32), np.stack(dpms).astype(np.float32))
    return out + (shifts,) if return_shifts else out


def _fourier_shift(img: np.ndarray, shift: tuple[float, float]) -> np.ndarray:
    # shift a smooth image by a sub-pixel amount without wrap-around: reflect-pad, phase ramp, crop
    pad = math.ceil(max(abs(shift[0]), abs(shift[1]))) + 8
    p = np.pad(img, pad, mode="reflect")
    f = ndimage.fourier_shift(sfft.fft2(p), shift)
    return sfft.ifft2(f).real[pad:-pad, pad:-pad]


def brightfield(
    absorbance: np.ndarray,
    z_um: float | Sequence[float],
    optics: Optics | None = None,
    *,
    phase_rad: np.ndarray | None = None,
    condenser_na: float | None = None,
    source_step: float = 0.25,
    cell_average: bool = True,
    photons: float = 2000.0,
    read_noise: float = 2.0,
    offset: float = 100.0,
    rng: np.random.Generator | int | None = None,
    noise: bool = True,
) -> np.ndarray:
    """Partially coherent brightfield image of a thin specimen at one wavelength (Abbe summation).

    What it models (details in :mod:`napari_deepr.optics.brightfield`): Köhler illumination by a
    uniform, incoherent circular condenser of ``condenser_na`` (default 0.7 × objective NA), a thin
    specimen with complex transmittance ``t = 10^(-A/2) · exp(iφ)`` (``A`` the optical density,
    ``φ`` the phase delay), an ideal objective pupil of radius NA/λ and angular-spectrum defocus in
    the immersion medium, with the project's sign (``z > 0``: focal plane beyond the specimen, seen
    from the objective). An absorber is sharpest at focus; a weak phase object (unstained cells)
    has almost no contrast at focus and reverses contrast between ``-z`` and ``+z`` (a cell denser
    than its medium is bright at ``z < 0``, dark at ``z > 0``).

    What it does not model: thick or multiply scattering specimens, polarisation, objective
    aberrations, colour (one wavelength; :func:`napari_deepr.optics.brightfield.stained_section`
    images each colour channel at its own wavelength), and condenser misalignment.

    Parameters
    ----------
    absorbance : numpy.ndarray
        Optical density per pixel (>= 0; 0 is clear glass).
    z_um : float or sequence of float
        Defocus in micrometres.
    optics : Optics, optional
        Optics; ``wavelength_um`` is the illumination wavelength.
    phase_rad : numpy.ndarray, optional
        Phase delay of the specimen in radians.
    condenser_na : float, optional
        Illumination NA (default ``0.7 * optics.na``).
    source_step : float
        Spacing of condenser points in units of ``NA_objective / λ``; 0.25 gives ~25 points for
        the default condenser.
    cell_average : bool
        Each condenser point stands for its grid cell (removes most of a coarse grid's ghosting at
        large defocus; see :func:`napari_deepr.optics.brightfield.abbe_intensity`).
    photons : float
        Photons per pixel of the clear background (exposure).
    read_noise, offset, rng, noise
        Camera, see :func:`camera`. With ``noise=False`` the intensity relative to the clear
        background (1.0) is returned as float32, for all planes.

    Returns
    -------
    numpy.ndarray
        uint16 (or float32 relative intensity) image, or a ``(Z, Y, X)`` stack for a sequence.
    """
    from .brightfield import abbe_intensity

    optics = OPTICS_20X_075 if optics is None else optics
    a = np.asarray(absorbance, dtype=np.float64)
    phi = np.zeros_like(a) if phase_rad is None else np.asarray(phase_rad, dtype=np.float64)
    if phi.shape != a.shape or a.ndim != 2:
        raise ValueError("absorbance and phase_rad must be 2-D arrays of the same shape.")
    na_c = 0.7 * optics.na if condenser_na is None else float(condenser_na)
    rel = abbe_intensity(
        10.0 ** (-a / 2) * np.exp(1j * phi), np.atleast_1d(np.asarray(z_um, dtype=float)), na=optics.na,
        wavelength_um=optics.wavelength_um, pixel_size_um=optics.pixel_size_um,
        immersion_index=optics.immersion_index, condenser_na=na_c, source_step=source_step,
        cell_average=cell_average,
    )
    if noise:
        res = camera(photons * rel, read_noise=read_noise, offset=offset, rng=rng)
    else:
        res = rel.astype(np.float32)
    return res[0] if np.ndim(z_um) == 0 else res


def _smooth_object(obj: np.ndarray, sigma_range_um, pixel_size_um: float, rng: np.random.Generator) -> np.ndarray:
    """The object low-pass filtered by a random Gaussian or Butterworth filter (its own smoothness).

    scipy only (no scikit-image), so lent training machines without it can simulate too.
    """
    sigma_px = float(np.exp(rng.uniform(np.log(sigma_range_um[0]), np.log(sigma_range_um[1])))) / pixel_size_um
    if rng.random() < 0.5:
        return ndimage.gaussian_filter(obj, sigma_px, mode="reflect")
    # Butterworth low-pass with its cut-off at the Gaussian's 1/e frequency 1/(sqrt(2) pi sigma),
    # a flatter pass band and a steeper fall (random order): another family of object spectra.
    cutoff = 1.0 / (np.sqrt(2) * np.pi * max(sigma_px, 1e-3))
    order = float(rng.uniform(1.0, 4.0))
    pad = int(min(64, 4 * sigma_px + 8))
    a = np.pad(obj, pad, mode="reflect")
    fy = sfft.fftfreq(a.shape[0])[:, None]
    fx = sfft.rfftfreq(a.shape[1])[None, :]
    h = 1.0 / (1.0 + (np.hypot(fy, fx) / cutoff) ** (2 * order))
    out = sfft.irfft2(sfft.rfft2(a) * h, s=a.shape)[pad:-pad, pad:-pad]
    return np.clip(out, 0, None)


def _thick_offset(z: float, lo: float, hi: float, offset_range, quantum: float, rng) -> float | None:
    """A depth ``d`` with ``|d|`` in ``offset_range`` and both ``d`` and ``z + d`` inside [lo, hi]."""
    q = quantum or 0.1
    cands = []
    for sign in (-1.0, 1.0):
        a, b = sorted((sign * offset_range[0], sign * offset_range[1]))
        a, b = max(a, lo, lo - z), min(b, hi, hi - z)
        if b - a >= q:
            cands.append((a, b))
    if not cands:
        return None
    a, b = cands[rng.integers(len(cands))]
    d = round(round(float(rng.uniform(a, b)) / q) * q, 6)
    return float(np.clip(d, math.ceil(a / q - 1e-9) * q, math.floor(b / q + 1e-9) * q))


def _random_window(img: np.ndarray, side: int, rng: np.random.Generator) -> np.ndarray:
    """A random ``side`` × ``side`` window over the last two axes of ``img`` (reflect-padded first when smaller)."""
    h, w = img.shape[-2:]
    if h < side or w < side:
        py, px_ = max(0, side - h), max(0, side - w)
        img = np.pad(img, ((0, 0),) * (img.ndim - 2) + ((py // 2, py - py // 2), (px_ // 2, px_ - px_ // 2)),
                     mode="reflect")
    y0 = int(rng.integers(0, img.shape[-2] - side + 1))
    x0 = int(rng.integers(0, img.shape[-1] - side + 1))
    return img[..., y0 : y0 + side, x0 : x0 + side]


def _magnified_window(img: np.ndarray, side: int, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """A random ``side`` × ``side`` window (last two axes) of ``img`` magnified by ``scale``.

    Crops what becomes ``side`` pixels after the zoom, then zooms linearly; when shrinking, a
    Gaussian prefilter of σ = (1/scale − 1)/2 anti-aliases (scikit-image's rule for resize). scipy
    only, so lent training machines without scikit-image can simulate too. Real images of unknown
    pixel size are used at several scales this way (fluorescence and brightfield pairs alike).
    """
    src = max(8, int(round(side / scale)))
    win = _random_window(img, src, rng)
    if src == side:
        return win
    lead = win.ndim - 2
    if scale < 1:
        win = ndimage.gaussian_filter(win, (0,) * lead + ((1 / scale - 1) / 2,) * 2, mode="reflect")
    flat = win.reshape((-1, src, src))
    out = np.stack([ndimage.zoom(c, side / src, order=1, mode="reflect", grid_mode=True)[:side, :side] for c in flat])
    if out.shape[1:] != (side, side):
        out = np.pad(out, ((0, 0), (0, side - out.shape[1]), (0, side - out.shape[2])), mode="reflect")
    return out.reshape(win.shape[:-2] + (side, side))


def _real_crop(img: np.ndarray, side: int, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    img = np.asarray(img, dtype=np.float64)
    if img.ndim != 2:
        raise ValueError("real_images must be 2-D arrays.")
    crop = np.rot90(_magnified_window(img, side, rng, scale), rng.integers(4))
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    lo, hi = np.percentile(crop, [1, 99.9])
    return np.clip((crop - lo) / max(hi - lo, 1e-12), 0, None)


def random_training_pair(
    rng: np.random.Generator | int | None,
    *,
    patch: int = 256,
    optics: Optics | None = None,
    z_range_um: tuple[float, float] = (-5.0, 5.0),
    specimen_kinds: Sequence[str] = _DEFAULT_TRAIN_KINDS,
    real_images: Sequence[np.ndarray] | None = None,
    photons_range: tuple[float, float] = (150.0, 3000.0),
    read_noise_range: tuple[float, float] = (1.0, 4.0),
    wavelength_range_um: tuple[float, float] = (0.45, 0.65),
    background_fraction: tuple[float, float] = (0.0, 0.05),
    real_fraction: float = 0.5,
    z_quantum_um: float = 0.1,
    surface_fraction: float = 0.0,
    surface_span_um: tuple[float, float] = (0.5, 3.0),
    near_focus_fraction: float = 0.0,
    near_focus_um: float = 1.0,
    smooth_fraction: float = 0.0,
    smooth_sigma_um: tuple[float, float] = (0.1, 1.0),
    thick_fraction: float = 0.0,
    thick_offset_um: tuple[float, float] = (2.0, 5.0),
    thick_weight: tuple[float, float] = (0.2, 1.0),
    real_scale_range: tuple[float, float] = (1.0, 1.0),
) -> tuple[np.ndarray, np.ndarray, float | np.ndarray]:
    """One synthetic (defocused, in-focus) training pair, generated on the fly.

    The object is drawn from ``specimen_kinds`` (or, with probability ``real_fraction``, a random
    crop of one of ``real_images``, treated as an emitter density after percentile scaling and a
    random D4 transform). It is generated ``psf_size // 2`` pixels larger on each side than the
    patch and blurred as a whole, so light from outside the patch blurs in, as in a real field.

    Randomised per call: specimen, defocus ``z`` (uniform in ``z_range_um``, quantised to
    ``z_quantum_um`` so PSFs come from the cache), emission wavelength (uniform, quantised to
    10 nm), exposure (log-uniform in ``photons_range``), read noise, background.

    Parameters
    ----------
    rng : numpy.random.Generator or int or None
        Random generator or seed.
    patch : int
        Side of the returned square images.
    optics : Optics, optional
        Base optics; the wavelength is replaced by a random one.
    z_range_um : (float, float)
        Defocus range.
    specimen_kinds : sequence of str
        Procedural specimens to draw from (see :data:`SPECIMEN_KINDS`).
    real_images : sequence of numpy.ndarray, optional
        In-focus 2-D real images used as objects.
    photons_range, read_noise_range, wavelength_range_um, background_fraction
        Ranges of the random camera and optics parameters; the background is a fraction of the
        photon budget.
    real_fraction : float
        Probability of using a real image when ``real_images`` is given.
    z_quantum_um : float
        Quantisation of ``z`` (0 disables it).
    surface_fraction : float
        Probability that the sample is not flat but a random smooth surface
        (:func:`random_surface_dpm`: tilt, curvature, waviness) whose peak-to-peak over the
        simulated field is drawn from ``surface_span_um`` and which lies inside ``z_range_um``.
        Its image is simulated per pixel as in :func:`defocus_map` (depths on a grid of
        ``2 * z_quantum_um``, or 0.2 µm). The target is still the whole field in focus. Never
        used when the range is a single value (validation pins the defocus that way).
    surface_span_um : (float, float)
        Range of the surface's peak-to-peak defocus.
    near_focus_fraction : float
        Probability that ``z`` is drawn uniformly from ``±near_focus_um`` (inside ``z_range_um``)
        instead of the whole range: pairs at and near focus, where the right output is the input
        (denoised), teach the generator to change nothing there. Never used for a pinned range.
    near_focus_um : float
        Half-width of that near-focus band.
    smooth_fraction : float
        Probability that the object is low-pass filtered before imaging (a Gaussian of sigma
        log-uniform in ``smooth_sigma_um``, or a Butterworth filter with its cut-off at the
        frequency of the same sigma). This is the specimen's own smoothness (soft-edged nuclei,
        diffuse stains), not an optical blur: its in-focus target stays smooth, so the generator
        learns that a smooth object at focus is not a sharp one out of focus.
    smooth_sigma_um : (float, float)
        Range of the object's own blur (µm in the sample).
    thick_fraction : float
        Probability of a thick sample: a second object (another specimen or real crop) lies
        ``thick_offset_um`` above or below the sample plane (sign random), with a total signal
        ``thick_weight`` times the main object's. It is imaged at its own defocus in the target
        (``d``) and in the input (``z + d``), so the in-focus target carries the out-of-focus haze
        of other depths, as a real in-focus image of a thick sample does. Offsets are limited so
        that ``d`` and ``z + d`` stay inside ``z_range_um`` (PSF banks hold nothing beyond it); when
        no such offset exists, or the sample is a surface, the second layer is skipped.
    thick_offset_um : (float, float)
        Range of ``|d|``.
    thick_weight : (float, float)
        Range of the second layer's total signal relative to the main object's.
    real_scale_range : (float, float)
        Real images are magnified by a factor log-uniform in this range (anti-aliased resize)
        before cropping: their true pixel size is unknown, and scale changes how sharp an object
        is per pixel.

    Returns
    -------
    defocused : numpy.ndarray
        float32 noisy image in photo-electrons (offset removed, read noise included).
    infocus : numpy.ndarray
        float32 noiseless target ``s · (O ⊛ PSF(0)) + b`` in the same units: the expected image of
        the in-focus plane. Both should be z-scored before training.
    z_um : float or numpy.ndarray
        The defocus used: a float for a flat sample, a float32 ``(patch, patch)`` map for a surface.
    """
    rng = np.random.default_rng(rng)
    if surface_fraction > 0 and (np.shape(surface_span_um) != (2,) or min(surface_span_um) < 0):
        raise ValueError("surface_span_um must be two non-negative numbers (µm), e.g. [0.5, 3.0].")
    base = OPTICS_20X_075 if optics is None else optics
    wl = round(float(rng.uniform(*wavelength_range_um)), 2)
    opt = base.replace(wavelength_um=wl)
    lo, hi = float(min(z_range_um)), float(max(z_range_um))
    # Draws are skipped for a pinned range so validation sets do not depend on these options.
    if near_focus_fraction > 0 and hi > lo and rng.random() < near_focus_fraction:
        z = float(rng.uniform(max(lo, -near_focus_um), min(hi, near_focus_um)))
    else:
        z = float(rng.uniform(*z_range_um))
    if z_quantum_um:
        z = round(round(z / z_quantum_um) * z_quantum_um, 6)
    surface = surface_fraction > 0 and hi > lo and rng.random() < surface_fraction
    zmax = max(abs(z_range_um[0]), abs(z_range_um[1]))
    half = psf_size(zmax, opt) // 2
    side = patch + 2 * half
    kinds = tuple(specimen_kinds)
    for k in kinds:
        if k not in SPECIMEN_KINDS:
            raise ValueError(f"Unknown specimen kind {k!r}; choose from {SPECIMEN_KINDS}.")

    def draw_object() -> np.ndarray:
        if bool(real_images) and rng.random() < real_fraction:
            lo_s, hi_s = float(min(real_scale_range)), float(max(real_scale_range))
            scale = float(np.exp(rng.uniform(np.log(lo_s), np.log(hi_s)))) if hi_s > lo_s else lo_s
            return _real_crop(real_images[rng.integers(len(real_images))], side, rng, scale=scale)
        return make_specimen(kinds[rng.integers(len(kinds))], side, opt.pixel_size_um, rng)

    obj = draw_object()
    if smooth_fraction > 0 and rng.random() < smooth_fraction:
        obj = _smooth_object(obj, smooth_sigma_um, opt.pixel_size_um, rng)
    # the object itself fills the margin, so only a thin reflect pad (PSF fits in `half`) is needed
    if surface:
        step = 2 * z_quantum_um if z_quantum_um else 0.2
        # Depths on a fixed grid so their PSFs come from the cache (or a PSF bank, which holds
        # planes only inside the range): the surface stays between the grid points inside it.
        lo_g, hi_g = math.ceil(lo / step - 1e-9) * step, math.floor(hi / step + 1e-9) * step
        if hi_g < lo_g:
            lo_g = hi_g = round(z / step) * step
        span = min(float(rng.uniform(*surface_span_um)), hi_g - lo_g)
        centre = float(rng.uniform(lo_g + span / 2, hi_g - span / 2))
        surf = random_surface_dpm((side, side), span, rng)
        surf -= (surf.max() + surf.min()) / 2  # mid-range at the centre, so nothing is clipped
        dpm = np.clip(centre + surf, lo_g, hi_g)
        # (a map touching a grid depth within round-off must not reach one depth beyond it)
        depths = np.arange(math.floor(dpm.min() / step + 1e-6), math.ceil(dpm.max() / step - 1e-6) + 1) * step
        depths = np.round(depths, 6)
        b = Blurrer(obj, psf_size(float(np.abs(depths).max()), opt) // 2)
    else:
        b = Blurrer(obj, psf_size(abs(z), opt) // 2)
    infocus = b.blur(defocus_psf(0.0, opt, copy=False))[half:-half, half:-half]
    # An empty crop holds only FFT rounding noise (~1e-16 of the object); the photon scaling would
    # blow that up into a garbage pair, so it becomes a flat, valid image instead.
    if float(infocus.max()) <= 1e-9 * float(np.abs(obj).max()):
        infocus = np.ones_like(infocus)
    if surface:
        blurred = _blend(b, dpm, depths, opt)[half:-half, half:-half]
        z = dpm[half:-half, half:-half].astype(np.float32)
    else:
        blurred = b.blur(defocus_psf(z, opt, copy=False))[half:-half, half:-half]
        d = _thick_offset(z, lo, hi, thick_offset_um, z_quantum_um, rng) if (
            thick_fraction > 0 and rng.random() < thick_fraction) else None
        if d is not None:
            # A second layer of the sample at depth d: its haze is part of the in-focus truth.
            other = draw_object()
            other *= float(rng.uniform(*thick_weight)) * obj.sum() / max(float(other.sum()), 1e-12)
            b2 = Blurrer(other, psf_size(max(abs(d), abs(z + d)), opt) // 2)
            infocus = infocus + b2.blur(defocus_psf(d, opt, copy=False))[half:-half, half:-half]
            blurred = blurred + b2.blur(defocus_psf(round(z + d, 6), opt, copy=False))[half:-half, half:-half]
    photons = float(np.exp(rng.uniform(np.log(photons_range[0]), np.log(photons_range[1]))))
    scale = _percentile_scale(infocus, photons)
    bg = float(rng.uniform(*background_fraction)) * photons
    read_noise = float(rng.uniform(*read_noise_range))
    lam = np.clip(scale * blurred + bg, 0, None)
    noisy = rng.poisson(lam) + rng.normal(0.0, read_noise, lam.shape)
    return noisy.astype(np.float32), (scale * infocus + bg).astype(np.float32), z


def write_sample_set(
    out_dir: str | Path,
    *,
    specimen: str = "mixed",
    size: int = 512,
    z_um: Sequence[float] = (-4, -2, 0, 2, 4),
    tilt_deg: float = 1.5,
    seed: int = 0,
    optics: Optics | None = None,
    stack_step_um: float = 0.5,
    photons: float = 500.0,
) -> list[Path]:
    """Write a calibrated simulated sample set (used by ``deepr simulate``).

    Files (ImageJ/OME-calibrated TIFFs via :func:`napari_deepr.io.write_image`):

    * ``object.tif``: the emitter density (float32);
    * ``ground_truth.tif``: expected in-focus image (float32 ADU);
    * ``defocus_{z:+.1f}um.tif``: uniformly defocused noisy images (uint16), one per ``z_um``;
    * ``tilted_{tilt:.1f}deg.tif`` and ``tilted_{tilt:.1f}deg_dpm.tif``: a field tilted by
      ``tilt_deg`` along the rows (uint16) and its defocus map (float32, µm);
    * ``zstack.tif``: a ``(Z, Y, X)`` stack from ``min(z_um)`` to ``max(z_um)`` in
      ``stack_step_um`` steps with a little lateral drift (0.15 px random walk), uint16;
    * ``samples.json``: a sidecar describing every file (optics, z values, units, seed).

    Returns
    -------
    list of Path
        Written files, the JSON sidecar last.
    """
    from ..io import write_image  # io is below optics in the layering; imported lazily

    optics = OPTICS_20X_075 if optics is None else optics
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    px = optics.pixel_size_um
    obj = make_specimen(specimen, (size, size), px, rng)
    meta_common = {"simulated": True, "optics": optics.to_dict(), "specimen": specimen,
                   "seed": seed, "photons": photons, "generator": "napari_deepr.optics.simulate"}
    written: list[Path] = []
    files: list[dict[str, Any]] = []

    def _w(name: str, arr: np.ndarray, desc: dict[str, Any], axes: str = "YX", dz=None) -> None:
        meta = dict(meta_common, **desc)
        p = write_image(out / name, arr, axes=axes, pixel_size_um=px, z_step_um=dz, metadata=meta)
        written.append(Path(p))
        files.append({"file": name, "axes": axes, "dtype": str(arr.dtype), **desc})

    _w("object.tif", obj, {"kind": "object", "units": "emitter density (a.u.)"})
    zs = [float(z) for z in z_um]
    stack_z = np.round(np.arange(min(zs), max(zs) + stack_step_um / 2, stack_step_um), 6)
    stack, gt, _ = simulate_stack(obj, stack_z, optics, drift_px=0.15, rng=rng, photons=photons)
    _w("ground_truth.tif", gt, {"kind": "ground_truth", "defocus_um": 0.0, "units": "ADU (expected)"})
    for z in zs:
        img = defocus(obj, z, optics, photons=photons, rng=rng)
        _w(f"defocus_{z:+.1f}um.tif", img, {"kind": "uniform_defocus", "defocus_um": z})
    if tilt_deg:
        dpm = tilt_dpm((size, size), px, tilt_deg)
        img = defocus_map(obj, dpm, optics, photons=photons, rng=rng)
        tag = f"tilted_{tilt_deg:.1f}deg"
        desc = {"kind": "tilted", "tilt_deg": tilt_deg, "direction_deg": 90.0,
                "delta_z_um": float(dpm.max() - dpm.min())}
        _w(f"{tag}.tif", img, desc)
        _w(f"{tag}_dpm.tif", dpm, {"kind": "dpm", "of": f"{tag}.tif", "units": "um"})
    _w("zstack.tif", stack, {"kind": "zstack", "z_um": stack_z.tolist(), "z_step_um": stack_step_um,
                             "drift_px_per_plane": 0.15,
                             "in_focus_index": int(np.argmin(np.abs(stack_z)))},
       axes="ZYX", dz=stack_step_um)
    sidecar = out / "samples.json"
    tmp = sidecar.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"format": "napari-deepr-samples/1", **meta_common, "files": files},
                              indent=2))
    tmp.replace(sidecar)
    written.append(sidecar)
    return written
