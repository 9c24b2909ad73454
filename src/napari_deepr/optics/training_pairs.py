"""Random (defocused, in-focus) fluorescence training pairs simulated on the fly.

:func:`random_training_pair` draws a specimen (or a crop of a real image), a defocus, optics and a
camera exposure, and images the object with the physical PSF (:mod:`napari_deepr.optics.simulate`):
flat or on a random surface, thin or thick, with the object's own smoothness. The trainer's
synthetic data source (:mod:`napari_deepr.train.synthetic`) calls it in worker processes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import fft as sfft
from scipy import ndimage

from .psf import OPTICS_20X_075, Optics, defocus_psf, psf_size
from .simulate import Blurrer, _blend, _percentile_scale
from .specimens import SPECIMEN_KINDS, make_specimen
from .surfaces import random_surface_dpm

_DEFAULT_TRAIN_KINDS = ("beads", "filaments", "nuclei", "tissue", "cells", "mixed")


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
