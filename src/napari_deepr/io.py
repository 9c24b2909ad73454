"""Reading images and z-stacks with their calibration, and writing outputs atomically.

Everything here is Qt-free and torch-free. Axes follow tifffile's letters: ``T`` time, ``Z`` depth,
``C`` channel, ``Y``/``X`` space and ``S`` samples (RGB), with :mod:`napari_deepr.layout`'s rule for
arrays given without them. Pixel sizes are in micrometres. The readers live in ``_readers``, path
kinds and atomic outputs in ``_files``; their public names are here.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._files import (  # noqa: F401 - the public names of io, and helpers other modules use through it
    _LIVE_TEMPS,
    DEEPR_TAG,
    LAZY_BYTES,
    MARKER,
    PLAUSIBLE_PIXEL_UM,
    TIFF_SUFFIXES,
    ZARR_SUFFIXES,
    _calibration_value,
    _finish,
    _first_line,
    _refuse_replace,
    _remove,
    _suffix,
    _temp_sibling,
    check_output_path,
    clean_stale_partials,
    is_tiff_path,
    is_tool_output,
    is_zarr_path,
)
from ._readers import _read_tiff, _read_zarr
from .errors import InputError, OutputError, SettingsError
from .layout import check_axes, guess_axes, store_chunks


@dataclass
class ImageData:
    """An image or stack with its calibration.

    Attributes
    ----------
    data : array-like
        numpy array, or a dask array for large or chunked files.
    axes : str
        One letter per dimension of ``data`` (e.g. ``"ZYX"``, ``"YXS"``).
    pixel_size_um : float or None
        Lateral pixel size in micrometres, ``None`` when the file does not say (uncalibrated files
        are "pixel size unknown", never 1 µm; ``metadata["pixel_size_source"]`` says where a known
        one came from).
    z_step_um : float or None
        Axial step in micrometres for stacks, ``None`` when unknown.
    metadata : dict
        Anything else worth keeping (source path, description, OME fields).
    """

    data: Any
    axes: str
    pixel_size_um: float | None = None
    z_step_um: float | None = None
    metadata: dict = field(default_factory=dict)
    name: str = ""

    @property
    def pixel_size_known(self) -> bool:
        """Whether the lateral pixel size is known (from the file or given by the user)."""
        return self.pixel_size_um is not None

    @property
    def scale(self) -> tuple[float, ...]:
        """napari scale per axis (µm for Z, Y, X; 1 elsewhere)."""
        out = []
        for ax in self.axes:
            if ax in "YX" and self.pixel_size_um:
                out.append(float(self.pixel_size_um))
            elif ax == "Z" and self.z_step_um:
                out.append(float(self.z_step_um))
            else:
                out.append(1.0)
        return tuple(out)


def read_images(path: str | os.PathLike) -> list[ImageData]:
    """Read every image series of a TIFF/OME-TIFF/ImageJ file, a zarr store or a folder.

    Parameters
    ----------
    path : str or Path
        A file, a zarr store, or a folder holding TIFF files (read in name order).

    Returns
    -------
    list of ImageData
        One entry per series (multi-position files give several).
    """
    p = _existing_input(path)
    if is_zarr_path(p):
        return _read_zarr(p)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if (is_tiff_path(f) or is_zarr_path(f)) and not f.name.startswith("."))
        if not files:
            raise InputError(f"The folder {p.name} holds no TIFF or zarr images.")
        return [img for f in files for img in read_images(f)]
    if not is_tiff_path(p):
        raise InputError(f"{p.name} is not a TIFF, OME-TIFF or zarr image.")
    return _read_tiff(p)


def _existing_input(path) -> Path:
    """The input path, refused in one sentence when it cannot be read without hanging or looping."""
    if not isinstance(path, (str, os.PathLike)):
        from .errors import ArgumentTypeError

        raise ArgumentTypeError(f"An image path must be a string or Path, not {type(path).__name__}.")
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        if p.is_symlink():
            raise InputError(f"{p} is a symbolic link to something that does not exist.") from None
        raise InputError(f"{p} does not exist.") from None
    except PermissionError:
        raise InputError(f"{p} cannot be read (permission denied).") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError(f"{p} is a symbolic link loop, so there is no file to read.") from None
        raise InputError(f"{p} cannot be read ({exc.strerror or exc}).") from None
    # A FIFO, socket or device would block the reader forever or stream endless bytes.
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise InputError(f"{p.name} is not a regular file (a pipe, socket or device); save the image to a file first.")
    if stat.S_ISREG(st.st_mode) and not os.access(p, os.R_OK):
        raise InputError(f"{p} cannot be read (permission denied).")
    return p


def read_image(path: str | os.PathLike) -> ImageData:
    """Read the first image series of a file or store, with its calibration."""
    return read_images(path)[0]


def read_stack(path: str | os.PathLike) -> ImageData:
    """Read a z-stack as ``(Z, Y, X)`` (channels/time dropped to the first index).

    Raises
    ------
    InputError
        If the file holds no Z axis with more than one plane.
    """
    return _as_zstack(read_image(path))


def read_stacks(path: str | os.PathLike) -> list[ImageData]:
    """Every z-stack in a file (all positions) or a folder, each as ``(Z, Y, X)``."""
    return [_as_zstack(img) for img in read_images(path)]


def _as_zstack(img: ImageData) -> ImageData:
    data, axes = img.data, img.axes
    if "Z" not in axes and len(axes) == 3 and "S" not in axes:
        axes = axes[0].replace(axes[0], "Z") + axes[1:]
    if "Z" not in axes:
        raise InputError(f"{img.name or 'The image'} has no z axis; a z-stack with several planes is needed.")
    index = []
    for ax in axes:
        index.append(slice(None) if ax in "ZYX" else 0)
    data = data[tuple(index)]
    new_axes = "".join(ax for ax in axes if ax in "ZYX")
    if new_axes != "ZYX":
        data = np.moveaxis(np.asarray(data), [new_axes.index(a) for a in "ZYX"], [0, 1, 2])
    return ImageData(data, "ZYX", img.pixel_size_um, img.z_step_um, img.metadata, img.name)


def write_image(
    path: str | os.PathLike,
    data,
    *,
    axes: str | None = None,
    pixel_size_um: float | None = None,
    z_step_um: float | None = None,
    metadata: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an image as calibrated (OME-)TIFF or zarr under a temporary name, then rename.

    Parameters
    ----------
    path : str or Path
        ``.tif``/``.tiff``/``.ome.tif`` write a TIFF (BigTIFF when large) carrying OME pixel sizes,
        resolution tags and a JSON description; ``.zarr`` writes an OME-Zarr style single-scale store.
    data : array-like
        numpy or dask array.
    axes : str, optional
        One letter per dimension; guessed from the shape if omitted.
    pixel_size_um, z_step_um : float, optional
        Calibration in micrometres.
    metadata : dict, optional
        JSON-serializable facts stored beside the pixels (model name, provider, ...).
    overwrite : bool
        Replace an existing file or folder that napari-deepr did not write (its own previous
        outputs are always replaced).

    Returns
    -------
    Path
        The written path.
    """
    path = Path(path)
    if _suffix(path) not in TIFF_SUFFIXES + ZARR_SUFFIXES:
        raise SettingsError(f"{path.name}: output must end in .tif, .tiff, .ome.tif or .zarr.")
    axes = check_axes(axes or guess_axes(tuple(data.shape), dtype=data.dtype), data.ndim)
    meta = dict(metadata or {})
    meta.update(axes=axes, pixel_size_um=_calibration_value(pixel_size_um), z_step_um=_calibration_value(z_step_um))
    if not (path.parent.is_dir() and os.access(path.parent, os.W_OK | os.X_OK)):
        raise OutputError(f"The output folder {path.parent} does not exist or is not writable.")
    if (path.exists() or path.is_symlink()) and not overwrite and not is_tool_output(path):
        raise _refuse_replace(path)
    from ._safety import check_free_space, image_bytes  # refused before anything is written

    check_free_space([(path, image_bytes(path, data.shape, data.dtype, axes))])
    clean_stale_partials(path)
    tmp = _temp_sibling(path)
    try:
        if _suffix(path) in ZARR_SUFFIXES:
            _write_zarr(tmp, data, axes, meta["pixel_size_um"], meta["z_step_um"], meta)
            (tmp / MARKER).write_text("written by napari-deepr; this folder may be replaced by its next run\n")
        else:
            _write_tiff(tmp, data, axes, meta["pixel_size_um"], meta["z_step_um"], meta)
        _finish(tmp, path, overwrite)
    except OSError as exc:
        if isinstance(exc, OutputError):
            raise
        reason = {errno.ENOSPC: "the disk is full", errno.EROFS: "the disk is read-only",
                  errno.EACCES: "permission denied", errno.EDQUOT: "the disk quota is exceeded"}.get(exc.errno, _first_line(exc))
        raise OutputError(f"{path.name} could not be written ({reason}); nothing was replaced.") from exc
    finally:
        _remove(tmp)
    return path


