"""Defocus-map (DPM) post-processing: plane fit (mean defocus, tilt angle and direction), surface fit
(curvature), range and structure masks."""

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


@dataclass
class SurfaceFit:
    """A least-squares quadratic surface through a DPM: how the sample is curved.

    Attributes
    ----------
    curvature_per_mm : (float, float)
        Principal curvatures of the defocus surface, 1/mm, largest magnitude first; positive where
        the defocus grows away from the surface's axis (for a |defocus| map the sign is that of |z|).
    radius_mm : (float, float)
        ``1 / |curvature|`` (inf for a flat direction).
    axis_deg : float
        Direction of the first principal curvature in the image, degrees (0 = +x, 90 = +y/down); a
        cylinder's axis lies at ``axis_deg + 90``.
    shape : str
        ``"flat"`` (the curvature explains little), ``"cylinder"``, ``"bowl"`` (both curvatures of one sign:
        a bowl or a dome, see ``curvature_per_mm``) or ``"saddle"``.
    sag_um : float
        Peak-to-peak of the quadratic part over the fitted pixels, µm.
    residual_um, plane_residual_um : float
        RMS of the DPM about the surface and about the best plane, µm.
    """

    curvature_per_mm: tuple
    radius_mm: tuple
    axis_deg: float
    shape: str
    sag_um: float
    residual_um: float
    plane_residual_um: float

    def to_dict(self) -> dict:
        """JSON-ready dictionary."""
        d = asdict(self)
        d["curvature_per_mm"] = [float(v) for v in self.curvature_per_mm]
        d["radius_mm"] = [float(v) if np.isfinite(v) else None for v in self.radius_mm]
        return d

    def describe(self) -> str:
        """One line for a readout."""
        if self.shape == "flat":
            return f"no clear curvature (sag {self.sag_um:.2f} µm)"
        r = self.radius_mm
        if self.shape == "cylinder":
            return (f"curved like a cylinder of radius {r[0]:.2g} mm, axis {(self.axis_deg + 90) % 180:.0f}° "
                    f"(sag {self.sag_um:.1f} µm)")
        if self.shape == "bowl":  # the defocus rises (bowl) or falls (dome) towards the edges
            kind = "bowl-shaped" if self.curvature_per_mm[0] > 0 else "dome-shaped"
        else:
            kind = "saddle-shaped"
        return f"{kind}, radii {r[0]:.2g} and {r[1]:.2g} mm (sag {self.sag_um:.1f} µm)"


# A curvature is reported when the quadratic part rises at least this far over the field and explains
# the map clearly better than the plane (DPM noise alone gives a few tenths of a µm of sag).
CURVED_MIN_SAG_UM = 0.75
CURVED_MAX_RESIDUAL_RATIO = 0.8
CYLINDER_RATIO = 0.25


def fit_surface(dpm: np.ndarray, pixel_size_um: float, *, mask: np.ndarray | None = None,
                image: np.ndarray | None = None) -> SurfaceFit:
    """Fit ``z = plane + c_xx·x² + c_xy·x·y + c_yy·y²`` to a 2-D DPM and report its curvature.

    The principal curvatures are the eigenvalues of the surface's Hessian. A sample that crosses
    focus under a |defocus| model folds (see :func:`fit_plane`) and reads as a U here:
    :func:`dpm_geometry` weighs the two readings.

    Parameters
    ----------
    dpm : ndarray, shape (Y, X)
        Defocus map in µm.
    pixel_size_um : float
        Lateral pixel size, µm.
    mask, image : ndarray, optional
        As in :func:`fit_plane`: pixels to use, or the refocused image whose structured pixels are used.
    """
    _, x, y, z, _ = _fit_points(dpm, pixel_size_um, mask, image, "fit_surface", 6)
    return _surface(x, y, z)


