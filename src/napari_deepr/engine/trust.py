"""Where not to trust a refocused image: a per-pixel trust map in [0, 1] (1 = trust).

Three maps are implemented; :data:`RECIPE` says which one the engine makes, and the shipped
``"by-scale"`` chooses per image by what the engine knows of its pixel size (:func:`recipe_for`):

- **pixel size known** (the file's calibration or the user's number; the image is then resampled to
  the model's sampling): ``"spread"``, the retuned map below. It ranks the per-pixel error of held-out
  simulated fields best (Spearman ρ 0.50 against v1's 0.43).
- **pixel size unknown** (the model's sampling is assumed): ``"v1"``, the map as it was before issue
  16, ``trust = exp(−(residual² + spread_σ4²) / 0.35²) · (1 − beyond)`` (the forward-model residual,
  the D4 spread smoothed over 4 px, the range test as a factor; all three described below). An
  assumed scale can be wrong, and a wrong scale is the failure only the forward-model residual sees:
  the uncalibrated DSB 2018 nuclei image (0.65 µm pixels, read as 0.325 µm; the model invents
  fragments) is 73 % untrusted with v1 and 21 % with ``"spread"``; in-focus real fields stay
  ≤ 0.7 %. The price is a more conservative map (strongly defocused in-range regions are doubted
  too), which giving the pixel size removes.

``"hybrid"`` (``"spread"`` with the residual as a ceiling) is kept for measurements. Numbers:
docs/TRUST.md, ``scripts/trust_eval.py``, ``scripts/trust_real.py``. The rest of this docstring
describes the ``"spread"`` map.

Everything is computed at the model's sampling on z-scored planes (zero mean, unit variance, as the
network sees them), and the map is built from a *doubt*: a prediction of the output's local absolute
error in those z-units.

- **Instability** – the spread of the outputs of test-time-augmented passes: the plane is flipped
  and rotated (the dihedral group D4, under which defocus blur is invariant), refocused, and turned
  back. A model on familiar ground gives nearly the same answer every time; where it invents
  structure the passes disagree. The error tracks the spread: on the tuning fields (the specimen
  families the model trained on, ``scripts/trust_tune.py``) the median |error| is
  :data:`SPREAD_GAIN` ≈ 3.3 times the spread (2.4–4.4 in every decile of the spread), so the spread,
  lightly smoothed (:data:`SPREAD_SIGMA_PX`), times that gain is the first term of the doubt.
- **Beyond the range** – :func:`beyond_range`, a test that does not rely on the DPM alone (the DPM
  decoder saturates far from focus: brightfield at −24 µm read 3.95 µm). Its evidence is weighted by
  how much there is to get wrong: the input's local signal above its background
  (:func:`signal_above_background`). Beyond the range a network's output is wrong by about that
  much, while a featureless background, which the test also flags in strongly defocused in-range
  images, is refocused right (it stays background).

The first two add in quadrature, ``doubt = sqrt((SPREAD_GAIN · spread)² + (beyond · signal)²)``, and map to
``trust = 1 / (1 + (doubt / scale)²)`` with ``scale`` from the card (``trust.scale``, default
:data:`DEFAULT_SCALE` = 0.25): a pixel counts as trustworthy (trust ≥ 0.5) when its predicted error
is below a quarter of the image's standard deviation. The heavy tail keeps the order of doubtful
pixels (a Gaussian would round them all to 0). How well this predicts the error is measured, not
assumed: ``scripts/trust_eval.py`` on held-out fields, after the constants were chosen on the tuning
fields only.

- **Unexplained by the optics** (``"hybrid"`` only) – a ceiling from the forward-model residual (:func:`range_residual`,
  ``min_z |x − PSF(z) ⊛ y|`` over the trained range, less the input's noise): if no in-range blur of
  the output reproduces the input, the output is not the in-focus image of this input (structure
  invented at the wrong scale, another modality). ``doubt = max(doubt, RESIDUAL_WEIGHT · residual)``,
  i.e. trust ≤ ``1 / (1 + (RESIDUAL_WEIGHT · residual / scale)²)``. It barely follows the in-range
  error (Spearman ρ 0.20 alone on the tuning fields), so it is a ceiling, not a term: it only lowers
  pixels the spread trusts where the optics cannot explain the input. It is what flags a real
  uncalibrated image read at the wrong pixel size (DSB 2018 nuclei at 0.325 µm instead of 0.65 µm:
  the model invents fragments; docs/TRUST.md). Its weight is the largest whose tuning-set ρ is at
  most 0.03 below the map without it (``scripts/trust_tune.py hybrid``), a rule fixed before any
  held-out or real image was measured with it.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

#: D4 transforms (quarter turns, mirror), ordered so the first four keep the plane's shape.
D4 = ((0, False), (2, False), (0, True), (2, True), (1, False), (3, False), (1, True), (3, True))
#: Default number of passes when a trust map is asked for.
DEFAULT_PASSES = 8
#: Doubt (predicted |error|, z-units) at which trust is 0.5, when the card does not say.
DEFAULT_SCALE = 0.25
#: Trust at or above which a pixel counts as trustworthy.
TRUSTED = 0.5
#: Gaussian σ (pixels at the model's sampling) of the range test's local averages and the local signal.
SIGMA_PX = 4.0
#: Median |error| ÷ spread of the D4 passes on the tuning fields (scripts/trust_tune.py).
SPREAD_GAIN = 3.3
#: Gaussian σ (pixels) smoothing the spread before use (the error's own scale: 1 px beat 0, 2 and 4 on the tuning fields).
SPREAD_SIGMA_PX = 1.0
#: Weight of the forward-model residual's ceiling on trust (doubt ≥ weight · residual; scripts/trust_tune.py hybrid).
RESIDUAL_WEIGHT = 0.2
#: Extra Gaussian σ (pixels) of the residual before its ceiling (0: per pixel, as range_residual's own σ 4 px).
RESIDUAL_SIGMA_PX = 0.0
#: The map the engine makes. "v1": the map before issue 16's retuning, ``exp(−(residual² + spread_σ4²) / 0.35²) ·
#: (1 − beyond)``; "spread": the retuned map (3.3 · spread σ 1 px ⊕ beyond · signal, heavy tail); "hybrid":
#: "spread" with the residual's ceiling; "by-scale" (shipped): "spread" where the pixel size is known, "v1" where
#: it was assumed (:func:`recipe_for`; docs/TRUST.md, issue 16).
RECIPE = "by-scale"
RECIPES = ("by-scale", "v1", "spread", "hybrid")
#: Doubt (RMS z-units) at which the v1 map's trust is exp(−1) ≈ 0.37, when the card does not say.
V1_SCALE = 0.35
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
    """Local RMS residual (z-units) of the best in-range forward model ``x ≈ PSF(z) ⊛ y`` (the map's ceiling).

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


def signal_above_background(x: np.ndarray, sigma_px: float = SIGMA_PX) -> np.ndarray:
    """Local signal of a z-scored plane above its background (z-units): the local mean less its 5th percentile."""
    from scipy.ndimage import gaussian_filter

    g = gaussian_filter(np.asarray(x, dtype=np.float32), sigma_px)
    return np.maximum(g - np.percentile(g, 5), 0.0).astype(np.float32)


def doubt_from(spread: np.ndarray | None, x: np.ndarray, beyond: np.ndarray | None = None) -> np.ndarray:
    """Predicted local |error| of the output (z-units) from the D4 spread and the range test.

    Parameters
    ----------
    spread : numpy.ndarray or None
        Standard deviation of the passes' outputs (z-units); None with a single pass.
    x : numpy.ndarray
        The z-scored input plane.
    beyond : numpy.ndarray, optional
        Evidence in [0, 1] that the input lies beyond the trained range (:func:`beyond_range`).
    """
    from scipy.ndimage import gaussian_filter

    d2 = np.zeros(np.shape(x), np.float32)
    if spread is not None:
        d2 += (SPREAD_GAIN * gaussian_filter(np.asarray(spread, np.float32), SPREAD_SIGMA_PX)) ** 2
    if beyond is not None:
        d2 += (np.asarray(beyond, np.float32) * signal_above_background(x)) ** 2
    return np.sqrt(d2)


def trust_of(doubt: np.ndarray, card, cap: float = 1.0) -> np.ndarray:
    """Trust in [0, 1] from a doubt map: ``1 / (1 + (doubt / scale)²)`` (0.5 at ``scale``), capped at ``cap``."""
    scale = float((card.extra.get("trust") or {}).get("scale", DEFAULT_SCALE))
    t = 1.0 / (1.0 + (np.asarray(doubt, np.float32) / np.float32(scale)) ** 2)
    return np.minimum(t, cap).astype(np.float32)


def recipe_for(scale_known: bool | None, recipe: str | None = None) -> str:
    """The map made for an image: :data:`RECIPE` (or ``recipe``), with ``"by-scale"`` resolved.

    Parameters
    ----------
    scale_known : bool or None
        Whether the image's pixel size is known (the file's or the user's); False or None when the
        model's sampling was assumed.
    """
    r = RECIPE if recipe is None else recipe
    if r not in RECIPES:
        raise ValueError(f"Unknown trust recipe {r!r}; use one of {', '.join(RECIPES)}.")
    if r == "by-scale":
        return "spread" if scale_known else "v1"
    return r


def trust_map(x: np.ndarray, spread: np.ndarray | None, dpm: np.ndarray | None, card,
              cap: float = 1.0, y: np.ndarray | None = None, scale_known: bool | None = None,
              recipe: str | None = None) -> tuple[np.ndarray, dict]:
    """The trust map of one plane and its parts.

    Parameters
    ----------
    x : numpy.ndarray
        z-scored input plane (2-D, the model's sampling).
    spread : numpy.ndarray or None
        Standard deviation of the D4 passes' outputs (z-units), None with one pass.
    dpm : numpy.ndarray or None
        The identity pass's DPM (µm), None when the model has none.
    card : ModelCard
    cap : float
        Highest trust (below 1 when the engine already knows the image is out of domain: a forced
        modality, a pixel-size mismatch with resampling off).
    y : numpy.ndarray, optional
        The identity pass's output, z-scored with the input's mean and std: the forward-model
        residual is computed from it (``"v1"``, ``"hybrid"``); without it the map is spread and range only.
    scale_known : bool, optional
        Whether the image's pixel size is known (see :func:`recipe_for`).
    recipe : str, optional
        Override :data:`RECIPE` (measurements).

    Returns
    -------
    trust : numpy.ndarray
        float32 in [0, 1].
    parts : dict
        ``spread``, ``beyond``, ``residual`` (None without ``y``), ``doubt`` and ``content_trust`` (the
        trust before ``cap``: what the pixels alone say) and ``recipe`` (the map made), for
        measurements (``scripts/trust_eval.py``).
    """
    from scipy.ndimage import gaussian_filter

    recipe = recipe_for(scale_known, recipe)
    beyond = beyond_range(x, dpm, card)
    if recipe == "v1":
        residual = None if y is None else range_residual(x, y, card)
        d2 = np.zeros(np.shape(x), np.float32) if residual is None else residual**2
        if spread is not None:
            d2 = d2 + gaussian_filter(np.asarray(spread, np.float32), SIGMA_PX) ** 2
        scale = float((card.extra.get("trust") or {}).get("v1_scale", V1_SCALE))
        content = (np.exp(-d2 / scale**2) * (1.0 - beyond)).astype(np.float32)
        return np.minimum(content, cap).astype(np.float32), {
            "spread": spread, "beyond": beyond, "residual": residual, "doubt": np.sqrt(d2), "content_trust": content,
            "recipe": recipe}
    doubt = doubt_from(spread, x, beyond)
    residual = None
    if recipe == "hybrid" and y is not None and RESIDUAL_WEIGHT:
        residual = range_residual(x, y, card)
        if RESIDUAL_SIGMA_PX:
            residual = gaussian_filter(residual, RESIDUAL_SIGMA_PX)
        doubt = np.maximum(doubt, np.float32(RESIDUAL_WEIGHT) * residual)
    content = trust_of(doubt, card)
    return np.minimum(content, cap).astype(np.float32), {
        "spread": spread, "beyond": beyond, "residual": residual, "doubt": doubt, "content_trust": content,
        "recipe": recipe}


def trust_sentence(share: float, passes: int, scale_known: bool | None) -> str:
    """What the front ends say after a run with a trust map (the same words in the CLI and the panel)."""
    text = f"{100 * share:.0f}% of the field is trustworthy (trust ≥ 0.5, {passes} passes)"
    if recipe_for(scale_known) == "v1" and RECIPE == "by-scale":
        text += ("; the pixel size is unknown, so the map also asks whether the model's optics explain the output "
                 "(a wrong assumed scale shows there) and is stricter: give the pixel size for the finer map")
    return text + "."


def trusted_fraction(trust: np.ndarray) -> float:
    """Share of pixels whose trust is at least :data:`TRUSTED`."""
    t = np.asarray(trust)
    return float(np.mean(t >= TRUSTED)) if t.size else 0.0


__all__ = [
    "D4", "DEFAULT_PASSES", "DEFAULT_SCALE", "OUT_OF_DOMAIN_CAP", "RECIPE", "RECIPES", "recipe_for", "trust_sentence", "RESIDUAL_SIGMA_PX", "RESIDUAL_WEIGHT", "SPREAD_GAIN", "SPREAD_SIGMA_PX", "TRUSTED",
    "beyond_range", "card_optics", "defocus_grid", "doubt_from", "forward", "inverse", "noise_sigma", "passes_from",
    "range_residual", "signal_above_background", "trust_map", "trust_of", "trusted_fraction", "V1_SCALE",
]