def _json_safe(meta: dict) -> dict:
    return json.loads(json.dumps(meta, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def _write_tiff(tmp: Path, data, axes, px, dz, meta) -> None:
    import tifffile

    # OME-TIFF stores planes of Y×X (×S samples): other axes go in front, in their own order
    # (a channel-last YXC array would otherwise be stored as Y planes of X×C).
    order = [i for i, a in enumerate(axes) if a not in "YXS"] + [axes.index("Y"), axes.index("X")] + (
        [axes.index("S")] if "S" in axes else [])
    if order != list(range(len(axes))):
        data = data.transpose(order)
        axes = "".join(axes[i] for i in order)
    ome_meta: dict[str, Any] = {"axes": axes}
    if px:
        ome_meta.update(PhysicalSizeX=px, PhysicalSizeY=px, PhysicalSizeXUnit="µm", PhysicalSizeYUnit="µm")
    if dz and "Z" in axes:
        ome_meta.update(PhysicalSizeZ=dz, PhysicalSizeZUnit="µm")
    nbytes = int(np.prod(data.shape)) * np.dtype(data.dtype).itemsize
    kwargs: dict[str, Any] = {"bigtiff": nbytes > 2**31 - 2**25, "ome": True, "metadata": ome_meta}
    if px:
        kwargs.update(resolution=(1e4 / px, 1e4 / px), resolutionunit="CENTIMETER")
    # OME-XML owns the ImageDescription; our facts ride in a private tag as JSON.
    kwargs["extratags"] = [(DEEPR_TAG, "s", 0, json.dumps(_json_safe(meta)), True)]
    if hasattr(data, "dask") or nbytes > LAZY_BYTES:
        # Stream plane tiles so peak memory is one tile, not the image.
        ysz, xsz = _yx_shape(data.shape, axes)
        tile = (256, 256) if min(ysz, xsz) >= 256 else None
        kwargs["tile"] = tile
        with tifffile.TiffWriter(tmp, bigtiff=kwargs.pop("bigtiff"), ome=True) as tw:
            kwargs.pop("ome")
            tw.write(_tile_iter(data, axes, tile), shape=data.shape, dtype=data.dtype, **kwargs)
    else:
        tifffile.imwrite(tmp, np.asarray(data), **kwargs)


def _yx_shape(shape, axes):
    return shape[axes.index("Y")], shape[axes.index("X")]


def _tile_iter(data, axes, tile):
    """Yield TIFF tiles (or whole planes) in the order tifffile expects."""
    yi, xi = axes.index("Y"), axes.index("X")
    lead = [i for i in range(len(axes)) if axes[i] not in "YXS"]
    ny, nx = data.shape[yi], data.shape[xi]
    for idx in np.ndindex(*[data.shape[i] for i in lead]):
        sl = [slice(None)] * data.ndim
        for i, v in zip(lead, idx, strict=True):
            sl[i] = v
        if tile is None:
            yield np.asarray(data[tuple(sl)])
            continue
        for y0 in range(0, ny, tile[0]):
            for x0 in range(0, nx, tile[1]):
                sl[yi] = slice(y0, min(y0 + tile[0], ny))
                sl[xi] = slice(x0, min(x0 + tile[1], nx))
                yield np.asarray(data[tuple(sl)])


def _write_zarr(tmp: Path, data, axes, px, dz, meta) -> None:
    import dask.array as da

    arr = data if hasattr(data, "dask") else da.from_array(np.asarray(data), chunks=store_chunks(data.shape, axes))
    arr = arr.rechunk(store_chunks(arr.shape, axes))
    da.to_zarr(arr, str(tmp), component="0", overwrite=True)
    write_zarr_attrs(tmp, axes, px, dz, meta)


def write_zarr_attrs(store: Path, axes: str, px, dz, meta) -> None:
    """Write OME-NGFF 0.4 style multiscales metadata for a single-scale array ``0``."""
    import zarr

    kinds = {"T": "time", "Z": "space", "Y": "space", "X": "space", "C": "channel", "S": "channel"}
    names = {"S": "c"}
    scale = [
        float(px) if (a in "YX" and px) else float(dz) if (a == "Z" and dz) else 1.0 for a in axes
    ]
    ax_meta = []
    for a in axes:
        entry = {"name": names.get(a, a.lower()), "type": kinds.get(a, "space" if a in "YXZ" else "channel")}
        if (a in "YX" and px) or (a == "Z" and dz):  # no unit: the scale is in pixels (uncalibrated)
            entry["unit"] = "micrometer"
        ax_meta.append(entry)
    g = zarr.open_group(str(store), mode="a")
    g.attrs.update(
        {
            "multiscales": [
                {
                    "version": "0.4",
                    "axes": ax_meta,
                    "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}],
                }
            ],
            "napari_deepr": _json_safe(meta),
            "axes": axes,
            "pixel_size_um": px,
            "z_step_um": dz,
        }
    )
