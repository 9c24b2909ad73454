"""The shape of a sample from its defocus map: quadratic surface fits (curvature) and the reading
between a plane, a fold through focus and a curved sample (:func:`dpm_geometry`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .dpm import PlaneFit, _fit_points, _plane, focus_line, out_of_range_mask


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
