"""Axis letters and array layout: one vocabulary for io, the reader, the writer, the engine and the widgets.

Letters follow tifffile: ``T`` time, ``Z`` depth, ``C`` channel, ``Y``/``X`` space, ``S`` samples
(the colours of an RGB image). Everything here is numpy only, so the lowest layer (``io``) may use it.

The one rule for an array handed in without axes (:func:`guess_axes`): the last two axes are ``Y``
and ``X``, unless the last axis holds 3 or 4 colours (``YXS``); the axes in front are, from the
right, ``Z``, ``T``, ``C``. A last axis of 3 or 4 counts as colours when the caller says so
(a napari RGB layer), when it equals the model's channel count, for ``uint8`` pixels, or in a
4-D array; a float ``Z×Y×3`` array is otherwise three-pixel-wide planes, which the engine then
refuses with a hint to give the axes.

A :class:`Layout` says how the engine walks an array: the plane axes (each plane refocused on its
own), the channel axis fed to the network jointly (when its size is the model's channel count), and
the colour axis of an RGB image refocused colour by colour, whose maps (DPM, trust) are averaged
into one.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from .errors import ArgumentTypeError, InputError

#: The axis letters napari-deepr understands.
AXIS_LETTERS = "TZCYXS"
#: napari axis labels of each letter (the reader writes them, the writer reads them back).
AXIS_LABELS = {"T": "t", "Z": "z", "C": "c", "Y": "y", "X": "x"}
#: Side of the Y and X chunks of every zarr store napari-deepr writes (results on disk included).
CHUNK_SIDE = 1024


def guess_axes(shape, channels: int = 1, dtype=None, *, rgb: bool | None = None) -> str:
    """Axis letters for an array given without axes (``YX``, ``ZYX``, ``YXS``, ``ZYXS``, ``TZYX``, ...).

    Parameters
    ----------
    shape : tuple of int
        The array's shape.
    channels : int
        The model's channel count (a last axis of that size counts as colours).
    dtype : numpy dtype, optional
        The pixels' type (``uint8`` with a last axis of 3 or 4 counts as colours).
    rgb : bool, optional
        Whether the last axis holds colours, when the caller knows (a napari layer's ``rgb``).

    Raises
    ------
    InputError
        For fewer than two dimensions, or more than three in front of the image axes.
    """
    shape = tuple(int(v) for v in shape)
    nd = len(shape)
    if nd < 2:
        raise InputError(f"An array with {nd} dimension(s) is not an image; refocus needs at least Y and X.")
    if rgb is None:
        rgb = nd >= 3 and shape[-1] in (3, 4) and (
            channels == shape[-1] or np.dtype(dtype or "f4") == np.uint8 or nd == 4
        )
    spatial = "YXS" if rgb else "YX"
    lead = nd - len(spatial)
    if lead < 0:
        raise InputError(f"An RGB array needs Y, X and colours, but this one has {nd} dimensions.")
    if lead > 3:
        raise InputError(f"An array with {nd} dimensions needs explicit axes (for example axes='TZCYX').")
    return ("", "Z", "TZ", "TZC")[lead] + spatial


def axes_from_labels(labels, ndim: int) -> str | None:
    """Axis letters from napari axis labels (``t``, ``z``, ``c``, ``y``, ``x``), or None when they name none."""
    if labels is None or len(labels) != ndim:
        return None
    cand = "".join(str(lab).strip().upper()[:1] for lab in labels)
    if cand.endswith("YX") and len(set(cand)) == len(cand) and set(cand) <= set("TZCYX"):
        return cand
    return None


def check_axes(axes: str, ndim: int) -> str:
    """Upper-cased ``axes``, refused in one sentence unless they are distinct known letters, one per dimension."""
    axes = axes.upper()
    if len(axes) != ndim:
        raise InputError(f"Axes {axes!r} do not match an array with {ndim} dimensions.")
    if len(set(axes)) != len(axes) or not set(axes) <= set(AXIS_LETTERS):
        raise InputError(f"Axes {axes!r} must be distinct letters from T, Z, C, Y, X and S.")
    return axes


def is_rgb(shape, axes: str) -> bool:
    """Whether an image shows as RGB in napari: its last axis is ``S`` with 3 or 4 colours."""
    return axes.upper().endswith("S") and int(shape[-1]) in (3, 4)


def store_chunks(shape, axes: str) -> tuple[int, ...]:
    """Chunks of a zarr store for an array with ``axes``: Y×X blocks of :data:`CHUNK_SIDE`, one plane deep,
    colours whole (the engine writes bands of rows of one plane)."""
    return tuple(min(int(s), CHUNK_SIDE) if a in "YX" else int(s) if a == "S" else 1
                 for s, a in zip(shape, axes.upper(), strict=True))


def megapixels(shape, axes: str) -> float:
    """Number of pixels (in millions) the network processes for an input of this shape."""
    return math.prod(s for s, a in zip(shape, axes, strict=True) if a not in "CS") / 1e6


@dataclass(frozen=True)
class Layout:
    """How the engine walks an array with given axes (see the module docstring).

    Attributes
    ----------
    axes : str
        One letter per dimension.
    shape : tuple of int
        The array's shape.
    plane_axes : tuple of int
        Axes whose every index is a plane refocused on its own.
    channel_axis : int or None
        The axis fed to the network as its channels, or None for one-channel models.
    y, x : int
        The image axes.
    rgb_axis : int or None
        The colour axis of an RGB image refocused colour by colour (its maps are averaged).
    """

    axes: str
    shape: tuple[int, ...]
    plane_axes: tuple[int, ...]
    channel_axis: int | None
    y: int
    x: int
    rgb_axis: int | None = None

    @property
    def map_axes(self) -> str:
        """Axes of the DPM and the trust map: the input's, less the joint channel and the colour axis."""
        return "".join(a for i, a in enumerate(self.axes) if i not in (self.channel_axis, self.rgb_axis))

    @property
    def map_shape(self) -> tuple[int, ...]:
        """Shape of the DPM and the trust map."""
        return tuple(v for i, v in enumerate(self.shape) if i not in (self.channel_axis, self.rgb_axis))

    @property
    def planes(self) -> list[tuple[int, ...]]:
        """Every plane index, in order."""
        return list(np.ndindex(*[self.shape[i] for i in self.plane_axes]))

    def plane_view(self, data, p: tuple[int, ...]):
        """Lazy ``(C, Y, X)`` view of plane ``p`` of ``data`` (C = 1 unless channels are fed jointly)."""
        idx: list = [slice(None)] * len(self.shape)
        for ax, v in zip(self.plane_axes, p, strict=True):
            idx[ax] = v
        view = data[tuple(idx)]
        rest = [i for i in range(len(self.shape)) if i not in self.plane_axes]
        order = ([self.channel_axis] if self.channel_axis is not None else []) + [self.y, self.x]
        view = _moveaxes(view, [rest.index(a) for a in order])
        return view if self.channel_axis is not None else view[None]

    def write(self, target, p: tuple[int, ...], y0: int, y1: int, block, *, is_map: bool = False) -> None:
        """Write a ``(C, rows, X)`` block into ``target`` at plane ``p``, rows ``y0:y1``.

        ``target`` has the input's axes (the output) or, with ``is_map``, :attr:`map_axes` (the DPM,
        the trust map); the colours of an RGB image add their share of one map.
        """
        idx: list = []
        order = []
        for i in range(len(self.shape)):
            if i in self.plane_axes:
                if is_map and i == self.rgb_axis:
                    continue  # one map for all colours: their mean, accumulated below
                idx.append(p[self.plane_axes.index(i)])
            elif i == self.y:
                idx.append(slice(y0, y1))
                order.append("Y")
            elif i == self.x:
                idx.append(slice(None))
                order.append("X")
            elif not is_map:
                idx.append(slice(None))
                order.append("C")
        joint = self.channel_axis is not None and not is_map
        data = block if joint else block[0]
        src = ["C", "Y", "X"] if joint else ["Y", "X"]
        value = np.transpose(data, [src.index(a) for a in order])
        if is_map and self.rgb_axis is not None:
            n = self.shape[self.rgb_axis]
            value = value / np.float32(n)
            if p[self.plane_axes.index(self.rgb_axis)]:  # later colours add to the first one's share
                value = np.asarray(target[tuple(idx)]) + value
        target[tuple(idx)] = value


def image_layout(shape, axes: str, channels: int = 1) -> Layout:
    """The :class:`Layout` of an array of ``shape`` with ``axes`` for a model with ``channels`` channels.

    Raises
    ------
    InputError
        Axes that do not fit the shape, lack Y or X, repeat or use unknown letters, or a model whose
        channel count no axis of the image has.
    """
    shape = tuple(int(v) for v in shape)
    axes = axes.upper()
    if len(axes) != len(shape):
        raise InputError(f"Axes '{axes}' name {len(axes)} dimensions but the image has {len(shape)}.")
    if "Y" not in axes or "X" not in axes:
        raise InputError(f"Axes '{axes}' must include Y and X.")
    if len(set(axes)) != len(axes) or not set(axes) <= set(AXIS_LETTERS):
        raise InputError(
            f"The image has {len(shape)} dimensions with axes '{axes}'; refocus supports distinct axes from "
            "T, Z, C, Y, X and S (at most 6), so pass --axes or reshape the image."
        )
    chan = None
    if channels > 1:
        for letter in ("C", "S"):
            if letter in axes and shape[axes.index(letter)] == channels:
                chan = axes.index(letter)
                break
        if chan is None:
            sizes = {a: shape[i] for i, a in enumerate(axes) if a in "CS"}
            raise InputError(
                f"The model expects {channels} channels but the image has "
                + (f"channel axes {sizes}" if sizes else "no channel axis")
                + "; choose a model with a matching channel count."
            )
    # With a one-channel model the colours of an RGB image are planes, each refocused on its own.
    plane_axes = tuple(i for i, a in enumerate(axes) if a not in "YX" and i != chan)
    s = axes.find("S")
    rgb = s if s >= 0 and chan != s and shape[s] in (3, 4) else None
    return Layout(axes, shape, plane_axes, chan, axes.index("Y"), axes.index("X"), rgb)


def result_shapes(shape, axes: str, channels: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of the refocused image and of its DPM (and trust map) for an input of ``shape`` with ``axes``.

    The refocused image keeps the input's shape; the maps drop a channel axis fed to the network
    jointly and the colour axis of an RGB image (one defocus per pixel), and keep every other axis.
    """
    lay = image_layout(shape, axes, channels)
    return lay.shape, lay.map_shape


def image_array(image, axes: str | None = None):
    """``(array, pixel size, axes)`` of an input (an array or an ``io.ImageData``, whose axes and pixel size
    it carries), refused in one sentence when it is not a real-valued image with at least Y and X.

    zarr arrays come back as dask arrays; numpy, dask and array-likes with ``shape``, ``dtype`` and
    item access as they are.
    """
    data, file_px = image, None
    if hasattr(image, "axes") and hasattr(image, "data"):  # io.ImageData
        axes = axes or image.axes
        data = image.data
        file_px = getattr(image, "pixel_size_um", None)
    if data is None or isinstance(data, (str, bytes, dict, set, os.PathLike)):
        raise ArgumentTypeError(
            f"The image must be an array (numpy, dask, zarr) or io.ImageData, not {type(data).__name__}; "
            "read files with napari_deepr.io.read_image first."
        )
    try:
        data = _as_array(data)
    except (ValueError, TypeError) as exc:  # ragged lists, objects numpy cannot convert
        raise InputError(f"The image cannot be turned into an array ({_one_line(exc)}).") from exc
    if data.ndim < 2 or 0 in data.shape:
        raise InputError(
            f"The image has shape {tuple(data.shape)}; refocus needs a non-empty array with at least Y and X."
        )
    if not (np.issubdtype(data.dtype, np.number) or data.dtype == bool) or np.iscomplexobj(data):
        raise InputError(f"Pixels of type {data.dtype} cannot be refocused; a real-valued numeric image is needed.")
    return data, file_px, axes


def _as_array(data):
    if is_dask(data) or isinstance(data, np.ndarray):
        return data
    mod = type(data).__module__
    if mod.startswith("zarr"):
        import dask.array as da

        return da.from_zarr(data)
    if hasattr(data, "__array__") and not hasattr(data, "shape"):
        return np.asarray(data)
    if isinstance(data, (list, tuple)):
        return np.asarray(data)
    if hasattr(data, "shape") and hasattr(data, "dtype") and hasattr(data, "__getitem__"):
        return data
    return np.asarray(data)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__).rstrip(".")[:200]


def is_dask(a) -> bool:
    """Whether ``a`` is a dask array (without importing dask)."""
    return hasattr(a, "dask") and hasattr(a, "compute")


def _moveaxes(view, perm):
    if list(perm) == sorted(perm):
        return view
    if is_dask(view):
        return view.transpose(perm)
    return np.transpose(view, perm) if isinstance(view, np.ndarray) else np.transpose(np.asarray(view), perm)


__all__ = [
    "AXIS_LABELS", "AXIS_LETTERS", "CHUNK_SIDE", "Layout", "axes_from_labels", "check_axes", "guess_axes",
    "image_array", "image_layout", "is_dask", "is_rgb", "megapixels", "result_shapes", "store_chunks",
]
