"""Focus measures and online-autofocus simulation (the Deep-R paper's baselines).

The definitions follow Micro-Manager's OughtaFocus (``FocusAnalysis.java``), which the paper used
for acquisition: sums run over the whole image and ``x`` is the column index. Intensities are
used as recorded (no rescaling), because the measures are only comparable across planes taken
with a fixed exposure.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage
from scipy.optimize import minimize_scalar

__all__ = [
    "FOCUS_MEASURES",
    "best_plane",
    "brenner",
    "brent_focus_search",
    "focus_curve",
    "get_measure",
    "normalized_variance",
    "std_focus",
    "tenengrad",
    "vollath4",
    "vollath5",
]


def _as2d(image) -> np.ndarray:
    a = np.asarray(image, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"Focus measures take a 2-D image, got shape {a.shape}.")
    return a


def vollath4(image) -> float:
    """Vollath F4 autocorrelation: ``Σ I(x)I(x+1) − Σ I(x)I(x+2)`` along rows.

    Both sums start at the first column (Micro-Manager starts the first sum at x = 1, an
    off-by-one that is not reproduced here).
    """
    a = _as2d(image)
    return float(np.sum(a[:, :-1] * a[:, 1:]) - np.sum(a[:, :-2] * a[:, 2:]))


def vollath5(image) -> float:
    """Vollath F5: ``Σ I(x)I(x+1) − (W−1)·H·μ²`` (autocorrelation minus its mean-field part)."""
    a = _as2d(image)
    h, w = a.shape
    return float(np.sum(a[:, :-1] * a[:, 1:]) - (w - 1) * h * a.mean() ** 2)


def std_focus(image) -> float:
    """Micro-Manager's "StdDev" measure, which is σ/μ (normalised standard deviation)."""
    a = _as2d(image)
    mu = a.mean()
    return float(a.std() / mu) if mu != 0 else 0.0


def normalized_variance(image) -> float:
    """Normalised variance ``σ²/μ = (1/(HWμ)) Σ (I − μ)²``."""
    a = _as2d(image)
    mu = a.mean()
    return float(a.var() / mu) if mu != 0 else 0.0


def brenner(image) -> float:
    """Brenner gradient ``Σ (I(x+2) − I(x))²`` along rows, divided by the pixel count."""
    a = _as2d(image)
    return float(np.mean((a[:, 2:] - a[:, :-2]) ** 2))


def tenengrad(image) -> float:
    """Tenengrad: mean squared Sobel gradient magnitude (scipy's unnormalised kernels)."""
    a = _as2d(image)
    return float(np.mean(ndimage.sobel(a, 0) ** 2 + ndimage.sobel(a, 1) ** 2))


#: Name -> function, all maximal at best focus for fluorescence.
FOCUS_MEASURES: dict[str, Callable[[np.ndarray], float]] = {
    "vollath4": vollath4,
    "vollath5": vollath5,
    "std": std_focus,
    "nvar": normalized_variance,
    "brenner": brenner,
    "tenengrad": tenengrad,
}


def get_measure(measure: str | Callable[[np.ndarray], float]) -> Callable[[np.ndarray], float]:
    """Resolve a measure name (key of :data:`FOCUS_MEASURES`) or pass a callable through."""
    if callable(measure):
        return measure
    try:
        return FOCUS_MEASURES[measure]
    except KeyError:
        raise ValueError(
            f"Unknown focus measure {measure!r}; choose one of {sorted(FOCUS_MEASURES)}."
        ) from None


def focus_curve(stack, measure: str | Callable = "vollath5") -> np.ndarray:
    """Focus measure of every plane of a ``(Z, Y, X)`` stack (float64 array of length Z)."""
    st = np.asarray(stack)
    if st.ndim != 3:
        raise ValueError(f"Expected a (Z, Y, X) stack, got shape {st.shape}.")
    f = get_measure(measure)
    return np.array([f(p) for p in st])


def best_plane(stack, measure: str | Callable = "vollath5") -> int:
    """Index of the plane with the highest focus measure."""
    return int(np.argmax(focus_curve(stack, measure)))


def brent_focus_search(
    render: Callable[[float], np.ndarray],
    bounds: tuple[float, float],
    measure: str | Callable = "vollath5",
    xatol: float = 0.1,
    max_evaluations: int = 100,
) -> tuple[float, int]:
    """Simulate OughtaFocus: Brent's bounded search for the z that maximises a focus measure.

    Every call of ``render`` stands for one camera exposure at a new stage position, so the
    returned evaluation count is the number of images an online autofocus would acquire.

    Parameters
    ----------
    render : callable
        ``render(z_um) -> image``: acquire (or simulate) an image at stage position ``z_um``.
    bounds : (float, float)
        Search interval in micrometres (Micro-Manager: start ± SearchRange/2).
    measure : str or callable
        Focus measure (name in :data:`FOCUS_MEASURES` or a function).
    xatol : float
        Absolute tolerance on z in micrometres (the paper: 0.1 µm).
    max_evaluations : int
        Cap on acquisitions (Micro-Manager: MaxEval(100)).

    Returns
    -------
    z_best : float
        Stage position found.
    n_evaluations : int
        Number of images acquired.
    """
    f = get_measure(measure)
    count = 0

    def cost(z: float) -> float:
        nonlocal count
        count += 1
        return -f(render(float(z)))

    res = minimize_scalar(
        cost,
        bounds=(float(bounds[0]), float(bounds[1])),
        method="bounded",
        options={"xatol": float(xatol), "maxiter": int(max_evaluations)},
    )
    return float(res.x), count
