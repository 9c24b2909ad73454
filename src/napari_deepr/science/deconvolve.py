"""Deconvolution baselines with a known PSF (the paper used DeconvolutionLab2).

* :func:`richardson_lucy` wraps :func:`skimage.restoration.richardson_lucy` and avoids its
  traps: it starts from a constant 0.5 (so the data are scaled to a maximum of 1 first), clips the
  result to [-1, 1] by default (``clip=False`` here, then rescaled back), and convolves with zero
  padding (so the image is reflect-padded by the PSF half-width and cropped afterwards).
* :func:`landweber` is DeconvolutionLab2's Landweber: in the Fourier domain
  ``X₀ = γ H* Y`` and ``X_{n+1} = X_n (1 − γ|H|²) + γ H* Y``, without positivity, step
  ``γ = 0.1`` and 100 iterations as in the paper. The image is reflect-padded instead of relying
  on DL2's circular boundaries.
* :func:`crop_edges` removes the 10-pixel border the paper excludes before scoring.
"""

from __future__ import annotations

import numpy as np
from scipy import fft as sfft
from skimage import restoration

__all__ = ["crop_edges", "landweber", "richardson_lucy"]


def _check(image, psf) -> tuple[np.ndarray, np.ndarray]:
    img = np.asarray(image, dtype=np.float64)
    k = np.asarray(psf, dtype=np.float64)
    if img.ndim != 2 or k.ndim != 2:
        raise ValueError("image and psf must be 2-D.")
    if k.shape[0] % 2 == 0 or k.shape[1] % 2 == 0:
        # an even kernel has no centre pixel: 'same' convolution would shift by half a pixel
        raise ValueError(f"The PSF must have odd sides, got {k.shape}.")
    s = k.sum()
    if not np.isfinite(s) or s <= 0:
        raise ValueError("The PSF must have a positive, finite sum.")
    if not np.all(np.isfinite(img)):
        raise ValueError("The image contains NaN or infinite values.")
    return img, k / s


def richardson_lucy(
    image,
    psf,
    iterations: int = 100,
    *,
    background: float = 0.0,
    filter_epsilon: float | None = None,
) -> np.ndarray:
    """Richardson-Lucy deconvolution (scikit-image) with border and scaling handled.

    Parameters
    ----------
    image : array-like
        2-D image; must be proportional to photons (subtract the camera offset via
        ``background``).
    psf : array-like
        2-D odd-sized PSF (normalised to unit sum here).
    iterations : int
        Number of iterations (the paper reports the best result at 100).
    background : float
        Constant subtracted before deconvolution (camera offset plus uniform background) and
        added back afterwards. RL assumes non-negative Poisson data, so values below it are
        clipped to 0.
    filter_epsilon : float, optional
        Passed to scikit-image (suppresses division by tiny values).

    Returns
    -------
    numpy.ndarray
        float64 deconvolved image, same shape and intensity scale as ``image``.
    """
    img, k = _check(image, psf)
    data = np.clip(img - background, 0, None)
    peak = data.max()
    if peak == 0:
        return img.copy()
    ph, pw = k.shape[0] // 2, k.shape[1] // 2
    padded = np.pad(data / peak, ((ph, ph), (pw, pw)), mode="reflect")
    out = restoration.richardson_lucy(
        padded, k, num_iter=int(iterations), clip=False, filter_epsilon=filter_epsilon
    )
    return out[ph : ph + img.shape[0], pw : pw + img.shape[1]] * peak + background


def landweber(
    image,
    psf,
    iterations: int = 100,
    step: float = 0.1,
    *,
    background: float = 0.0,
) -> np.ndarray:
    """Landweber deconvolution as in DeconvolutionLab2 (no positivity constraint).

    Parameters
    ----------
    image : array-like
        2-D image.
    psf : array-like
        2-D odd-sized PSF (normalised to unit sum, so ``|H| <= 1`` and ``γ = 0.1`` is stable).
    iterations : int
        Number of iterations (paper: 100).
    step : float
        Step ``γ`` (paper: 0.1). Must satisfy ``0 < γ < 2`` for a unit-sum PSF.
    background : float
        Constant subtracted before and added back after.

    Returns
    -------
    numpy.ndarray
        float64 deconvolved image.
    """
    img, k = _check(image, psf)
    if not 0 < step < 2:
        raise ValueError("step must be in (0, 2) for a unit-sum PSF.")
    h, w = img.shape
    ph, pw = k.shape[0] // 2, k.shape[1] // 2
    fshape = (sfft.next_fast_len(h + 2 * ph, real=True), sfft.next_fast_len(w + 2 * pw, real=True))
    pad = ((ph, fshape[0] - h - ph), (pw, fshape[1] - w - pw))
    y = np.pad(img - background, pad, mode="reflect")
    kk = np.zeros(fshape)
    kk[: k.shape[0], : k.shape[1]] = k
    H = sfft.rfft2(np.roll(kk, (-ph, -pw), axis=(0, 1)))
    g_hy = step * np.conj(H) * sfft.rfft2(y)
    damp = 1.0 - step * np.abs(H) ** 2
    x = g_hy.copy()  # X0 = γ H* Y, as DL2 initialises
    for _ in range(int(iterations)):
        x = x * damp + g_hy
    out = sfft.irfft2(x, s=fshape)
    return out[ph : ph + h, pw : pw + w] + background


def crop_edges(img, n: int = 10) -> np.ndarray:
    """Drop ``n`` pixels from each edge of the last two axes (the paper's scoring crop)."""
    a = np.asarray(img)
    if n <= 0:
        return a
    if a.shape[-1] <= 2 * n or a.shape[-2] <= 2 * n:
        raise ValueError(f"Image {a.shape} is too small to crop {n} px from each edge.")
    return a[..., n:-n, n:-n]
