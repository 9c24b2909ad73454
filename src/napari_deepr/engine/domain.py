"""What a model was made for, and whether an image is that: pixel size, modality and channels.

A Deep-R model has learned what defocus looks like at one sampling (µm per pixel), for one contrast
(fluorescence: bright objects on a dark background; brightfield: absorbing objects on a bright
one) and one channel layout. Fed anything else it still returns a plausible-looking image, so the
engine checks before it runs, in one place, for the API, ``deepr`` and the widget alike:

- the pixel size is *known* (file calibration or the user's ``pixel_size_um``) or *unknown*
  (uncalibrated file, plain array): unknown is never taken as 1 µm, the model's own sampling is
  assumed and the user is told once;
- a known pixel size more than :data:`SCALE_TOLERANCE` away from the card's is resampled to the
  card's sampling (anti-aliased), refocused and resampled back; with resampling off the mismatch is
  a warning before the run; ratios outside the card's ``pixel_size_ratio_range`` are refused;
- an RGB image through a one-channel fluorescence model (or a grayscale image through an RGB
  brightfield model) is refused unless forced.

Everything here is numpy/scipy; no Qt, no napari, no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError

#: Relative pixel-size difference above which the image is resampled (or, with resampling off, warned about).
SCALE_TOLERANCE = 0.05
#: Image pixel size ÷ model pixel size where resampling is sensible, when the card does not say.
#: Down to 1/4: an anti-aliased 4× reduction of an oversampled image keeps every frequency the model
#: sees (at the card's 0.325 µm, 1/4 is 0.08 µm pixels, still 2× finer than Nyquist at NA 0.75).
#: Up to 2.5: beyond that the input pixel is larger than the in-focus PSF (FWHM ≈ 0.45 µm for the
#: bundled optics), so upsampling would ask the model to restore detail the camera never sampled.
DEFAULT_RATIO_RANGE = (0.25, 2.5)
#: Pixel sizes outside this interval (µm) are not a light microscope's sampling: refused as absurd.
from ..io import PLAUSIBLE_PIXEL_UM  # noqa: E402  (one definition for reader and engine)


# -- pixel size -----------------------------------------------------------------------------------
def check_pixel_size(value, what: str = "The pixel size") -> float | None:
    """Validate a user-given pixel size in µm (``None`` passes through as "unknown").

    Raises
    ------
    InputError
        For a value that is not a finite number, ≤ 0, or outside :data:`PLAUSIBLE_PIXEL_UM`.
    """
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} '{value}' is not a number of micrometres.") from None
    if not math.isfinite(v) or v <= 0:
        raise InputError(f"{what} must be a positive number of micrometres, not {value}.")
    lo, hi = PLAUSIBLE_PIXEL_UM
    if not lo <= v <= hi:
        raise InputError(f"{what} of {v:g} µm is not a light microscope's sampling ({lo:g}–{hi:g} µm); give it in micrometres.")
    return v


def ratio_range(card) -> tuple[float, float]:
    """The card's sensible ``image/model`` pixel-size ratio range (default :data:`DEFAULT_RATIO_RANGE`)."""
    r = card.extra.get("pixel_size_ratio_range") or DEFAULT_RATIO_RANGE
    return float(r[0]), float(r[1])


@dataclass
class Sampling:
    """The pixel-size verdict for one image and one model.

    Attributes
    ----------
    image_um : float or None
        The image's pixel size (µm) or None when unknown.
    model_um : float or None
        The card's pixel size (None when the card does not say).
    source : {"file", "argument", "unknown"}
        Where ``image_um`` came from.
    resample : bool
        Whether the engine resamples to the model's sampling and back.
    message : str
        One sentence for the user ("" when nothing needs saying).
    level : {"ok", "info", "warning"}
        How the front ends show ``message``.
    """

    image_um: float | None
    model_um: float | None
    source: str
    resample: bool = False
    message: str = ""
    level: str = "ok"

    @property
    def ratio(self) -> float | None:
        """Image pixel size ÷ model pixel size (None when either is unknown)."""
        if self.image_um and self.model_um:
            return self.image_um / self.model_um
        return None

    @property
    def known(self) -> bool:
        """Whether the image's pixel size is known (the file's or the user's), not assumed."""
        return self.image_um is not None

    @property
    def effective_um(self) -> float | None:
        """The pixel size used for physical fits on the input grid (the model's when unknown)."""
        return self.image_um or self.model_um


