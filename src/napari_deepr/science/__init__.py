"""Science: focus measures and Brent autofocus, deconvolution baselines, quality metrics.

Qt-free and torch-free; see ``docs/ARCHITECTURE.md``.
"""

from .deconvolve import crop_edges, landweber, richardson_lucy
from .focus import (
    FOCUS_MEASURES,
    best_plane,
    brenner,
    brent_focus_search,
    focus_curve,
    normalized_variance,
    std_focus,
    tenengrad,
    vollath4,
    vollath5,
)
from .metrics import bead_fwhm, fit_gaussian_fwhm, rmse, row_sharpness, ssim, zscore

__all__ = [
    "FOCUS_MEASURES",
    "bead_fwhm",
    "best_plane",
    "brenner",
    "brent_focus_search",
    "crop_edges",
    "fit_gaussian_fwhm",
    "focus_curve",
    "landweber",
    "normalized_variance",
    "richardson_lucy",
    "rmse",
    "row_sharpness",
    "ssim",
    "std_focus",
    "tenengrad",
    "vollath4",
    "vollath5",
    "zscore",
]
