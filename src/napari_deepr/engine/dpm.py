"""Defocus-map (DPM) post-processing: plane fit (mean defocus, tilt angle and direction), surface fit
(curvature), range and structure masks.

The surface fit and :func:`dpm_geometry` (plane, fold or curved) live in :mod:`.dpm_surface` and are
re-exported here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .normalization import zscore


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
    crosses_focus : bool
        A |defocus| map whose sample passes through focus: the plane was fitted through the fold
        (see :func:`fit_plane`), so ``direction_deg`` is known only up to 180°.
    floor_um : float
        For a folded fit, the map's reading at focus (a magnitude DPM cannot go below it).
    offset_um : float
        The fitted plane's value at ``center_px`` (signed for a folded fit: where it is 0 the sample
        is in focus, see :func:`focus_line`).
    center_px : (float, float)
        Centroid ``(x, y)`` of the fitted pixels, in pixels (column, row).
    """

    mean_um: float
    slope_x: float
    slope_y: float
    tilt_deg: float
    direction_deg: float
    residual_um: float
    out_of_range_fraction: float = 0.0
    crosses_focus: bool = False
    floor_um: float = 0.0
    offset_um: float = float("nan")
    center_px: tuple = (float("nan"), float("nan"))

    def to_dict(self) -> dict:
        """Plain-float dictionary (JSON-ready); ``crosses_focus`` stays a bool, ``center_px`` a pair."""
        return {k: (v if isinstance(v, bool) else [float(c) for c in v] if isinstance(v, tuple) else float(v))
                for k, v in asdict(self).items()}

    def describe(self) -> str:
        """One line for a readout: mean defocus, tilt and direction."""
        if self.crosses_focus:
            towards = (f"axis {self.direction_deg % 180:.0f}°/{self.direction_deg % 180 + 180:.0f}° "
                       "(the sample crosses focus; the sign of |defocus| maps is unknown)")
        else:
            towards = f"towards {self.direction_deg:.0f}°"
        return (
            f"mean defocus {self.mean_um:+.2f} µm, tilt {self.tilt_deg:.2f}° {towards}, "
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
    if not np.isfinite(sd) or sd == 0:  # nothing to measure: no pixel has structure
        return np.zeros(a.shape, dtype=bool)
    a = zscore(a, dtype=np.float64)
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
              image: np.ndarray | None = None, magnitude: bool = False) -> PlaneFit:
    """Fit a plane to a 2-D DPM and report mean defocus, tilt angle and direction.

    A model that maps |defocus| (``magnitude=True``) folds a sample that passes through focus into
    a V, and near focus it reads a floor rather than 0, so a plane through such a map reads the tilt
    far too low (a 1.5° sample centred on focus reads ~0.1°). For these maps the model
    ``|dpm| = sqrt(plane² + floor²)`` is also fitted (robust least squares, several starts); when
    its plane puts a real share of the field on each side of focus, that fit is returned with
    ``crosses_focus=True``. Otherwise the plain plane is kept: away from focus the two agree and
    the floor cannot be told from curvature.

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
    magnitude : bool
        The DPM holds |defocus| (``ModelCard.dpm_magnitude``): fit through the fold at focus.
    image : ndarray, shape (Y, X), optional
        The (refocused) image the DPM belongs to: only pixels where it has structure
        (:func:`structure_mask`) are fitted, since the defocus of empty background is a guess. Ignored
        when fewer than 5 % of the pixels qualify.
    """
    d, x, y, z, center = _fit_points(dpm, pixel_size_um, mask, image, "fit_plane", 3)
    oor = float(out_of_range_mask(d, defocus_range_um).mean()) if defocus_range_um is not None else 0.0
    return _plane(x, y, z, magnitude, oor, center)


def _plane(x, y, z, magnitude: bool, oor: float, center) -> PlaneFit:
    a = np.column_stack([np.ones_like(x), x, y])
    coef, *_ = np.linalg.lstsq(a, z, rcond=None)
    offset, gx, gy = coef
    rms = float(np.sqrt(np.mean((z - a @ coef) ** 2)))
    folded = _fit_folded(x, y, z, coef) if magnitude and z.size >= FOLD_MIN_POINTS else None
    floor = 0.0
    if folded is not None:
        (offset, gx, gy, floor), rms = folded
    return PlaneFit(
        mean_um=float(z.mean()),
        slope_x=float(gx),
        slope_y=float(gy),
        tilt_deg=float(np.degrees(np.arctan(np.hypot(gx, gy)))),
        direction_deg=float(np.degrees(np.arctan2(gy, gx)) % 360.0),
        residual_um=rms,
        out_of_range_fraction=oor,
        crosses_focus=folded is not None,
        floor_um=float(floor),
        offset_um=float(offset),
        center_px=center,
    )


