"""Which paths are images, which outputs are napari-deepr's own, and writing outputs atomically.

Outputs are written under a temporary name beside the target (same folder, so the final rename is
atomic) and renamed when complete; only napari-deepr's own previous outputs are replaced without
asking. Temporary names carry the writer's process id, so a later run recognises and removes what
a killed one left. :mod:`napari_deepr.io` re-exports everything here.
"""

from __future__ import annotations

import atexit
import errno
import json
import math
import os
import re
import shutil
import time
import uuid
from pathlib import Path

from .engine.contract import PAIRS_INDEX_FILE
from .errors import OutputError, SettingsError

TIFF_SUFFIXES = (".tif", ".tiff", ".ome.tif", ".ome.tiff", ".btf", ".tf8")
ZARR_SUFFIXES = (".zarr", ".ome.zarr")

# Above this many bytes a TIFF is opened lazily (tile by tile) instead of read into memory.
LAZY_BYTES = 1 << 30
# Private TIFF tag holding napari-deepr's JSON metadata (OME-XML keeps the ImageDescription).
DEEPR_TAG = 65042
# Written inside every folder output (zarr stores, pairs datasets) so that a later run knows the
# folder is a previous output of this tool and may be replaced; any other folder is the user's.
MARKER = ".napari-deepr-output"

#: Pixel sizes (µm) a light microscope can record; a file claiming one outside is not calibrated
#: (1 pixel per inch or per centimetre, the defaults of many writers, gives 25 400 or 10 000 µm).
PLAUSIBLE_PIXEL_UM = (1e-3, 100.0)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suf in sorted(TIFF_SUFFIXES + ZARR_SUFFIXES, key=len, reverse=True):
        if name.endswith(suf):
            return suf
    return path.suffix.lower()


def is_zarr_path(path: str | os.PathLike) -> bool:
    """Whether a path names a zarr store (by suffix or by its metadata files)."""
    p = Path(path)
    if _suffix(p) in ZARR_SUFFIXES:
        return True
    return p.is_dir() and any((p / n).exists() for n in (".zarray", ".zgroup", "zarr.json"))


def is_tiff_path(path: str | os.PathLike) -> bool:
    """Whether a path has a TIFF suffix."""
    return _suffix(Path(path)) in TIFF_SUFFIXES



def _calibration_value(v) -> float | None:
    """A positive finite micrometre value, or ``None`` for missing, text, lists, zero, negative or NaN."""
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError, OverflowError):
        return None
    return f if math.isfinite(f) and f > 0 else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__).rstrip(".")[:200]


# Temporary outputs of this process, removed on any exit Python sees (atexit; the CLI turns SIGTERM
# into an exception so ``finally`` blocks and this hook run). kill -9 cannot be seen: the pid in each
# name lets the next run to the same place recognise and remove what a dead process left.
_LIVE_TEMPS: set[Path] = set()
_PARTIAL_RE = r"^\.{name}\.(?:(\d+)(?:-[0-9a-f]+)?|[0-9a-f]{{8}})\.partial(?:\.zarr)?$"


def _temp_sibling(path: Path) -> Path:
    # Same folder as the target so the final rename is atomic on the same filesystem.
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")
    _LIVE_TEMPS.add(tmp)
    return tmp


def _remove(p: Path) -> None:
    """Remove a file or folder, quietly when it is already gone (another writer, a retry)."""
    _LIVE_TEMPS.discard(p)
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    except OSError:
        pass


@atexit.register
def _remove_live_temps() -> None:
    for p in list(_LIVE_TEMPS):
        _remove(p)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's live process
    return True


def clean_stale_partials(path: str | os.PathLike) -> list[Path]:
    """Remove temporary files that killed runs left beside ``path``.

    Temporary names carry the writer's process id; those whose process is gone are removed. Older
    names without a process id are removed when they have not changed for an hour.

    Returns
    -------
    list of Path
        What was removed.
    """
    path = Path(path)
    folder = path.parent
    pattern = re.compile(_PARTIAL_RE.format(name=re.escape(path.name)))
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for e in entries:
        m = pattern.match(e.name)
        if not m or e in _LIVE_TEMPS:
            continue
        try:
            if m.group(1) is not None:
                stale = not _pid_alive(int(m.group(1)))
            else:
                stale = time.time() - e.lstat().st_mtime > 3600
        except OSError:
            continue
        if stale:
            _remove(e)
            removed.append(e)
    return removed