def resolve_sampling(card, image_um=None, *, override=None, resample: bool = True, name: str | None = None) -> Sampling:
    """Decide how an image meets the model's sampling.

    Parameters
    ----------
    card : ModelCard
        The model's card (``pixel_size_um``, optional ``pixel_size_ratio_range``).
    image_um : float, optional
        The pixel size the file recorded (None when uncalibrated).
    override : float, optional
        The user's pixel size (``pixel_size_um=`` / ``--pixel-size``); wins over the file.
    resample : bool
        Resample a mismatched image to the model's sampling (default); False only warns.
    name : str, optional
        The model's name for messages.

    Raises
    ------
    InputError
        A bad override, or (with resampling on) a ratio outside the card's sensible range.
    """
    override = check_pixel_size(override)
    model_um = card.pixel_size_um
    name = name or card.name
    if override is not None:
        px, source = override, "argument"
    elif image_um is not None and _plausible(image_um):
        px, source = float(image_um), "file"
    else:
        px, source = None, "unknown"
    if px is None:
        msg = (
            f"The pixel size is unknown (the image is not calibrated), so {name}'s sampling of {model_um:g} µm/px "
            "is assumed; give the real one with pixel_size_um= or --pixel-size if it differs."
            if model_um else "The pixel size is unknown and the model's card does not state one, so none is assumed."
        )
        return Sampling(None, model_um, source, False, msg, "info")
    if not model_um:
        return Sampling(px, None, source, False, f"{name}'s card states no pixel size, so {px:g} µm/px cannot be checked.", "warning")
    ratio = scale_mismatch(px, model_um)
    if ratio is None:
        return Sampling(px, model_um, source, False, f"Pixel size {px:g} µm matches {name} ({model_um:g} µm).", "ok")
    if not resample:
        return Sampling(
            px, model_um, source, False,
            f"The image has {px:g} µm pixels but {name} was trained at {model_um:g} µm and resampling is off, so "
            f"structures look {1 / ratio:.2g}× their trained size to the model and the results may be wrong.",
            "warning",
        )
    lo, hi = ratio_range(card)
    if not lo <= ratio <= hi:
        how = f"{1 / ratio:.3g}× finer" if ratio < 1 else f"{ratio:.3g}× coarser"
        raise InputError(
            f"The image's {px:g} µm pixels are {how} than {name}'s {model_um:g} µm, outside the {lo:g}–{hi:g}× range "
            "where resampling keeps what the model needs; use a model made for this sampling."
        )
    return Sampling(
        px, model_um, source, True,
        f"The image's {px:g} µm pixels are resampled to {name}'s {model_um:g} µm for the network and the results "
        "back onto the input grid.",
        "info",
    )


def scale_mismatch(image_um, model_um) -> float | None:
    """Image ÷ model pixel size when they differ by more than :data:`SCALE_TOLERANCE` (the engine
    then resamples), else None (within it, or either unknown)."""
    if not (image_um and model_um):
        return None
    ratio = float(image_um) / float(model_um)
    return ratio if abs(ratio - 1.0) > SCALE_TOLERANCE else None


def _plausible(px) -> bool:
    try:
        v = float(px)
    except (TypeError, ValueError):
        return False
    return math.isfinite(v) and PLAUSIBLE_PIXEL_UM[0] <= v <= PLAUSIBLE_PIXEL_UM[1]


def resampled_size(n: int, ratio: float) -> int:
    """Pixels along an axis of ``n`` input pixels at ``ratio`` = input/model pixel size."""
    return max(1, int(round(n * ratio)))


