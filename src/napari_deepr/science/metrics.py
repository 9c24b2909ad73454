"""Image-quality metrics used to score refocusing, as in the Deep-R paper.

* SSIM and RMSE are computed on z-scored images (zero mean, unit variance per image), after the
  paper's 10-pixel border crop, so that they measure structure rather than brightness.
* :func:`row_sharpness` is the row-wise relative sharpness coefficient used for tilted samples.
* :func:`bead_fwhm` measures lateral bead FWHM across a stack by 2-D Gaussian fits.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import ndimage
from scipy.optimize import OptimizeWarning, curve_fit
from skimage import filters, measure
from skimage.metrics import structural_similarity

from ..engine.normalization import zscore as _zscore
from .deconvolve import crop_edges

__all__ = ["FWHM_PER_SIGMA", "bead_fwhm", "fit_gaussian_fwhm", "rmse", "row_sharpness", "ssim", "zscore"]

#: FWHM = 2 sqrt(2 ln 2) σ of a Gaussian.
FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


def zscore(img) -> np.ndarray:
    """Zero-mean, unit-variance float64 copy, each 2-D plane on its own.

    The engine's normalization (:func:`napari_deepr.engine.normalization.zscore`) in float64; a
    constant image becomes ``image - mean``, zero up to rounding.
    """
    return _zscore(img, dtype=np.float64)


def _pair(a, b, crop: int) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"Shapes differ: {a.shape} vs {b.shape}.")
    return zscore(crop_edges(a, crop)), zscore(crop_edges(b, crop))


def ssim(image, reference, crop: int = 10, data_range: float | None = None) -> float:
    """SSIM between z-scored images after an edge crop.

    Uses Wang et al.'s settings (11×11 Gaussian window, σ = 1.5, population covariance,
    K1 = 0.01, K2 = 0.03), the same as MATLAB's ``ssim``. Because both images are z-scored,
    ``data_range`` defaults to the dynamic range (max − min) of the z-scored *reference*; this
    fixes the stabilising constants C1, C2 relative to the ground truth's contrast and makes the
    metric independent of the images' original units.

    Parameters
    ----------
    image, reference : array-like
        2-D images of the same shape (``reference`` is the ground truth).
    crop : int
        Pixels dropped at each edge before normalising (paper: 10).
    data_range : float, optional
        Override the data range.

    Returns
    -------
    float
        Mean SSIM.
    """
    a, b = _pair(image, reference, crop)
    dr = float(b.max() - b.min()) if data_range is None else float(data_range)
    if dr <= 0:
        dr = 1.0
    return float(
        structural_similarity(
            a, b, data_range=dr, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
    )


def rmse(image, reference, crop: int = 10) -> float:
    """Root-mean-square error between z-scored images after an edge crop (σ units)."""
    a, b = _pair(image, reference, crop)
    return float(np.sqrt(np.mean((a - b) ** 2)))


def row_sharpness(image, reference) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise relative sharpness of an image against a sharp reference.

    The sharpness map is the Sobel gradient magnitude ``S = sqrt(Sx² + Sy²)`` of the z-scored
    image (scikit-image's kernel scaling cancels in the ratio). For each row ``i`` the coefficient
    is the no-intercept least-squares slope ``β_i = <S_i, R_i> / <R_i, R_i>`` of the image's row
    on the reference's row ``R_i``, and its standard error is
    ``SE_i = sqrt(RSS_i / (n − 1)) / ||R_i||`` with ``n`` pixels per row. ``β ≈ 1`` means as sharp
    as the reference; tilted samples show β falling off along the tilt.

    Parameters
    ----------
    image, reference : array-like
        2-D images of the same shape.

    Returns
    -------
    beta, se : numpy.ndarray
        One value per row.
    """
    a = zscore(image)
    r = zscore(reference)
    if a.shape != r.shape or a.ndim != 2:
        raise ValueError("image and reference must be 2-D arrays of the same shape.")
    s = filters.sobel(a)
    rs = filters.sobel(r)
    rr = np.sum(rs * rs, axis=1)
    safe = np.where(rr > 0, rr, 1.0)
    beta = np.where(rr > 0, np.sum(s * rs, axis=1) / safe, np.nan)
    rss = np.sum((s - beta[:, None] * rs) ** 2, axis=1)
    n = a.shape[1]
    se = np.where(rr > 0, np.sqrt(rss / (n - 1)) / np.sqrt(safe), np.nan)
    return beta, se


