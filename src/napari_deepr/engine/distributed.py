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
from .refocus import STREAM_TILE_BUDGET, Progress, RefocusJob, plane_stats


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


def refocus_strip(source, model_path, axes, plane, tile_rows, norm, dpm, tile, overlap, batch, providers, threads,
                  precision="fp32"):
    """One cluster task: refocus tile rows ``tile_rows`` of ``plane`` and return the written rows."""
    data = _open_source(source)
    out = _StripSink(data.shape)
    job = RefocusJob(
        data, model_path, dpm=dpm, tile=tile, overlap=overlap, batch=batch, providers=providers, axes=axes,
        out=out, threads=threads, planes=[plane], tile_rows=tile_rows, norm={plane: norm}, memory_arena=False,
        precision=precision,
    )
    if dpm:
        job.dpm = _StripSink(job.dpm_shape)
    job.run()
    return out.writes, (job.dpm.writes if dpm else []), job.provider, job.tiles_per_plane


def refocus_lazy(
    image,
    model="default",
    *,
    axes: str | None = None,
    dpm: bool = False,
    tile: int | None = None,
    overlap: int | None = None,
    batch: int | None = None,
    providers=None,
    threads: int | None = None,
    scheduler=None,
    out=None,
    dpm_out=None,
    rows_per_strip: int = 4,
    progress=None,
    source=None,
    precision: str = "fp32",
    trust_out=None,
    **domain,
):
    """Refocus into (disk-backed) outputs, locally or on a dask.distributed cluster.

    Parameters
    ----------
    image : array-like
        numpy, dask or zarr array (or ``io.ImageData``).
    scheduler : str or distributed.Client, optional
        Scheduler address (``tcp://…``) or a client; ``None`` runs locally, streaming.
    out, dpm_out : array-like, optional
        Outputs with ``__setitem__`` (zarr arrays for out-of-core work); numpy arrays if omitted.
    rows_per_strip : int
        Tile rows per cluster task.
    source : tuple (path, series), optional
        Where workers can reopen the input; without it numpy inputs are scattered to the workers.
    precision : {"fp32", "bf16", "int8"}
        As in :func:`napari_deepr.refocus`; every worker runs the same precision.
    trust_out : array-like, optional
        Output for the trust map (with ``trust=``); local runs only.
    **domain
        ``pixel_size_um``, ``resample``, ``force_modality``, ``trust`` as in :func:`napari_deepr.refocus`.
        Resampling and the trust map run locally (plane by plane); a scheduler refuses them.

    Returns
    -------
    job : RefocusJob
        The planning job (``job.output``, ``job.dpm``, ``job.provider``).
    """
    given = image  # an io.ImageData keeps its pixel size for the job's sampling verdict
    if hasattr(image, "axes") and hasattr(image, "data"):
        axes = axes or image.axes
        if source is None and image.metadata.get("source"):
            source = (image.metadata["source"], int(image.metadata.get("series", 0)))
        image = image.data
    job = RefocusJob(
        given, model, dpm=dpm, tile=tile, overlap=overlap, batch=batch, providers=providers, axes=axes,
        out=out, dpm_out=dpm_out, threads=threads, memory_arena=False,  # resident memory bounded by one tile
        precision=precision, trust_out=trust_out, memory_budget=STREAM_TILE_BUDGET, **domain,
    )
    if scheduler is not None and job.planewise:
        from ..errors import InputError

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
        futures = []
        strips = strip_ranges(job.plan_y.n, rows_per_strip)
        for p in job.planes:
            norm = plane_stats(job._plane_view(p))
            job._check_stats(p, *norm)
            for rows in strips:
                futures.append(
                    client.submit(
                        refocus_strip, src, str(job.model.location),
                        job.layout.axes, p, rows, norm, dpm, job.tile, job.overlap, job.batch,
                        [job.provider], threads, precision, pure=False,
                    )
                )
        job.done = 0
        job.total = len(job.planes) * sum(
            (kb - max(ka - 1, 0)) * job.plan_x.n for ka, kb in strips
        )
        for fut in as_completed(futures):
            writes, dwrites, provider, ntiles = fut.result()
            for idx, value in writes:
                job.output[idx] = value
            for idx, value in dwrites:
                job.dpm[idx] = value
            job.done += ntiles
            if progress is not None:
                progress(Progress(job.done, job.total, (), provider))
    finally:
        if not isinstance(scheduler, Client):
            client.close()
    return job