def resample_plane(src, out_shape: tuple[int, int], *, out=None, band: int = 256) -> np.ndarray:
    """Resample a ``(C, Y, X)`` plane onto a ``(C, Y', X')`` grid covering the same field, band by band.

    Pixel centres map as ``y_in = (y_out + 0.5) · Y / Y' − 0.5`` (scikit-image's ``resize``
    convention). Downsampling is anti-aliased with a Gaussian of σ = (s − 1)/2 input pixels
    (scikit-image's choice) before linear interpolation; upsampling interpolates linearly, which
    adds no overshoot. Rows are read in bands with a margin wider than the filter, so a lazy
    (dask, zarr, memmap) plane is never read whole and the result equals the whole-plane one.

    Parameters
    ----------
    src : array-like
        ``(C, Y, X)`` plane; sliced along Y only.
    out_shape : (int, int)
        Target ``(Y', X')``.
    out : array-like or callable, optional
        ``(C, Y', X')`` destination (numpy, memmap, zarr), float32 numpy if omitted; or a callable
        ``out(a, b, block)`` receiving output rows ``a:b`` as a ``(C, b - a, X')`` block (then None is returned).
    band : int
        Output rows per band.
    """
    from scipy.ndimage import gaussian_filter1d

    c, h, w = (int(v) for v in src.shape)
    ho, wo = (int(v) for v in out_shape)
    sink = out if callable(out) else None
    if out is None:
        out = np.empty((c, ho, wo), dtype=np.float32)
    sy, sx = h / ho, w / wo
    sig_y, sig_x = max(0.0, (sy - 1) / 2), max(0.0, (sx - 1) / 2)
    margin = int(math.ceil(4 * sig_y)) + 2
    yc = np.clip((np.arange(ho) + 0.5) * sy - 0.5, 0, h - 1)
    xc = np.clip((np.arange(wo) + 0.5) * sx - 0.5, 0, w - 1)
    x0 = np.minimum(np.floor(xc).astype(np.intp), max(w - 2, 0))
    fx = (xc - x0).astype(np.float32)
    x1 = np.minimum(x0 + 1, w - 1)
    for a in range(0, ho, band):
        b = min(a + band, ho)
        y0s = np.minimum(np.floor(yc[a:b]).astype(np.intp), max(h - 2, 0))
        fy = (yc[a:b] - y0s).astype(np.float32)[:, None]
        r0 = max(0, int(y0s[0]) - margin)
        r1 = min(h, int(y0s[-1]) + 2 + margin)
        blk = np.asarray(src[:, r0:r1, :], dtype=np.float32)
        # Gaussian rows need true neighbours: reflect only at the plane's own edges.
        if sig_y:
            blk = gaussian_filter1d(blk, sig_y, axis=1, mode="reflect" if (r0 == 0 or r1 == h) else "nearest")
        if sig_x:
            blk = gaussian_filter1d(blk, sig_x, axis=2, mode="reflect")
        i0 = y0s - r0
        i1 = np.minimum(i0 + 1, blk.shape[1] - 1)
        rows = blk[:, i0] * (1 - fy) + blk[:, i1] * fy
        block = rows[:, :, x0] * (1 - fx) + rows[:, :, x1] * fx
        if sink is not None:
            sink(a, b, block)
        else:
            out[:, a:b] = block
    return None if sink is not None else out


# -- modality and channels ------------------------------------------------------------------------
def model_modality(card) -> tuple[str, str]:
    """``(kind, photometric)`` of a model: kind ``fluorescence``, ``brightfield`` or ``unknown``;
    photometric ``minisblack`` (one gray channel) or ``rgb`` (from the card, else from its channels)."""
    text = str(card.modality).lower()
    kind = "fluorescence" if "fluor" in text else "brightfield" if ("bright" in text or "h&e" in text or "histo" in text) else "unknown"
    photometric = str(card.extra.get("photometric") or ("rgb" if card.channels == 3 else "minisblack")).lower()
    return kind, photometric


def image_photometric(shape, axes: str, *, channels: int = 1) -> str:
    """``rgb`` when the image has a colour-sample axis of 3 or 4 (and the model is not fed it jointly), else ``minisblack``."""
    axes = axes.upper()
    if "S" in axes and int(shape[axes.index("S")]) in (3, 4):
        return "rgb"
    return "minisblack"


@dataclass
class Modality:
    """The modality verdict: ``ok`` false means a mismatch (refused unless ``forced``)."""

    image: str
    model: str
    ok: bool
    forced: bool = False
    message: str = ""
    level: str = "ok"
    notes: list = field(default_factory=list)


