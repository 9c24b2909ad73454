"""The engine finishes its own results: arrays for them (in memory, memmaps, zarr stores), what they
record about their run, the DPM summary, and calibrated files written from a finished run.

Front ends (the ``deepr`` command, the napari widget, the cluster path in
:mod:`napari_deepr.engine.distributed`) call these instead of building metadata, map axes or
disk stores themselves.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..layout import image_layout, store_chunks

#: How the output's intensity relates to the input's (recorded with every file output).
INTENSITY = "z-scored network output mapped back with each plane's mean and std"
#: Units recorded with a trust map.
TRUST_UNITS = "trust, 0-1 (1 = trust; >= 0.5 trustworthy)"

# What an output records about its run, in this order, per kind of output. Every fact comes from
# run_metadata; the kinds differ in what they carry (the streamed writer records fewer facts).
FILE_FIELDS = ("source", "model", "model_version", "provider", "tile", "overlap", "intensity",
               "pixel_size_source", "resampled_to_um", "modality_forced")
STREAM_FIELDS = ("model", "provider", "tile", "overlap", "source", "scheduler")
LAYER_FIELDS = ("model", "model_version", "model_path", "provider", "tile", "overlap")


def run_metadata(job, fields=FILE_FIELDS, *, source=None, scheduler=None) -> dict:
    """What an output of ``job`` records about its run: ``fields`` (see :data:`FILE_FIELDS`) in order.

    Parameters
    ----------
    job : RefocusJob
        The run (after it ran: ``provider`` is what ran).
    fields : sequence of str
        Which facts, in order: ``source``, ``model``, ``model_version``, ``model_path``, ``provider``,
        ``tile``, ``overlap``, ``intensity``, ``pixel_size_source``, ``resampled_to_um``,
        ``modality_forced``, ``scheduler``.
    source, scheduler : str, optional
        Where the input came from and the dask scheduler the run used.
    """
    card = job.model.card
    facts = {
        "source": source,
        "model": card.name,
        "model_version": card.version,
        "model_path": str(job.model.root),
        "provider": job.provider,
        "tile": job.tile,
        "overlap": job.overlap,
        "intensity": INTENSITY,
        "pixel_size_source": job.sampling.source,
        "resampled_to_um": card.pixel_size_um if job.sampling.resample else None,
        "modality_forced": job.modality.forced,
        "scheduler": scheduler,
    }
    return {k: facts[k] for k in fields}


def result_array(shape, streaming: bool = False) -> np.ndarray:
    """A zeroed float32 result: in memory, or on disk (an unlinked temporary file) when ``streaming``."""
    if not streaming:
        return np.zeros(shape, dtype=np.float32)
    # The file has no name (removed at once on POSIX): its space returns when the array is freed.
    f = tempfile.TemporaryFile(prefix="deepr-result-")  # noqa: SIM115 - lives as long as the memmap
    return np.memmap(f, dtype=np.float32, mode="w+", shape=tuple(shape))


def zarr_result(path, shape, axes: str):
    """A zeroed float32 zarr array at ``path`` for a result with ``axes``, chunked as every store
    napari-deepr writes (:func:`napari_deepr.layout.store_chunks`)."""
    import zarr

    return zarr.open_array(str(path), mode="w", shape=tuple(shape), chunks=store_chunks(shape, axes),
                           dtype="float32", fill_value=0.0)


def finished_output(job, dtype) -> tuple[np.ndarray, str]:
    """The output as it is written: an RGB result in the input's type and range (clipped), and the
    sentence added to its ``intensity`` ("" for others)."""
    from .domain import to_input_range

    if job.layout.rgb_axis is not None or job.modality.image == "rgb":
        return to_input_range(job.output, dtype), f"; RGB clipped to the {np.dtype(dtype).name} range"
    return job.output, ""


@dataclass
class DpmSummary:
    """What a 2-D DPM says about the sample: the fitted geometry, its metadata and one line for the user."""

    geometry: object
    metadata: dict
    line: str


def dpm_summary(job) -> DpmSummary | None:
    """The plane (and surface) fit of a finished run's 2-D DPM, where the image has structure.

    None for stacks and when the pixel size is unknown and the card states none.
    """
    from .dpm import dpm_geometry

    card = job.model.card
    if job.dpm is None or job.dpm.ndim != 2 or not job.sampling.effective_um:
        return None
    geometry = dpm_geometry(job.dpm, job.sampling.effective_um, defocus_range_um=card.defocus_range_um,
                            image=job.output if job.output.ndim == 2 else None, magnitude=card.dpm_magnitude)
    fit = geometry.plane
    meta = {"plane_fit": fit.to_dict(), "dpm_reading": geometry.reading}
    if geometry.surface is not None:
        meta["surface_fit"] = geometry.surface.to_dict()
    if geometry.focus_line_px is not None:  # [[row, col], [row, col]] where the fitted plane is in focus
        meta["focus_line_px"] = geometry.focus_line_px.tolist()
    mean = f"mean |defocus| {fit.mean_um:.2f}" if card.dpm_magnitude else f"mean defocus {fit.mean_um:+.2f}"
    line = (f"DPM: {mean} µm · {geometry.describe()}"
            + (f", {100 * fit.out_of_range_fraction:.0f}% outside the trained range" if fit.out_of_range_fraction else ""))
    return DpmSummary(geometry, meta, line)


#: Keys of the command's JSON summary for the DPM facts of :func:`dpm_summary`.
_SUMMARY_KEYS = {"plane_fit": "dpm_fit", "dpm_reading": "dpm_reading", "surface_fit": "dpm_surface",
                 "focus_line_px": "focus_line_px"}


def dpm_metadata(job, meta: dict) -> dict:
    """``meta`` with what a DPM file records: units, the trained range and the sign convention."""
    card = job.model.card
    return dict(meta, units="µm", defocus_range_um=list(card.defocus_range_um), sign=card.dpm_sign)


def write_results(job, image, out_path, *, dpm_path=None, trust_path=None, source=None, overwrite: bool = False,
                  say: Callable[[str], None] | None = None) -> dict:
    """Write a finished in-memory run as calibrated files (TIFF, OME-TIFF or zarr) and summarize it.

    Parameters
    ----------
    job : RefocusJob
        The finished run.
    image : io.ImageData
        Its input (dtype for RGB outputs, z step).
    out_path, dpm_path, trust_path : str or Path
        Where the output, the DPM and the trust map go (checked beforehand by the caller).
    source : str, optional
        The input's path, recorded with every output.
    say : callable, optional
        Called with one line each for the DPM and the trust map.

    Returns
    -------
    dict
        The run's summary (output paths, provider, model, pixel size, DPM fit, trusted share).
    """
    from .. import io
    from .trust import trust_sentence, trusted_fraction

    say = say or (lambda line: None)
    card = job.model.card
    px = job.sampling.image_um  # known (file or pixel_size_um) or None: an unknown size is never written as one
    dz = image.z_step_um
    meta = run_metadata(job, FILE_FIELDS, source=source)
    output, note = finished_output(job, image.data.dtype)
    meta["intensity"] += note
    io.write_image(out_path, output, axes=job.layout.axes, pixel_size_um=px, z_step_um=dz, metadata=meta,
                   overwrite=overwrite)
    summary = {"output": str(out_path), "provider": job.provider, "model": card.name,
               "pixel_size_um": px, "pixel_size_source": job.sampling.source, "resampled": job.sampling.resample}
    map_axes = job.layout.map_axes
    if dpm_path:
        dmeta = dpm_metadata(job, meta)
        fit = dpm_summary(job)
        if fit is not None:
            dmeta.update(fit.metadata)
            summary.update((_SUMMARY_KEYS[k], v) for k, v in fit.metadata.items())
            say(fit.line)
        io.write_image(dpm_path, job.dpm, axes=map_axes, pixel_size_um=px, z_step_um=dz, metadata=dmeta,
                       overwrite=overwrite)
        summary["dpm"] = str(Path(dpm_path).resolve())
    if trust_path:
        share = trusted_fraction(job.trust_map)
        tmeta = dict(meta, units=TRUST_UNITS, passes=job.passes, trusted_fraction=share,
                     recipe=(getattr(job, "trust_parts", None) or {}).get("recipe"))
        io.write_image(trust_path, job.trust_map, axes=map_axes, pixel_size_um=px, z_step_um=dz, metadata=tmeta,
                       overwrite=overwrite)
        summary["trust"] = str(Path(trust_path).resolve())
        summary["trusted_fraction"] = share
        say("Trust: " + trust_sentence(share, job.passes, job.sampling.known))
    return summary


def stream_by_default(image, axes: str, channels: int, n_maps: int) -> bool:
    """Whether a file is refocused disk to disk without being asked (see ``settings.should_stream``).

    RGB images stay in memory: their output is converted back to the input's type, which the
    streaming writer does not do yet.
    """
    from .settings import should_stream

    shape = tuple(image.data.shape)
    try:
        lay = image_layout(shape, axes, channels)
    except InputError:  # the engine reports a bad layout in its own words
        return False
    if lay.rgb_axis is not None:
        return False
    eager = int(np.prod(shape)) * np.dtype(image.data.dtype).itemsize if isinstance(image.data, np.ndarray) else 0
    return should_stream(shape, n_maps, input_bytes=eager, from_file=True)


__all__ = [
    "FILE_FIELDS", "INTENSITY", "LAYER_FIELDS", "STREAM_FIELDS", "DpmSummary", "dpm_metadata", "dpm_summary",
    "finished_output", "result_array", "run_metadata", "stream_by_default", "write_results", "zarr_result",
]