# A plane or a quadratic has a handful of unknowns: beyond this many usable pixels they are fitted on a
# regular sub-grid, so a whole-slide DPM is fitted in a fraction of a second instead of freezing a UI.
FIT_MAX_POINTS = 1_000_000


def _fit_points(dpm, pixel_size_um, mask, image, who: str, minimum: int):
    """The DPM as float and its usable pixels: ``(dpm, x_um, y_um, z_um, (x0_px, y0_px))``, x/y centred on
    their mean ``(x0_px, y0_px)``."""
    d = np.asarray(dpm, dtype=np.float64)
    if d.ndim != 2:
        raise ValueError(f"{who} needs a 2-D DPM, got shape {d.shape}.")
    if not pixel_size_um or pixel_size_um <= 0:
        raise ValueError(f"{who} needs a positive pixel size in µm to turn slopes into angles.")
    use = np.isfinite(d) if mask is None else (np.asarray(mask, bool) & np.isfinite(d))
    if image is not None and np.shape(image) == d.shape:
        sm = structure_mask(image) & use
        if sm.mean() >= 0.05:
            use = sm
    n = int(use.sum())
    if n < minimum:
        raise ValueError(f"{who} needs at least {minimum} usable DPM pixels.")
    step = max(1, int(np.ceil(np.sqrt(n / FIT_MAX_POINTS))))
    iy, ix = np.nonzero(use[::step, ::step])
    iy, ix = iy * step, ix * step
    center = (float(ix.mean()), float(iy.mean()))
    x = (ix - center[0]) * pixel_size_um
    y = (iy - center[1]) * pixel_size_um
    return d, x, y, d[iy, ix], center


# A folded fit counts as crossing focus when at least this share of the fitted pixels lies on each
# side of focus, beyond the floor (and beyond FOLD_MARGIN_UM): a V needs both arms to be seen.
FOLD_MIN_SIDE = 0.05
FOLD_MARGIN_UM = 0.25
FOLD_MAX_POINTS = 8000
# Measured on the bundled model: untilted fields near focus give ratios 0.52-1.0, fields tilted
# through focus 0.04-0.51 (cells, the held-out type, are the highest).
FOLD_MAX_COST_RATIO = 0.6
FOLD_MIN_POINTS = 256  # a V and its floor from fewer pixels would be fitted noise


def _fit_folded(x, y, z, plane_coef):
    """Fit ``z ≈ sqrt((a + gx·x + gy·y)² + floor²)``; ``((a, gx, gy, floor), rms)`` or None.

    None when the best fit keeps the whole field on one side of focus (then the plain plane holds).
    """
    from scipy.optimize import least_squares

    n = z.size
    if n > FOLD_MAX_POINTS:  # a plane has 3 unknowns: a deterministic subsample keeps it fast
        pick = np.random.default_rng(0).choice(n, FOLD_MAX_POINTS, replace=False)
        xs, ys, zs = x[pick], y[pick], z[pick]
    else:
        xs, ys, zs = x, y, z
    span = max(float(np.ptp(zs)), 1e-3)
    floor_max = max(float(np.percentile(zs, 50)), 1e-3)

    def residual(p):
        return np.sqrt((p[0] + p[1] * xs + p[2] * ys) ** 2 + p[3] ** 2) - zs

    # Starts: the plain plane, and a V along each of 12 directions with its vertex where the map is
    # lowest (a V is a local minimum no plane start reaches).
    low = zs <= np.percentile(zs, 3)
    starts = [[plane_coef[0], plane_coef[1], plane_coef[2], 0.1 * floor_max]]
    for theta in np.radians(np.arange(0, 180, 15)):
        c, s = np.cos(theta), np.sin(theta)
        u = xs * c + ys * s
        half = max(0.5 * float(np.ptp(u)), 1e-6)
        slope = span / half
        u0 = float(np.median(u[low]))
        starts.append([-slope * u0, slope * c, slope * s, 0.1 * floor_max])
    best = None
    for p0 in starts:
        p0 = list(p0)
        p0[3] = min(max(p0[3], 0.0), floor_max)
        r = least_squares(residual, p0, bounds=([-np.inf, -np.inf, -np.inf, 0.0], [np.inf, np.inf, np.inf, floor_max]),
                          loss="soft_l1", f_scale=0.5, max_nfev=200)
        if best is None or r.cost < best.cost:
            best = r
    a, gx, gy, floor = best.x
    # The fold must explain the map clearly better than the plain plane (same robust loss), or a
    # near-focus map with patchy readings would pass for a shallow V.
    plain = least_squares(lambda p: p[0] + p[1] * xs + p[2] * ys - zs, plane_coef, loss="soft_l1", f_scale=0.5,
                          max_nfev=200)
    if best.cost > FOLD_MAX_COST_RATIO * plain.cost:
        return None
    plane = a + gx * x + gy * y
    margin = max(float(floor), FOLD_MARGIN_UM)
    if min(np.mean(plane < -margin), np.mean(plane > margin)) < FOLD_MIN_SIDE:
        return None
    if plane.mean() < 0:  # the sign of a |defocus| map is unknown: report the plane mostly above focus
        a, gx, gy = -a, -gx, -gy
    rms = float(np.sqrt(np.mean((np.sqrt(plane**2 + floor**2) - z) ** 2)))
    return (float(a), float(gx), float(gy), float(floor)), rms


