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

from ..engine.refocus import RefocusJob, available_memory
from ..errors import Cancelled, DeepRError
from ._common import one_sentence


def layer_axes(layer, data) -> str:
    """Axis letters for the engine: leading axes are planes, then ``YX`` (``YXS`` for RGB layers)."""
    spatial = "YXS" if getattr(layer, "rgb", False) else "YX"
    lead = data.ndim - len(spatial)
    if lead < 0:
        raise DeepRError(f"The layer has {data.ndim} dimension(s); refocus needs at least Y and X.")
    # Any letter other than C, S, Y, X is a plane axis for the engine; Z reads naturally for stacks.
    names = {0: "", 1: "Z", 2: "TZ"}[lead] if lead <= 2 else "PQRTUVW"[: lead - 1] + "Z"
    return names + spatial


def layer_data(layer):
    """The full-resolution array of an image layer (level 0 of a multiscale pyramid)."""
    return layer.data[0] if layer.multiscale else layer.data


# Results bigger than this fraction of free memory are written to a zarr store on disk and shown
# from there, so refocusing a whole large stack never runs napari out of memory.
DISK_RESULT_FRACTION = 0.25


def _disk_results(out_shape, dpm_shape, want_dpm: bool, axes: str):
    """Zarr arrays (in a new temporary folder) for a result too large for memory, else ``None``."""
    need = 4 * (int(np.prod(out_shape)) + (int(np.prod(dpm_shape)) if want_dpm else 0))
    if need <= DISK_RESULT_FRACTION * available_memory():
        return None
    import zarr  # only now: importing zarr costs the main thread ~0.4 s the first time
    folder = Path(tempfile.mkdtemp(prefix="napari-deepr-"))

    def chunks(shape, letters):
        # One plane, a band of rows and the full width: the engine writes whole tile rows.
        return tuple(1 if a not in "YXS" else (min(n, 512) if a == "Y" else n) for a, n in zip(letters, shape, strict=True))

    dpm_axes = axes
    if len(dpm_shape) != len(out_shape):  # the joint channel axis (S or C) has no DPM of its own
        i = next(i for i, a in enumerate(axes) if a in "SC" and out_shape[:i] + out_shape[i + 1:] == tuple(dpm_shape))
        dpm_axes = axes[:i] + axes[i + 1:]
    out = zarr.open_array(str(folder / "refocused.zarr"), mode="w", shape=out_shape, chunks=chunks(out_shape, axes),
                          dtype="float32", fill_value=0.0)
    dpm = None
    if want_dpm:
        dpm = zarr.open_array(str(folder / "dpm_um.zarr"), mode="w", shape=dpm_shape,
                              chunks=chunks(dpm_shape, dpm_axes), dtype="float32", fill_value=0.0)
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


def _refocus_steps(data, model, axes, settings: dict, cancel: threading.Event, ready: threading.Event | None = None):
    """Worker body: build the job, then yield it and every :class:`Progress`; returns ``(status, message, job)``.

    After yielding the job it waits for ``ready``: the main thread adds the result layers while the
    cores are idle (adding a multi-megapixel layer takes napari 0.1-0.3 s, several times longer
    while the network holds both cores).
    """
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            job = RefocusJob(data, model, axes=axes, **settings)
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
