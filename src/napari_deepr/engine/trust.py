"""Where not to trust a refocused image: a per-pixel trust map in [0, 1] (1 = trust).

Two signals, both computed at the model's sampling on z-scored planes (zero mean, unit variance,
as the network sees them):

- **Instability** – the spread of the outputs of test-time-augmented passes: the plane is flipped
  and rotated (the dihedral group D4, under which defocus blur is invariant), refocused, and turned
  back. A model on familiar ground gives nearly the same answer every time; where it invents
  structure the passes disagree.
- **Range** – a forward-model check that does not use the DPM (the DPM decoder saturates far from
  focus: brightfield at −24 µm read 3.95 µm). If the output ``y`` is the in-focus image of an input
  ``x`` taken within the trained range, then ``x ≈ PSF(z) ⊛ y`` for some ``z`` in that range. The
  local residual energy ``min_z G_σ ⊛ (x − PSF(z) ⊛ y)²`` (less the input's noise variance) is small
  inside the range and large when ``x`` is blurrier than any trained defocus can make ``y``, or when
  ``y`` is not an image these optics could have blurred into ``x`` at all (wrong modality, wrong
  sampling). PSFs come from :mod:`napari_deepr.optics.psf` with the optics on the model's card.

The two are added as RMS z-units, ``doubt = sqrt(spread² + residual²)``, and mapped to
``trust = exp(−(doubt / scale)²)`` with ``scale`` from the card (``trust.scale``, default
:data:`DEFAULT_SCALE`); a pixel counts as trustworthy when ``trust ≥ 0.5``. How well this
predicts the error is measured, not assumed: ``scripts/trust_eval.py``.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

#: D4 transforms (quarter turns, mirror), ordered so the first four keep the plane's shape.
D4 = ((0, False), (2, False), (0, True), (2, True), (1, False), (3, False), (1, True), (3, True))
#: Default number of passes when a trust map is asked for.
DEFAULT_PASSES = 8
#: Doubt (RMS z-units) at which trust is exp(-1) ≈ 0.37, when the card does not say.
DEFAULT_SCALE = 0.35
#: Trust at or above which a pixel counts as trustworthy.
TRUSTED = 0.5
#: Gaussian σ (pixels at the model's sampling) of the local averages.
SIGMA_PX = 4.0
#: Highest trust of an image the engine knows is out of domain (forced modality; pixel size off, not resampled).
OUT_OF_DOMAIN_CAP = 0.25


def forward(a: np.ndarray, k: int, flip: bool) -> np.ndarray:
    """Apply D4 element ``(k quarter turns, mirror)`` to the last two axes."""
    if flip:
        a = a[..., ::-1]
    return np.rot90(a, k, axes=(-2, -1))


def inverse(a: np.ndarray, k: int, flip: bool) -> np.ndarray:
    """Undo :func:`forward`."""
    a = np.rot90(a, -k, axes=(-2, -1))
    return a[..., ::-1] if flip else a


def passes_from(trust) -> int:
    """Number of TTA passes for ``trust`` (False/0: none; True: :data:`DEFAULT_PASSES`; an int 1–8)."""
    from ..errors import InputError

    if trust is None or trust is False:
        return 0
    if trust is True:
        return DEFAULT_PASSES
    try:
        n = int(trust)
    except (TypeError, ValueError):
        raise InputError(f"trust must be True or a number of passes from 1 to 8, not {trust!r}.") from None
    if not 1 <= n <= len(D4):
        raise InputError(f"The trust map takes 1 to {len(D4)} passes (the flips and turns of a square), not {n}.")
    return n


def card_optics(card):
    """The card's optics as :class:`~napari_deepr.optics.psf.Optics` (provenance first, then the card's fields)."""
    from ..optics.psf import Optics

    d = dict((card.provenance or {}).get("optics") or {})
    d.setdefault("na", card.na or 0.75)
    d.setdefault("wavelength_um", card.wavelength_um or 0.55)
    d.setdefault("pixel_size_um", card.pixel_size_um or 0.325)
    if card.immersion_index:
        d.setdefault("immersion_index", card.immersion_index)
    d["pixel_size_um"] = card.pixel_size_um or d["pixel_size_um"]
    return Optics.from_dict(d)


@lru_cache(maxsize=8)
def _kernels(optics, zs: tuple[float, ...]) -> tuple[np.ndarray | None, ...]:
    from ..optics.psf import defocus_psf

    return tuple(None if z == 0 else defocus_psf(z, optics).astype(np.float32) for z in zs)


def defocus_grid(card, step_um: float = 1.0) -> tuple[float, ...]:
    """Defocus values (µm) the range test tries: the card's trained range in ``step_um`` steps, 0 included."""
    lo, hi = card.defocus_range_um
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    n_lo, n_hi = int(math.floor(-lo / step_um + 1e-9)), int(math.floor(hi / step_um + 1e-9))
    return tuple(float(v) for v in np.arange(-n_lo, n_hi + 1) * step_um)


