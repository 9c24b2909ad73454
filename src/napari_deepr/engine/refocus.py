"""Refocus N-d images tile by tile with an ONNX Deep-R generator (and optional DPM decoder).

Intensity convention: each plane (and channel) is z-scored once over the whole plane, as the model was
trained (zero mean, unit variance per image). The network's output is in those z-scored units and is
mapped back with the same plane's mean and standard deviation, ``out = y * std + mean``. Defocus
conserves energy, so the mean is physical; the contrast of the output is relative (the in-focus
image's true standard deviation is unknown from a defocused input).
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..errors import Cancelled, InputError, ModelError
from . import trust as _trust
from .domain import Sampling, check_modality, resample_plane, resampled_size, resolve_sampling
from .fp16 import FP16_PROVIDERS, fp16_variant
from .model import DeepRModel, load_model
from .providers import (
    PROVIDERS,
    SHORT_NAMES,
    bf16_provider_options,
    default_threads,
    get_session,
    gpu_free_memory,
    require_bf16,
    resolve_providers,
)
from .tiling import axis_weights, plan_axis, read_region

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
_DEVICE_TYPES = {"cuda": "cuda", "tensorrt": "cuda", "rocm": "cuda", "directml": "dml"}


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


def guess_axes(shape: tuple[int, ...], channels: int = 1, dtype=None) -> str:
    """Axis letters for an array given without axes (``YX``, ``ZYX``, ``YXS``, ``ZYXS``, ``TZYX``, ...)."""
    nd = len(shape)
    if nd < 2:
        raise InputError(f"An array with {nd} dimension(s) is not an image; refocus needs at least Y and X.")
    rgb = nd >= 3 and shape[-1] in (3, 4) and (
        channels == shape[-1] or np.dtype(dtype or "f4") == np.uint8 or nd == 4
    )
    spatial = "YXS" if rgb else "YX"
    lead = nd - len(spatial)
    if lead > 3:
        raise InputError(f"An array with {nd} dimensions needs explicit axes (for example axes='TZCYX').")
    return ("", "Z", "TZ", "TZC")[lead] + spatial


@dataclass
class _Layout:
    axes: str
    plane_axes: tuple[int, ...]
    channel_axis: int | None  # input axis fed to the network as channels (joint), or None
    y: int
    x: int
    rgb_axis: int | None = None  # colour axis refocused plane by plane; its DPM and trust are one map


def result_shapes(shape, axes: str, channels: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of the refocused image and of its DPM for an input of ``shape`` with ``axes``.

    The refocused image keeps the input's shape; the DPM (and the trust map) drops a channel axis
    that is fed to the network jointly and the colour axis of an RGB image (one defocus per pixel:
    the colours' maps are averaged), and keeps every other axis.
    """
    shape = tuple(int(v) for v in shape)
    lay = _layout(shape, axes, channels)
    return shape, tuple(v for i, v in enumerate(shape) if i not in (lay.channel_axis, lay.rgb_axis))


def _layout(shape, axes: str, channels: int) -> _Layout:
    axes = axes.upper()
    if len(axes) != len(shape):
        raise InputError(f"Axes '{axes}' name {len(axes)} dimensions but the image has {len(shape)}.")
    if "Y" not in axes or "X" not in axes:
        raise InputError(f"Axes '{axes}' must include Y and X.")
    if len(set(axes)) != len(axes) or not set(axes) <= set("TZCYXS"):
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
    elif "S" in axes and shape[axes.index("S")] not in (1,) and channels == 1:
        pass  # RGB with a one-channel model: each colour is refocused as its own plane.
    plane_axes = tuple(i for i, a in enumerate(axes) if a not in "YX" and i != chan)
    rgb = axes.index("S") if "S" in axes and chan != axes.index("S") and shape[axes.index("S")] in (3, 4) else None
    return _Layout(axes, plane_axes, chan, axes.index("Y"), axes.index("X"), rgb)