def _gauss2d(yx, amp, y0, x0, sy, sx, off):
    y, x = yx
    return (amp * np.exp(-((y - y0) ** 2) / (2 * sy**2) - ((x - x0) ** 2) / (2 * sx**2)) + off).ravel()


def fit_gaussian_fwhm(crop, *, return_params: bool = False):
    """Lateral FWHM (pixels) of a spot from a 2-D Gaussian-plus-offset least-squares fit.

    The model is ``A exp(−(y−y0)²/2σy² − (x−x0)²/2σx²) + c`` (axis-aligned, like the paper's
    MATLAB ``lsqcurvefit`` fit); the FWHM is ``2 sqrt(2 ln 2)`` times the mean of ``σx`` and
    ``σy``. Starting values come from the intensity moments.

    Parameters
    ----------
    crop : array-like
        2-D crop around one spot.
    return_params : bool
        Also return the fitted ``(A, y0, x0, σy, σx, c)``.

    Returns
    -------
    float or (float, numpy.ndarray)
        FWHM in pixels (NaN if the fit fails or the spot is not contained in the crop).
    """
    c = np.asarray(crop, dtype=np.float64)
    if c.ndim != 2:
        raise ValueError("crop must be 2-D.")
    h, w = c.shape
    yy, xx = np.mgrid[0:h, 0:w]
    off0 = float(np.percentile(c, 10))
    wts = np.clip(c - off0, 0, None)
    tot = wts.sum()
    if tot <= 0:
        return (np.nan, np.full(6, np.nan)) if return_params else np.nan
    y0, x0 = (wts * yy).sum() / tot, (wts * xx).sum() / tot
    s0 = np.sqrt(max(((wts * ((yy - y0) ** 2 + (xx - x0) ** 2)).sum() / tot) / 2, 0.25))
    p0 = [float(c.max() - off0), y0, x0, s0, s0, off0]
    bounds = ([0, -0.5, -0.5, 0.2, 0.2, -np.inf], [np.inf, h - 0.5, w - 0.5, max(h, w), max(h, w), np.inf])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)
            p, _ = curve_fit(_gauss2d, (yy, xx), c.ravel(), p0=p0, bounds=bounds, maxfev=2000)
    except (RuntimeError, ValueError):
        return (np.nan, np.full(6, np.nan)) if return_params else np.nan
    fwhm = float(FWHM_PER_SIGMA * (abs(p[3]) + abs(p[4])) / 2)
    if fwhm > max(h, w):  # a "spot" wider than the crop is background, not a bead
        fwhm = np.nan
    return (fwhm, p) if return_params else fwhm


