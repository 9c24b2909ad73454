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
Other parts of the simulator live beside this module and are re-exported here, so
``napari_deepr.optics.simulate`` stays the one import path: defocus maps of non-flat samples in
:mod:`.surfaces`, z-stacks and the sample set in :mod:`.zstacks`, random training pairs in
:mod:`.training_pairs`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import fft as sfft
from scipy import ndimage

from .psf import OPTICS_20X_075, Optics, defocus_psf, psf_size

__all__ = [
    "Blurrer",
    "blur",
    "brightfield",
    "camera",
    "defocus",
    "defocus_map",
    "photon_scale",
]

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


# Where the names moved when this module was split (imported lazily: those modules import this one).
_MOVED = {
    "cylinder_dpm": "surfaces", "random_surface_dpm": "surfaces", "sphere_dpm": "surfaces", "tilt_dpm": "surfaces",
    "_centred_coords": "surfaces",
    "simulate_stack": "zstacks", "write_sample_set": "zstacks",
    "random_training_pair": "training_pairs", "_DEFAULT_TRAIN_KINDS": "training_pairs",
    "_magnified_window": "training_pairs", "_random_window": "training_pairs", "_real_crop": "training_pairs",
    "_smooth_object": "training_pairs", "_thick_offset": "training_pairs",
}


__all__ += sorted(name for name in _MOVED if not name.startswith("_"))


def __getattr__(name: str):
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(f"{__package__}.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
