"""Refocus N-d images tile by tile with an ONNX Deep-R generator (and optional DPM decoder).

Intensity convention: each plane (and channel) is z-scored once over the whole plane, as the model was
trained (zero mean, unit variance per image). The network's output is in those z-scored units and is
mapped back with the same plane's mean and standard deviation, ``out = y * std + mean``. Defocus
conserves energy, so the mean is physical; the contrast of the output is relative (the in-focus
image's true standard deviation is unknown from a defocused input).

A :class:`RefocusJob` walks the image plane by plane: the plane's statistics, then its tile
batches through the :class:`~napari_deepr.engine.runner.Runner`, blended by a
:class:`~napari_deepr.engine.tiling.Band` whose finished rows are mapped back and written, with a
:class:`Progress` after every batch. Settings come in as one
:class:`~napari_deepr.engine.settings.RefocusSettings` and are resolved once (``job.resolved``);
resampled and trust-map runs go through :mod:`napari_deepr.engine.passes`.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .. import _safety
from ..errors import ArgumentTypeError, Cancelled, InputError, ModelError
from ..layout import guess_axes, image_array, image_layout, megapixels, result_shapes
from .domain import Sampling, check_modality, resampled_size, resolve_sampling, small_field_note
from .model import DeepRModel, load_model
from .normalization import flat_planes, plane_stats
from .providers import default_threads
from .results import result_array
from .runner import Runner, cancel_check, one_line
from .settings import (
    BYTES_PER_TILE_PIXEL,
    GPU_MAX_TILE,
    PRECISIONS,
    STREAM_FILE_BYTES,
    STREAM_MEMORY_FRACTION,
    STREAM_TILE_BUDGET,
    RefocusSettings,
    auto_batch,
    auto_tile,
    available_memory,
    check_for_card,
    gpu_tile,
    resolve,
    result_bytes,
    should_stream,
    streaming_for,
)
from .tiling import Band, Rows, by_rows, plan_axis, read_region


@dataclass
class Progress:
    """Where a refocus run is: tiles done out of the total, the plane being worked on, the provider."""

    done: int
    total: int
    plane: tuple[int, ...] = ()
    provider: str = "cpu"
    rows_done: tuple[int, int] = (0, 0)

    @property
    def fraction(self) -> float:
        """Done fraction in [0, 1]."""
        return self.done / self.total if self.total else 1.0


class RefocusJob:
    """One refocus run, steppable so front ends can show progress and fill results tile by tile.

    Parameters
    ----------
    image : array-like or io.ImageData
        numpy, dask or zarr array (or an ``ImageData`` carrying its axes and pixel size).
    model : str, Path or DeepRModel
        Model name, folder or ``.onnx`` file.
    settings : RefocusSettings, optional
        How to refocus; keyword ``options`` (its field names: ``dpm``, ``tile``, ``precision``, …)
        change it. Resolved once against the card, the image and the machine (``resolved``).
    axes : str, optional
        Axis letters of ``image`` (guessed if omitted, :func:`napari_deepr.layout.guess_axes`).
    out, dpm_out, trust_out : array-like, optional
        Preallocated results (numpy, zarr, memmap) of the input's shape (the maps: its
        :attr:`~napari_deepr.layout.Layout.map_shape`); written band by band.
    planes, tile_rows, norm : optional
        A part of the run (a cluster strip): these plane indices, tile rows ``[ka, kb)`` (row ka-1
        also runs, to rebuild the overlap it shares with the strip above), and each plane's
        ``(mean, std)`` computed over the whole plane.

    Attributes
    ----------
    sampling : napari_deepr.engine.domain.Sampling
        The pixel-size verdict (known or unknown, resampled or not).
    modality : napari_deepr.engine.domain.Modality
        The modality verdict.
    notes : list of str
        What the user must be told before the run (unknown pixel size, resampling, forced modality).
    warnings : list of str
        What went differently than asked (fallbacks, constant planes); ``announced`` holds those
        already issued with :func:`warnings.warn`.
    output, dpm, trust_map : array-like
        The results (``dpm`` and ``trust_map`` None unless asked for).
    """

    def __init__(self, image, model="default", settings: RefocusSettings | None = None, *, axes: str | None = None,
                 out=None, dpm_out=None, trust_out=None, planes: list[tuple[int, ...]] | None = None,
                 tile_rows: tuple[int, int] | None = None, norm: dict | None = None, **options):
        settings = RefocusSettings.of(settings, **options)
        if axes is not None and not isinstance(axes, str):
            raise ArgumentTypeError(f"axes must be a string of axis letters such as 'ZYX', not {type(axes).__name__}.")
        self.settings = settings
        self.model: DeepRModel = load_model(model)
        card = self.model.card
        data, file_px, axes = image_array(image, axes)
        axes = (axes or guess_axes(tuple(data.shape), card.channels, data.dtype)).upper()
        self.layout = image_layout(data.shape, axes, card.channels)
        self.data = data
        self.shape = tuple(data.shape)
        h, w = data.shape[self.layout.y], data.shape[self.layout.x]
        # What the model was made for, checked before anything runs (one place for every front end).
        self.sampling: Sampling = resolve_sampling(card, file_px, override=settings.pixel_size_um,
                                                   resample=settings.resample)
        self.modality = check_modality(card, self.shape, axes, force=settings.force_modality)
        self.passes = settings.passes
        if self.passes and card.extra.get("trust_map") is False:
            raise InputError(f"The card of {card.name} forbids a trust map (trust_map: false), so none can be computed.")
        self.notes = [v.message for v in (self.sampling, self.modality) if v.level != "ok" and v.message]
        # Resampling and test-time passes work plane by plane at the model's sampling.
        self.planewise = self.sampling.resample or self.passes > 0
        self.input_hw = (h, w)
        if self.sampling.resample:
            h, w = resampled_size(h, self.sampling.ratio), resampled_size(w, self.sampling.ratio)
        if self.planewise and tile_rows is not None:
            raise InputError(
                "Cluster strips cannot resample or compute a trust map yet; resample the image to the model's "
                "pixel size first, or run without --scheduler."
            )
        self.work_hw = (h, w)
        if min(h, w) < card.min_size:
            hint = ""
            if w <= 4 < h and len(axes) >= 3 and axes[-1] == "X":
                # A channel-last image saved without axes reads as planes of Y × (a few) pixels.
                hint = (f"; if its last axis holds {w} channels of a {data.shape[-3]}×{h} image, "
                        f"give the axes ({axes[:-3]}YXC: axes= or --axes)")
            raise InputError(
                f"The image is {h}×{w} pixels, smaller than this model's minimum of {card.min_size}×{card.min_size}{hint}."
            )
        if settings.dpm and (note := small_field_note(card, *self.input_hw, self.sampling)):
            self.notes.append(note)
        self.warnings: list[str] = []
        #: Messages already issued with ``warnings.warn`` (front ends show only the rest of ``warnings``).
        self.announced: set[str] = set()
        self.runner = Runner(self.model, settings, self._warn, want_dpm=settings.dpm)
        check_for_card(settings, card)
        if settings.dpm and not self.model.has_dpm:
            raise InputError(f"Model {card.name} has no DPM decoder (dpm.onnx), so no defocus map can be computed.")
        self.want_dpm = settings.dpm
        owned = [out is None] + ([dpm_out is None] if self.want_dpm else []) + ([trust_out is None] if self.passes else [])
        streaming, arena, budget = streaming_for(settings, self.shape, owned)
        self.runner.open(arena)
        # Decided by the provider that actually started (a GPU that fell back to the CPU gets CPU settings).
        self.resolved = resolve(settings, card, (h, w), self.runner.provider, streaming=streaming, arena=arena,
                                memory_budget=budget)
        self.runner.io_binding = self.resolved.io_binding
        r = self.resolved
        self.plan_y = plan_axis(h, r.tile, r.overlap, card.tile_multiple, r.halo)
        self.plan_x = plan_axis(w, r.tile, r.overlap, card.tile_multiple, r.halo)
        _safety.check_halo_memory(self, r.halo)  # a card's halo that grows tiles past free memory is named
        # An output this job allocates may be promoted to float64 if the refocused values of a float
        # image do not fit in float32 (inputs near 3e38); a caller's preallocated output cannot.
        self._own_output = out is None
        self.output = out if out is not None else result_array(self.shape, self.streaming)
        self.dpm_shape = self.layout.map_shape
        self.dpm = None
        if self.want_dpm:
            self.dpm = dpm_out if dpm_out is not None else result_array(self.dpm_shape, self.streaming)
        self.trust_map = None
        if self.passes:
            self.trust_map = trust_out if trust_out is not None else result_array(self.dpm_shape, self.streaming)
        self.planes = planes if planes is not None else self.layout.planes
        ka, kb = tile_rows if tile_rows is not None else (0, self.plan_y.n)
        if not (0 <= ka < kb <= self.plan_y.n):
            raise InputError(f"Tile rows {tile_rows} are outside 0..{self.plan_y.n}.")
        self.tile_rows = (ka, kb)
        self.norm = norm or {}
        self.tiles_per_plane = self.tiles_in([self.tile_rows])
        self.total = self.tiles_per_plane * len(self.planes) * max(self.passes, 1)
        self.done = 0

    # -- what was resolved and what runs ------------------------------------------------------------
    tile = property(lambda self: self.resolved.tile, doc="Tile side in pixels.")
    overlap = property(lambda self: self.resolved.overlap, doc="Overlap between tiles in pixels.")
    batch = property(lambda self: self.resolved.batch, doc="Tiles per network call.")
    pipeline = property(lambda self: self.resolved.pipeline, doc="Whether the network runs in a worker thread.")
    streaming = property(lambda self: self.resolved.streaming, doc="Whether the results this job allocates are on disk.")
    arena = property(lambda self: self.resolved.arena, doc="onnxruntime's CPU memory arena (None: the default).")
    threads = property(lambda self: self.settings.threads, doc="onnxruntime intra-op threads (None: the cores).")
    provider = property(lambda self: self.runner.provider, doc="Short name of the provider running now.")
    providers = property(lambda self: self.runner.providers, doc="onnxruntime names of the candidate running now.")
    precision = property(lambda self: self.runner.precision, doc="The precision running now.")
    requested_precision = property(lambda self: self.runner.requested_precision, doc="The precision asked for.")
    provider_options = property(lambda self: self.runner.provider_options)
    session = property(lambda self: self.runner.session, doc="The generator's onnxruntime session.")
    dpm_session = property(lambda self: self.runner.dpm_session, doc="The DPM decoder's session (or None).")
    generator_path = property(lambda self: self.runner.generator_path, doc="The generator file running.")
    dpm_path = property(lambda self: self.runner.dpm_path, doc="The DPM decoder file.")

    @property
    def io_binding(self) -> bool:
        """Whether the DPM decoder's inputs stay on the device (off after a fallback to the host)."""
        return self.runner.io_binding

    def _warn(self, msg: str) -> None:
        """One warning, issued now and kept for front ends that collect them."""
        warnings.warn(msg, RuntimeWarning, stacklevel=4)
        self.announced.add(msg)
        self.warnings.append(msg)

    # -- public pieces (front ends and the cluster path) ----------------------------------------------
    def tiles_in(self, strips) -> int:
        """Tiles one plane costs when run as ``strips`` of tile rows ``(ka, kb)`` (each with its warm-up row)."""
        return sum(kb - max(ka - 1, 0) for ka, kb in strips) * self.plan_x.n

    def use_strips(self, strips: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Run this job as cluster strips of tile rows (each a task): ``done`` and ``total`` then count
        their tiles, warm-up rows included. Returns ``strips``."""
        self.done = 0
        self.total = len(self.planes) * self.tiles_in(strips)
        return strips

    def apply_writes(self, writes, dpm_writes, tiles: int, provider: str) -> Progress:
        """Put the rows a strip task wrote (``(index, block)`` pairs) into the results; the progress after it."""
        for idx, value in writes:
            self.output[idx] = value
        for idx, value in dpm_writes:
            self.dpm[idx] = value
        self.done += tiles
        return Progress(self.done, self.total, (), provider)

    def plane_view(self, p: tuple[int, ...]):
        """Lazy ``(C, Y, X)`` view of plane ``p`` of the input (C = 1 unless channels are fed jointly)."""
        return self.layout.plane_view(self.data, p)

    def plane_statistics(self, p: tuple[int, ...], pool=None) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel ``(mean, std)`` of plane ``p`` (given ``norm`` when this job has it), checked.

        Raises
        ------
        InputError
            A plane with NaN or infinite pixels, or one that cannot be read.
        """
        try:
            mean, std = self.norm[p] if p in self.norm else plane_stats(self.plane_view(p), pool=pool)
        except (InputError, ModelError, Cancelled, MemoryError):
            raise
        except Exception as exc:  # a corrupt chunk or a file that vanished shows up here first
            raise InputError(f"Plane {p} of the image could not be read ({one_line(exc)}).") from exc
        self.check_statistics(p, mean, std)
        return mean, std

    def check_statistics(self, p, mean, std) -> tuple[np.ndarray, np.ndarray]:
        """Refuse NaN/inf planes; returns ``(flat, safe_std)``: constant channels pass through unchanged."""
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std))):
            where = f" (plane {p})" if p else ""
            raise InputError(f"The image contains NaN or infinite pixels{where}; replace them before refocusing.")
        flat, safe_std = check_flat(mean, std)
        if np.any(flat):
            self.warnings.append(f"Plane {p} is constant; it is returned unchanged.")
        return flat, safe_std

    def write(self, target, p, y0: int, y1: int, block) -> None:
        """Write a ``(C, rows, X)`` block of plane ``p`` into ``target`` (the output, DPM or trust map)."""
        self.layout.write(target, p, y0, y1, block, is_map=target is not self.output)

    # -- the run ----------------------------------------------------------------------------------
    def steps(self, cancel: Callable[[], bool] | threading.Event | None = None) -> Iterator[Progress]:
        """Run, yielding a :class:`Progress` after every batch of tiles.

        Raises
        ------
        Cancelled
            When ``cancel`` is set; rows finished so far are already written to the outputs.
        """
        is_cancelled = cancel_check(cancel)
        if self.planewise:
            from .passes import planewise_steps

            yield from planewise_steps(self, is_cancelled)
            return
        py, px, c = self.plan_y, self.plan_x, self.model.card.channels
        xs = list(enumerate(px.starts))
        ka, kb = self.tile_rows
        batches = [(ky, xs[b0:b0 + self.batch]) for ky in range(max(ka - 1, 0), kb) for b0 in range(0, len(xs), self.batch)]
        overlap_work = self.pipeline and len(batches) * len(self.planes) > 1  # nothing to overlap with one batch
        pool = ThreadPoolExecutor(1, thread_name_prefix="deepr-net") if overlap_work else None
        # Host work per tile is a few passes over float32 buffers reused between batches: on a GPU
        # the host side, not the network, bounds the engine's speed (measured on an H200).
        # Two input buffers: with the pipeline, batch i+1 is filled while batch i runs.
        bufs = [np.empty((min(self.batch, len(xs)), c, py.tile, px.tile), dtype=np.float32) for _ in range(2 if pool else 1)]
        workers = min(self.threads or default_threads(), 8)
        host = ThreadPoolExecutor(workers, thread_name_prefix="deepr-host") if workers > 1 else None
        try:
            for p in self.planes:
                view = self.plane_view(p)
                norm = _PlaneNorm(*self.plane_statistics(p, pool=host))
                band = Band(py, px, c, self.want_dpm, host, first_row=ka)

                def prepare(i, view=view, norm=norm):
                    ky, chunk = batches[i]
                    y0 = py.starts[ky]
                    tiles = bufs[i % len(bufs)][: len(chunk)]
                    for j, (_, x0) in enumerate(chunk):
                        norm.into(read_region(view, y0, y0 + py.tile, x0, x0 + px.tile), tiles[j], host)
                    return tiles

                for i, (out, dp) in self.runner.batches(len(batches), prepare, pool, is_cancelled):
                    ky, chunk = batches[i]
                    for rows in band.add(ky, chunk, out, dp):
                        self._emit(p, view, norm, rows, host)
                    self.done += len(chunk)
                    yield Progress(self.done, self.total, p, self.provider, (0, 0))
                for rows in band.close():
                    self._emit(p, view, norm, rows, host)
        finally:
            if pool is not None:
                pool.shutdown(wait=True)
            if host is not None:
                host.shutdown(wait=True)

    def _emit(self, p, view, norm: _PlaneNorm, rows: Rows, host) -> None:
        """Map finished rows back to the input's intensity and write them (and their DPM)."""
        c, w = self.model.card.channels, self.plan_x.length
        y0, r0, r1 = rows.y0, rows.r0, rows.r1
        res = np.empty((c, r1 - r0, w), dtype=np.float32)

        def rescale(a, b):
            with np.errstate(over="ignore", invalid="ignore"):  # checked just below
                np.multiply(rows.image(a, b), norm.std32, out=res[:, a:b])
                res[:, a:b] += norm.mean32

        by_rows(host, rescale, r1 - r0)
        if not np.isfinite(res).all():
            res = self._non_finite(p, rows.image(0, r1 - r0), norm.std, norm.mean)
        if np.any(norm.flat):
            src = read_region(view, y0 + r0, y0 + r1, 0, w).astype(np.float32)
            res[norm.flat] = src[norm.flat]
        if isinstance(self.output, np.ndarray):  # memory (or memmap): rows in parallel
            by_rows(host, lambda a, b: self.layout.write(self.output, p, y0 + r0 + a, y0 + r0 + b, res[:, a:b]), r1 - r0)
        else:  # zarr & co.: one writer, chunks shared between rows must not race
            self.layout.write(self.output, p, y0 + r0, y0 + r1, res)
        if self.want_dpm:
            d = rows.dpm()
            if not np.isfinite(d).all():
                raise ModelError(
                    f"The DPM decoder of model {self.model.name} produced NaN or infinite values "
                    f"(plane {p}); the model is broken or the image is far outside its training data."
                )
            self.layout.write(self.dpm, p, y0 + r0, y0 + r1, d[None], is_map=True)

    def _non_finite(self, p, net, std, mean) -> np.ndarray:
        """Rows whose rescaled output is not finite: name the model, or keep float64 for huge inputs.

        NaN or inf in the network's own output is the model's fault (nothing is written). A finite
        network output that overflows float32 only when mapped back to the input's intensity (a float
        image near 3e38) is recomputed in float64, and the output this job owns becomes float64.
        """
        if not np.isfinite(net).all():
            raise ModelError(
                f"Model {self.model.name} produced NaN or infinite values (plane {p}); "
                "the model is broken or the image is far outside its training data, so nothing was written."
            )
        res = net.astype(np.float64) * np.asarray(std, np.float64)[:, None, None] + np.asarray(mean, np.float64)[:, None, None]
        if not np.isfinite(res).all():
            raise InputError("The refocused values exceed the float64 range; scale the image down before refocusing.")
        if not (self._own_output and isinstance(self.output, np.ndarray)):
            raise InputError(
                "The refocused values exceed the float32 range of the output; scale the image down (for example by 1e-30) first."
            )
        if self.output.dtype != np.float64:
            self.output = self.output.astype(np.float64)
        return res

    def run(self, progress: Callable[[Progress], None] | None = None, cancel=None):
        """Run to the end; returns the output, then the DPM and the trust map when requested."""
        for ev in self.steps(cancel):
            if progress is not None:
                progress(ev)
        return self.results()

    def results(self):
        """``output``, or the tuple ``(output[, dpm][, trust_map])`` of what was asked for."""
        extra = ([self.dpm] if self.want_dpm else []) + ([self.trust_map] if self.passes else [])
        return (self.output, *extra) if extra else self.output