def focus_line(fit: PlaneFit, shape, pixel_size_um: float):
    """Where a fitted plane crosses focus inside the image: ``[[row, col], [row, col]]`` or None.

    For a signed DPM, or a |defocus| map fitted through its fold (``fit.crosses_focus``), the plane
    is 0 along a straight line: the part of a tilted sample that is in focus.

    Parameters
    ----------
    fit : PlaneFit
        From :func:`fit_plane` (or ``dpm_geometry(...).plane``).
    shape : (int, int)
        ``(rows, cols)`` of the DPM.
    pixel_size_um : float
        The pixel size the fit was made with.
    """
    gx, gy = fit.slope_x * pixel_size_um, fit.slope_y * pixel_size_um  # µm of defocus per pixel
    if not np.isfinite(fit.offset_um) or np.hypot(gx, gy) < 1e-9:
        return None
    cx, cy = fit.center_px
    rows, cols = shape
    # z(col, row) = offset + gx·(col − cx) + gy·(row − cy) = 0, cut by the image's four edges
    points = []
    for col in (0.0, cols - 1.0):
        if abs(gy) > 1e-12:
            row = cy - (fit.offset_um + gx * (col - cx)) / gy
            if 0 <= row <= rows - 1:
                points.append((row, col))
    for row in (0.0, rows - 1.0):
        if abs(gx) > 1e-12:
            col = cx - (fit.offset_um + gy * (row - cy)) / gx
            if 0 <= col <= cols - 1:
                points.append((row, col))
    unique = []
    for pt in points:
        if all(np.hypot(pt[0] - q[0], pt[1] - q[1]) > 1e-6 for q in unique):
            unique.append(pt)
    if len(unique) < 2:
        return None
    return np.array(unique[:2], dtype=np.float64)


def row_profile(dpm: np.ndarray, axis: int = 1) -> np.ndarray:
    """Mean defocus per row (``axis=1``) or per column (``axis=0``), as in the paper's Fig. 7c."""
    return np.nanmean(np.asarray(dpm, dtype=np.float64), axis=axis)


def _range(r):
    if r is None:
        return (-np.inf, np.inf)
    if np.isscalar(r):
        return (-abs(float(r)), abs(float(r)))
    return (float(r[0]), float(r[1]))


# Moved to .dpm_surface (which imports this module, hence lazily).
_GEOMETRY = ("CLEARLY_BETTER", "CURVED_MAX_RESIDUAL_RATIO", "CURVED_MIN_SAG_UM", "CYLINDER_RATIO", "DpmGeometry",
             "NEAR_FOCUS_UM", "SurfaceFit", "dpm_geometry", "fit_surface")


def __getattr__(name: str):
    if name in _GEOMETRY:
        from . import dpm_surface

        return getattr(dpm_surface, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