def noise_sigma(x: np.ndarray) -> float:
    """Gaussian noise σ of a plane (wavelet MAD estimate, scikit-image)."""
    from skimage.restoration import estimate_sigma

    return float(estimate_sigma(np.asarray(x, dtype=np.float32)))


def range_residual(x: np.ndarray, y: np.ndarray, card, sigma_px: float = SIGMA_PX) -> np.ndarray:
    """Local RMS residual (z-units) of the best in-range forward model ``x ≈ PSF(z) ⊛ y``.

    Parameters
    ----------
    x, y : numpy.ndarray
        z-scored input and output planes (2-D, the model's sampling).
    card : ModelCard
        Optics and trained defocus range.
    """
    from scipy.ndimage import gaussian_filter
    from scipy.signal import fftconvolve

    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.float32)
    zs = defocus_grid(card)
    kernels = _kernels(card_optics(card), zs)
    best = None
    for k in kernels:
        if k is None:
            pred = y
        else:
            pad = k.shape[0] // 2
            yp = np.pad(y, pad, mode="reflect") if min(y.shape) > pad else np.pad(y, pad, mode="edge")
            pred = fftconvolve(yp, k, mode="same")[pad:-pad, pad:-pad]
        e = gaussian_filter((x - pred) ** 2, sigma_px)
        best = e if best is None else np.minimum(best, e)
    return np.sqrt(np.maximum(best - noise_sigma(x) ** 2, 0.0)).astype(np.float32)


def beyond_range(x: np.ndarray, dpm: np.ndarray | None, card, sigma_px: float = SIGMA_PX) -> np.ndarray:
    """Per-pixel evidence in [0, 1] that the input lies beyond the trained defocus range.

    The DPM alone cannot say it (the decoder saturates near the range edge whatever the true
    defocus), so it is paired with the input itself: beyond the range even the mid-scale structure
    that an in-range blur keeps is gone, and the fine band (< 4 px) of the input is mostly noise, so
    the ratio of fine-band to mid-band (< 16 px) energy approaches 1 (measured: 0.1–0.55 within
    ±5 µm, 0.5–0.96 at 10–20 µm on held-out fields). Evidence counts only where the DPM is near
    saturation (≥ 70 % of the range), so sharp in-focus detail (beads) is not mistaken for noise.
    """
    from scipy.ndimage import gaussian_filter

    x = np.asarray(x, dtype=np.float32)
    fine = gaussian_filter((x - gaussian_filter(x, 4.0)) ** 2, sigma_px)
    mid = gaussian_filter((x - gaussian_filter(x, 16.0)) ** 2, sigma_px)
    q = fine / np.maximum(mid, 1e-6)
    ev = np.clip((q - 0.55) / 0.2, 0.0, 1.0)
    if dpm is not None:
        hi = max(abs(v) for v in card.defocus_range_um)
        near = np.clip((np.abs(gaussian_filter(np.asarray(dpm, np.float32), sigma_px)) / hi - 0.6) / 0.2, 0.0, 1.0)
        ev = ev * near
    return ev.astype(np.float32)


def trust_from(spread: np.ndarray | None, residual: np.ndarray, card, *, beyond: np.ndarray | None = None,
               cap: float = 1.0) -> np.ndarray:
    """Trust in [0, 1] from the TTA spread and the range residual (both RMS z-units), times ``1 − beyond``
    (:func:`beyond_range`), capped at ``cap`` (below 1 when the engine already knows the image is out of
    domain: a forced modality, a pixel-size mismatch with resampling off)."""
    from scipy.ndimage import gaussian_filter

    scale = float((card.extra.get("trust") or {}).get("scale", DEFAULT_SCALE))
    d2 = residual.astype(np.float32) ** 2
    if spread is not None:
        d2 = d2 + gaussian_filter(spread.astype(np.float32), SIGMA_PX) ** 2
    t = np.exp(-d2 / scale**2)
    if beyond is not None:
        t = t * (1.0 - beyond)
    return np.minimum(t, cap).astype(np.float32)


def trusted_fraction(trust: np.ndarray) -> float:
    """Share of pixels whose trust is at least :data:`TRUSTED`."""
    t = np.asarray(trust)
    return float(np.mean(t >= TRUSTED)) if t.size else 0.0


__all__ = [
    "D4", "DEFAULT_PASSES", "OUT_OF_DOMAIN_CAP", "beyond_range", "DEFAULT_SCALE", "TRUSTED", "card_optics", "defocus_grid", "forward", "inverse",
    "noise_sigma", "passes_from", "range_residual", "trust_from", "trusted_fraction",
]
