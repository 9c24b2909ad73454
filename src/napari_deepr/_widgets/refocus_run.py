"""Refocus widget, run side: the layer's array and axes for the engine, on-disk results for large runs,
and the worker body that builds and steps a :class:`napari_deepr.engine.refocus.RefocusJob`.

Nothing here touches layers: the worker yields the job and its progress to the widget on the main thread.
"""

from __future__ import annotations

import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from napari.layers import Image

from ..engine.refocus import RefocusJob
from ..engine.results import zarr_result
from ..engine.settings import RefocusSettings, available_memory
from ..errors import Cancelled, DeepRError
from ..layout import guess_axes
from ._common import one_sentence


def layer_axes(layer, data) -> str:
    """Axis letters for the engine: leading axes are planes, then ``YX`` (``YXS`` for RGB layers)."""
    return guess_axes(data.shape, rgb=bool(getattr(layer, "rgb", False)))


def layer_data(layer):
    """The full-resolution array of an image layer (level 0 of a multiscale pyramid)."""
    return layer.data[0] if layer.multiscale else layer.data


# Results bigger than this fraction of free memory are written to a zarr store on disk and shown
# from there, so refocusing a whole large stack never runs napari out of memory.
DISK_RESULT_FRACTION = 0.25


def _disk_results(lay, want_dpm: bool):
    """Zarr arrays (in a new temporary folder) for a result of layout ``lay`` too large for memory, else ``None``."""
    need = 4 * (int(np.prod(lay.shape)) + (int(np.prod(lay.map_shape)) if want_dpm else 0))
    if need <= DISK_RESULT_FRACTION * available_memory():
        return None
    folder = Path(tempfile.mkdtemp(prefix="napari-deepr-"))
    out = zarr_result(folder / "refocused.zarr", lay.shape, lay.axes)
    dpm = zarr_result(folder / "dpm_um.zarr", lay.map_shape, lay.map_axes) if want_dpm else None
    return folder, out, dpm


def _lazy(a):
    """numpy arrays as they are; zarr/dask-backed results as dask arrays (computed piece by piece)."""
    if isinstance(a, np.ndarray):
        return a
    import dask.array as da

    return a if isinstance(a, da.Array) else da.from_array(a, chunks=getattr(a, "chunks", "auto"))


@dataclass
class _Run:
    """What one run needs on the main thread to place and describe its results."""

    layer: Image
    lead: int
    plane: tuple[int, ...] | None  # the plane refocused in "current plane" mode, else None
    dpm: bool
    out_name: str
    dpm_name: str
    oor_name: str


#: How long the worker waits for the main thread to lay out the result layers before computing anyway.
LAYERS_READY_TIMEOUT_S = 30.0


def _refocus_steps(data, model, axes, settings: RefocusSettings, cancel: threading.Event,
                   ready: threading.Event | None = None, outputs: dict | None = None):
    """Worker body: build the job, then yield it and every :class:`Progress`; returns ``(status, message, job)``.

    After yielding the job it waits for ``ready``: the main thread adds the result layers while the
    cores are idle (adding a multi-megapixel layer takes napari 0.1-0.3 s, several times longer
    while the network holds both cores).
    """
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            job = RefocusJob(data, model, settings, axes=axes, **(outputs or {}))
        job.warnings.extend(str(w.message) for w in caught if issubclass(w.category, RuntimeWarning))
    except DeepRError as exc:
        return ("error", one_sentence(exc), None)
    except Exception as exc:  # noqa: BLE001 - an unexpected failure still reaches the user as one sentence
        return ("error", f"Refocus could not start ({type(exc).__name__}: {one_sentence(exc)}).", None)
    yield job
    if ready is not None:
        t_end = time.monotonic() + LAYERS_READY_TIMEOUT_S
        while not ready.wait(0.02) and not cancel.is_set() and time.monotonic() < t_end:
            pass
    try:
        yield from job.steps(cancel)
    except Cancelled:
        return ("cancelled", f"Cancelled after {job.done} of {job.total} tiles; finished rows are kept.", job)
    except DeepRError as exc:
        return ("error", one_sentence(exc), job)
    except Exception as exc:  # noqa: BLE001 - any failure becomes one sentence for the user
        return ("error", f"Refocus failed ({type(exc).__name__}: {one_sentence(exc)}).", job)
    return ("done", "", job)