def bead_fwhm(
    stack,
    pixel_size_um: float,
    *,
    crop_px: int = 30,
    threshold: float | None = None,
    smooth_px: float = 1.0,
    min_area_px: int = 2,
    reject_ratio: float = 1.5,
    min_snr: float = 3.0,
    min_fraction: float = 0.5,
    return_details: bool = False,
):
    """Mean and standard deviation of the lateral bead FWHM in every plane of a stack.

    Follows the paper: (1) take the sharpest plane (maximum standard deviation), threshold it
    (Otsu on a Gaussian-smoothed copy unless ``threshold`` is given) and label connected
    components; (2) crop ``crop_px × crop_px`` around each centroid, rejecting beads too close to
    the border or to another bead (neighbour within the crop half-diagonal would bias the fit);
    (3) fit a 2-D Gaussian plus offset in every plane (:func:`fit_gaussian_fwhm`); (4) reject
    dirt and clusters whose in-focus FWHM exceeds ``reject_ratio`` × the median, and per-plane
    fits narrower than 0.7 × that bead's in-focus FWHM (noise speckles far from focus) and every
    fit beyond the first plane, on each side of focus, where the bead was lost in the noise.

    Parameters
    ----------
    stack : array-like
        ``(Z, Y, X)`` bead stack (a 2-D image is treated as one plane).
    pixel_size_um : float
        Lateral pixel size in micrometres.
    crop_px : int
        Crop side (paper: 30 px at 0.1625 µm); use a larger crop for finer sampling or large
        defocus.
    threshold : float, optional
        Intensity threshold on the smoothed sharpest plane.
    smooth_px : float
        Gaussian smoothing (pixels) before thresholding, against noise speckles.
    min_area_px : int
        Smallest connected component counted as a bead.
    reject_ratio : float
        In-focus FWHM outlier threshold relative to the median.
    min_snr : float
        A plane's fit counts only if the fitted amplitude exceeds ``min_snr`` times the residual
        standard deviation and the fitted centre stays within a quarter crop of the crop centre;
        otherwise the bead is lost in the noise at that defocus and the plane gets NaN for it.
    min_fraction : float
        A plane's mean and std are reported (else NaN) only if at least this fraction of the
        kept beads has a valid fit there.
    return_details : bool
        Also return a dict with the sharpest plane index, bead centroids and the per-bead FWHM
        table ``(n_beads, Z)`` in micrometres.

    Returns
    -------
    mean_um, std_um : numpy.ndarray
        Per-plane mean and standard deviation (NaN where no fit succeeded).
    n_beads : int
        Beads kept.
    """
    st = np.asarray(stack, dtype=np.float64)
    if st.ndim == 2:
        st = st[None]
    if st.ndim != 3:
        raise ValueError(f"Expected a (Z, Y, X) stack, got shape {st.shape}.")
    z_in = int(np.argmax(st.reshape(st.shape[0], -1).std(axis=1)))
    sm = ndimage.gaussian_filter(st[z_in], smooth_px) if smooth_px else st[z_in]
    thr = filters.threshold_otsu(sm) if threshold is None else float(threshold)
    labels = measure.label(sm > thr)
    props = [p for p in measure.regionprops(labels, intensity_image=st[z_in]) if p.area >= min_area_px]
    cents = np.array([p.centroid_weighted for p in props]).reshape(-1, 2)
    h, w = st.shape[1:]
    half = crop_px // 2
    keep = []
    for i, (cy, cx) in enumerate(cents):
        y0, x0 = round(cy) - half, round(cx) - half
        if y0 < 0 or x0 < 0 or y0 + crop_px > h or x0 + crop_px > w:
            continue
        d = np.hypot(*(cents - cents[i]).T)
        d[i] = np.inf
        if np.any(d < half * np.sqrt(2)):
            continue
        keep.append((y0, x0))
    table = np.full((len(keep), st.shape[0]), np.nan)
    yy, xx = np.mgrid[0:crop_px, 0:crop_px]
    for b, (y0, x0) in enumerate(keep):
        for z in range(st.shape[0]):
            crop = st[z, y0 : y0 + crop_px, x0 : x0 + crop_px]
            fwhm, p = fit_gaussian_fwhm(crop, return_params=True)
            if not np.isfinite(fwhm):
                continue
            resid = crop.ravel() - _gauss2d((yy, xx), *p)
            centred = np.hypot(p[1] - (crop_px - 1) / 2, p[2] - (crop_px - 1) / 2) <= crop_px / 4
            if p[0] >= min_snr * resid.std() and centred:
                table[b, z] = fwhm
    table *= pixel_size_um
    if len(keep):
        f0 = table[:, z_in]
        med = np.nanmedian(f0) if np.any(np.isfinite(f0)) else np.nan
        good = np.isfinite(f0) & (f0 <= reject_ratio * med)
        table = table[good]
        # defocus only broadens a bead: a fit much narrower than in focus is a noise speckle
        table[table < 0.7 * table[:, z_in : z_in + 1]] = np.nan
        # once a bead is lost in the noise moving away from focus, farther planes are only
        # noise: keep each bead's contiguous run of valid fits around the in-focus plane
        for row in table:
            ok = np.isfinite(row)
            for rng_ in (range(z_in, len(row)), range(z_in, -1, -1)):
                lost = False
                for z in rng_:
                    lost = lost or not ok[z]
                    if lost:
                        row[z] = np.nan
        keep = [k for k, g in zip(keep, good) if g]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN planes give NaN, by design
        mean = np.nanmean(table, axis=0) if len(table) else np.full(st.shape[0], np.nan)
        std = np.nanstd(table, axis=0) if len(table) else np.full(st.shape[0], np.nan)
    if len(table):
        # a plane where most beads are lost would report the few survivors' (biased) width
        few = np.isfinite(table).sum(axis=0) < np.ceil(min_fraction * len(table))
        mean[few] = np.nan
        std[few] = np.nan
    if return_details:
        details = {"in_focus_index": z_in, "crops_yx": keep, "fwhm_um": table}
        return mean, std, len(table), details
    return mean, std, len(table)
