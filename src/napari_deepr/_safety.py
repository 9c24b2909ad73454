"""Checks made before any computing, and temporary files that never outlive their process.

Kept apart from the engine, the writers and the trainer so that each entry point calls it in one line:

* **Free space.** What each output will take is known before the run (shape and type of the result,
  the DPM and the trust map; the crops of a pairs dataset), so a run that cannot be written is refused
  at once with one sentence (how much is needed, how much is free, where) instead of failing after
  hours of computing. Zarr outputs are compressed: the uncompressed size is used as the bound.
* **Halo memory.** A model card's border halo is added to every tile; when the tile that halo makes
  does not fit in memory but the tile without it would, the refusal names the halo.
* **Temporaries.** Every temporary file or folder goes through :mod:`napari_deepr.io`'s scheme: a
  hidden ``.NAME.<pid>-<random>.partial`` sibling of the final path, removed on any exit Python sees
  (``finally``, ``atexit``; the ``deepr`` command turns SIGTERM into an exception), and removed by the
  next run to the same place when a ``kill -9`` left it (its process id is dead).

Nothing here imports torch, Qt or onnxruntime.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from .errors import ModelError, NoSpaceError

# -- free space ------------------------------------------------------------------------------------
#: Headers, OME-XML, JSON metadata and the marker file of one output, in bytes (a generous bound).
OUTPUT_OVERHEAD = 1 << 20
#: A file occupies whole filesystem blocks: counted once per zarr chunk file and per pairs crop.
BLOCK = 4096
#: Side of the TIFF tiles a streamed or large TIFF is written in (``io._write_tiff``): edge tiles are full.
TIFF_TILE = 256
#: Largest zarr chunk side along Y and X (``io._zarr_chunks``): edge chunks are stored full-size.
ZARR_CHUNK = 1024


def _round_up(n: int, m: int) -> int:
    return -(-int(n) // m) * m


def image_bytes(path, shape, dtype, axes: str | None = None) -> int:
    """An upper bound of the bytes :func:`napari_deepr.io.write_image` puts on disk for an array.

    TIFF: the pixels, with Y and X rounded up to whole 256-px tiles (edge tiles are stored full), plus
    headers. Zarr: the pixels uncompressed, with Y and X rounded up to whole chunks, plus a filesystem
    block per chunk file -- the stores are compressed, which shrinks them (incompressible chunks grow
    by a frame header of a few bytes, covered by that block), so this bounds them from above.
    """
    from . import io

    shape = tuple(int(s) for s in shape)
    item = np.dtype(dtype).itemsize
    if axes is None or len(axes) != len(shape) or "X" not in axes:
        try:
            axes = io._guess_axes(shape)
        except Exception:  # noqa: BLE001 - not an image: count its bytes
            return math.prod(shape) * item + OUTPUT_OVERHEAD
    yi, xi = (axes.index("Y") if "Y" in axes else None), axes.index("X")
    dims = list(shape)
    if io.is_zarr_path(path):
        for i in (yi, xi):
            if i is not None:
                dims[i] = _round_up(dims[i], min(dims[i], ZARR_CHUNK) or 1)
        n_chunks = math.prod(
            -(-s // (min(s, ZARR_CHUNK) or 1)) if a in "YX" else (1 if a == "S" else s) for s, a in zip(shape, axes, strict=True))
        return math.prod(dims) * item + n_chunks * BLOCK + OUTPUT_OVERHEAD
    if yi is not None and min(dims[yi], dims[xi]) >= TIFF_TILE:
        dims[yi], dims[xi] = _round_up(dims[yi], TIFF_TILE), _round_up(dims[xi], TIFF_TILE)
    planes = math.prod(s for s, a in zip(shape, axes, strict=True) if a not in "YXS")
    tiles = planes * (-(-dims[xi] // TIFF_TILE)) * (-(-(dims[yi] if yi is not None else 1) // TIFF_TILE))
    return math.prod(dims) * item + 16 * tiles + 1024 * planes + OUTPUT_OVERHEAD


def _existing_folder(path: Path) -> Path:
    """The nearest existing folder at or above where ``path`` will be created (its filesystem's)."""
    p = Path(os.path.abspath(path)).parent
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _size(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def check_free_space(needs: Iterable[tuple[str | os.PathLike, int]]) -> None:
    """Refuse, before any computing, outputs that cannot fit on their disks.

    Parameters
    ----------
    needs : iterable of (path, bytes)
        Each output with the bytes it will take (see :func:`image_bytes`). Outputs on one filesystem
        are added up: a run writes all of them, and the old output they replace is removed only after
        the new one is complete, so the space it holds does not count as free.

    Raises
    ------
    NoSpaceError
        One sentence: what needs how much, how much is free, where. Where free space cannot be
        known (``disk_usage`` fails) nothing is refused; the writers still report a full disk.
    """
    groups: dict[int, list] = {}
    for path, nbytes in needs:
        if not nbytes or path is None:
            continue
        folder = _existing_folder(Path(path))
        try:
            dev = folder.stat().st_dev
        except OSError:
            continue
        g = groups.setdefault(dev, [folder, 0, []])
        g[1] += int(nbytes)
        g[2].append(Path(path).name)
    for folder, need, names in groups.values():
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            continue
        if need > free:
            what = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
            raise NoSpaceError(
                f"Writing {what} needs about {_size(need)} but only {_size(free)} is free on the disk holding "
                f"{folder}; free some space or write to another disk."
            )


def write_failed(path: str | os.PathLike, exc: OSError):
    """The one-sentence :class:`~napari_deepr.errors.OutputError` for a write that failed midway (disk full, ...)."""
    import errno

    from .errors import OutputError

    if isinstance(exc, OutputError):
        return exc
    reason = {errno.ENOSPC: "the disk is full", errno.EROFS: "the disk is read-only", errno.EACCES: "permission denied",
              errno.EDQUOT: "the disk quota is exceeded"}.get(exc.errno)
    if reason is None:
        text = (str(exc.strerror or exc).strip().splitlines() or [type(exc).__name__])[0]
        reason = text.rstrip(".")[:200]
    return OutputError(f"{Path(path).name} could not be written ({reason}); nothing was replaced.")


def refocus_needs(output, shape, axes: str, channels: int, dtype, *, dpm=None, trust=None, rgb: bool = False,
                  streamed: bool = False) -> list[tuple[Path, int]]:
    """What ``deepr refocus`` (or :func:`~napari_deepr.engine.distributed.refocus_file`) will write.

    The refocused image keeps the input's shape, float32 (an RGB image in memory, or ``rgb`` -- the
    modality verdict says RGB: the input's type);
    the DPM and the trust map drop the joint channel and colour axes, float32. Streamed runs first
    fill a float32 zarr store beside each output; a TIFF output is then written from it, so both exist
    at once. (A float image whose refocused values overflow float32 is promoted to float64 in memory;
    that rare case can need twice the estimate and is then reported by the writer.)
    """
    from .layout import image_layout

    shape = tuple(int(s) for s in shape)
    lay = image_layout(shape, axes, channels)
    rgb = rgb or lay.rgb_axis is not None
    map_shape, map_axes = lay.map_shape, lay.map_axes
    out_type = np.dtype(dtype) if (rgb and not streamed) else np.dtype(np.float32)
    needs = []
    for path, shp, ax, typ in ((output, shape, axes, out_type), (dpm, map_shape, map_axes, np.float32),
                               (trust, map_shape, map_axes, np.float32)):
        if not path:
            continue
        path = Path(path)
        n = image_bytes(path, shp, typ, ax)
        if streamed and not _is_zarr(path):
            n += image_bytes(path.with_name(path.name + ".zarr"), shp, np.float32, ax)  # the scratch store
        needs.append((path, n))
    return needs


def _is_zarr(path: Path) -> bool:
    from . import io

    return io.is_zarr_path(path)


def pairs_bytes(fields, patch: int, range_um: float) -> int:
    """An upper bound of a pairs dataset's size: every crop with every plane within the range, float32.

    Each field gives ``(Y // patch) × (X // patch)`` crops of at most ``2·⌊range/z-step⌋ + 1`` planes
    (fewer where the in-focus plane is near the stack's end), one TIFF each, plus ``index.json``.
    """
    total = OUTPUT_OVERHEAD
    for f in fields:
        z, y, x = (int(s) for s in f.data.shape[:3])
        half = int(np.floor(range_um / f.z_step_um + 1e-6))
        planes = min(z, 2 * half + 1)
        crops = (y // patch) * (x // patch)
        crop_file = _round_up(planes * patch * patch * 4 + 8192, BLOCK)
        total += crops * (crop_file + 600 + 160 * planes)  # the TIFF, and its crop and pair entries in index.json
    return total


# -- halo memory -----------------------------------------------------------------------------------
def check_halo_memory(job, halo: int) -> None:
    """Refuse a run whose tiles the card's halo has grown past free memory (the halo named as the cause).

    A small image runs as one tile of its own size plus the halo on both sides (``plan_axis``), so a
    large halo makes the tile larger than the tile size asked for. When that tile's activations
    (:data:`~napari_deepr.engine.settings.BYTES_PER_TILE_PIXEL`) do not fit in free memory but the tile
    without the halo would, the run would only end in "not enough memory"; it is refused here instead.
    """
    from .engine.model import MAX_HALO
    from .engine.providers import device_free_memory, provider_traits
    from .engine.settings import BYTES_PER_TILE_PIXEL, available_memory
    from .engine.tiling import plan_axis

    if not halo:
        return
    per_tile = job.batch * BYTES_PER_TILE_PIXEL
    need = job.plan_y.tile * job.plan_x.tile * per_tile
    mult = job.model.card.tile_multiple
    bare = [plan_axis(p.length, job.tile, job.overlap, mult, 0).tile for p in (job.plan_y, job.plan_x)]
    if need <= bare[0] * bare[1] * per_tile:
        return  # the halo did not make the tile larger
    # The memory that holds the activations: the device's own (asked as its trait row says) or the host's.
    free = None if provider_traits(job.provider).host else device_free_memory(job.provider)
    free = free or available_memory()
    if need > free >= bare[0] * bare[1] * per_tile:
        from_card = halo == job.model.card.halo  # else the caller's own halo= argument
        who, fix = ("The model card's", "lower 'halo' in its model.json") if from_card else ("A", "pass a smaller halo")
        raise ModelError(
            f"{who} halo of {halo} px grows each tile to {job.plan_y.tile}×{job.plan_x.tile} px, which needs about "
            f"{_size(need)} of memory while {_size(free)} is free; {fix} (a few tens of pixels are usual, at most "
            f"{MAX_HALO})."
        )


# -- figures ---------------------------------------------------------------------------------------
#: The PNG ``Software`` text chunk of figures napari-deepr writes (how a later run knows one is its own).
FIGURE_SOFTWARE = "napari-deepr"


def _our_figure(path: Path) -> bool:
    try:
        from PIL import Image

        with Image.open(path) as im:
            return im.info.get("Software") == FIGURE_SOFTWARE
    except Exception:  # noqa: BLE001 - not a PNG we can read, so certainly not one we wrote
        return False


def check_own_outputs(folder: str | os.PathLike, names: Iterable[str], what: str = "the demo") -> None:
    """Refuse, before any computing, to put outputs over files in ``folder`` that napari-deepr did not write.

    TIFFs and folders are recognised as in :func:`napari_deepr.io.is_tool_output`, PNG figures by
    their ``Software`` chunk (:func:`save_figure`).
    """
    from . import io
    from .errors import OutputError

    for name in names:
        p = Path(folder) / name
        if not (p.exists() or p.is_symlink()):
            continue
        ours = _our_figure(p) if p.suffix.lower() == ".png" and p.is_file() and not p.is_symlink() else io.is_tool_output(p)
        if not ours:
            raise OutputError(f"{p} is an existing file that napari-deepr did not write, and {what} does not replace it; "
                              "choose another output folder with -o.")


def save_figure(fig, path: str | os.PathLike, **kwargs) -> Path:
    """Save a matplotlib figure as PNG, tagged as ours, under a temporary name renamed when complete."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": FIGURE_SOFTWARE}, **kwargs)
    return path


# -- temporaries -----------------------------------------------------------------------------------
@contextlib.contextmanager
def temporary_beside(path: str | os.PathLike, *, folder: bool = False) -> Iterator[Path]:
    """A pid-named temporary sibling of ``path`` (``.NAME.<pid>-<hex>.partial``), removed on any exit.

    Temporaries that killed runs left beside ``path`` (their process is gone) are removed first. The
    caller moves the finished temporary into place with :func:`os.replace` inside the ``with`` block.
    """
    from . import io

    path = Path(path)
    io.clean_stale_partials(path)
    tmp = io._temp_sibling(path)
    try:
        if folder:
            tmp.mkdir()
        yield tmp
    finally:
        io._remove(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Write to the yielded temporary path; on success it replaces ``path`` in one rename."""
    path = Path(path)
    with temporary_beside(path) as tmp:
        yield tmp
        os.replace(tmp, path)


@contextlib.contextmanager
def tempdir_inside(folder: Path) -> Iterator[None]:
    """Route :mod:`tempfile`'s default folder into ``folder`` for a while (libraries' own temporaries).

    onnxruntime's quantization tools write their scratch models with ``tempfile.TemporaryDirectory()``;
    inside our own pid-named temporary folder they go wherever it goes, even after ``kill -9``.
    """
    old = tempfile.tempdir
    tempfile.tempdir = str(folder)
    try:
        yield
    finally:
        tempfile.tempdir = old
