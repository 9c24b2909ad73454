"""napari reader: TIFF / OME-TIFF / ImageJ hyperstacks, zarr stores and folders of stacks, calibrated.

Every layer gets its scale in micrometres (z step included), axis labels, units and the file's
metadata, so refocus and the pairs builder see the physical sampling the file recorded. An
uncalibrated file keeps scale 1 in "pixel" units (``metadata["pixel_size_um"] is None``): its pixel
size is unknown, never 1 µm, and the reader says so once per read.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from . import io
from .errors import DeepRError
from .layout import AXIS_LABELS, is_rgb


def _can_read(path: Path) -> bool:
    if io.is_zarr_path(path) or io.is_tiff_path(path):
        return path.exists()
    if path.is_dir():
        return any(io.is_tiff_path(f) or io.is_zarr_path(f) for f in path.iterdir())
    return False


def get_reader(path: str | os.PathLike | list):
    """Return a reader for ``path`` when napari-deepr can open it, else None.

    Parameters
    ----------
    path : str, Path or list of them
        A TIFF/OME-TIFF/ImageJ file, a zarr store, a folder of TIFF stacks, or a list of these.

    Returns
    -------
    callable or None
        ``reader(path) -> list of LayerData tuples``; None for paths this plugin does not read, so
        napari can offer another reader.
    """
    paths = [Path(p) for p in (path if isinstance(path, (list, tuple)) else [path])]
    if not paths or not all(_can_read(p) for p in paths):
        return None
    return read_layers


def image_to_layer_data(img: io.ImageData) -> tuple:
    """One ``(data, kwargs, "image")`` tuple from an :class:`io.ImageData`, calibration kept."""
    axes = img.axes
    data = img.data
    scale = list(img.scale)
    kwargs: dict = {"name": img.name or "image", "metadata": dict(img.metadata, axes=axes,
                    pixel_size_um=img.pixel_size_um, z_step_um=img.z_step_um,
                    pixel_size_known=img.pixel_size_um is not None)}
    keep = list(range(len(axes)))
    rgb = is_rgb(data.shape, axes)
    if rgb:
        kwargs["rgb"] = True
        keep = keep[:-1]
    elif "S" in axes:
        # Samples that are not RGB(A) behave like channels.
        axes = axes.replace("S", "C")
    if "C" in axes and data.shape[axes.index("C")] > 1:
        c = axes.index("C")
        kwargs["channel_axis"] = c
        keep.remove(c)
    kwargs["scale"] = [scale[i] for i in keep]
    kwargs["axis_labels"] = [AXIS_LABELS.get(axes[i], axes[i].lower()) for i in keep]

    def unit(letter: str) -> str:
        calibrated = (letter in "YX" and img.pixel_size_um) or (letter == "Z" and img.z_step_um)
        return "µm" if calibrated else "pixel"

    kwargs["units"] = [unit(axes[i]) for i in keep]
    return (data, kwargs, "image")


def read_layers(path: str | os.PathLike | list) -> list[tuple]:
    """Read every image series of ``path`` (or of each path in a list) as napari layer data.

    Raises
    ------
    napari_deepr.errors.DeepRError
        With one sentence when a file cannot be read (napari shows it to the user).
    """
    paths = path if isinstance(path, (list, tuple)) else [path]
    out = []
    unknown = []
    for p in paths:
        try:
            images = io.read_images(p)
        except DeepRError:
            raise
        except (OSError, ValueError) as exc:
            raise DeepRError(f"{Path(p).name} could not be read ({str(exc).splitlines()[0]}).") from exc
        out.extend(image_to_layer_data(img) for img in images)
        unknown += [img.name for img in images if img.pixel_size_um is None]
    if unknown:
        names = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        # One notice per read (napari shows warnings as notifications); refocus then uses the model's sampling.
        warnings.warn(
            f"{names}: the pixel size is unknown (the file is not calibrated), so refocus will assume the model's "
            "sampling; set it in the Refocus panel if it differs.",
            UserWarning, stacklevel=2,
        )
    return out


__all__ = ["get_reader", "image_to_layer_data", "read_layers"]