def _surface(x, y, z) -> SurfaceFit:
    a = np.column_stack([np.ones_like(x), x, y, x * x, x * y, y * y])
    coef, *_ = np.linalg.lstsq(a, z, rcond=None)
    resid = z - a @ coef
    plane_coef, *_ = np.linalg.lstsq(a[:, :3], z, rcond=None)
    plane_rms = float(np.sqrt(np.mean((z - a[:, :3] @ plane_coef) ** 2)))
    cxx, cxy, cyy = coef[3:]
    hess = np.array([[2 * cxx, cxy], [cxy, 2 * cyy]])  # 1/µm
    vals, vecs = np.linalg.eigh(hess)
    order = np.argsort(-np.abs(vals))
    k = vals[order] * 1000.0  # 1/mm
    v1 = vecs[:, order[0]]
    quad = a[:, 3:] @ coef[3:]
    sag = float(np.ptp(quad))
    rms = float(np.sqrt(np.mean(resid**2)))
    if sag < CURVED_MIN_SAG_UM or rms > CURVED_MAX_RESIDUAL_RATIO * plane_rms:
        shape = "flat"
    elif abs(k[1]) < CYLINDER_RATIO * abs(k[0]):
        shape = "cylinder"
    else:
        shape = "bowl" if k[0] * k[1] > 0 else "saddle"
    radius = tuple(float(1.0 / abs(v)) if abs(v) > 1e-6 else float("inf") for v in k)  # beyond 1 km: flat
    return SurfaceFit(
        curvature_per_mm=(float(k[0]), float(k[1])), radius_mm=radius,
        axis_deg=float(np.degrees(np.arctan2(v1[1], v1[0])) % 180.0), shape=shape, sag_um=sag,
        residual_um=rms, plane_residual_um=plane_rms,
    )


# How much better one model must explain a |defocus| map (RMS residual) to rule out the other. On
# the bundled model, fields tilted through focus and fields curved near focus give overlapping ratios
# (0.58-1.36 against 0.61-1.36 on seven specimen types), so most such maps get both readings.
CLEARLY_BETTER = 0.55
# A |defocus| map whose low end (5th percentile) is below this is near focus: a U there may be a fold.
NEAR_FOCUS_UM = 1.0


@dataclass
class DpmGeometry:
    """What a DPM says about the sample's shape: plane, curvature, and which reading holds.

    Attributes
    ----------
    plane : PlaneFit
        The plane fit (through the fold for a |defocus| map whose sample crosses focus).
    surface : SurfaceFit or None
        The quadratic fit (None when too few pixels).
    reading : str
        ``"plane"`` (tilt only), ``"curved"`` (the curvature is clear), ``"fold"`` (a sample tilted
        through focus under a |defocus| model), ``"fold_or_curved"`` (a |defocus| map folded at
        focus and one curved like a U look alike within the map's noise, so both are reported) or
        ``"curved_or_fold"`` (a |defocus| map curved like a cylinder whose low side is near focus,
        where no fold was fitted but a tilt through focus cannot be ruled out).
    focus_line_px : ndarray or None
        ``[[row, col], [row, col]]`` where the fitted plane crosses focus inside the map (a signed
        plane, or a fold), unless the reading is a plain curvature.
    """

    plane: PlaneFit
    surface: SurfaceFit | None
    reading: str
    fold: PlaneFit | None = None  # the fold fit set aside for a curvature, if one was fitted
    focus_line_px: np.ndarray | None = None  # see :func:`focus_line`; None when no tilt crosses focus here

    def describe(self) -> str:
        """The shape part of a readout: tilt, direction, residual, and curvature when there is one."""
        p, sf = self.plane, self.surface
        residual = f" · residual {p.residual_um:.2f} µm"
        if self.reading in ("fold", "fold_or_curved"):
            text = (f"tilt {p.tilt_deg:.2f}° axis {p.direction_deg % 180:.0f}°{residual} · the sample crosses focus: "
                    f"tilt fitted through the fold of this |defocus| map, direction ±180°")
            if self.reading == "fold_or_curved":
                text += f" · or it is {sf.describe()} near focus: a |defocus| map cannot tell these apart"
            return text
        text = f"tilt {p.tilt_deg:.2f}° towards {p.direction_deg:.0f}°{residual}"
        if self.reading == "curved_or_fold":
            alt = f"tilted {self.fold.tilt_deg:.2f}° through focus" if self.fold else "tilted through focus"
            return (text + f" · {sf.describe()}; its low side is near focus, where this |defocus| map would "
                    f"also fold a tilted sample: it may be {alt} instead")
        return text + (f" · {sf.describe()}" if self.reading == "curved" else "")

    def to_dict(self) -> dict:
        """JSON-ready: ``plane_fit``, ``surface_fit``, ``reading`` and ``fold_fit``."""
        return {"plane_fit": self.plane.to_dict(), "surface_fit": self.surface.to_dict() if self.surface else None,
                "reading": self.reading, "fold_fit": self.fold.to_dict() if self.fold else None,
                "focus_line_px": self.focus_line_px.tolist() if self.focus_line_px is not None else None}