class _PlaneNorm:
    """One plane's z-scoring: into the network's units (tile by tile) and back (row by row)."""

    def __init__(self, mean, std):
        self.mean = mean
        self.flat, self.std = check_flat(mean, std)
        self.mean32 = np.asarray(mean, dtype=np.float32)[:, None, None]
        self.inv32 = (1.0 / np.asarray(self.std, dtype=np.float64)).astype(np.float32)[:, None, None]
        self.std32 = np.asarray(self.std, dtype=np.float32)[:, None, None]
        # Pixels near the float32 limit (3.4e38) overflow when the mean is subtracted in
        # float32; such planes are normalized in float64 (rare, so the fast path stays).
        self.huge = bool(np.max(np.abs(mean)) + np.max(self.std) > 1e30)
        self.mean64 = np.asarray(mean, dtype=np.float64)[:, None, None]
        self.inv64 = (1.0 / np.asarray(self.std, dtype=np.float64))[:, None, None]

    def into(self, region, t, host) -> None:
        """Write the z-scored ``region`` (C, H, W) into the tile buffer ``t``."""

        def norm(r0, r1):
            if self.huge:
                t[:, r0:r1] = (region[:, r0:r1].astype(np.float64) - self.mean64) * self.inv64
                return
            np.subtract(region[:, r0:r1], self.mean32, out=t[:, r0:r1], casting="unsafe")
            t[:, r0:r1] *= self.inv32

        by_rows(host, norm, t.shape[1])