class RefocusJob:
    """One refocus run, steppable so front ends can show progress and fill results tile by tile.

    Parameters
    ----------
    image : array-like or io.ImageData
        numpy, dask or zarr array (or an ``ImageData`` carrying its axes).
    model : str, Path or DeepRModel
        Model name, folder or ``.onnx`` file.
    dpm : bool
        Also compute the defocus map (µm) with the model's DPM decoder, reusing the generator's features.
    tile, overlap, batch : int, optional
        Tile side (a multiple of the model's ``tile_multiple``), overlap between tiles, tiles per
        network call. Defaults come from the model card.
    providers : str or list of str, optional
        Short provider names (``cpu``, ``cuda``, ``tensorrt``, ``directml``, ``coreml``, ``openvino``)
        in order of preference; CPU is always the fallback and ``provider`` reports what ran.
    axes : str, optional
        Axis letters of ``image`` (guessed if omitted).
    out, dpm_out : array-like, optional
        Preallocated outputs (numpy, zarr, memmap) of the input's shape; written band by band.
    memory_arena : bool, optional
        Keep onnxruntime's CPU memory arena (default :func:`~napari_deepr.engine.providers.default_arena`,
        on): faster; off bounds resident memory by the tile in flight (used for whole slides).
    pixel_size_um : float, optional
        The image's pixel size in µm; overrides the file's calibration. Without either the pixel
        size is unknown and the model's is assumed (``sampling.message`` says so).
    resample : bool
        Resample an image whose pixel size differs from the card's by more than 5 % to the model's
        sampling and the results back (default); False runs at the input's sampling and leaves a
        warning in ``notes``.
    force_modality : bool
        Run even when the image's modality (RGB vs gray) is not the model's.
    trust : bool or int
        Also compute a per-pixel trust map (see :mod:`napari_deepr.engine.trust`) from that many
        D4 test-time passes (``True``: 8), in ``trust_map`` (or ``trust_out`` when given, like ``dpm_out``).
    memory_budget : int, optional
        Bytes the activations of one host-side tile may take; the default tile shrinks to fit (the
        streaming path passes :data:`STREAM_TILE_BUDGET`). A given ``tile`` is used as is.
    stream : bool, optional
        Keep the results this job allocates in disk-backed arrays (``numpy.memmap`` of an anonymous
        temporary file), with the arena off and the tile within :data:`STREAM_TILE_BUDGET`. Default:
        when :func:`should_stream` says the results would not fit comfortably in free memory;
        False forces memory.
    precision : {"fp32", "fp16", "bf16", "int8"}
        As in :func:`refocus`. A reduced precision that fails (conversion, loading, running, or
        NaN/inf) falls back to float32, and a provider that fails to the next one, with one warning;
        ``precision`` and ``provider`` say what ran.

    Attributes
    ----------
    sampling : napari_deepr.engine.domain.Sampling
        The pixel-size verdict (known or unknown, resampled or not).
    modality : napari_deepr.engine.domain.Modality
        The modality verdict.
    notes : list of str
        What the user must be told before the run (unknown pixel size, resampling, forced modality).
    """

    def __init__(
        self,
        image,
        model="default",
        *,
        dpm: bool = False,
        tile: int | None = None,
        overlap: int | None = None,
        batch: int | None = None,
        providers=None,
        axes: str | None = None,
        out=None,
        dpm_out=None,
        threads: int | None = None,
        planes: list[tuple[int, ...]] | None = None,
        tile_rows: tuple[int, int] | None = None,
        norm: dict | None = None,
        halo: int | None = None,
        precision: str = "fp32",
        memory_arena: bool | None = None,
        io_binding: bool | None = None,
        pipeline: bool | None = None,
        pixel_size_um: float | None = None,
        resample: bool = True,
        force_modality: bool = False,
        trust: bool | int = False,
        trust_out=None,
        memory_budget: int | None = None,
        stream: bool | None = None,
    ):
        _check_settings(tile=tile, overlap=overlap, batch=batch, threads=threads, halo=halo, providers=providers,
                        axes=axes, precision=precision)
        self.model: DeepRModel = load_model(model)
        card = self.model.card
        data = image
        file_px = None
        if hasattr(image, "axes") and hasattr(image, "data"):  # io.ImageData
            axes = axes or image.axes
            data = image.data
            file_px = getattr(image, "pixel_size_um", None)
        if data is None or isinstance(data, (str, bytes, dict, set)) or (
            isinstance(data, os.PathLike)
        ):
            from ..errors import ArgumentTypeError

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
        axes = (axes or guess_axes(tuple(data.shape), card.channels, data.dtype)).upper()
        self.layout = _layout(data.shape, axes, card.channels)
        self.data = data
        self.shape = tuple(data.shape)
        h, w = data.shape[self.layout.y], data.shape[self.layout.x]
        # What the model was made for, checked before anything runs (one place for every front end).
        self.sampling: Sampling = resolve_sampling(card, file_px, override=pixel_size_um, resample=resample)
        self.modality = check_modality(card, self.shape, axes, force=force_modality)
        self.passes = _trust.passes_from(trust)
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
        if precision not in PRECISIONS:
            raise InputError(f"Unknown precision '{precision}'; use fp32, fp16, bf16 or int8.")
        self.requested_precision = self.precision = precision
        self.provider_options = None
        # Sentences about what could not run as asked; folded into one warning when sessions open.
        self._fallbacks: list[str] = []
        if precision == "bf16":
            if providers not in (None, "auto", "cpu", "openvino", ["cpu"], ["openvino"]):
                raise InputError("bf16 runs on the CPU through the OpenVINO provider; use fp32 on other providers.")
            self.providers = require_bf16()
            self.provider_options = bf16_provider_options(threads)
        else:
            self.providers = resolve_providers(providers, missing=self._fallbacks)
        if precision == "fp16" and not any(p in FP16_PROVIDERS for p in self.providers):
            if not self._fallbacks and providers not in (None, "auto"):
                # Only the CPU was asked for: a setting to change, not a device that failed.
                raise InputError(
                    "fp16 runs on GPU providers (cuda, tensorrt, rocm, directml), and none is running here; "
                    "use fp32, or bf16 on a CPU that has it."
                )
            self._fallbacks.append("fp16 needs a GPU provider (cuda, tensorrt, rocm, directml) and none is available here")
        if precision == "int8" and not (self.model.root / "generator.int8.onnx").is_file():
            raise InputError(
                f"Model {self.model.name} has no int8 variant; create it with 'deepr quantize {self.model.name}'."
            )
        self.threads = threads
        if batch is not None and int(batch) < 1:
            raise InputError("Batch must be at least 1.")
        mult = card.tile_multiple
        overlap = card.overlap if overlap is None else int(overlap)
        if tile is not None and (int(tile) <= 0 or int(tile) % mult):
            raise InputError(f"Tile size {tile} is not a positive multiple of {mult}, which this model needs.")
        if tile is not None and (overlap < 0 or overlap > int(tile) // 2):
            raise InputError(f"Overlap {overlap} must be between 0 and half the tile ({int(tile) // 2}).")
        if dpm and not self.model.has_dpm:
            raise InputError(f"Model {card.name} has no DPM decoder (dpm.onnx), so no defocus map can be computed.")
        self.want_dpm = dpm
        # Results that would not fit comfortably in free memory go to disk-backed arrays, and the
        # tile and onnxruntime's arena are then bounded too, so a whole slide costs tiles, not its size.
        owned = [out is None] + ([dpm_out is None] if dpm else []) + ([trust_out is None] if self.passes else [])
        if stream is None:
            stream = any(owned) and should_stream(self.shape, n_maps=len(owned) - 1)
        self.streaming = bool(stream)
        if self.streaming:
            memory_arena = False if memory_arena is None else memory_arena
            memory_budget = STREAM_TILE_BUDGET if memory_budget is None else memory_budget
        self.arena = memory_arena
        self.warnings: list[str] = []
        #: Messages already issued with ``warnings.warn`` (front ends show only the rest of ``warnings``).
        self.announced: set[str] = set()
        self._chain = self._candidates()
        self._open_sessions()
        # Tile and batch from the memory of the device that holds the activations (a GPU's own memory
        # when one runs the network, else the host's), decided by the provider that actually started.
        on_gpu = self.provider not in ("cpu", "openvino")
        memory = None
        if not tile or (on_gpu and not batch):  # asking a GPU costs a call to nvidia-smi (cached)
            memory = (gpu_free_memory() if on_gpu else None) or available_memory()
        if tile:
            tile = int(tile)
        elif on_gpu:
            tile = gpu_tile(card, (h, w), memory, batch=int(batch) if batch else None)
        else:
            tile = auto_tile(card, int(batch or 1), memory=memory, budget_bytes=memory_budget)
        self.batch = int(batch) if batch else (auto_batch(tile, memory) if on_gpu else 1)
        if overlap < 0 or overlap > tile // 2:
            raise InputError(f"Overlap {overlap} must be between 0 and half the tile ({tile // 2}).")
        self.tile, self.overlap = tile, overlap
        halo = card.halo if halo is None else int(halo)
        self.plan_y = plan_axis(h, tile, overlap, mult, halo)
        self.plan_x = plan_axis(w, tile, overlap, mult, halo)
        # Decided by the provider that actually started (a GPU that fell back to the CPU gets neither).
        on_gpu = self.provider not in ("cpu", "openvino")
        # On a GPU, features for the DPM decoder stay in device memory between the two graphs (IO
        # binding) instead of a round trip through the host; on CPU providers there is nothing to save.
        self.io_binding = on_gpu if io_binding is None else bool(io_binding)
        # On a GPU the next batch's tiles are read and normalized, and the last one blended, while the
        # network runs in a worker thread; on the CPU that work would only compete for the same cores.
        self.pipeline = on_gpu if pipeline is None else bool(pipeline)
        # An output this job allocates may be promoted to float64 if the refocused values of a float
        # image do not fit in float32 (inputs near 3e38); a caller's preallocated output cannot.
        self._own_output = out is None
        self.output = out if out is not None else self._result_array(self.shape)
        self.dpm_shape = result_shapes(self.shape, axes, card.channels)[1]
        self.dpm = None
        if dpm:
            self.dpm = dpm_out if dpm_out is not None else self._result_array(self.dpm_shape)
        self.trust_map = None
        if self.passes:
            self.trust_map = trust_out if trust_out is not None else self._result_array(self.dpm_shape)
        self.planes = planes if planes is not None else list(np.ndindex(*[self.shape[i] for i in self.layout.plane_axes]))
        # A strip of tile rows [ka, kb) (for distributed work) also runs row ka-1 to rebuild the
        # overlap it shares with the strip above, so strips add up to exactly the whole-image result.
        ka, kb = tile_rows if tile_rows is not None else (0, self.plan_y.n)
        if not (0 <= ka < kb <= self.plan_y.n):
            raise InputError(f"Tile rows {tile_rows} are outside 0..{self.plan_y.n}.")
        self.tile_rows = (ka, kb)
        self.norm = norm or {}
        self.tiles_per_plane = (kb - max(ka - 1, 0)) * self.plan_x.n
        self.total = self.tiles_per_plane * len(self.planes) * max(self.passes, 1)
        self.done = 0

    # -- reading and writing in the input's own layout ---------------------------------------------
    def _plane_index(self, p: tuple[int, ...]) -> tuple:
        idx: list = [slice(None)] * len(self.shape)
        for ax, v in zip(self.layout.plane_axes, p, strict=True):
            idx[ax] = v
        return tuple(idx)

    def _plane_view(self, p):
        """Lazy ``(C, Y, X)`` view of one plane (C = 1 unless channels are fed jointly)."""
        lay = self.layout
        view = self.data[self._plane_index(p)]
        rest = [i for i in range(len(self.shape)) if i not in lay.plane_axes]
        order = ([lay.channel_axis] if lay.channel_axis is not None else []) + [lay.y, lay.x]
        view = _moveaxes(view, [rest.index(a) for a in order])
        return view if lay.channel_axis is not None else view[None]

    def _write(self, target, p, y0, y1, block):
        """Write a ``(C, rows, X)`` block into ``target`` (input layout) at plane ``p``, rows y0:y1.

        ``target`` is the output (all input axes) or the DPM (input axes less the joint channel axis).
        """
        lay = self.layout
        is_dpm = target is self.dpm or (target is self.trust_map and target is not None)
        idx: list = []
        order = []
        for i in range(len(self.shape)):
            if i in lay.plane_axes:
                if is_dpm and i == lay.rgb_axis:
                    continue  # one map for all colours: their mean, accumulated below
                idx.append(p[lay.plane_axes.index(i)])
            elif i == lay.y:
                idx.append(slice(y0, y1))
                order.append("Y")
            elif i == lay.x:
                idx.append(slice(None))
                order.append("X")
            elif not is_dpm:
                idx.append(slice(None))
                order.append("C")
        joint = lay.channel_axis is not None and not is_dpm
        data = block if joint else block[0]
        src = ["C", "Y", "X"] if joint else ["Y", "X"]
        value = np.transpose(data, [src.index(a) for a in order])
        if is_dpm and lay.rgb_axis is not None:
            n = self.shape[lay.rgb_axis]
            value = value / np.float32(n)
            if p[lay.plane_axes.index(lay.rgb_axis)]:  # later colours add to the first one's share
                value = np.asarray(target[tuple(idx)]) + value
        target[tuple(idx)] = value

    # -- the run -----------------------------------------------------------------------------------
    def _candidates(self) -> list[tuple[str, list[str], dict | None]]:
        """(precision, providers, provider options) to try in order: the asked-for precision on each
        provider, then float32 on the same provider, then the next provider; CPU float32 last."""
        req, out = self.requested_precision, []
        for i, full in enumerate(self.providers):
            tail = list(self.providers[i:])  # nodes the provider lacks go to the ones after it
            if req == "fp16" and full in FP16_PROVIDERS:
                out.append(("fp16", tail, None))
            elif req == "bf16" and full == "OpenVINOExecutionProvider":
                out.append(("bf16", tail, self.provider_options))
                continue  # OpenVINO's fp32 is slower than the CPU provider's (measured ~15 %)
            elif req == "int8":
                out.append(("int8", tail, None))
            out.append(("fp32", tail, None))
        return out

    def _open_sessions(self, start: int = 0, why: str | None = None):
        """Open the generator (and DPM decoder) with the first candidate from ``start`` that starts.

        Every candidate that fails adds its reason; when the one that runs is not the first asked
        for, one warning says what failed and what runs instead.

        Raises
        ------
        ModelError
            When not even float32 on the CPU loads.
        """
        reasons = list(self._fallbacks) + ([why] if why else [])
        self._fallbacks = []
        last = None
        for k in range(start, len(self._chain)):
            prec, provs, opts = self._chain[k]
            short = SHORT_NAMES.get(provs[0], provs[0])
            try:
                gpath, dpath = self._graph_paths(prec)
                sess, used = get_session(gpath, provs, self.threads, self.arena, opts, fallback=False)
                dsess = None
                if self.want_dpm:
                    dsess, dused = get_session(dpath, provs, self.threads, self.arena, opts, fallback=False)
                    used = used if dused == used else dused
                if PROVIDERS.get(used, used) != provs[0]:
                    # onnxruntime drops a provider that fails to initialise (missing CUDA libraries) with a log line only.
                    raise ModelError(f"{short} did not start (onnxruntime ran {used} instead)")
            except Exception as exc:  # noqa: BLE001 - any failure of a precision or provider moves to the next
                last = exc
                reasons.append(f"{prec} on {short} could not start ({_one_line(exc)})")
                continue
            self._index = k
            self.precision, self.providers, self.provider_options = prec, provs, opts
            self.generator_path, self.dpm_path = gpath, dpath
            self.session, self.dpm_session, self.provider = sess, dsess, used
            if reasons:
                where = "CPU" if used == "cpu" else used
                also = f" in {prec}" if prec != self.requested_precision else ""
                self._warn(f"{'; '.join(reasons)}; falling back to {where}{also}.")
            return
        if len(self._chain) == 1 and isinstance(last, ModelError):  # only the CPU was tried: its own words
            raise last
        raise ModelError(f"No precision or provider could run model {self.model.name}: {'; '.join(reasons)}.")

    def _warn(self, msg: str) -> None:
        """One warning, issued now and kept for front ends that collect them."""
        warnings.warn(msg, RuntimeWarning, stacklevel=4)
        self.announced.add(msg)
        self.warnings.append(msg)

    def _graph_paths(self, precision: str):
        """The generator and DPM decoder files for ``precision`` (float16 copies are made here)."""
        m = self.model
        if precision == "fp16":
            gen = fp16_variant(m.generator_path)
            return gen, (fp16_variant(m.dpm_path, feeds_from=m.generator_path) if self.want_dpm else m.dpm_path)
        if precision == "int8":
            return m.root / "generator.int8.onnx", m.dpm_path
        return m.generator_path, m.dpm_path

    def _check_stats(self, p, mean, std):
        """Refuse NaN/inf planes; constant planes are passed through unchanged (std would be 0)."""
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std))):
            where = f" (plane {p})" if p else ""
            raise InputError(f"The image contains NaN or infinite pixels{where}; replace them before refocusing.")
        flat = std <= 1e-12 * np.maximum(np.abs(mean), 1.0)
        if np.any(flat):
            self.warnings.append(f"Plane {p} is constant; it is returned unchanged.")
        return flat, np.where(flat, 1.0, std)

    def _run_network(self, x: np.ndarray):
        names = [self.model.output_name]
        if self.want_dpm:
            names += list(self.model.feature_names)
        stage = "generator"
        try:
            if self.io_binding:
                out, dpm = self._run_bound(x)
            else:
                res = self.session.run(names, {self.model.input_name: x})
                out, dpm = res[0], None
                if self.want_dpm:
                    stage = "dpm"
                    feeds = dict(zip(self.model.feature_names, res[1:], strict=True))
                    dpm = self.dpm_session.run(["dpm"] if "dpm" in _output_names(self.dpm_session) else None, feeds)[0]
            if self.precision != "fp32" and not (np.isfinite(out).all() and (dpm is None or np.isfinite(dpm).all())):
                # Half precision overflows at 65504: a reduced-precision graph that does is a failure of
                # that graph (float32 is tried next), not of the model.
                raise FloatingPointError(f"the {self.precision} graph gave NaN or infinite values")
        except Exception as exc:
            if self._index + 1 >= len(self._chain):
                if stage == "dpm":
                    raise ModelError(f"The DPM decoder of model {self.model.name} failed ({_one_line(exc)}).") from exc
                raise ModelError(
                    f"Model {self.model.name} failed on a {x.shape[2]}×{x.shape[3]} tile ({_one_line(exc)}); "
                    "it may need a fixed input size or be broken."
                ) from exc
            self._open_sessions(self._index + 1, f"{self.precision} on {self.provider} failed while running ({_one_line(exc)})")
            # IO binding and the pipeline stay only while a device other than the host runs the network.
            if self.provider in ("cpu", "openvino"):
                self.io_binding = False
            return self._run_network(x)
        return self._checked(x, out, dpm)

    def _checked(self, x, out, dpm):
        """Refuse network outputs whose shape does not match the tile (a model that loads but is wrong)."""
        if getattr(out, "shape", None) != x.shape:
            raise ModelError(
                f"Model {self.model.name} returned an output of shape {tuple(getattr(out, 'shape', ()))} for an input of "
                f"shape {x.shape}; a Deep-R generator must return an image of its input's size and channels."
            )
        if dpm is not None and (dpm.ndim != 4 or dpm.shape[0] != x.shape[0] or dpm.shape[2:] != x.shape[2:]):
            raise ModelError(
                f"The DPM decoder of model {self.model.name} returned shape {dpm.shape} for tiles of shape {x.shape}; "
                "it must return one defocus value per pixel."
            )
        return out, dpm

    def _run_bound(self, x: np.ndarray):
        """One network call with IO binding: the features feeding the DPM decoder never leave the device."""
        device = "cpu" if self.provider in ("cpu", "openvino") else _DEVICE_TYPES.get(self.provider, "cuda")
        b = self.session.io_binding()
        b.bind_cpu_input(self.model.input_name, x)
        b.bind_output(self.model.output_name)
        if self.want_dpm:
            for name in self.model.feature_names:
                b.bind_output(name, device)
        self.session.run_with_iobinding(b)
        values = b.get_outputs()
        out = values[0].numpy()
        if not self.want_dpm:
            return out, None
        d = self.dpm_session.io_binding()
        for name, v in zip(self.model.feature_names, values[1:], strict=True):
            d.bind_ortvalue_input(name, v)
        names = _output_names(self.dpm_session)
        d.bind_output("dpm" if "dpm" in names else names[0])
        self.dpm_session.run_with_iobinding(d)
        return out, d.get_outputs()[0].numpy()

    def steps(self, cancel: Callable[[], bool] | threading.Event | None = None) -> Iterator[Progress]:
        """Run, yielding a :class:`Progress` after every batch of tiles.

        Raises
        ------
        Cancelled
            When ``cancel`` is set; rows finished so far are already written to the outputs.
        """
        is_cancelled = _cancel_fn(cancel)
        if self.planewise:
            yield from self._steps_planewise(is_cancelled)
            return
        py, px = self.plan_y, self.plan_x
        ty, tx = py.tile, px.tile
        h, w = py.length, px.length
        wy = [axis_weights(py, k).astype(np.float32) for k in range(py.n)]
        wx = [axis_weights(px, k).astype(np.float32) for k in range(px.n)]
        # The cosine ramps of neighbouring tiles sum to one, so the blend needs no weight sum and no
        # division; the weight sum is kept only for plans where they do not (tiny tiles, odd overlaps).
        unity = _partition_of_unity(py, wy) and _partition_of_unity(px, wx)
        single = py.n == 1 and px.n == 1 and unity and bool(np.all(wy[0] == 1) and np.all(wx[0] == 1))
        flat_y = [bool(np.all(v == 1)) for v in wy]
        flat_x = [bool(np.all(v == 1)) for v in wx]
        c = self.model.card.channels
        x_lo, x_hi = px.starts[0], px.starts[-1] + tx
        width = x_hi - x_lo
        # Host work per tile is a few passes over float32 buffers reused between batches: on a GPU
        # the host side, not the network, bounds the engine's speed (measured on an H200).
        # Two input buffers: with the pipeline, batch i+1 is filled while batch i runs.
        xs = list(enumerate(px.starts))
        ka, kb = self.tile_rows
        batches = [(ky, xs[b0:b0 + self.batch]) for ky in range(max(ka - 1, 0), kb) for b0 in range(0, len(xs), self.batch)]
        overlap_work = self.pipeline and len(batches) * len(self.planes) > 1  # nothing to overlap with one batch
        pool = ThreadPoolExecutor(1, thread_name_prefix="deepr-net") if overlap_work else None
        bufs = [np.empty((min(self.batch, len(xs)), c, ty, tx), dtype=np.float32) for _ in range(2 if pool else 1)]
        tmp = np.empty((c, ty, tx), dtype=np.float32)
        # Host passes are split by rows over the cores (numpy releases the GIL in them).
        workers = min(self.threads or default_threads(), 8)
        host = ThreadPoolExecutor(workers, thread_name_prefix="deepr-host") if workers > 1 else None
        try:
            for p in self.planes:
                view = self._plane_view(p)
                try:
                    mean, std = self.norm[p] if p in self.norm else plane_stats(view, pool=host)
                except (InputError, ModelError, Cancelled, MemoryError):
                    raise
                except Exception as exc:  # a corrupt chunk or a file that vanished shows up here first
                    raise InputError(f"Plane {p} of the image could not be read ({_one_line(exc)}).") from exc
                flat, safe_std = self._check_stats(p, mean, std)
                mean32 = np.asarray(mean, dtype=np.float32)[:, None, None]
                inv32 = (1.0 / np.asarray(safe_std, dtype=np.float64)).astype(np.float32)[:, None, None]
                std32 = np.asarray(safe_std, dtype=np.float32)[:, None, None]
                # Pixels near the float32 limit (3.4e38) overflow when the mean is subtracted in
                # float32; such planes are normalized in float64 (rare, so the fast path stays).
                huge = bool(np.max(np.abs(mean)) + np.max(safe_std) > 1e30)
                mean64 = np.asarray(mean, dtype=np.float64)[:, None, None]
                inv64 = (1.0 / np.asarray(safe_std, dtype=np.float64))[:, None, None]

                def prepare(i, view=view, mean32=mean32, inv32=inv32, huge=huge, mean64=mean64, inv64=inv64):
                    ky, chunk = batches[i]
                    y0 = py.starts[ky]
                    tiles = bufs[i % len(bufs)][: len(chunk)]
                    for j, (_, x0) in enumerate(chunk):
                        region = read_region(view, y0, y0 + ty, x0, x0 + tx)

                        def norm(r0, r1, region=region, t=tiles[j]):
                            if huge:
                                t[:, r0:r1] = (region[:, r0:r1].astype(np.float64) - mean64) * inv64
                                return
                            np.subtract(region[:, r0:r1], mean32, out=t[:, r0:r1], casting="unsafe")
                            t[:, r0:r1] *= inv32

                        _by_rows(host, norm, ty)
                    return tiles

                def finish_row(ky, acc, wacc, dacc, view=view, std32=std32, mean32=mean32, flat=flat):
                    """Write the rows of tile row ``ky`` that no later tile touches; return the carried rest."""
                    y0 = py.starts[ky]
                    last = ky == py.n - 1
                    fin_end = ty if last else py.starts[ky + 1] - y0
                    r0, r1 = max(0, -y0), min(fin_end, h - y0)
                    if r1 > r0 and ky >= ka:  # rows of the warm-up row ka-1 belong to the strip above
                        cx0, cx1 = -x_lo, -x_lo + w
                        res = np.empty((c, r1 - r0, w), dtype=np.float32)

                        def rescale(a, b):
                            blk = acc[:, r0 + a:r0 + b, cx0:cx1]
                            if wacc is not None:
                                blk = blk / wacc[r0 + a:r0 + b, cx0:cx1]
                            with np.errstate(over="ignore", invalid="ignore"):  # checked just below
                                np.multiply(blk, std32, out=res[:, a:b])
                                res[:, a:b] += mean32

                        _by_rows(host, rescale, r1 - r0)
                        if not np.isfinite(res).all():
                            res = self._non_finite(p, acc[:, r0:r1, cx0:cx1], None if wacc is None else wacc[r0:r1, cx0:cx1],
                                                   safe_std, mean)
                        if np.any(flat):
                            src = read_region(view, y0 + r0, y0 + r1, 0, w).astype(np.float32)
                            res[flat] = src[flat]
                        if isinstance(self.output, np.ndarray):  # memory (or memmap): rows in parallel
                            _by_rows(host, lambda a, b: self._write(self.output, p, y0 + r0 + a, y0 + r0 + b, res[:, a:b]), r1 - r0)
                        else:  # zarr & co.: one writer, chunks shared between rows must not race
                            self._write(self.output, p, y0 + r0, y0 + r1, res)
                        if self.want_dpm:
                            d = dacc[r0:r1, cx0:cx1]
                            if wacc is not None:
                                d = d / wacc[r0:r1, cx0:cx1]
                            if not np.isfinite(d).all():
                                raise ModelError(
                                    f"The DPM decoder of model {self.model.name} produced NaN or infinite values "
                                    f"(plane {p}); the model is broken or the image is far outside its training data."
                                )
                            self._write(self.dpm, p, y0 + r0, y0 + r1, d[None])
                    if last:
                        return None
                    s = py.starts[ky + 1] - y0
                    return (acc[:, s:].copy(), None if wacc is None else wacc[s:].copy(), dacc[s:].copy() if self.want_dpm else None)

                row, acc, wacc, dacc, carry = None, None, None, None, None
                pending = None
                for i, (ky, chunk) in enumerate(batches):
                    if is_cancelled():
                        if pending is not None and pool is not None:
                            _quietly_wait(pending)
                        raise Cancelled("Refocus was cancelled; finished rows are kept.")
                    nxt = None
                    if pool is None:
                        pending = _Done(self._run_network(prepare(i)))
                    else:
                        if pending is None:
                            pending = pool.submit(self._run_network, prepare(i))
                        if i + 1 < len(batches):  # queued behind batch i; its inputs are filled while i runs
                            nxt = pool.submit(self._run_network, prepare(i + 1))
                    try:
                        out, dp = pending.result()
                    except BaseException:
                        if nxt is not None:
                            _quietly_wait(nxt)
                        raise
                    if single:  # one tile, weight one everywhere: the network's output is the blend
                        row, acc, dacc = ky, out[0], (dp[0, 0] if self.want_dpm else None)
                        self.done += 1
                        pending = nxt
                        yield Progress(self.done, self.total, p, self.provider, (0, 0))
                        continue
                    if ky != row:
                        if row is not None:
                            carry = finish_row(row, acc, wacc, dacc)
                        row = ky
                        acc = np.zeros((c, ty, width), dtype=np.float32)
                        wacc = None if unity else np.zeros((ty, width), dtype=np.float32)
                        dacc = np.zeros((ty, width), dtype=np.float32) if self.want_dpm else None
                        if carry is not None:
                            # The overlap rows accumulated by the previous tile row.
                            keep = ty - (py.starts[ky] - py.starts[ky - 1])
                            acc[:, :keep] = carry[0]
                            if wacc is not None:
                                wacc[:keep] = carry[1]
                            if self.want_dpm:
                                dacc[:keep] = carry[2]
                    for j, (kx, x0) in enumerate(chunk):
                        sl = slice(x0 - x_lo, x0 - x_lo + tx)

                        def blend(a, b, j=j, kx=kx, sl=sl):
                            fy, fx, vy, vx = flat_y[ky], flat_x[kx], wy[ky][a:b], wx[kx]
                            _blend(acc[:, a:b, sl], out[j][:, a:b], vy, vx, fy, fx, tmp[:, a:b])
                            if wacc is not None:
                                wacc[a:b, sl] += vy[:, None] * vx[None, :]
                            if self.want_dpm:
                                _blend(dacc[None, a:b, sl], dp[j, :1, a:b], vy, vx, fy, fx, tmp[:1, a:b])

                        _by_rows(host, blend, ty)
                    self.done += len(chunk)
                    pending = nxt
                    yield Progress(self.done, self.total, p, self.provider, (0, 0))
                if row is not None:
                    finish_row(row, acc, wacc, dacc)
        finally:
            if pool is not None:
                pool.shutdown(wait=True)
            if host is not None:
                host.shutdown(wait=True)

    def _non_finite(self, p, blk, wblk, std, mean) -> np.ndarray:
        """Rows whose rescaled output is not finite: name the model, or keep float64 for huge inputs.

        NaN or inf in the network's own output is the model's fault (nothing is written). A finite
        network output that overflows float32 only when mapped back to the input's intensity (a float
        image near 3e38) is recomputed in float64, and the output this job owns becomes float64.
        """
        net = blk if wblk is None else blk / wblk
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

    def _result_array(self, shape) -> np.ndarray:
        """A zeroed float32 result: in memory, or on disk (an unlinked temporary file) when streaming."""
        if not self.streaming:
            return np.zeros(shape, dtype=np.float32)
        import tempfile

        # The file has no name (removed at once on POSIX): its space returns when the array is freed.
        f = tempfile.TemporaryFile(prefix="deepr-result-")
        return np.memmap(f, dtype=np.float32, mode="w+", shape=tuple(shape))

    def _scratch(self, shape) -> np.ndarray:
        """A float32 work array: in memory, or a temporary memmap when it would take over an eighth of free memory."""
        nbytes = 4 * math.prod(shape)
        if nbytes <= available_memory() // 8:
            return np.zeros(shape, dtype=np.float32)
        import tempfile

        if getattr(self, "_tmpdir", None) is None:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="deepr-work-")
        path = f"{self._tmpdir.name}/{len(os.listdir(self._tmpdir.name))}.npy"
        return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=tuple(shape))

    def _steps_planewise(self, is_cancelled) -> Iterator[Progress]:
        """Plane by plane at the model's sampling: resample in, run the D4 passes, measure trust, resample back.

        Each pass is a whole-plane run of an inner :class:`RefocusJob` (same tiling, providers and
        precision), so tiling, stacks and disk-backed outputs behave as without resampling. Only
        the identity pass computes the DPM and provides the output; the other passes only measure
        how much the answer moves.
        """
        card = self.model.card
        hw, ww = self.work_hw
        h, w = self.input_hw
        transforms = _trust.D4[: self.passes] if self.passes else _trust.D4[:1]
        joint = self.layout.channel_axis is not None
        # The trust map's range test reads the DPM too (computed once, on the identity pass).
        need_dpm = self.want_dpm or (self.passes > 0 and self.model.has_dpm)
        # Out of domain by what the engine already knows: trust is capped whatever the pixels say.
        known_ood = self.modality.forced or (
            self.sampling.ratio is not None and not self.sampling.resample and abs(self.sampling.ratio - 1) > 0.05)
        cap = _trust.OUT_OF_DOMAIN_CAP if known_ood else 1.0
        for p in self.planes:
            view = self._plane_view(p)
            c = int(view.shape[0])
            if self.sampling.resample:
                src = resample_plane(view, (hw, ww), out=self._scratch((c, hw, ww)))
            elif isinstance(view, np.ndarray):
                src = view.astype(np.float32, copy=False)
            else:
                src = self._scratch((c, hw, ww))
                for a in range(0, hw, 512):
                    src[:, a:a + 512] = np.asarray(view[:, a:a + 512], dtype=np.float32)
            mean, std = plane_stats(src)
            flat, safe_std = self._check_stats(p, mean, std)
            out0 = dpm0 = None
            acc = m2 = None
            for k, (rot, flip) in enumerate(transforms):
                if is_cancelled():
                    raise Cancelled("Refocus was cancelled; finished planes are kept.")
                first = k == 0
                inner = RefocusJob(
                    _trust.forward(src, rot, flip), self.model, dpm=need_dpm and first, tile=self.tile,
                    overlap=self.overlap, batch=self.batch, providers=self.providers, axes="CYX", threads=self.threads,
                    precision=self.precision, memory_arena=self.arena, io_binding=self.io_binding, pipeline=self.pipeline,
                    out=self._scratch((c, hw, ww)[:1] + ((ww, hw) if rot % 2 else (hw, ww))) if first else None,
                    norm={(0,) if not joint else (): (mean, std)}, pixel_size_um=card.pixel_size_um, force_modality=True,
                )
                base = self.done
                for ev in inner.steps(is_cancelled):
                    self.done = base + ev.done
                    self.provider = inner.provider
                    yield Progress(self.done, self.total, p, inner.provider)
                self.warnings.extend(m for m in inner.warnings if m not in self.warnings)
                y = _trust.inverse(np.asarray(inner.output), rot, flip).astype(np.float32, copy=False)
                if first:
                    out0 = y
                    if need_dpm:
                        dpm0 = np.asarray(inner.dpm, dtype=np.float32).reshape(hw, ww)
                if self.passes > 1:  # Welford: mean and spread of the passes without keeping them
                    if acc is None:
                        acc, m2 = y.copy(), np.zeros_like(y)
                    else:
                        delta = y - acc
                        acc += delta / (k + 1)
                        m2 += delta * (y - acc)
            if self.passes:
                s32 = np.asarray(safe_std, dtype=np.float32)[:, None, None]
                m32 = np.asarray(mean, dtype=np.float32)[:, None, None]
                spread = None
                if self.passes > 1:
                    spread = (np.sqrt(m2 / (len(transforms) - 1)) / s32).mean(axis=0)
                xz = ((src - m32) / s32).mean(axis=0)
                yz = ((out0 - m32) / s32).mean(axis=0)
                # The signals of the last plane (model grid) stay, for measurements (scripts/trust_eval.py).
                trust2d, self.trust_parts = _trust.trust_map(xz, spread, dpm0, card, cap=cap, y=yz)
            # Back onto the input grid, band by band, in the input's layout.
            if self.sampling.resample:
                resample_plane(out0, (h, w), out=lambda a, b, blk, p=p: self._write(self.output, p, a, b, blk))
                if self.want_dpm:
                    resample_plane(dpm0[None], (h, w), out=lambda a, b, blk, p=p: self._write(self.dpm, p, a, b, blk))
                if self.passes:
                    resample_plane(trust2d[None], (h, w), out=lambda a, b, blk, p=p: self._write(self.trust_map, p, a, b, blk))
            else:
                for a in range(0, h, 512):
                    b = min(a + 512, h)
                    self._write(self.output, p, a, b, out0[:, a:b])
                    if self.want_dpm:
                        self._write(self.dpm, p, a, b, dpm0[None, a:b])
                    if self.passes:
                        self._write(self.trust_map, p, a, b, trust2d[None, a:b])
            del flat

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