def dpm_geometry(dpm: np.ndarray, pixel_size_um: float, *, image: np.ndarray | None = None, magnitude: bool = False,
                 defocus_range_um=None) -> DpmGeometry:
    """Fit a plane and a quadratic surface to a 2-D DPM and decide which describes the sample.

    Used by the napari readout and ``deepr refocus --dpm`` alike. For a |defocus| map a V (a tilt
    through focus, :func:`fit_plane` with ``magnitude=True``) and a U (a sample curved near focus)
    can explain the map equally well; then both are reported rather than guessing. A curvature
    that explains the map clearly better than the fold (or, without a fold, than the plane) is
    reported as such.

    Parameters
    ----------
    dpm : ndarray, shape (Y, X)
        Defocus map in µm.
    pixel_size_um : float
        Lateral pixel size, µm.
    image : ndarray, optional
        The refocused image: only its structured pixels are fitted.
    magnitude : bool
        The map holds |defocus| (``ModelCard.dpm_magnitude``).
    defocus_range_um : optional
        The model's trained range, for the out-of-range fraction.
    """
    d, x, y, z, center = _fit_points(dpm, pixel_size_um, None, image, "dpm_geometry", 3)
    g = _reading(x, y, z, center, magnitude, d, defocus_range_um)
    if (g.plane.crosses_focus or not magnitude) and g.reading != "curved":
        g.focus_line_px = focus_line(g.plane, d.shape, pixel_size_um)
    return g


def _reading(x, y, z, center, magnitude, d, defocus_range_um) -> DpmGeometry:
    """Plane, surface and the reading between them, from the points of :func:`_fit_points`."""
    oor = float(out_of_range_mask(d, defocus_range_um).mean()) if defocus_range_um is not None else 0.0
    plane = _plane(x, y, z, magnitude, oor, center)
    if z.size < 6:  # too few pixels for a curvature: the plane is all there is
        return DpmGeometry(plane, None, "fold" if plane.crosses_focus else "plane")
    surface = _surface(x, y, z)
    curved = surface.shape != "flat"
    if not plane.crosses_focus:
        if not curved:
            return DpmGeometry(plane, surface, "plane")
        # A tilt through focus folds into a U-like valley (never a bowl): with its low side near focus,
        # a |defocus| cylinder may be one whose fold the fit did not pick up.
        near_focus = magnitude and surface.shape == "cylinder" and float(np.percentile(z, 5)) < NEAR_FOCUS_UM
        return DpmGeometry(plane, surface, "curved_or_fold" if near_focus else "curved")
    if curved and surface.residual_um < CLEARLY_BETTER * plane.residual_um:
        # The curvature explains the map much better than a V: the plain plane gives its tilt.
        plain = _plane(x, y, z, False, oor, center)
        reading = "curved_or_fold" if surface.shape == "cylinder" else "curved"
        return DpmGeometry(plain, surface, reading, fold=plane)
    if curved and plane.residual_um >= CLEARLY_BETTER * surface.residual_um:
        return DpmGeometry(plane, surface, "fold_or_curved")
    return DpmGeometry(plane, surface, "fold")


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