def check_flat(mean, std) -> tuple[np.ndarray, np.ndarray]:
    """``(flat, safe_std)`` of plane statistics: constant channels get std 1 and pass through unchanged."""
    return flat_planes(mean, std)


def refocus(image, model="default", settings: RefocusSettings | None = None, *,
            progress: Callable[[Progress], None] | None = None, cancel=None, axes: str | None = None,
            out=None, dpm_out=None, **options):
    """Refocus a defocused image (2-D, stacks, channels, RGB; numpy, dask or zarr).

    Parameters
    ----------
    image : array-like or io.ImageData
        The defocused image. Every plane (Z, T, and colour when the model has one channel) is refocused
        on its own; a channel axis whose size equals the model's channel count is fed jointly.
    model : str, Path or DeepRModel
        ``"default"`` (the bundled model), a model name, folder or ``.onnx`` file.
    settings : RefocusSettings, optional
        All the options below in one frozen object; keyword options change it.
    progress : callable, optional
        Called with a :class:`Progress` after each batch of tiles.
    cancel : threading.Event or callable, optional
        When set, stops within one batch and raises :class:`napari_deepr.errors.Cancelled` (rows done
        so far are in ``out``/``dpm_out`` when given).
    axes : str, optional
        Axis letters, e.g. ``"ZYX"``, ``"YXS"``, ``"TCYX"``; guessed when omitted.
    out, dpm_out : array-like, optional
        Preallocated outputs (numpy, zarr, memmap) written band by band, for out-of-core work.
    **options
        Fields of :class:`~napari_deepr.engine.settings.RefocusSettings` (which says what each does):
        ``dpm``, ``trust``, ``tile``, ``overlap``, ``batch``, ``halo``, ``providers``, ``precision``
        (``fp32``, ``fp16`` on GPUs, ``bf16`` through OpenVINO, ``int8``), ``threads``,
        ``pixel_size_um``, ``resample``, ``force_modality``, ``stream``, ``memory_arena``,
        ``memory_budget``, ``io_binding``, ``pipeline``.

    Returns
    -------
    numpy.ndarray or tuple of numpy.ndarray
        float32 refocused image in the input's layout and intensity scale (see module docstring),
        then the DPM in µm when ``dpm``, then the trust map when ``trust`` (both in the input's
        layout less the joint channel or RGB colour axis).
    """
    job = RefocusJob(image, model, settings, axes=axes, out=out, dpm_out=dpm_out, **options)
    for msg in job.notes:  # before the run: unknown pixel size, resampling, forced modality
        warnings.warn(msg, UserWarning, stacklevel=2)
    result = job.run(progress, cancel)
    for msg in dict.fromkeys(job.warnings):  # construction and run warnings, each once
        if msg not in job.announced:
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
    return result


# Names importable from here since before the engine was split (settings, layout, runner).
__all__ = [
    "BYTES_PER_TILE_PIXEL", "GPU_MAX_TILE", "PRECISIONS", "STREAM_FILE_BYTES", "STREAM_MEMORY_FRACTION",
    "STREAM_TILE_BUDGET", "Progress", "RefocusJob", "RefocusSettings", "auto_batch", "auto_tile",
    "available_memory", "gpu_tile", "guess_axes", "megapixels", "plane_stats", "refocus", "result_bytes",
    "result_shapes", "should_stream",
]
