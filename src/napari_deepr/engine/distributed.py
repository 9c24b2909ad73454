"""Whole-slide refocus: out of core on one machine, or on an existing dask.distributed cluster.

Locally, :class:`RefocusJob` already streams: it reads tiles lazily from dask/zarr/TIFF, keeps one
band of tile rows in memory and writes finished rows into a disk-backed output (zarr), so peak
memory is set by the tile size and image width, not the image size.

On a cluster, the image is cut into strips of tile rows. Each strip task opens the input itself
(by path, so no pixels travel through the scheduler), also runs the tile row just above the strip
to rebuild the overlap it shares with its neighbour, and returns its finished rows; the client
writes them into the output as they arrive. Tiles, weights and the order of accumulation are those
of a whole-image run, and every plane is normalized with statistics computed once by the client,
so the result is bit-identical with and without the scheduler.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .. import _safety, io
from ..errors import InputError
from ..layout import image_layout, result_shapes
from .model import load_model
from .refocus import RefocusJob
from .results import STREAM_FIELDS, run_metadata, zarr_result
from .settings import STREAM_TILE_BUDGET, RefocusSettings, peak_rss_mb


class _StripSink:
    """Stands in for an output array inside a strip task: records the row blocks written to it."""

    def __init__(self, shape, dtype=np.float32):
        self.shape, self.dtype, self.writes = tuple(shape), np.dtype(dtype), []

    def __setitem__(self, idx, value):
        self.writes.append((idx, np.array(value, dtype=self.dtype, copy=True)))


def strip_ranges(n_tile_rows: int, rows_per_strip: int) -> list[tuple[int, int]]:
    """Split ``range(n_tile_rows)`` into consecutive ``(start, stop)`` strips."""
    rows_per_strip = max(1, int(rows_per_strip))
    return [(k, min(k + rows_per_strip, n_tile_rows)) for k in range(0, n_tile_rows, rows_per_strip)]


def _open_source(source):
    if isinstance(source, tuple):  # (path, series) reopened on the worker
        path, series = source
        return io.read_images(path)[series].data
    return source


def strip_settings(job) -> RefocusSettings:
    """The settings every strip task of ``job`` runs with: its resolved tiling, the provider and precision
    that started, the arena off; sampling and modality were checked once, by ``job``."""
    r = job.resolved
    return r.settings.replace(
        tile=r.tile, overlap=r.overlap, batch=r.batch, halo=r.halo, providers=(job.provider,),
        precision=job.precision, memory_arena=False, trust=False, pixel_size_um=None, force_modality=True,
        stream=False,
    )


def refocus_strip(source, model_path, axes: str, plane: tuple[int, ...], tile_rows: tuple[int, int], norm,
                  settings: RefocusSettings):
    """One cluster task: refocus tile rows ``tile_rows`` of ``plane`` and return the written rows.

    Returns
    -------
    tuple
        ``(output writes, DPM writes, provider, tiles)``: ``(index, block)`` pairs for
        :meth:`~napari_deepr.engine.refocus.RefocusJob.apply_writes`, what ran and how many tiles.
    """
    data = _open_source(source)
    model = load_model(model_path)
    shape, map_shape = result_shapes(data.shape, axes, model.card.channels)
    out = _StripSink(shape)
    dpm = _StripSink(map_shape) if settings.dpm else None
    job = RefocusJob(data, model, settings, axes=axes, out=out, dpm_out=dpm, planes=[plane], tile_rows=tile_rows,
                     norm={plane: norm})
    job.run()
    return out.writes, (dpm.writes if dpm is not None else []), job.provider, job.tiles_per_plane


def refocus_lazy(image, model="default", settings: RefocusSettings | None = None, *, axes: str | None = None,
                 scheduler=None, out=None, dpm_out=None, trust_out=None, rows_per_strip: int = 4, progress=None,
                 source=None, **options):
    """Refocus into (disk-backed) outputs, locally or on a dask.distributed cluster.

    Parameters
    ----------
    image : array-like
        numpy, dask or zarr array (or ``io.ImageData``).
    settings : RefocusSettings, optional
        As in :func:`napari_deepr.refocus`; keyword ``options`` change it. The arena is off and one
        host tile's activations stay within :data:`~napari_deepr.engine.settings.STREAM_TILE_BUDGET`
        unless the settings say otherwise; every worker runs the same tiling and precision.
        Resampling and the trust map run locally (plane by plane); a scheduler refuses them.
    scheduler : str or distributed.Client, optional
        Scheduler address (``tcp://…``) or a client; ``None`` runs locally, streaming.
    out, dpm_out, trust_out : array-like, optional
        Outputs with ``__setitem__`` (zarr arrays for out-of-core work); numpy arrays if omitted
        (``trust_out``: local runs only).
    rows_per_strip : int
        Tile rows per cluster task.
    source : tuple (path, series), optional
        Where workers can reopen the input; without it numpy inputs are scattered to the workers.

    Returns
    -------
    job : RefocusJob
        The planning job (``job.output``, ``job.dpm``, ``job.provider``).
    """
    settings = RefocusSettings.of(settings, **options)
    # Resident memory bounded by one tile, whatever the image's size.
    settings = settings.replace(
        memory_arena=False if settings.memory_arena is None else settings.memory_arena,
        memory_budget=STREAM_TILE_BUDGET if settings.memory_budget is None else settings.memory_budget,
    )
    if hasattr(image, "axes") and hasattr(image, "data") and source is None and image.metadata.get("source"):
        source = (image.metadata["source"], int(image.metadata.get("series", 0)))
    # An io.ImageData keeps its pixel size for the job's sampling verdict.
    job = RefocusJob(image, model, settings, axes=axes, out=out, dpm_out=dpm_out, trust_out=trust_out)
    if scheduler is not None and job.planewise:
        raise InputError(
            "A dask scheduler cannot resample or compute a trust map yet; drop --scheduler (out of core still works "
            "locally), pass --no-resample, or resample the image to the model's pixel size first."
        )
    if scheduler is None:
        job.run(progress)
        return job
    from distributed import Client, as_completed

    if isinstance(scheduler, Client):
        client = scheduler
    else:
        try:
            client = Client(scheduler, timeout="10s")
        except (OSError, TimeoutError) as exc:  # unreachable address, refused connection
            raise InputError(f"The dask scheduler at {scheduler} cannot be reached ({exc}).") from exc
    try:
        if source is None:
            data = job.data
            if hasattr(data, "compute"):
                data = data.compute()
            src = client.scatter(np.asarray(data), broadcast=True)
        else:
            src = source
        strips = job.use_strips(strip_ranges(job.plan_y.n, rows_per_strip))
        task = strip_settings(job)
        futures = []
        for p in job.planes:
            norm = job.plane_statistics(p)  # once per plane, so every strip z-scores alike
            futures += [client.submit(refocus_strip, src, str(job.model.location), job.layout.axes, p, rows, norm,
                                      task, pure=False) for rows in strips]
        for fut in as_completed(futures):
            writes, dwrites, provider, ntiles = fut.result()
            ev = job.apply_writes(writes, dwrites, ntiles, provider)
            if progress is not None:
                progress(ev)
    finally:
        if not isinstance(scheduler, Client):
            client.close()
    return job


def refocus_file(img: io.ImageData, out_path, *, model="default", settings: RefocusSettings | None = None,
                 dpm_path=None, trust_path=None, scheduler=None, progress=None, rows_per_strip: int = 4,
                 overwrite: bool = False, **options) -> dict:
    """Refocus a file disk to disk with bounded memory; TIFF or zarr out, calibration kept.

    ``settings`` (and keyword ``options``) as in :func:`refocus_lazy`; ``dpm`` and ``trust`` follow
    from ``dpm_path`` and ``trust_path``. An existing output is replaced only when it is a previous
    output of napari-deepr, or with ``overwrite``.

    The result is streamed into a zarr store under a temporary name (the final store, or a scratch
    store that is then streamed tile by tile into a BigTIFF) and renamed when complete.
    """
    t0 = time.perf_counter()
    settings = RefocusSettings.of(settings, **options)
    settings = settings.replace(dpm=bool(dpm_path), trust=(settings.trust or True) if trust_path else False)
    out_path = Path(out_path)
    m = load_model(model)
    lay = image_layout(img.data.shape, img.axes, m.card.channels)
    _safety.check_free_space(_safety.refocus_needs(out_path, tuple(img.data.shape), img.axes, m.card.channels,
                                                   img.data.dtype, dpm=dpm_path, trust=trust_path, streamed=True))
    scratch: list[Path] = []

    def scratch_store(path: Path, shape, axes):
        # A group with array "0" (OME-Zarr layout) under a temporary name beside the target.
        io.clean_stale_partials(path)
        tmp = io._temp_sibling(path)
        scratch.append(tmp)
        return tmp, zarr_result(tmp / "0", shape, axes)

    try:
        stores = [(out_path, img.axes, *scratch_store(out_path, lay.shape, img.axes))]
        for path in (dpm_path, trust_path):
            stores.append((path, lay.map_axes, *scratch_store(Path(path), lay.map_shape, lay.map_axes)) if path else None)
        arrays = [s[3] if s else None for s in stores]
        job = refocus_lazy(img, m, settings, scheduler=scheduler, out=arrays[0], dpm_out=arrays[1], trust_out=arrays[2],
                           rows_per_strip=rows_per_strip, progress=progress)
        px = job.sampling.image_um  # an unknown pixel size is never written as one
        meta = run_metadata(job, STREAM_FIELDS, source=img.metadata.get("source"),
                            scheduler=str(scheduler) if scheduler else None)
        results = {}
        for final, axes, tmp, arr in filter(None, stores):
            final = Path(final)
            if io.is_zarr_path(final):
                io.write_zarr_attrs(tmp, axes, px, img.z_step_um, meta)
                (tmp / io.MARKER).write_text("written by napari-deepr; this folder may be replaced by its next run\n")
                io._finish(tmp, final, overwrite)  # replaces only a previous output of this tool
                scratch.remove(tmp)
            else:
                import dask.array as da

                io.write_image(final, da.from_zarr(arr), axes=axes, pixel_size_um=px,
                               z_step_um=img.z_step_um, metadata=meta, overwrite=overwrite)
            results[str(final)] = list(arr.shape)
    finally:
        for tmp in scratch:
            io._remove(tmp)
    return {"outputs": results, "provider": job.provider, "seconds": time.perf_counter() - t0,
            "peak_rss_mb": peak_rss_mb(), "scheduler": str(scheduler) if scheduler else "local"}