def refocus(
    image,
    model="default",
    *,
    dpm: bool = False,
    tile: int | None = None,
    overlap: int | None = None,
    batch: int | None = None,
    providers=None,
    progress: Callable[[Progress], None] | None = None,
    cancel=None,
    axes: str | None = None,
    out=None,
    dpm_out=None,
    threads: int | None = None,
    precision: str = "fp32",
    pixel_size_um: float | None = None,
    resample: bool = True,
    force_modality: bool = False,
    trust: bool | int = False,
    stream: bool | None = None,
):
    """Refocus a defocused image (2-D, stacks, channels, RGB; numpy, dask or zarr).

    Parameters
    ----------
    image : array-like or io.ImageData
        The defocused image. Every plane (Z, T, and colour when the model has one channel) is refocused
        on its own; a channel axis whose size equals the model's channel count is fed jointly.
    model : str, Path or DeepRModel
        ``"default"`` (the bundled model), a model name, folder or ``.onnx`` file.
    dpm : bool
        Also return the defocus map in µm (same layout without the joint channel axis).
    tile, overlap, batch : int, optional
        Tiling; defaults from the model card. ``tile`` must be a multiple of the model's multiple (32).
    providers : str or list of str, optional
        ``cpu``, ``cuda``, ``tensorrt``, ``directml``, ``coreml``, ``openvino``; CPU is the fallback.
    progress : callable, optional
        Called with a :class:`Progress` after each batch of tiles.
    cancel : threading.Event or callable, optional
        When set, stops within one batch and raises :class:`napari_deepr.errors.Cancelled` (rows done
        so far are in ``out``/``dpm_out`` when given).
    axes : str, optional
        Axis letters, e.g. ``"ZYX"``, ``"YXS"``, ``"TCYX"``; guessed when omitted.
    out, dpm_out : array-like, optional
        Preallocated outputs (numpy, zarr, memmap) written band by band, for out-of-core work.
    threads : int, optional
        onnxruntime intra-op threads (default: the usable cores).
    stream : bool, optional
        Keep the results on disk (``numpy.memmap``) with the tile and memory bounded; default: when
        they would take more than a quarter of free memory (:func:`should_stream`). False forces memory.
    precision : {"fp32", "fp16", "bf16", "int8"}
        ``bf16`` runs the float32 graphs in bfloat16 on CPUs with AVX512-BF16/AMX through onnxruntime's
        OpenVINO provider (``onnxruntime-openvino``; the model was trained under bf16 autocast);
        ``int8`` runs the model's static-QDQ variant (``generator.int8.onnx``, see
        :mod:`napari_deepr.engine.quantize`). Both are faster on CPU; ``fp16`` runs half-precision
        copies of the graphs on GPU providers (:mod:`napari_deepr.engine.fp16`). Their quality cost is measured
        (``deepr quantize``, ``napari_deepr.engine.quantize.quality_delta``), not assumed.
    pixel_size_um : float, optional
        The image's pixel size in µm (overrides an ``io.ImageData``'s calibration). Plain arrays and
        uncalibrated files have none: the model's sampling is assumed and a warning says so once.
    resample : bool
        When the pixel size differs from the model card's by more than 5 %, resample to the model's
        sampling (anti-aliased), refocus, and resample the results back onto the input grid
        (default). False runs at the input's sampling and warns before the run.
    force_modality : bool
        Refocus even when the image's modality is not the model's (an RGB image through a
        fluorescence model); otherwise that is refused with an :class:`~napari_deepr.errors.InputError`.
    trust : bool or int
        Also return a per-pixel trust map in [0, 1] (1 = trust; ≥ 0.5 counts as trustworthy) from
        this many D4 test-time passes (``True``: 8) and a forward-model range test; see
        :mod:`napari_deepr.engine.trust`. Costs one network run per pass.

    Returns
    -------
    numpy.ndarray or tuple of numpy.ndarray
        float32 refocused image in the input's layout and intensity scale (see module docstring),
        then the DPM in µm when ``dpm=True``, then the trust map when ``trust`` (both in the input's
        layout less the joint channel or RGB colour axis).
    """
    job = RefocusJob(
        image, model, dpm=dpm, tile=tile, overlap=overlap, batch=batch, providers=providers, axes=axes,
        out=out, dpm_out=dpm_out, threads=threads, precision=precision, pixel_size_um=pixel_size_um,
        resample=resample, force_modality=force_modality, trust=trust, stream=stream,
    )
    for msg in job.notes:  # before the run: unknown pixel size, resampling, forced modality
        warnings.warn(msg, UserWarning, stacklevel=2)
    result = job.run(progress, cancel)
    for msg in dict.fromkeys(job.warnings):  # construction and run warnings, each once
        if msg not in job.announced:
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
    return result