def is_tool_output(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a previous output of napari-deepr (so it may be replaced without asking).

    Folders carry the :data:`MARKER` file (zarr stores written before the marker existed are
    recognised by their ``napari_deepr`` attributes, pairs datasets by their ``index.json``); TIFF
    files by napari-deepr's private tag.
    """
    p = Path(path)
    if p.is_symlink():
        return False
    if p.is_dir():
        if (p / MARKER).is_file():
            return True
        for meta in (".zattrs", "zarr.json"):
            f = p / meta
            try:
                if f.is_file() and f.stat().st_size < 1 << 20 and '"napari_deepr"' in f.read_text(errors="replace"):
                    return True
            except OSError:
                pass
        try:
            idx = json.loads((p / PAIRS_INDEX_FILE).read_text())
            return isinstance(idx, dict) and idx.get("format") == "napari-deepr-pairs"
        except (OSError, ValueError):
            return False
    if p.is_file() and is_tiff_path(p):
        try:
            import tifffile

            with tifffile.TiffFile(p) as tif:
                return DEEPR_TAG in tif.pages.first.tags
        except Exception:  # noqa: BLE001 - an unreadable TIFF is certainly not one we wrote
            return False
    return False


def _refuse_replace(path: Path) -> OutputError:
    kind = "folder" if path.is_dir() else "file"
    return OutputError(
        f"{path} is an existing {kind} that napari-deepr did not write; choose another output name or pass --overwrite "
        "(overwrite=True) to replace it."
    )


def _finish(tmp: Path, path: Path, overwrite: bool = False) -> None:
    """Move a complete temporary output into place, replacing only what may be replaced.

    A previous folder output is first renamed aside (atomic), so two processes finishing the same
    output at the same instant both succeed (the last one wins) instead of racing in ``rmtree``.
    """
    if path.is_dir() and not tmp.is_dir():
        raise OutputError(f"{path} is a folder; choose a file name for the output.")
    doubted = False
    for _attempt in range(5):
        if (path.exists() or path.is_symlink()) and not overwrite and not is_tool_output(path):
            # Another writer swapping its output in (renamed aside, not yet replaced) reads as "not
            # ours" for an instant: only what is still not ours a moment later is the user's.
            if doubted:
                raise _refuse_replace(path)
            doubted = True
            time.sleep(0.1)
            continue
        if not tmp.is_dir() or not (path.exists() or path.is_symlink()):
            try:
                os.replace(tmp, path)
                _LIVE_TEMPS.discard(tmp)
                return
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR):
                    raise
                continue  # another writer put a folder there meanwhile: look at it again
        aside = _temp_sibling(path)
        try:
            os.replace(path, aside)
        except FileNotFoundError:
            _LIVE_TEMPS.discard(aside)  # another writer moved it first
            continue
        try:
            os.replace(tmp, path)
            _LIVE_TEMPS.discard(tmp)
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR):
                raise
        finally:
            _remove(aside)
    raise OutputError(f"Other processes kept replacing {path} while this one finished; run again when they are done.")


def check_output_path(
    output: str | os.PathLike,
    *inputs: str | os.PathLike,
    overwrite: bool = False,
    kind: str = "image",
) -> Path:
    """Check an output path before any computing, so a run never ends in a refusal.

    Parameters
    ----------
    output : str or Path
        Where the output goes.
    *inputs : str or Path
        Paths handed in (``None`` entries are ignored). The output may be none of them, may not hold
        one (replacing it would delete the input), and may not lie inside one (inputs are never modified).
    overwrite : bool
        Allow replacing an existing output that napari-deepr did not write.
    kind : {"image", "folder", "file"}
        ``"image"``: a TIFF/OME-TIFF/zarr path; ``"folder"``: an output folder (pairs, models, samples);
        ``"file"``: any file (JSON reports).

    Returns
    -------
    Path
        The resolved output path.

    Raises
    ------
    OutputError, SettingsError
        With one sentence.
    """
    if not isinstance(output, (str, os.PathLike)) or not str(output):
        raise SettingsError(f"The output path must be a non-empty string or Path, not {output!r}.")
    try:
        out = Path(output).expanduser().resolve()
    except (OSError, RuntimeError) as exc:  # a symbolic link loop
        raise OutputError(f"The output path {output} cannot be resolved ({_first_line(exc)}).") from exc
    if kind == "image" and _suffix(out) not in TIFF_SUFFIXES + ZARR_SUFFIXES:
        raise SettingsError(f"{out.name}: output must end in .tif, .tiff, .ome.tif or .zarr.")
    for inp in inputs:
        if inp is None:
            continue
        try:
            src = Path(inp).expanduser().resolve()
        except (OSError, RuntimeError):
            continue
        if src == out:
            raise OutputError(f"The output path {Path(output).name} is the input; choose another name so the input is kept.")
        if out in src.parents:
            raise OutputError(f"The output {out} holds the input {src.name}; replacing it would delete the input, so choose another output.")
        if src in out.parents:
            raise OutputError(f"The output {out.name} lies inside the input {src}; inputs are never modified, so write it elsewhere.")
    parent = out.parent
    if kind == "folder":  # an output folder's missing parents are created, as mkdir -p would
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
    if not parent.exists():
        raise OutputError(f"The output folder {parent} does not exist.")
    if not parent.is_dir():
        raise OutputError(f"{parent} is a file, not a folder, so {out.name} cannot be written there.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"The output folder {parent} is not writable.")
    if out.exists() or out.is_symlink():
        is_folder_out = kind == "folder" or (kind == "image" and _suffix(out) in ZARR_SUFFIXES)
        if out.is_dir() and not is_folder_out:
            raise OutputError(f"{out} is a folder; choose a file name for the output.")
        if not out.is_dir() and kind == "folder":
            raise OutputError(f"{out} is a file; choose a folder name for the output.")
        if not overwrite and not is_tool_output(out) and not (kind == "folder" and out.is_dir() and not any(out.iterdir())):
            raise _refuse_replace(out)
    return out

