"""Brightfield (transmitted-light) defocus of thin specimens: Abbe summation, per colour channel.

What is modelled
----------------
*Köhler illumination, partially coherent.* The condenser aperture is a uniform, mutually
incoherent disc of numerical aperture ``condenser_na``; each of its points illuminates the specimen
with one tilted plane wave. The image is the incoherent sum of the coherent images of all
condenser points (Abbe's method)::

    I_z(x) = (1/S) Σ_s |F⁻¹{ T(f) P(f + f_s) exp(-i 2π z [k_z(f + f_s) - k_z(f_s)]) }|²,
    k_z(f) = √((n/λ)² - |f|²),

with ``T`` the spectrum of the specimen's complex transmittance, ``P`` the ideal objective pupil
(radius NA/λ), ``n`` the immersion index and ``f_s`` the condenser point's spatial frequency.
The intensity is relative to clear glass (1.0).

*Thin specimen.* One layer with transmittance ``t = 10^(-OD/2) · exp(iφ)``: ``OD`` is the decadic
optical density (absorbance, Beer-Lambert), ``φ`` the phase delay. A stained section is described
by stain amounts per pixel; the optical density in a colour channel is their sum weighted by each
stain's optical-density vector (Beer-Lambert per stain; Ruifrok & Johnston 2001 colour
deconvolution, the vectors ``skimage.color.rgb2hed`` uses). The phase is an optical path
difference (µm), so ``φ = 2π OPD / λ`` per channel.

*Colour.* Each camera channel is imaged at its own wavelength (default 0.61, 0.54, 0.47 µm for
R, G, B): the pupil cut-off NA/λ and the defocus phase depend on λ, so at fixed NA the blur of the
red channel differs from the blue one. The camera's white balance divides each channel by its
clear-glass level (clear glass is white).

*Defocus sign* (the project's convention, see :mod:`napari_deepr.optics.psf`): positive ``z``
means the focal plane lies further from the objective than the specimen, i.e. upstream of it in
the transmitted light; the image is then the back-propagated field. A specimen that is optically
denser than its surroundings (a cell; positive ``φ``) acts as a weak converging lens: it looks
bright when the focal plane is between it and the objective (``z < 0``) and dark for ``z > 0``.

*Source sampling.* The condenser disc is sampled on a square grid of step ``source_step``
(in units of NA/λ). At large defocus neighbouring condenser points give images displaced by
``|z| λ Δf / n``; summing points would leave ghost copies, so by default each point stands for
its whole grid cell: to first order in the cell size, tilting the illumination across a cell
translates the coherent image, so the cell integrates to the point's image convolved with a
square of side ``|z| λ Δf / n`` (``cell_average=True``). This removes most of the sampling error
of a coarse grid (tested against a four-times finer grid).

What is not modelled
--------------------
Thick or multiply scattering specimens (one thin layer only), polarisation (scalar optics),
objective aberrations (ideal pupil), broadband spectra inside a colour channel (one wavelength
per channel), dispersion of the phase, camera colour cross-talk, condenser misalignment or a
condenser aperture image that is not a uniform disc, stray light and glare.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import fft as sfft
from scipy import ndimage

from .psf import OPTICS_20X_075, Optics
from .stains import (
    H_AND_E,
    STAIN_OD,
    _jittered_stains,
    od_to_rgb,
    procedural_he,
    real_stain_amounts,
    rgb_to_od,
    rgb_to_stains,
    stains_to_od,
    stains_to_rgb,
)

__all__ = [
    "H_AND_E",
    "RGB_WAVELENGTHS_UM",
    "STAIN_OD",
    "abbe_intensity",
    "blur_half_width",
    "condenser_points",
    "od_to_rgb",
    "procedural_he",
    "random_brightfield_pair",
    "real_stain_amounts",
    "rgb_to_od",
    "rgb_to_stains",
    "stained_section",
    "stains_to_od",
    "stains_to_rgb",
    "weak_object_transfer",
]

#: Wavelengths (µm) at which the R, G and B channels of a colour camera are imaged.
RGB_WAVELENGTHS_UM: tuple[float, float, float] = (0.61, 0.54, 0.47)


# -- the Abbe sum ------------------------------------------------------------------------------------
def condenser_points(na: float, wavelength_um: float, condenser_na: float, source_step: float) -> np.ndarray:
    """Spatial frequencies ``(n, 2)`` (cycles/µm) of the condenser points on the sampling grid.

    The grid has step ``source_step · NA / λ`` and always contains the axis; points lie inside the
    condenser disc ``|f| <= condenser_na / λ``. A condenser NA of 0 gives the single axial point
    (coherent illumination).
    """
    if source_step <= 0:
        raise ValueError("source_step must be positive.")
    if condenser_na < 0:
        raise ValueError("condenser_na must be zero or positive.")
    fc = na / wavelength_um
    step = source_step * fc
    r = condenser_na / wavelength_um
    m = int(math.floor(r / step + 1e-9))
    g = np.arange(-m, m + 1) * step
    sy, sx = np.meshgrid(g, g, indexing="ij")
    keep = sy**2 + sx**2 <= r**2 * (1 + 1e-9) + 1e-18
    return np.stack([sy[keep], sx[keep]], axis=1)


def blur_half_width(z_max_um: float, optics: Optics, condenser_na: float | None = None) -> int:
    """Pixels of margin that hold a brightfield image's defocus blur at ``|z| <= z_max_um``.

    1.3 × the geometric radius of the widest cone (objective or condenser, whichever is larger)
    plus three Airy radii and the condenser-cell walk-off; light from farther away is negligible.
    """
    na = max(optics.na, condenser_na or 0.0)
    s = min(na / optics.immersion_index, 0.99)
    r = 1.3 * abs(z_max_um) * s / math.sqrt(1 - s * s) + 3 * optics.airy_radius_um
    return max(4, math.ceil(r / optics.pixel_size_um) + 2)


def abbe_intensity(
    transmittance: np.ndarray,
    z_um: float | Sequence[float],
    *,
    na: float,
    wavelength_um: float,
    pixel_size_um: float,
    immersion_index: float = 1.0,
    condenser_na: float,
    source_step: float = 0.25,
    cell_average: bool = True,
    pad: int | None = None,
    single: bool = False,
) -> np.ndarray:
    """Partially coherent image intensity of a thin specimen (relative to clear glass).

    Parameters
    ----------
    transmittance : numpy.ndarray
        Complex 2-D transmittance ``t``.
    z_um : float or sequence of float
        Defocus (project sign convention, see the module docstring).
    na, wavelength_um, pixel_size_um, immersion_index : float
        Objective NA, wavelength, sample-space pixel size and immersion index.
    condenser_na : float
        Illumination NA (must not exceed the objective NA: this is brightfield, not darkfield).
    source_step : float
        Condenser grid step in units of NA/λ.
    cell_average : bool
        Let each condenser point stand for its grid cell (see the module docstring).
    pad : int, optional
        Reflect-padding in pixels against wrap-around (default: the blur half-width at the largest
        ``|z|``). Use 0 when the field already carries its own margin that will be cropped.
    single : bool
        Compute the FFTs in single precision (about twice as fast; relative error ~1e-6, enough for
        training data, not for the tests' exact identities).

    Returns
    -------
    numpy.ndarray
        float64 ``(H, W)`` for a scalar ``z``, ``(Z, H, W)`` for a sequence.
    """
    t = np.asarray(transmittance)
    if t.ndim != 2:
        raise ValueError("The transmittance must be a 2-D array.")
    if condenser_na > na + 1e-9:
        raise ValueError(f"The condenser NA ({condenser_na}) exceeds the objective NA ({na}); that is darkfield, not brightfield.")
    zs = np.atleast_1d(np.asarray(z_um, dtype=float))
    lam, n, px = float(wavelength_um), float(immersion_index), float(pixel_size_um)
    if pad is None:
        opt = Optics(na=na, wavelength_um=lam, pixel_size_um=px, immersion_index=n)
        pad = blur_half_width(float(np.abs(zs).max()), opt, condenser_na)
    h, w = t.shape
    fshape = (sfft.next_fast_len(h + 2 * pad), sfft.next_fast_len(w + 2 * pad))
    widths = ((pad, fshape[0] - h - pad), (pad, fshape[1] - w - pad))
    ctype, rtype = (np.complex64, np.float32) if single else (np.complex128, np.float64)
    tp = np.pad(t.astype(ctype), widths, mode="reflect" if min(h, w) > max(max(widths)) else "symmetric")
    T = sfft.fft2(tp, workers=1)
    fy = sfft.fftfreq(fshape[0], d=px)[:, None]
    fx = sfft.fftfreq(fshape[1], d=px)[None, :]
    fc = na / lam
    src = condenser_points(na, lam, condenser_na, source_step)
    kmax2 = (n / lam) ** 2
    out = []
    for z in zs:
        acc = np.zeros(fshape, rtype)
        for sy, sx in src:
            f2 = (fy + sy) ** 2 + (fx + sx) ** 2
            pupil = f2 <= fc**2
            kz = np.sqrt(np.clip(kmax2 - f2, 0, None)) - math.sqrt(max(kmax2 - sy * sy - sx * sx, 0.0))
            # exp(-i...): back-propagation, the project's sign (z > 0: focal plane beyond the sample)
            h_s = np.where(pupil, np.exp(-2j * np.pi * z * kz), 0).astype(ctype, copy=False)
            acc += np.abs(sfft.ifft2(T * h_s, workers=1)) ** 2
        acc /= len(src)
        if cell_average and len(src) > 1 and z != 0:
            side = abs(z) * lam * source_step * fc / n  # walk-off across one condenser cell (µm)
            box = np.sinc(side * fy) * np.sinc(side * sfft.rfftfreq(fshape[1], d=px)[None, :])
            acc = sfft.irfft2(sfft.rfft2(acc, workers=1) * box.astype(rtype), s=fshape, workers=1)
        out.append(acc[pad : pad + h, pad : pad + w])
    res = np.stack(out)
    return res[0] if np.ndim(z_um) == 0 else res


def stained_section(
    amounts: np.ndarray,
    z_um: float | Sequence[float],
    optics: Optics | None = None,
    *,
    stains: np.ndarray = H_AND_E,
    wavelengths_um: Sequence[float] = RGB_WAVELENGTHS_UM,
    phase_opd_um: np.ndarray | None = None,
    condenser_na: float | None = None,
    source_step: float = 0.25,
    cell_average: bool = True,
    pad: int | None = None,
    single: bool = False,
) -> np.ndarray:
    """White-balanced colour image of a thin stained section (relative transmission per channel).

    Parameters
    ----------
    amounts : numpy.ndarray
        ``(S, H, W)`` stain amounts (optical density along each stain vector, see
        :func:`rgb_to_stains`); ``S`` = rows of ``stains``.
    z_um : float or sequence of float
        Defocus in µm.
    optics : Optics, optional
        NA, pixel size and immersion (default 20×/0.75 dry, 0.325 µm); its wavelength is unused.
    stains : numpy.ndarray
        ``(S, C)`` optical-density vectors, one column per colour channel.
    wavelengths_um : sequence of float
        Wavelength of each colour channel.
    phase_opd_um : numpy.ndarray, optional
        Optical path difference (µm) of the section against the mountant; phase ``2π OPD / λ``.
    condenser_na : float, optional
        Illumination NA (default 0.7 × objective NA).
    source_step, cell_average, pad, single
        See :func:`abbe_intensity`.

    Returns
    -------
    numpy.ndarray
        float64 ``(C, H, W)`` (or ``(Z, C, H, W)`` for a sequence of ``z``), clear glass = 1 in
        every channel (white balance).
    """
    optics = OPTICS_20X_075 if optics is None else optics
    a = np.asarray(amounts, dtype=np.float64)
    st = np.asarray(stains, dtype=np.float64)
    if a.ndim != 3 or a.shape[0] != st.shape[0]:
        raise ValueError(f"amounts must be (S, H, W) with S = {st.shape[0]} stains, got {a.shape}.")
    if st.shape[1] != len(wavelengths_um):
        raise ValueError("stains needs one column per wavelength (colour channel).")
    na_c = 0.7 * optics.na if condenser_na is None else float(condenser_na)
    od = np.clip(np.tensordot(st.T, a, axes=1), 0, None)  # (C, H, W): Beer-Lambert, densities add
    opd = None if phase_opd_um is None else np.asarray(phase_opd_um, dtype=np.float64)
    if opd is not None and opd.shape != a.shape[1:]:
        raise ValueError("phase_opd_um must have the image shape.")
    chans = []
    for c, lam in enumerate(wavelengths_um):
        phase = 0.0 if opd is None else 2 * np.pi * opd / float(lam)
        t = 10.0 ** (-od[c] / 2) * np.exp(1j * phase)
        chans.append(abbe_intensity(
            t, z_um, na=optics.na, wavelength_um=float(lam), pixel_size_um=optics.pixel_size_um,
            immersion_index=optics.immersion_index, condenser_na=na_c, source_step=source_step,
            cell_average=cell_average, pad=pad, single=single,
        ))
    return np.stack(chans, axis=-3)


def _crop_channels(img: np.ndarray, side: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Random ``side``² crop of a ``(C, H, W)`` image magnified by ``scale`` (anti-aliased), random D4."""
    from .training_pairs import _magnified_window

    crop = np.rot90(_magnified_window(img, side, rng, scale), int(rng.integers(4)), axes=(1, 2))
    if rng.random() < 0.5:
        crop = crop[:, :, ::-1]
    return np.ascontiguousarray(crop)

def random_brightfield_pair(
    rng: np.random.Generator | int | None,
    *,
    patch: int = 256,
    optics: Optics | None = None,
    z_range_um: tuple[float, float] = (-10.0, 10.0),
    real_images: Sequence[np.ndarray] | None = None,
    real_fraction: float = 0.6,
    real_scale_range: tuple[float, float] = (0.5, 2.0),
    stain_scale_range: tuple[float, float] = (0.6, 1.6),
    stain_vector_jitter: float = 0.05,
    wavelengths_um: Sequence[float] = RGB_WAVELENGTHS_UM,
    wavelength_jitter_um: float = 0.01,
    condenser_ratio_range: tuple[float, float] = (0.4, 0.8),
    phase_opd_range_um: tuple[float, float] = (0.0, 0.1),
    photons_range: tuple[float, float] = (300.0, 5000.0),
    read_noise_range: tuple[float, float] = (1.0, 4.0),
    white_level_range: tuple[float, float] = (200.0, 245.0),
    white_balance_error: float = 0.03,
    source_step: float = 0.25,
    max_walkoff_um: float = 0.75,
    near_focus_fraction: float = 0.0,
    near_focus_um: float = 1.0,
    z_quantum_um: float = 0.0,
    quantize: bool = True,
) -> tuple[np.ndarray, np.ndarray, float]:
    """One synthetic RGB brightfield training pair of a stained section (defocused, in focus).

    The section is drawn either from ``real_images`` (in-focus RGB H&E/IHC images, colour
    deconvolved into stain amounts, magnified by a factor log-uniform in ``real_scale_range``,
    random crop and D4 transform) with probability ``real_fraction``, or procedurally
    (:func:`procedural_he`). Stain augmentation happens in optical-density space: each stain's amount
    is scaled (log-uniform in ``stain_scale_range``) and the stain vectors are perturbed
    (``stain_vector_jitter``) before the colours are recomposed (Beer-Lambert). A weak phase
    follows the tissue density (OPD up to ``phase_opd_range_um``). Both images are simulated by
    :func:`stained_section` with a random condenser NA (``condenser_ratio_range`` × objective NA)
    and per-channel wavelengths jittered by ``wavelength_jitter_um``; the object carries a margin of
    the blur half-width so light from outside the patch blurs in.

    Camera: the clear-glass level of channel ``c`` collects ``photons × w_c`` photo-electrons
    (``w_c`` a random spectral weight, 0.6-1.0), with Poisson and Gaussian read noise; white
    balance scales clear glass to a white level log-uniform in ``white_level_range`` (DN of an
    8-bit camera), with a per-channel balance error (``white_balance_error``, the same in input and
    target). The input is rounded and clipped to 0-255 when ``quantize``.

    Parameters
    ----------
    rng : numpy.random.Generator or int or None
        Random generator or seed.
    patch : int
        Side of the returned images.
    optics : Optics, optional
        NA, pixel size and immersion (default 20×/0.75 dry, 0.325 µm pixels).
    z_range_um : (float, float)
        Defocus range; a degenerate range pins ``z`` (validation sets).
    source_step, max_walkoff_um : float
        Condenser grid step (units of NA/λ) of the in-focus target, and the largest walk-off of one
        condenser cell at the input's defocus (µm): the input's step shrinks with ``|z|`` to
        ``max_walkoff_um · n / (|z| NA)``, at least 1/16, so large defocus stays accurate.
    near_focus_fraction, near_focus_um, z_quantum_um
        As in :func:`napari_deepr.optics.simulate.random_training_pair`.
    quantize : bool
        Round and clip the input to 8-bit values (float32 all the same).

    Returns
    -------
    defocused : numpy.ndarray
        float32 ``(3, patch, patch)`` noisy RGB (DN, white ≈ the white level).
    infocus : numpy.ndarray
        float32 ``(3, patch, patch)`` noiseless in-focus RGB in the same units.
    z_um : float
        The defocus.
    """
    rng = np.random.default_rng(rng)
    optics = OPTICS_20X_075 if optics is None else optics
    lo, hi = float(min(z_range_um)), float(max(z_range_um))
    if near_focus_fraction > 0 and hi > lo and rng.random() < near_focus_fraction:
        z = float(rng.uniform(max(lo, -near_focus_um), min(hi, near_focus_um)))
    else:
        z = float(rng.uniform(lo, hi))
    if z_quantum_um:
        z = round(round(z / z_quantum_um) * z_quantum_um, 6)
    na_c = float(rng.uniform(*condenser_ratio_range)) * optics.na
    half = blur_half_width(max(abs(lo), abs(hi)), optics, na_c)
    side = patch + 2 * half
    # -- the section: stain amounts (3, side, side)
    if real_images and rng.random() < real_fraction:
        img = real_images[int(rng.integers(len(real_images)))]
        amounts = img if (img.ndim == 3 and img.shape[0] == 3 and img.shape[-1] != 3) else real_stain_amounts(img)
        s_lo, s_hi = float(min(real_scale_range)), float(max(real_scale_range))
        scale = float(np.exp(rng.uniform(np.log(s_lo), np.log(s_hi)))) if s_hi > s_lo else s_lo
        amounts = _crop_channels(np.asarray(amounts, dtype=np.float64), side, rng, scale)
    else:
        amounts = procedural_he(side, optics.pixel_size_um, rng).astype(np.float64)
    amounts = amounts * np.exp(rng.uniform(np.log(stain_scale_range[0]), np.log(stain_scale_range[1]), (3, 1, 1)))
    stains = _jittered_stains(rng, stain_vector_jitter)
    density = np.clip(amounts, 0, None).sum(axis=0)
    density = ndimage.gaussian_filter(density, 1.0, mode="reflect")
    opd = density / max(float(np.percentile(density, 99.5)), 1e-9) * float(rng.uniform(*phase_opd_range_um))
    lams = [float(lam) + float(rng.uniform(-wavelength_jitter_um, wavelength_jitter_um)) for lam in wavelengths_um]
    step_in = source_step
    if z != 0:
        step_in = min(source_step, max(1.0 / 16, max_walkoff_um * optics.immersion_index / (abs(z) * optics.na)))
    common = {"stains": stains, "wavelengths_um": lams, "phase_opd_um": opd, "condenser_na": na_c, "pad": 0, "single": True}
    target = stained_section(amounts, 0.0, optics, source_step=source_step, **common)[:, half:-half, half:-half]
    blurred = stained_section(amounts, z, optics, source_step=step_in, **common)[:, half:-half, half:-half]
    # -- camera and white balance
    photons = float(np.exp(rng.uniform(np.log(photons_range[0]), np.log(photons_range[1]))))
    weights = rng.uniform(0.6, 1.0, 3)
    white = float(np.exp(rng.uniform(np.log(white_level_range[0]), np.log(white_level_range[1]))))
    balance = white * (1.0 + rng.normal(0.0, white_balance_error, 3))
    read_noise = float(rng.uniform(*read_noise_range))
    pe = (photons * weights)[:, None, None]
    counts = rng.poisson(np.clip(blurred, 0, None) * pe) + rng.normal(0.0, read_noise, blurred.shape)
    noisy = counts / pe * balance[:, None, None]
    if quantize:
        noisy = np.clip(np.rint(noisy), 0, 255)
    return noisy.astype(np.float32), (target * balance[:, None, None]).astype(np.float32), z


def weak_object_transfer(
    shape: tuple[int, int],
    z_um: float,
    *,
    na: float,
    wavelength_um: float,
    pixel_size_um: float,
    immersion_index: float = 1.0,
    condenser_na: float,
    source_step: float = 0.25,
) -> tuple[np.ndarray, np.ndarray]:
    """Transfer functions of a weak object under the same partially coherent illumination.

    For ``t = 1 + ε(x) + iφ(x)`` with small real ``ε`` (amplitude) and ``φ`` (phase), the image is,
    to first order, ``I = 1 + F⁻¹{H_ε Ê + H_φ Φ̂}`` with (θ the defocus phase of
    :func:`abbe_intensity`, the mean over condenser points ``s``)::

        H_ε(f) = ⟨P(f+f_s) e^{i[θ(f+f_s)-θ(f_s)]} + P(f_s-f) e^{-i[θ(f_s-f)-θ(f_s)]}⟩_s
        H_φ(f) = i ⟨P(f+f_s) e^{i[θ(f+f_s)-θ(f_s)]} - P(f_s-f) e^{-i[θ(f_s-f)-θ(f_s)]}⟩_s

    At focus with a symmetric condenser ``H_φ = 0`` (a weak phase object is invisible) and ``H_ε = 2``
    inside the coherent pass band. Used to estimate a specimen's phase from two defocused planes
    (``scripts/brightfield_vs_real.py``). No condenser-cell averaging (exact for the sampled points).

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        Complex ``H_ε`` and ``H_φ`` on the ``numpy.fft.fftfreq`` grid of ``shape``.
    """
    lam, n = float(wavelength_um), float(immersion_index)
    fy = sfft.fftfreq(shape[0], d=pixel_size_um)[:, None]
    fx = sfft.fftfreq(shape[1], d=pixel_size_um)[None, :]
    fc2 = (na / lam) ** 2
    k2 = (n / lam) ** 2

    def theta(gy, gx):
        return -2 * np.pi * z_um * np.sqrt(np.clip(k2 - gy**2 - gx**2, 0, None))

    src = condenser_points(na, lam, condenser_na, source_step)
    h_e = np.zeros(shape, complex)
    h_p = np.zeros(shape, complex)
    for sy, sx in src:
        t0 = theta(sy, sx)
        plus = ((fy + sy) ** 2 + (fx + sx) ** 2 <= fc2) * np.exp(1j * (theta(fy + sy, fx + sx) - t0))
        minus = ((sy - fy) ** 2 + (sx - fx) ** 2 <= fc2) * np.exp(-1j * (theta(sy - fy, sx - fx) - t0))
        h_e += plus + minus
        h_p += 1j * (plus - minus)
    return h_e / len(src), h_p / len(src)