def refocus_file(
    img: io.ImageData,
    out_path,
    *,
    model="default",
    dpm_path=None,
    tile=None,
    overlap=None,
    batch=None,
    providers=None,
    scheduler=None,
    threads=None,
    progress=None,
    rows_per_strip: int = 4,
    precision: str = "fp32",
    overwrite: bool = False,
    trust_path=None,
    **domain,
) -> dict:
    """Refocus a file disk to disk with bounded memory; TIFF or zarr out, calibration kept.

    An existing output is replaced only when it is a previous output of napari-deepr, or with
    ``overwrite``.

    The result is streamed into a zarr store under a temporary name (the final store, or a scratch
    store that is then streamed tile by tile into a BigTIFF) and renamed when complete.
    """
    import zarr

    from .model import load_model
    from .refocus import _layout

    t0 = time.perf_counter()
    out_path = Path(out_path)
    shape = tuple(img.data.shape)
    m = load_model(model)
    lay = _layout(shape, img.axes, m.card.channels)
    dpm_axes = "".join(a for i, a in enumerate(img.axes) if i not in (lay.channel_axis, lay.rgb_axis))
    _safety.check_free_space(_safety.refocus_needs(out_path, shape, img.axes, m.card.channels, img.data.dtype,
                                                   dpm=dpm_path, trust=trust_path, streamed=True))
    scratch: list[Path] = []

    def scratch_store(path: Path, shp, axes):
        # A group with array "0" (OME-Zarr layout) under a temporary name beside the target.
        io.clean_stale_partials(path)
        tmp = io._temp_sibling(path)
        scratch.append(tmp)
        chunks = tuple(min(s, 1024) if a in "YX" else 1 for s, a in zip(shp, axes, strict=True))
        arr = zarr.open_array(str(tmp / "0"), mode="w", shape=shp, chunks=chunks, dtype="float32", fill_value=0.0)
        return tmp, arr

    try:
        out_tmp, out_arr = scratch_store(out_path, shape, img.axes)
        dpm_tmp = dpm_arr = trust_tmp = trust_arr = None
        dpm_shape = tuple(s for i, s in enumerate(shape) if i not in (lay.channel_axis, lay.rgb_axis))
        if dpm_path:
            dpm_tmp, dpm_arr = scratch_store(Path(dpm_path), dpm_shape, dpm_axes)
        if trust_path:
            trust_tmp, trust_arr = scratch_store(Path(trust_path), dpm_shape, dpm_axes)
        job = refocus_lazy(
            img, m, dpm=bool(dpm_path), tile=tile, overlap=overlap, batch=batch, providers=providers,
            threads=threads, scheduler=scheduler, out=out_arr, dpm_out=dpm_arr, rows_per_strip=rows_per_strip,
            progress=progress, precision=precision, trust_out=trust_arr, **domain,
        )
        px = job.sampling.image_um  # an unknown pixel size is never written as one
        meta = {"model": job.model.card.name, "provider": job.provider, "tile": job.tile, "overlap": job.overlap,
                "source": img.metadata.get("source"), "scheduler": str(scheduler) if scheduler else None}
        results = {}
        for tmp, arr, final, axes in ((out_tmp, out_arr, out_path, img.axes), (dpm_tmp, dpm_arr, dpm_path, dpm_axes),
                                      (trust_tmp, trust_arr, trust_path, dpm_axes)):
            if arr is None:
                continue
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
    from ..bench import peak_rss_mb

    return {"outputs": results, "provider": job.provider, "seconds": time.perf_counter() - t0,
            "peak_rss_mb": peak_rss_mb(), "scheduler": str(scheduler) if scheduler else "local"}