def check_modality(card, shape, axes: str, *, force: bool = False, name: str | None = None) -> Modality:
    """Compare the image's photometry with what the card says the model was trained on.

    A fluorescence (gray) model on an RGB image, or an RGB brightfield model on a gray image, is a
    mismatch: refused with one sentence unless ``force`` (then the verdict carries a warning).

    Raises
    ------
    InputError
        On a mismatch without ``force``.
    """
    name = name or card.name
    kind, model_pm = model_modality(card)
    img_pm = image_photometric(shape, axes, channels=card.channels)
    img_desc = "an RGB (brightfield or stained) image" if img_pm == "rgb" else "a one-channel (gray) image"
    model_desc = f"{card.modality} ({'RGB' if model_pm == 'rgb' else 'one gray channel'})"
    # A gray brightfield model may refocus each colour of an RGB image; a fluorescence model may not.
    mismatch = (img_pm == "rgb" and kind == "fluorescence") or (model_pm == "rgb" and img_pm != "rgb")
    if not mismatch:
        return Modality(img_pm, model_pm, True, False, f"Modality: {img_desc} for a {model_desc} model.", "ok")
    if not force:
        raise InputError(
            f"{name} was trained on {model_desc} but this is {img_desc}; use a model for this modality, "
            "or force it (force_modality=True, --force-modality) knowing the output may be invented."
        )
    return Modality(
        img_pm, model_pm, False, True,
        f"Forced: {img_desc} through {name}, a {model_desc} model; the output may show structure that is not there.",
        "warning",
    )


def model_for_image(photometric: str, models, default_name: str | None = None):
    """The model that fits an image's photometry: RGB → a brightfield RGB model, gray → fluorescence.

    Parameters
    ----------
    photometric : {"rgb", "minisblack"}
        The image's photometry (:func:`image_photometric`; a napari layer's ``rgb`` flag).
    models : sequence
        Candidate models (objects with a ``card``), e.g. :func:`napari_deepr.engine.model.list_models`.
    default_name : str, optional
        Name of the default model, preferred among equally fitting ones and returned when none fits.

    Returns
    -------
    object or None
        The first fitting model (the default first when it fits), else the default model when it is
        among ``models``, else None.
    """
    want = ("brightfield", "rgb") if str(photometric).lower() == "rgb" else ("fluorescence", "minisblack")
    models = list(models)
    default = next((m for m in models if default_name and m.card.name == default_name), None)
    ordered = ([default] if default is not None else []) + [m for m in models if m is not default]
    for m in ordered:
        if model_modality(m.card) == want:
            return m
    return default


def to_input_range(output, dtype):
    """An RGB output in the input's dtype: clipped to its range (integers are rounded)."""
    dtype = np.dtype(dtype)
    arr = np.asarray(output)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(arr), info.min, info.max).astype(dtype)
    if dtype == np.bool_:
        return arr > 0.5
    return arr.astype(dtype, copy=False)


__all__ = [
    "DEFAULT_RATIO_RANGE", "Modality", "SCALE_TOLERANCE", "Sampling", "scale_mismatch", "check_modality", "check_pixel_size",
    "image_photometric", "model_for_image", "model_modality", "preflight", "ratio_range", "resample_plane", "resampled_size", "resolve_sampling",
    "small_field_note", "to_input_range",
]


def small_field_note(card, h: int, w: int, sampling: Sampling) -> str | None:
    """What to say before a DPM of an ``h``×``w`` image (at the image's sampling) smaller than the
    decoder's training patches (the card's ``config.patch``), or None.

    The decoder reads defocus from context, and a field smaller than the ones it was trained on gives
    it less: the bundled model reads a true 4 µm as about 3.7 µm on 192-px fields and 4.0 µm from 512
    px on (docs/MODEL_QUALITY.md).
    """
    patch = (card.config or {}).get("patch")
    if sampling.resample:
        h, w = resampled_size(h, sampling.ratio), resampled_size(w, sampling.ratio)
    if not isinstance(patch, int) or min(h, w) >= patch:
        return None
    at = " at the model's sampling" if sampling.resample else ""
    return (f"The image is {h}×{w} pixels{at}, smaller than the {patch}-pixel fields {card.name}'s DPM decoder "
            "was trained on, so the DPM may read the defocus low (by about 0.3 µm at 4 µm on 192-pixel "
            "fields); read it as a lower bound.")


def preflight(card, shape, axes: str, *, image_um=None, pixel_size_um=None, resample: bool = True,
              force_modality: bool = False) -> tuple[Sampling, Modality]:
    """Both verdicts for an image before anything runs (what the CLI prints and the widget shows).

    Raises
    ------
    InputError
        A bad pixel size, a resampling ratio outside the card's range, or a modality mismatch without ``force_modality``.
    """
    return (resolve_sampling(card, image_um, override=pixel_size_um, resample=resample),
            check_modality(card, shape, axes, force=force_modality))
