"""The normalization a model card names, and the one z-score everything else uses.

A Deep-R network sees each image plane z-scored by its own statistics (the paper: zero mean, unit
variance per image) and returns its output in the same units; the engine maps the output back with
the input plane's mean and standard deviation. The card says so in two fields, which
:class:`~napari_deepr.engine.model.ModelCard` checks when a model is loaded:

* ``normalization`` -- :data:`ZSCORE_PER_PLANE` or :data:`ZSCORE_PER_PLANE_PER_CHANNEL`: every 2-D
  plane, and every channel of a multi-channel plane, by its own mean and standard deviation (for one
  channel the two names mean the same; the trainer writes the second for multi-channel models).
* ``output_scaling`` -- :data:`INPUT_MEAN_STD`: ``output = network_output * std + mean`` with the
  input plane's statistics.

A plane is *flat* when its standard deviation is at most :data:`FLAT_RTOL` times its magnitude
(``max(|mean|, 1)``): dividing by such a spread would only amplify rounding noise, so a flat plane is
divided by 1 instead (it becomes ``plane - mean``, about zero) and the engine returns it unchanged.

:func:`zscore` is that rule for an in-memory image (the trainer's pairs, the metrics, the figures);
the engine streams planes too large for memory, so it takes the same statistics block by block with
:func:`plane_stats` and applies :func:`flat_planes`. Both agree to float rounding (``tests/test_science.py``).
"""

from __future__ import annotations

import numpy as np

from ..errors import ModelError

ZSCORE_PER_PLANE = "zscore_per_plane"
ZSCORE_PER_PLANE_PER_CHANNEL = "zscore_per_plane_per_channel"
NORMALIZATIONS: dict[str, str] = {
    ZSCORE_PER_PLANE: "each image plane z-scored by its own mean and standard deviation",
    ZSCORE_PER_PLANE_PER_CHANNEL: "each channel of each image plane z-scored by its own mean and standard deviation",
}
"""Normalizations the engine applies, by the name a card gives them."""

INPUT_MEAN_STD = "input_mean_std"
OUTPUT_SCALINGS: dict[str, str] = {
    INPUT_MEAN_STD: "the output, in z-scored units, times the input plane's standard deviation plus its mean",
}
"""How the engine maps the network's output back to image units, by the card's name."""

FLAT_RTOL = 1e-12
"""A plane whose standard deviation is at most this times ``max(|mean|, 1)`` is flat (see above).

The engine has always used this rule. The trainer used an absolute ``std > 1e-6``; on real and
simulated training images no plane comes near either bound, so its z-scored pairs are unchanged
byte for byte (``tests/test_science.py``)."""


def card_normalization(channels: int) -> str:
    """The ``normalization`` a card of a ``channels``-channel model names (what the trainer writes)."""
    return ZSCORE_PER_PLANE if int(channels) == 1 else ZSCORE_PER_PLANE_PER_CHANNEL


def check_card(normalization: str, output_scaling: str, source: str = "model.json") -> None:
    """Refuse a card whose normalization or output scaling this engine does not apply.

    Raises
    ------
    ModelError
        In one sentence, naming the field, its value and the values that are understood.
    """
    for key, value, known in (("normalization", normalization, NORMALIZATIONS),
                              ("output_scaling", output_scaling, OUTPUT_SCALINGS)):
        if value not in known:
            raise ModelError(
                f"{source}: '{key}' is {value!r}, which this napari-deepr does not apply (it knows "
                f"{', '.join(known)}), so the model's output would be wrong; use a model made for it or a newer napari-deepr."
            )


def flat_planes(mean, std) -> tuple[np.ndarray, np.ndarray]:
    """Which planes (or channels) are flat, and the standard deviation to divide by.

    Parameters
    ----------
    mean, std : array_like
        Per-plane (or per-channel) statistics.

    Returns
    -------
    flat : ndarray of bool
        ``std <= FLAT_RTOL * max(|mean|, 1)``.
    safe_std : ndarray
        ``std``, with 1 where flat.
    """
    mean = np.asarray(mean)
    std = np.asarray(std)
    flat = std <= FLAT_RTOL * np.maximum(np.abs(mean), 1.0)
    return flat, np.where(flat, 1.0, std)


def zscore(image, *, dtype=np.float32) -> np.ndarray:
    """A copy of ``image`` with every 2-D plane at zero mean and unit standard deviation.

    Planes are the last two axes; every index of the leading axes (channels, z, ...) is normalized
    by its own statistics, which are computed in ``dtype`` (the trainer's pairs are float32, the
    metrics float64). A flat plane (:data:`FLAT_RTOL`) becomes ``plane - mean``.

    Parameters
    ----------
    image : array_like
        At least 2-D.
    dtype : numpy dtype
        Working and output precision.

    Returns
    -------
    ndarray
        Same shape as ``image``, of ``dtype``.
    """
    a = np.asarray(image, dtype=dtype)
    if a.ndim < 2:
        raise ValueError(f"zscore needs an image of at least two dimensions, not shape {a.shape}.")
    if a.ndim > 2:
        return np.stack([zscore(p, dtype=dtype) for p in a]) if len(a) else a.copy()
    m = float(a.mean())
    s = float(a.std())
    # Python floats keep the arithmetic in the working dtype (numpy's rules for scalars).
    flat = s <= FLAT_RTOL * max(abs(m), 1.0)
    return ((a - m) / (1.0 if flat else s)).astype(dtype, copy=False)


def plane_stats(view, block_rows: int = 512, pool=None) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of a ``(C, Y, X)`` plane, read block by block.

    Blocks are combined in order with Chan's parallel update, so memory stays at a few blocks and
    every caller (numpy, dask, zarr, a distributed strip, with or without a thread ``pool``) gets
    bit-identical statistics. Statistics are float64 whatever the image's type.

    Parameters
    ----------
    view : array_like
        ``(C, Y, X)``; numpy, dask or zarr.
    block_rows : int
        Rows read at a time.
    pool : concurrent.futures.Executor, optional
        Threads for numpy planes (lazy arrays are read by one thread).

    Returns
    -------
    mean, std : ndarray
        Shape ``(C,)``.
    """
    c, h = view.shape[0], view.shape[1]

    def block(r0):
        blk = np.asarray(view[:, r0:r0 + block_rows, :], dtype=np.float64).reshape(c, -1)
        mb = blk.mean(axis=1)
        blk -= mb[:, None]
        return blk.shape[1], mb, np.einsum("ij,ij->i", blk, blk)

    starts = range(0, h, block_rows)
    # Lazy arrays (dask, zarr) are read by one thread: their own readers may not be thread-safe.
    parts = pool.map(block, starts) if pool is not None and isinstance(view, np.ndarray) else map(block, starts)
    n = 0
    mean = np.zeros(c)
    m2 = np.zeros(c)
    for nb, mb, m2b in parts:
        delta = mb - mean
        tot = n + nb
        mean = mean + delta * nb / tot
        m2 = m2 + m2b + delta**2 * n * nb / tot
        n = tot
    return mean, np.sqrt(m2 / n)
