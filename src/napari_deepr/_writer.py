"""napari writer: an image layer (refocused image or DPM) to a calibrated TIFF with its metadata."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from . import io
from .errors import InputError
from .layout import axes_from_labels, guess_axes

_MICRON = {"µm", "um", "micrometer", "micrometre", "micron", "μm"}


def _axes_for(shape, rgb: bool, labels) -> str:
    """Axis letters from napari axis labels when they name axes (t, z, c, y, x), else by position."""
    ndim = len(shape) - (1 if rgb else 0)
    letters = axes_from_labels(labels, ndim)
    if letters is not None:
        return letters + ("S" if rgb else "")
    try:
        return guess_axes(shape, rgb=rgb)
    except InputError:  # the layer's own words: napari users set labels, not axes=
        raise InputError(f"A {ndim}-D layer needs axis labels (t, z, c, y, x) to be saved as TIFF.") from None


def write_image(path: str | os.PathLike, data, meta: dict) -> list[str]:
    """Save one image layer as a calibrated (OME-)TIFF.

    Parameters
    ----------
    path : str or Path
        Target ``.tif``/``.tiff`` (written under a temporary name, then renamed).
    data : array-like
        The layer data (numpy or dask).
    meta : dict
        napari's layer attributes: ``scale`` (µm per axis), ``units``, ``axis_labels``, ``rgb``,
        ``metadata`` (model, provider, … kept in the file) and ``name``.

    Returns
    -------
    list of str
        The written path.
    """
    if isinstance(data, list):  # multiscale: the full-resolution level
        data = data[0]
    rgb = bool(meta.get("rgb", False))
    ndim = np.ndim(data) - (1 if rgb else 0)
    axes = _axes_for(np.shape(data), rgb, meta.get("axis_labels"))
    scale = list(meta.get("scale") or [1.0] * ndim)
    units = [str(u) for u in (meta.get("units") or ["pixel"] * ndim)]

    def size(letter: str) -> float | None:
        if letter not in axes:
            return None
        i = axes.index(letter)
        # A scale other than 1 is taken as µm even when the layer says "pixel" (many readers omit units).
        if units[i] in _MICRON or scale[i] != 1.0:
            return float(scale[i])
        return None

    extra = dict(meta.get("metadata") or {})
    extra.update(name=meta.get("name"), translate=list(meta.get("translate") or []))
    # napari's save dialog has already asked before replacing a file; a folder (zarr) is replaced only
    # when napari-deepr wrote it, since the dialog cannot tell a store from a folder of the user's.
    overwrite = not Path(path).is_dir()
    written = io.write_image(path, data, axes=axes, pixel_size_um=size("X"), z_step_um=size("Z"), metadata=extra,
                             overwrite=overwrite)
    return [str(written)]


__all__ = ["write_image"]
