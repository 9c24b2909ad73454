"""Refocus settings: what a caller asks for (:class:`RefocusSettings`) and what a run uses (:class:`Resolved`).

Every entry point (``napari_deepr.refocus``, :class:`~napari_deepr.engine.refocus.RefocusJob`,
``refocus_lazy``, ``refocus_file``, the ``deepr`` command, the napari widget, ``deepr bench``)
takes one frozen :class:`RefocusSettings`; the keyword arguments they also accept are its fields.
Types, ranges and everything that needs no model are refused when it is made, in one sentence.

A run then resolves it once: against the model card (tile multiple, default overlap and halo),
against the image (results in memory or streamed to disk) and against the machine (the provider
that actually started, the free memory of the device that holds the activations). The resolved
values are a frozen :class:`Resolved`; the job keeps it as ``job.resolved``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from ..errors import ArgumentTypeError, InputError, SettingsError
from .providers import device_free_memory, provider_traits

PRECISIONS = ("fp32", "fp16", "bf16", "int8")


@dataclass(frozen=True)
class RefocusSettings:
    """How to refocus, as asked (``None``: decided for the model and the machine).

    Attributes
    ----------
    dpm : bool
        Also compute the defocus map in µm with the model's DPM decoder (same layout as the input
        less the joint channel or RGB colour axis): signed defocus or |defocus|, as the card says.
    trust : bool or int
        Also compute a per-pixel trust map in [0, 1] (1 = trust; ≥ 0.5 counts as trustworthy) from
        this many D4 test-time passes (``True``: 8) and a forward-model range test; see
        :mod:`napari_deepr.engine.trust`. Costs one network run per pass.
    tile, overlap, batch, halo : int, optional
        Tile side (a multiple of the model's ``tile_multiple``, 32), overlap between tiles, tiles
        per network call, reflected border halo. Defaults from the card and the device's memory.
    providers : str or tuple of str, optional
        ``cpu``, ``cuda``, ``tensorrt``, ``directml``, ``coreml``, ``openvino``, ``rocm`` (or
        onnxruntime names) in order of preference; CPU is always the fallback and the job's
        ``provider`` says what ran.
    precision : {"fp32", "fp16", "bf16", "int8"}
        ``fp32``: the files as exported. ``bf16``: the float32 graphs in bfloat16 on CPUs with
        AVX512-BF16/AMX through onnxruntime's OpenVINO provider (``onnxruntime-openvino``).
        ``int8``: the model's static-QDQ variant (``generator.int8.onnx``, from ``deepr quantize``).
        ``fp16``: half-precision copies of the graphs on GPU providers
        (:mod:`napari_deepr.engine.fp16`). A reduced precision that fails falls back to float32,
        and a provider that fails to the next one, with one warning. Their quality cost is
        measured (``deepr quantize``), not assumed.
    threads : int, optional
        onnxruntime intra-op threads (default: the usable cores).
    pixel_size_um : float, optional
        The image's pixel size in µm (overrides an ``io.ImageData``'s calibration). Without either
        the pixel size is unknown and the model's is assumed (a note says so).
    resample : bool
        When the pixel size differs from the card's by more than 5 %, resample to the model's
        sampling (anti-aliased), refocus, and resample the results back (default); False runs at
        the input's sampling and warns before the run.
    force_modality : bool
        Run even when the image's modality (RGB or gray) is not the model's.
    stream : bool, optional
        Keep the results a run allocates on disk (``numpy.memmap`` of an anonymous temporary file),
        with the arena off and the tile within :data:`STREAM_TILE_BUDGET`. Default: when they would
        take more than a quarter of free memory (:func:`should_stream`); False forces memory.
    memory_arena : bool, optional
        Keep onnxruntime's CPU memory arena (default on, faster; off when streaming, so resident
        memory stays bounded by the tile in flight).
    memory_budget : int, optional
        Bytes the activations of one host tile may take; the default tile shrinks to fit.
    io_binding, pipeline : bool, optional
        Keep the DPM decoder's inputs on the device; run the network in a worker thread while the
        host prepares the next batch. Default: on where the provider's activations are not the host's.
    """

    dpm: bool = False
    trust: bool | int = False
    tile: int | None = None
    overlap: int | None = None
    batch: int | None = None
    halo: int | None = None
    providers: str | tuple[str, ...] | None = None
    precision: str = "fp32"
    threads: int | None = None
    pixel_size_um: float | None = None
    resample: bool = True
    force_modality: bool = False
    stream: bool | None = None
    memory_arena: bool | None = None
    memory_budget: int | None = None
    io_binding: bool | None = None
    pipeline: bool | None = None

    def __post_init__(self):
        from .domain import check_pixel_size
        from .trust import passes_from

        for name in ("tile", "overlap", "batch", "threads", "halo", "memory_budget"):
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ArgumentTypeError(f"{name} must be a whole number or None, not {type(v).__name__} {v!r}.")
            lo = 0 if name in ("overlap", "halo") else 1
            if v < lo:
                raise SettingsError(f"{name} must be at least {lo}, got {v}.")
        p = self.providers
        if p is not None and not isinstance(p, str):
            if not (isinstance(p, (list, tuple)) and all(isinstance(x, str) for x in p)):
                raise ArgumentTypeError(f"providers must be a name or a list of names, not {type(p).__name__}.")
            object.__setattr__(self, "providers", tuple(p))  # frozen and hashable
        if not isinstance(self.precision, str):
            raise ArgumentTypeError(f"precision must be one of fp32, fp16, bf16, int8, not {self.precision!r}.")
        if self.precision not in PRECISIONS:
            raise InputError(f"Unknown precision '{self.precision}'; use fp32, fp16, bf16 or int8.")
        if self.precision == "bf16" and not _host_only(self.providers):
            raise InputError("bf16 runs on the CPU through the OpenVINO provider; use fp32 on other providers.")
        passes_from(self.trust)
        object.__setattr__(self, "pixel_size_um", check_pixel_size(self.pixel_size_um))

    @property
    def passes(self) -> int:
        """Test-time passes of the trust map (0: none)."""
        from .trust import passes_from

        return passes_from(self.trust)

    def replace(self, **changes) -> RefocusSettings:
        """A copy with ``changes`` (field names of this class), checked like a new one."""
        unknown = sorted(set(changes) - _FIELDS)
        if unknown:
            raise ArgumentTypeError(f"Unknown refocus setting {unknown[0]!r}; the settings are: {', '.join(sorted(_FIELDS))}.")
        return dataclasses.replace(self, **changes)

    @classmethod
    def of(cls, settings: RefocusSettings | None = None, **options) -> RefocusSettings:
        """``settings`` (default: the defaults) with keyword ``options`` applied: how entry points take both."""
        if settings is not None and not isinstance(settings, RefocusSettings):
            raise ArgumentTypeError(f"settings must be a RefocusSettings, not {type(settings).__name__}.")
        base = settings or _DEFAULT
        return base.replace(**options) if options else base


_FIELDS = frozenset(f.name for f in dataclasses.fields(RefocusSettings))
_DEFAULT = RefocusSettings()


def _host_only(providers) -> bool:
    """Whether ``providers`` asks for nothing but the CPU or OpenVINO (bf16 runs only there)."""
    if providers is None or providers == "auto":
        return True
    names = [providers] if isinstance(providers, str) else list(providers)
    return bool(names) and all(provider_traits(n).host for n in names)


@dataclass(frozen=True)
class Resolved:
    """The settings a run uses, resolved against the card, the image and the machine.

    Attributes
    ----------
    settings : RefocusSettings
        What was asked.
    tile, overlap, batch, halo : int
        The tiling.
    streaming : bool
        Results this run allocates live on disk (memory bounded by tiles).
    arena : bool or None
        onnxruntime's CPU memory arena (None: :func:`~napari_deepr.engine.providers.default_arena`).
    memory_budget : int or None
        Bytes one host tile's activations may take.
    io_binding, pipeline : bool
        As in :class:`RefocusSettings`, decided for the provider that started.
    """

    settings: RefocusSettings
    tile: int
    overlap: int
    batch: int
    halo: int
    streaming: bool
    arena: bool | None
    memory_budget: int | None
    io_binding: bool
    pipeline: bool


def check_for_card(settings: RefocusSettings, card) -> None:
    """Refuse a tile or overlap this model cannot use, before any session opens."""
    mult = card.tile_multiple
    overlap = card.overlap if settings.overlap is None else int(settings.overlap)
    tile = settings.tile
    if tile is not None and (int(tile) <= 0 or int(tile) % mult):
        raise InputError(f"Tile size {tile} is not a positive multiple of {mult}, which this model needs.")
    if tile is not None and (overlap < 0 or overlap > int(tile) // 2):
        raise InputError(f"Overlap {overlap} must be between 0 and half the tile ({int(tile) // 2}).")


def streaming_for(settings: RefocusSettings, shape, owned: list[bool]) -> tuple[bool, bool | None, int | None]:
    """``(streaming, arena, memory_budget)`` for an input of ``shape``; ``owned`` says which results
    (output, then each map) the run allocates itself.

    Results that would not fit comfortably in free memory go to disk-backed arrays, and the tile and
    onnxruntime's arena are then bounded too, so a whole slide costs tiles, not its size.
    """
    stream = settings.stream
    if stream is None:
        stream = any(owned) and should_stream(shape, n_maps=len(owned) - 1)
    arena, budget = settings.memory_arena, settings.memory_budget
    if stream:
        arena = False if arena is None else arena
        budget = STREAM_TILE_BUDGET if budget is None else budget
    return bool(stream), arena, budget


def resolve(settings: RefocusSettings, card, work_hw: tuple[int, int], provider: str, *,
            streaming: bool = False, arena: bool | None = None, memory_budget: int | None = None) -> Resolved:
    """Tile, batch, overlap, halo, IO binding and pipeline for the provider that started.

    Tile and batch come from the memory of the device that holds the activations (a GPU's own
    memory when one runs the network, else the host's).

    Raises
    ------
    InputError
        An overlap larger than half the tile chosen.
    """
    traits = provider_traits(provider)
    on_device = not traits.host
    tile, batch = settings.tile, settings.batch
    memory = None
    if not tile or (on_device and not batch):  # asking a GPU costs a call to nvidia-smi (cached)
        memory = (device_free_memory(provider) if on_device else None) or available_memory()
    if tile:
        tile = int(tile)
    elif on_device:
        tile = gpu_tile(card, work_hw, memory, batch=int(batch) if batch else None)
    else:
        tile = auto_tile(card, int(batch or 1), memory=memory, budget_bytes=memory_budget)
    batch = int(batch) if batch else (auto_batch(tile, memory) if on_device else 1)
    overlap = card.overlap if settings.overlap is None else int(settings.overlap)
    if overlap < 0 or overlap > tile // 2:
        raise InputError(f"Overlap {overlap} must be between 0 and half the tile ({tile // 2}).")
    halo = card.halo if settings.halo is None else int(settings.halo)
    # On a device, features for the DPM decoder stay there between the two graphs (IO binding)
    # instead of a round trip through the host; on the host there is nothing to save.
    io_binding = (on_device and traits.binding is not None) if settings.io_binding is None else bool(settings.io_binding)
    # On a device the next batch's tiles are read and normalized, and the last one blended, while the
    # network runs in a worker thread; on the CPU that work would only compete for the same cores.
    pipeline = on_device if settings.pipeline is None else bool(settings.pipeline)
    return Resolved(settings, tile, overlap, batch, halo, streaming, arena, memory_budget, io_binding, pipeline)


# -- memory ----------------------------------------------------------------------------------------
# Peak activation memory of a base-16 five-level U-Net in onnxruntime, bytes per input pixel: an
# estimate (about five live full-resolution tensors of 16-32 channels plus the deeper levels).
BYTES_PER_TILE_PIXEL = 600
#: Results (output, DPM, trust map) taking more than this share of free memory are streamed to disk.
STREAM_MEMORY_FRACTION = 0.25
#: A file whose results would take more than this is refocused disk to disk by the ``deepr`` command
#: even when memory would hold them (a 5800² float32 plane): a whole slide then costs tiles, not its size.
STREAM_FILE_BYTES = 128 << 20
#: Activation bytes of one tile on the streaming path. Measured with the arena off: a 8192² uint16
#: TIFF disk to disk peaks under 2 GB with the tile this allows (docs/PERFORMANCE.md).
STREAM_TILE_BUDGET = 1 << 30
#: Largest default tile on a GPU: an untiled 8192² call fails on CUDA ("Resize: output pitch exceeds
#: supported int range", H200, onnxruntime-gpu 1.31), and at 8192² tiles of up to 4096 were 4.9× faster
#: than 2048 and 6.1× faster than 1024 (batch 4, same run).
GPU_MAX_TILE = 4096


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


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MB."""
    import platform
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if platform.system() != "Darwin" else r / 2**20


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


__all__ = [
    "BYTES_PER_TILE_PIXEL", "GPU_MAX_TILE", "PRECISIONS", "STREAM_FILE_BYTES", "STREAM_MEMORY_FRACTION",
    "STREAM_TILE_BUDGET", "RefocusSettings", "Resolved", "auto_batch", "auto_tile", "available_memory",
    "check_for_card", "gpu_tile", "peak_rss_mb", "resolve", "result_bytes", "should_stream", "streaming_for",
]
