"""Rigid (translation) registration of the planes of an axial z-stack.

Phase correlation in scikit-image with its default ``normalization="phase"`` (whitening) fails on
smooth, defocused images: it returned ≈ 0 shift for true shifts up to 2.8 px in our measurements,
because whitening amplifies the noise-only high frequencies that defocus leaves behind. Plain
cross-correlation (``normalization=None``) of mean-subtracted, Hann-windowed images is exact on
the same data. Two more measured refinements: a light Gaussian pre-filter (σ = 1 px) removes
the white shot noise that dominates the empty high frequencies of a defocused plane, and because a
fixed window multiplies the *shifted* content differently from the reference, the estimate is
refined iteratively (shift back, re-estimate the residual), which removes that bias. A Tukey
window (flat centre) loses less signal than Hann. On a 2 µm-defocused noisy plane this brings the
error from 0.2 px (Hann, one pass) to below 0.1 px.

Every plane is registered directly to one reference plane (no chaining, so errors do not
accumulate): lateral PSF slices are symmetric, so the correlation peak of a defocused plane with
the in-focus one stays at the true shift even where the defocus OTF changes sign.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.filters import window
from skimage.registration import phase_cross_correlation

__all__ = ["estimate_shift", "register_stack"]


def _check(cancel) -> None:
    if cancel is not None and cancel():
        from ..errors import Cancelled

        raise Cancelled("Registration was cancelled.")


def _prep(img: np.ndarray, win: np.ndarray) -> np.ndarray:
    a = np.asarray(img, dtype=np.float64)
    return (a - a.mean()) * win


def estimate_shift(
    reference,
    moving,
    *,
    upsample: int = 20,
    smooth_px: float = 1.0,
    iterations: int = 3,
    cancel=None,
) -> np.ndarray:
    """Shift ``(dy, dx)`` that registers ``moving`` onto ``reference`` (scikit-image convention).

    Parameters
    ----------
    reference, moving : array-like
        2-D images of the same shape.
    upsample : int
        Sub-pixel precision is ``1 / upsample`` px (matrix-multiply DFT upsampling).
    smooth_px : float
        Gaussian pre-filter σ in pixels (0 disables it).
    iterations : int
        Shift-back-and-re-estimate passes that remove the windowing bias.
    cancel : callable, optional
        Checked before every pass (a pass on a 1024² plane takes up to a second on a busy CPU);
        returning True raises :class:`~napari_deepr.errors.Cancelled`.

    Returns
    -------
    numpy.ndarray
        ``(2,)`` float shift to apply to ``moving`` (e.g. with :func:`scipy.ndimage.shift`).
    """
    ref = np.asarray(reference)
    mov = np.asarray(moving)
    if ref.shape != mov.shape or ref.ndim != 2:
        raise ValueError("reference and moving must be 2-D arrays of the same shape.")
    win = window(("tukey", 0.3), ref.shape)
    ref = ndimage.gaussian_filter(ref.astype(np.float64), smooth_px) if smooth_px else ref
    mov0 = ndimage.gaussian_filter(mov.astype(np.float64), smooth_px) if smooth_px else mov
    r = _prep(ref, win)
    total = np.zeros(2)
    mov_k = np.asarray(mov0, dtype=np.float64)
    for _ in range(max(1, int(iterations))):
        _check(cancel)
        step, _, _ = phase_cross_correlation(
            r, _prep(mov_k, win), upsample_factor=upsample, normalization=None
        )
        total += step
        if np.all(np.abs(step) < 0.5 / upsample):
            break  # converged to the upsampling precision
        mov_k = ndimage.shift(mov0, total, order=3, mode="reflect")
    return total


def register_stack(
    stack,
    *,
    reference: int | None = None,
    upsample: int = 20,
    max_shift_px: float | None = None,
    cancel=None,
    progress=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Register every plane of a ``(Z, Y, X)`` stack to a reference plane by translation.

    Parameters
    ----------
    stack : array-like
        ``(Z, Y, X)`` stack.
    reference : int, optional
        Reference plane index; by default the plane with the highest normalised variance (the
        sharpest in fluorescence), because it correlates best with its neighbours on both sides.
    upsample : int
        Sub-pixel upsampling factor (precision ``1 / upsample`` px).
    max_shift_px : float, optional
        Shifts larger than this (in either axis) are treated as failed estimates and set to 0,
        e.g. on empty planes far from focus.
    cancel : callable, optional
        Checked before every plane; returning True raises :class:`~napari_deepr.errors.Cancelled`
        (registration is the longest step of building pairs, so a cancel must not wait for all of it).
    progress : callable, optional
        ``progress(fraction)`` after every plane (the longest step should not look stalled).

    Returns
    -------
    registered : numpy.ndarray
        float32 ``(Z, Y, X)`` stack, each plane shifted with cubic splines (reflect borders).
    shifts : numpy.ndarray
        ``(Z, 2)`` applied shifts ``(dy, dx)`` in pixels (the reference plane's is 0).
    """
    st = np.asarray(stack)
    if st.ndim != 3:
        raise ValueError(f"Expected a (Z, Y, X) stack, got shape {st.shape}.")
    z = st.shape[0]
    if reference is None:
        # Plane by plane: a float64 copy of the whole stack is 210 MB for 25 × 1024² and took seconds
        # on a busy CPU with no cancel point.
        mu, var = np.empty(z), np.empty(z)
        for k in range(z):
            _check(cancel)
            plane = st[k].reshape(-1).astype(np.float64)
            mu[k], var[k] = plane.mean(), plane.var()
        nv = np.where(mu != 0, var / np.where(mu != 0, mu, 1), 0)
        reference = int(np.argmax(nv))
    if not 0 <= reference < z:
        raise ValueError(f"reference {reference} is outside 0..{z - 1}.")
    ref = st[reference]
    shifts = np.zeros((z, 2))
    out = np.empty(st.shape, dtype=np.float32)
    for k in range(z):
        _check(cancel)
        if k != reference:
            shifts[k] = estimate_shift(ref, st[k], upsample=upsample, cancel=cancel)
            if max_shift_px is not None and np.any(np.abs(shifts[k]) > max_shift_px):
                shifts[k] = 0.0
        if np.any(shifts[k]):
            _check(cancel)  # the cubic shift of a large plane is the other long part of a plane
            out[k] = ndimage.shift(st[k].astype(np.float64), shifts[k], order=3, mode="reflect")
        else:
            out[k] = st[k]
        if progress is not None:
            progress((k + 1) / z)
    return out, shifts
