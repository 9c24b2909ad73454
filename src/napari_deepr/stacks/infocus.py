"""Choosing the in-focus plane of a z-stack, for the whole field or per crop.

The Deep-R protocol takes, for each crop, the plane most similar (SSIM) to the extended depth of
field image ("ssim_edof"), which adapts to tilt and field curvature. Focus-measure alternatives
are offered because the best choice depends on the modality: in fluorescence the sharpest plane
is in focus ("nvar", "vollath5", "max_std"), but unstained cells in brightfield are phase objects
with the *least* contrast at focus ("min_contrast"). Callers offer a manual override on top.
"""

from __future__ import annotations

import numpy as np
from skimage.metrics import structural_similarity

from ..science.focus import normalized_variance, vollath5
from .edof import edof_wavelet

__all__ = ["FOCUS_METHODS", "crop_grid", "select_in_focus"]

#: Methods understood by :func:`select_in_focus`.
FOCUS_METHODS: tuple[str, ...] = ("ssim_edof", "nvar", "vollath5", "max_std", "min_contrast")


def crop_grid(shape: tuple[int, int], crop: int) -> list[tuple[int, int]]:
    """Top-left corners of the non-overlapping ``crop × crop`` grid (leftover border dropped)."""
    ny, nx = shape[0] // crop, shape[1] // crop
    return [(i * crop, j * crop) for i in range(ny) for j in range(nx)]


def _score(stack: np.ndarray, method: str, edof: np.ndarray | None) -> np.ndarray:
    z = stack.shape[0]
    if method == "ssim_edof":
        dr = float(edof.max() - edof.min()) or 1.0
        win = min(7, *(s - (1 - s % 2) for s in edof.shape))
        return np.array(
            [structural_similarity(edof, stack[k], data_range=dr, win_size=win) for k in range(z)]
        )
    if method == "nvar":
        return np.array([normalized_variance(p) for p in stack])
    if method == "vollath5":
        return np.array([vollath5(p) for p in stack])
    if method == "max_std":
        return stack.reshape(z, -1).std(axis=1)
    if method == "min_contrast":
        flat = stack.reshape(z, -1)
        mu = flat.mean(axis=1)
        return -flat.std(axis=1) / np.where(mu != 0, mu, 1.0)  # argmax of -contrast
    raise ValueError(f"Unknown in-focus method {method!r}; choose one of {FOCUS_METHODS}.")


def select_in_focus(
    stack,
    *,
    method: str = "ssim_edof",
    crop: int | None = None,
    edof: np.ndarray | None = None,
    cancel=None,
    progress=None,
) -> int | np.ndarray:
    """Index of the in-focus plane, for the whole field or per crop.

    Parameters
    ----------
    stack : array-like
        Registered ``(Z, Y, X)`` stack.
    method : str
        One of :data:`FOCUS_METHODS`. ``"ssim_edof"`` (paper): highest SSIM to the wavelet EDOF
        (data range of the EDOF crop, scikit-image's 7×7 window). ``"nvar"``, ``"vollath5"``,
        ``"max_std"``: sharpest plane (fluorescence). ``"min_contrast"``: lowest σ/μ
        (brightfield of unstained, phase-like cells).
    crop : int, optional
        Side of non-overlapping square crops; None scores the whole field.
    edof : numpy.ndarray, optional
        Precomputed EDOF for ``"ssim_edof"`` (computed with :func:`edof_wavelet` otherwise).
    cancel : callable, optional
        Checked in the EDOF fusion and before every crop; returning True raises
        :class:`~napari_deepr.errors.Cancelled` (a large stack takes seconds per step).
    progress : callable, optional
        ``progress(fraction)`` after the EDOF and after every crop.

    Returns
    -------
    int or numpy.ndarray
        Plane index, or an int array of shape ``(Y // crop, X // crop)`` with one index per crop.
    """
    st = np.asarray(stack, dtype=np.float64)
    if st.ndim != 3:
        raise ValueError(f"Expected a (Z, Y, X) stack, got shape {st.shape}.")
    if method not in FOCUS_METHODS:
        raise ValueError(f"Unknown in-focus method {method!r}; choose one of {FOCUS_METHODS}.")
    ref = None
    if method == "ssim_edof":
        ref = edof_wavelet(st, cancel=cancel) if edof is None else np.asarray(edof, dtype=np.float64)
        if ref.shape != st.shape[1:]:
            raise ValueError(f"EDOF shape {ref.shape} differs from the planes {st.shape[1:]}.")
    if crop is None:
        return int(np.argmax(_score(st, method, ref)))
    crop = int(crop)
    if crop < 8 or crop > min(st.shape[1:]):
        raise ValueError(f"crop must be between 8 and {min(st.shape[1:])} px, got {crop}.")
    ny, nx = st.shape[1] // crop, st.shape[2] // crop
    out = np.empty((ny, nx), dtype=int)
    for i in range(ny):
        for j in range(nx):
            if cancel is not None and cancel():
                from ..errors import Cancelled

                raise Cancelled("Choosing the in-focus planes was cancelled.")
            sl = (slice(i * crop, (i + 1) * crop), slice(j * crop, (j + 1) * crop))
            sub_ref = None if ref is None else ref[sl]
            out[i, j] = int(np.argmax(_score(st[(slice(None),) + sl], method, sub_ref)))
            if progress is not None:
                progress((i * nx + j + 1) / (ny * nx))
    return out