# -- helpers ---------------------------------------------------------------------------------------
# Peak activation memory of a base-16 five-level U-Net in onnxruntime, bytes per input pixel: an
# estimate (about five live full-resolution tensors of 16-32 channels plus the deeper levels).
BYTES_PER_TILE_PIXEL = 600


def available_memory() -> int:
    """Bytes of memory available to this process (Linux ``MemAvailable``; 4 GiB if unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


#: Results (output, DPM, trust map) taking more than this share of free memory are streamed to disk.
STREAM_MEMORY_FRACTION = 0.25
#: A file whose results would take more than this is refocused disk to disk by the ``deepr`` command
#: even when memory would hold them (a 5800² float32 plane): a whole slide then costs tiles, not its size.
STREAM_FILE_BYTES = 128 << 20
#: Activation bytes of one tile on the streaming path. Measured with the arena off: a 8192² uint16
#: TIFF disk to disk peaks under 2 GB with the tile this allows (docs/PERFORMANCE.md).
STREAM_TILE_BUDGET = 1 << 30


def result_bytes(shape, n_maps: int = 0) -> int:
    """Bytes of the float32 results of an input of ``shape``: the output and ``n_maps`` maps (over-counted for channels)."""
    return 4 * math.prod(int(v) for v in shape) * (1 + n_maps)


def should_stream(shape, n_maps: int = 0, *, input_bytes: int = 0, from_file: bool = False,
                  free: int | None = None) -> bool:
    """Whether refocusing an input of ``shape`` should stream its results to disk.

    Parameters
    ----------
    shape : tuple of int
        The input's shape.
    n_maps : int
        How many maps besides the output are asked for (DPM, trust map).
    input_bytes : int
        Bytes the input itself will take in memory (0 when it is already there or read lazily).
    from_file : bool
        The input is read from a file and the results go to one: then results of
        :data:`STREAM_FILE_BYTES` or more stream even when memory would hold them.
    free : int, optional
        Free memory in bytes (default :func:`available_memory`).
    """
    need = result_bytes(shape, n_maps)
    free = available_memory() if free is None else int(free)
    if need + input_bytes > STREAM_MEMORY_FRACTION * free:
        return True
    return bool(from_file) and need >= STREAM_FILE_BYTES


def auto_tile(card, batch: int = 1, budget_fraction: float = 0.25, memory: int | None = None,
              budget_bytes: int | None = None) -> int:
    """The card's tile, shrunk (in multiples of the model's size multiple) to fit a quarter of free
    memory (``memory`` bytes; default the host's available memory), and ``budget_bytes`` when given
    (the streaming path's bound on resident memory)."""
    tile = card.tile
    budget = (available_memory() if memory is None else memory) * budget_fraction
    if budget_bytes is not None and batch * tile * tile * BYTES_PER_TILE_PIXEL > budget_bytes:
        # A hard bound: the largest multiple that fits (fewer tiles than halving would give).
        fit = int(math.sqrt(budget_bytes / (batch * BYTES_PER_TILE_PIXEL))) // card.tile_multiple * card.tile_multiple
        tile = max(4 * card.tile_multiple, min(tile, fit))
    while tile > 4 * card.tile_multiple and batch * tile * tile * BYTES_PER_TILE_PIXEL > budget:
        tile = max(4 * card.tile_multiple, (tile // 2) // card.tile_multiple * card.tile_multiple)
    return tile


#: Largest default tile on a GPU: an untiled 8192² call fails on CUDA ("Resize: output pitch exceeds
#: supported int range", H200, onnxruntime-gpu 1.31), and at 8192² tiles of up to 4096 were 4.9× faster
#: than 2048 and 6.1× faster than 1024 (batch 4, same run).
GPU_MAX_TILE = 4096


def gpu_tile(card, image_hw: tuple[int, int], memory: int | None, batch: int | None = None,
             budget_fraction: float = 0.25, most: int = GPU_MAX_TILE) -> int:
    """Default tile side on a GPU provider, from the device's free memory and the image's size.

    On a GPU each network call costs a fixed overhead, so fewer, larger tiles win (see
    :data:`GPU_MAX_TILE`); the card's tile is a CPU-sized choice. The tile is the largest multiple of
    the model's size multiple whose activations (``batch`` tiles, default 1; :data:`BYTES_PER_TILE_PIXEL`)
    fit in ``budget_fraction`` of ``memory`` bytes, at most ``most``, and no larger than the image
    needs: :func:`~napari_deepr.engine.tiling.plan_axis` then spreads the fewest tiles evenly.

    Parameters
    ----------
    card : ModelCard
    image_hw : (int, int)
        Height and width of the plane at the model's sampling.
    memory : int or None
        Free device memory in bytes; None (unknown) keeps the card's tile.
    """
    mult = card.tile_multiple
    if not memory:
        return card.tile
    per_tile = (batch or 1) * BYTES_PER_TILE_PIXEL
    side = int(math.sqrt(memory * budget_fraction / per_tile)) // mult * mult
    side = max(4 * mult, min(side, most // mult * mult))
    # An image smaller than that runs as one tile of its own (padded) size.
    need = -(-(max(image_hw) + 2 * card.halo) // mult) * mult
    return min(side, need)


def auto_batch(tile: int, memory: int, budget_fraction: float = 0.25, most: int = 4) -> int:
    """Tiles per GPU call: as many as fit in a quarter of ``memory`` bytes, at most ``most``."""
    return int(max(1, min(most, memory * budget_fraction // (tile * tile * BYTES_PER_TILE_PIXEL))))


def _check_settings(**kw) -> None:
    """Refuse settings of the wrong type or range in one sentence, before any model or pixel is read."""
    from ..errors import ArgumentTypeError, SettingsError

    for name in ("tile", "overlap", "batch", "threads", "halo"):
        v = kw[name]
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ArgumentTypeError(f"{name} must be a whole number or None, not {type(v).__name__} {v!r}.")
        lo = 0 if name in ("overlap", "halo") else 1
        if v < lo:
            raise SettingsError(f"{name} must be at least {lo}, got {v}.")
    p = kw["providers"]
    if p is not None and not isinstance(p, str) and not (
        isinstance(p, (list, tuple)) and all(isinstance(x, str) for x in p)
    ):
        raise ArgumentTypeError(f"providers must be a name or a list of names, not {type(p).__name__}.")
    if kw["axes"] is not None and not isinstance(kw["axes"], str):
        raise ArgumentTypeError(f"axes must be a string of axis letters such as 'ZYX', not {type(kw['axes']).__name__}.")
    if not isinstance(kw["precision"], str):
        raise ArgumentTypeError(f"precision must be one of fp32, fp16, bf16, int8, not {kw['precision']!r}.")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__).rstrip(".")[:200]


def plane_stats(view, block_rows: int = 512, pool=None) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of a ``(C, Y, X)`` plane, read block by block.

    Blocks are combined in order with Chan's parallel update, so memory stays at a few blocks and
    every caller (numpy, dask, zarr, a distributed strip, with or without a thread ``pool``) gets
    bit-identical statistics.
    """
    c, h = view.shape[0], view.shape[1]

    def block(r0):
        blk = np.asarray(view[:, r0:r0 + block_rows, :], dtype=np.float64).reshape(c, -1)
        mb = blk.mean(axis=1)
        blk -= mb[:, None]
        return blk.shape[1], mb, np.einsum("ij,ij->i", blk, blk)

    starts = range(0, h, block_rows)
    # Lazy arrays (dask, zarr) are read by one thread: their own readers may not be thread-safe.
    parts = pool.map(block, starts) if pool is not None and isinstance(view, np.ndarray) else map(block, starts)
    n = 0
    mean = np.zeros(c)
    m2 = np.zeros(c)
    for nb, mb, m2b in parts:
        delta = mb - mean
        tot = n + nb
        mean = mean + delta * nb / tot
        m2 = m2 + m2b + delta**2 * n * nb / tot
        n = tot
    return mean, np.sqrt(m2 / n)



def _by_rows(pool, fn, rows: int, min_rows: int = 128) -> None:
    """Call ``fn(a, b)`` on row ranges covering ``0..rows``, spread over ``pool`` when it is worth it."""
    if pool is None or rows < 2 * min_rows:
        fn(0, rows)
        return
    parts = min(pool._max_workers, rows // min_rows)
    edges = np.linspace(0, rows, parts + 1).astype(int)
    for f in [pool.submit(fn, int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]:
        f.result()


class _Done:
    """An already computed result with a future's ``result()``, for runs without the pipeline."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


def _quietly_wait(future) -> None:
    """Let an in-flight network call end (its error, if any, is superseded by the one being raised)."""
    try:
        future.result()
    except BaseException:  # noqa: BLE001
        pass


def _partition_of_unity(plan, weights) -> bool:
    """Whether the tiles' weights along an axis sum to one at every image pixel."""
    total = np.zeros(plan.length, dtype=np.float64)
    for start, wt in zip(plan.starts, weights, strict=True):
        a, b = max(start, 0), min(start + plan.tile, plan.length)
        if b > a:
            total[a:b] += wt[a - start:b - start]
    return bool(np.allclose(total, 1.0, atol=1e-5))


def _blend(acc, out, wy, wx, flat_y: bool, flat_x: bool, tmp) -> None:
    """``acc += out * wy[:, None] * wx[None, :]`` in as few passes as the weights allow."""
    if flat_y and flat_x:
        acc += out
        return
    if flat_y:
        np.multiply(out, wx[None, None, :], out=tmp)
    elif flat_x:
        np.multiply(out, wy[None, :, None], out=tmp)
    else:
        np.multiply(out, wy[None, :, None], out=tmp)
        tmp *= wx[None, None, :]
    acc += tmp


def _is_dask(a) -> bool:
    return hasattr(a, "dask") and hasattr(a, "compute")


def _as_array(data):
    if _is_dask(data) or isinstance(data, np.ndarray):
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


def _moveaxes(view, perm):
    if list(perm) == sorted(perm):
        return view
    if _is_dask(view):
        return view.transpose(perm)
    return np.transpose(view, perm) if isinstance(view, np.ndarray) else np.transpose(np.asarray(view), perm)


def _cancel_fn(cancel) -> Callable[[], bool]:
    if cancel is None:
        return lambda: False
    if isinstance(cancel, threading.Event):
        return cancel.is_set
    if callable(cancel):
        return lambda: bool(cancel())
    raise InputError("cancel must be a threading.Event or a callable returning True to stop.")


def _output_names(sess) -> list[str]:
    return [o.name for o in sess.get_outputs()]


def megapixels(shape, axes: str) -> float:
    """Number of pixels (in millions) the network processes for an input of this shape."""
    return math.prod(s for s, a in zip(shape, axes, strict=True) if a not in "CS") / 1e6


__all__ = ["Progress", "RefocusJob", "guess_axes", "megapixels", "refocus", "result_shapes", "should_stream"]
