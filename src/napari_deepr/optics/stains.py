"""Stained sections in colour: optical density, stain amounts (colour deconvolution) and random H&E.

A stained section is described by stain amounts per pixel; the optical density in a colour channel
is their sum weighted by each stain's optical-density vector (Beer-Lambert per stain; Ruifrok &
Johnston 2001 colour deconvolution, the vectors ``skimage.color.rgb2hed`` uses).
:mod:`napari_deepr.optics.brightfield` images such sections.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

#: Optical-density vectors (R, G, B) of histological stains: Ruifrok & Johnston (2001), as in
#: ``skimage.color.rgb_from_hed`` (rows hematoxylin, eosin, DAB).
STAIN_OD: dict[str, tuple[float, float, float]] = {
    "hematoxylin": (0.65, 0.70, 0.29),
    "eosin": (0.07, 0.99, 0.11),
    "dab": (0.27, 0.57, 0.78),
}

#: The stain matrix (rows H, E, DAB) used by :func:`rgb_to_stains` and :func:`stains_to_od`.
H_AND_E = np.array([STAIN_OD["hematoxylin"], STAIN_OD["eosin"], STAIN_OD["dab"]])

_OD_FLOOR = 1e-6  # transmission floor before the logarithm (skimage uses the same)


# -- colour: transmission, optical density, stain amounts ------------------------------------------
def rgb_to_od(rgb: np.ndarray, white: float | Sequence[float] = 255.0) -> np.ndarray:
    """Decadic optical density ``-log10(I / I_white)`` per channel (channel axis last).

    Parameters
    ----------
    rgb : numpy.ndarray
        ``(..., 3)`` image, e.g. uint8.
    white : float or sequence of float
        Clear-glass level per channel (the camera's white).
    """
    t = np.asarray(rgb, dtype=np.float64) / np.asarray(white, dtype=np.float64)
    return -np.log10(np.clip(t, _OD_FLOOR, None))


def od_to_rgb(od: np.ndarray, white: float | Sequence[float] = 255.0) -> np.ndarray:
    """Inverse of :func:`rgb_to_od` (float64, not clipped or rounded)."""
    return np.asarray(white, dtype=np.float64) * 10.0 ** (-np.asarray(od, dtype=np.float64))


def rgb_to_stains(rgb: np.ndarray, white: float | Sequence[float] = 255.0, stains: np.ndarray = H_AND_E) -> np.ndarray:
    """Stain amounts per pixel by colour deconvolution (channel axis last in and out).

    Solves ``OD = c @ stains`` per pixel (three stains, three channels: exact). ``c`` is in units of
    optical density along each stain vector; it equals 6 × ``skimage.color.rgb2hed`` (which uses
    natural logarithms divided by ``ln(10⁶)``) wherever that is not clipped at zero. Negative amounts
    are kept, so :func:`stains_to_od` gives the input back exactly.
    """
    return rgb_to_od(rgb, white) @ np.linalg.inv(np.asarray(stains, dtype=np.float64))


def stains_to_od(amounts: np.ndarray, stains: np.ndarray = H_AND_E) -> np.ndarray:
    """Optical density per channel, ``c @ stains`` (Beer-Lambert: densities of stains add)."""
    return np.asarray(amounts, dtype=np.float64) @ np.asarray(stains, dtype=np.float64)


def stains_to_rgb(amounts: np.ndarray, white: float | Sequence[float] = 255.0, stains: np.ndarray = H_AND_E) -> np.ndarray:
    """Colour of stain amounts seen in focus with no blur: ``white · 10^(-c @ stains)``."""
    return od_to_rgb(np.clip(stains_to_od(amounts, stains), 0, None), white)


# -- specimens ---------------------------------------------------------------------------------------
def procedural_he(shape: tuple[int, int] | int, pixel_size_um: float, rng: np.random.Generator | int | None = None) -> np.ndarray:
    """A random H&E-like section: ``(3, H, W)`` amounts of hematoxylin, eosin and DAB (zero).

    Hematoxylin: nuclei with chromatin texture (the ``nuclei`` specimen); eosin: a fibrous or
    cytoplasmic stroma (``tissue``/``cytoplasm``/``texture``); both cut by a smooth mask of empty
    glass (lumina, tears) so white areas occur as in real sections. Densities in the ranges of real
    H&E (nuclei up to about 1 OD, stroma 0.1-0.6 OD).
    """
    from .specimens import make_specimen

    rng = np.random.default_rng(rng)
    if isinstance(shape, (int, np.integer)):
        shape = (int(shape), int(shape))
    nuc = make_specimen("nuclei", shape, pixel_size_um, rng).astype(np.float64)
    kind = ("tissue", "cytoplasm", "texture")[int(rng.integers(3))]
    eo = make_specimen(kind, shape, pixel_size_um, rng).astype(np.float64)
    nuc /= max(float(np.percentile(nuc, 99.5)), 1e-9)
    eo /= max(float(np.percentile(eo, 99.5)), 1e-9)
    h = np.clip(nuc, 0, 1.5) * rng.uniform(0.4, 1.1)
    e = (rng.uniform(0.05, 0.2) + np.clip(eo, 0, 1.5) * rng.uniform(0.15, 0.5))
    # Empty glass: a smooth random field thresholded (a few tens of µm across).
    sigma = rng.uniform(8.0, 25.0) / pixel_size_um
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    field /= max(float(field.std()), 1e-12)
    glass = 1.0 / (1.0 + np.exp(-(field - rng.uniform(0.5, 2.5)) * 4.0))  # soft edge, 0-30 % area
    e *= 1.0 - glass
    h *= 1.0 - glass
    return np.stack([h, e, np.zeros(shape)]).astype(np.float32)


def real_stain_amounts(rgb: np.ndarray, stains: np.ndarray = H_AND_E) -> np.ndarray:
    """``(3, H, W)`` stain amounts of a real in-focus RGB image (``(H, W, 3)``, any range).

    The clear-glass level of each channel is its 99.5th percentile (sections have some empty
    glass; a field without any makes the densities a little low, which stain augmentation covers).
    """
    a = np.asarray(rgb, dtype=np.float64)
    if a.ndim != 3 or a.shape[-1] < 3:
        raise ValueError(f"Expected an (H, W, 3) RGB image, got shape {a.shape}.")
    a = a[..., :3]
    white = np.maximum(np.percentile(a.reshape(-1, 3), 99.5, axis=0), 1e-6)
    return np.moveaxis(rgb_to_stains(a, white, stains), -1, 0)


def _jittered_stains(rng: np.random.Generator, jitter: float) -> np.ndarray:
    """The H/E/DAB matrix with each optical-density vector perturbed and renormalised (stain colour)."""
    m = H_AND_E + rng.normal(0.0, jitter, H_AND_E.shape) if jitter > 0 else H_AND_E.copy()
    m = np.clip(m, 0.01, None)
    return m / np.linalg.norm(m, axis=1, keepdims=True) * np.linalg.norm(H_AND_E, axis=1, keepdims=True)
