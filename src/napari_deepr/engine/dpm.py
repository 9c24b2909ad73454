"""Defocus-map (DPM) post-processing: plane fit (mean defocus, tilt angle and direction), range and
structure masks."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class PlaneFit:
    """A least-squares plane ``z = mean + slope_x·(x − x̄) + slope_y·(y − ȳ)`` through a DPM.

    Attributes
    ----------
    mean_um : float
        Mean defocus over the fitted pixels, µm.
    slope_x, slope_y : float
        Defocus change per µm along x (columns) and y (rows), µm/µm.
    tilt_deg : float
        Angle between the sample plane and the focal plane, degrees.
    direction_deg : float
        Direction of steepest increase of defocus in the image, degrees (0 = +x/right, 90 = +y/down).
    residual_um : float
        RMS of the DPM about the plane, µm (large for curved samples or noisy maps).
    out_of_range_fraction : float
        Fraction of pixels whose |defocus| exceeds the trained range (when a range was given).
    """

    mean_um: float
    slope_x: float
    slope_y: float
    tilt_deg: float
    direction_deg: float
    residual_um: float
    out_of_range_fraction: float = 0.0

    def to_dict(self) -> dict:
        """Plain-float dictionary (JSON-ready)."""
        return {k: float(v) for k, v in asdict(self).items()}

    def describe(self) -> str:
        """One line for a readout: mean defocus, tilt and direction."""
        return (
            f"mean defocus {self.mean_um:+.2f} µm, tilt {self.tilt_deg:.2f}° towards {self.direction_deg:.0f}°, "
            f"residual {self.residual_um:.2f} µm"
            + (f", {100 * self.out_of_range_fraction:.0f}% outside the trained range" if self.out_of_range_fraction else "")
        )


STRUCTURE_WINDOW_PX = 15
STRUCTURE_THRESHOLD = 0.25


def structure_mask(image: np.ndarray, window_px: int = STRUCTURE_WINDOW_PX,
                   threshold: float = STRUCTURE_THRESHOLD) -> np.ndarray:
    """Pixels where the image has structure, so that their defocus is observable at all.

    The defocus of empty background cannot be measured from its blur: a DPM there is a guess. This
    mask keeps pixels whose local standard deviation (over ``window_px``) exceeds ``threshold`` times
    the plane's own standard deviation.

    Parameters
    ----------
    image : ndarray
        One 2-D plane (in-focus ground truth for scoring, or the input image for a plane fit).
    window_px : int
        Side of the square window, pixels (about the blur diameter at the edge of the range).
    threshold : float
        Local/global standard-deviation ratio that counts as structure.

    Returns
    -------
    ndarray of bool
        Same shape as ``image``.
    """
    from scipy.ndimage import uniform_filter

    a = np.asarray(image, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"structure_mask takes one 2-D plane, not an array of shape {a.shape}.")
    sd = a.std()
    if not np.isfinite(sd) or sd == 0:
        return np.zeros(a.shape, dtype=bool)
    a = (a - a.mean()) / sd
    m1 = uniform_filter(a, window_px, mode="reflect")
    m2 = uniform_filter(a * a, window_px, mode="reflect")
    return np.sqrt(np.clip(m2 - m1 * m1, 0, None)) > threshold


def out_of_range_mask(dpm: np.ndarray, defocus_range_um, margin_um: float = 0.0) -> np.ndarray:
    """Pixels whose defocus lies outside the model's trained range (plus an optional margin).

    Parameters
    ----------
    dpm : ndarray
        Defocus map in µm.
    defocus_range_um : (float, float) or float
        Trained range ``(low, high)``; a single number means ``±value``.
    margin_um : float
        Tolerance added on both ends before a pixel counts as out of range.
    """
    lo, hi = _range(defocus_range_um)
    # Arrays that implement ufuncs themselves (numpy, dask) stay as they are, so a DPM on disk is
    # masked lazily; anything else becomes numpy.
    d = dpm if hasattr(dpm, "__array_ufunc__") else np.asarray(dpm)
    return (d < lo - margin_um) | (d > hi + margin_um) | ~np.isfinite(d)


def fit_plane(dpm: np.ndarray, pixel_size_um: float, *, mask: np.ndarray | None = None, defocus_range_um=None,
              image: np.ndarray | None = None) -> PlaneFit:
    """Fit a plane to a 2-D DPM and report mean defocus, tilt angle and direction.

    Parameters
    ----------
    dpm : ndarray, shape (Y, X)
        Defocus map in µm.
    pixel_size_um : float
        Lateral pixel size, so slopes (and the angle) are in physical units.
    mask : ndarray of bool, optional
        Pixels to use (e.g. where the sample has signal); all finite pixels by default.
    defocus_range_um : (float, float), optional
        When given, also report the out-of-range fraction.
    image : ndarray, shape (Y, X), optional
        The (refocused) image the DPM belongs to: only pixels where it has structure
        (:func:`structure_mask`) are fitted, since the defocus of empty background is a guess. Ignored
        when fewer than 5 % of the pixels qualify.
    """
    d = np.asarray(dpm, dtype=np.float64)
    if d.ndim != 2:
        raise ValueError(f"fit_plane needs a 2-D DPM, got shape {d.shape}.")
    if not pixel_size_um or pixel_size_um <= 0:
        raise ValueError("fit_plane needs a positive pixel size in µm to turn slopes into an angle.")
    yy, xx = np.mgrid[0 : d.shape[0], 0 : d.shape[1]].astype(np.float64)
    use = np.isfinite(d) if mask is None else (np.asarray(mask, bool) & np.isfinite(d))
    if image is not None and np.shape(image) == d.shape:
        sm = structure_mask(image) & use
        if sm.mean() >= 0.05:
            use = sm
    if use.sum() < 3:
        raise ValueError("fit_plane needs at least 3 usable DPM pixels.")
    x = (xx[use] - xx[use].mean()) * pixel_size_um
    y = (yy[use] - yy[use].mean()) * pixel_size_um
    z = d[use]
    a = np.column_stack([np.ones_like(x), x, y])
    coef, *_ = np.linalg.lstsq(a, z, rcond=None)
    resid = z - a @ coef
    gx, gy = coef[1], coef[2]
    oor = float(out_of_range_mask(d, defocus_range_um).mean()) if defocus_range_um is not None else 0.0
    return PlaneFit(
        mean_um=float(z.mean()),
        slope_x=float(gx),
        slope_y=float(gy),
        tilt_deg=float(np.degrees(np.arctan(np.hypot(gx, gy)))),
        direction_deg=float(np.degrees(np.arctan2(gy, gx)) % 360.0),
        residual_um=float(np.sqrt(np.mean(resid**2))),
        out_of_range_fraction=oor,
    )


def row_profile(dpm: np.ndarray, axis: int = 1) -> np.ndarray:
    """Mean defocus per row (``axis=1``) or per column (``axis=0``), as in the paper's Fig. 7c."""
    return np.nanmean(np.asarray(dpm, dtype=np.float64), axis=axis)


def _range(r):
    if r is None:
        return (-np.inf, np.inf)
    if np.isscalar(r):
        return (-abs(float(r)), abs(float(r)))
    return (float(r[0]), float(r[1]))
