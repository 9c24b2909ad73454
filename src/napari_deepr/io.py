"""Reading images and z-stacks with their calibration, and writing outputs atomically.

Everything here is Qt-free and torch-free. Axes follow tifffile's letters: ``T`` time, ``Z`` depth,
``C`` channel, ``Y``/``X`` space and ``S`` samples (RGB). Pixel sizes are in micrometres.
"""

from __future__ import annotations

import atexit
import errno
import json
import math
import os
import re
import shutil
import stat
import struct
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError, OutputError, SettingsError

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
#: Length units in ImageJ's ``unit`` field, in µm; "pixel" (ImageJ's default) or none means uncalibrated.
_IJ_UNITS = {"micron": 1.0, "microns": 1.0, "um": 1.0, "µm": 1.0, "\\u00b5m": 1.0, "μm": 1.0, "nm": 1e-3,
             "nanometer": 1e-3, "mm": 1e3, "millimeter": 1e3, "cm": 1e4, "m": 1e6, "meter": 1e6}


@dataclass
class ImageData:
    """An image or stack with its calibration.

    Attributes
    ----------
    data : array-like
        numpy array, or a dask array for large or chunked files.
    axes : str
        One letter per dimension of ``data`` (e.g. ``"ZYX"``, ``"YXS"``).
    pixel_size_um : float or None
        Lateral pixel size in micrometres, ``None`` when the file does not say (uncalibrated files
        are "pixel size unknown", never 1 µm; ``metadata["pixel_size_source"]`` says where a known
        one came from).
    z_step_um : float or None
        Axial step in micrometres for stacks, ``None`` when unknown.
    metadata : dict
        Anything else worth keeping (source path, description, OME fields).
    """

    data: Any
    axes: str
    pixel_size_um: float | None = None
    z_step_um: float | None = None
    metadata: dict = field(default_factory=dict)
    name: str = ""

    @property
    def pixel_size_known(self) -> bool:
        """Whether the lateral pixel size is known (from the file or given by the user)."""
        return self.pixel_size_um is not None

    @property
    def scale(self) -> tuple[float, ...]:
        """napari scale per axis (µm for Z, Y, X; 1 elsewhere)."""
        out = []
        for ax in self.axes:
            if ax in "YX" and self.pixel_size_um:
                out.append(float(self.pixel_size_um))
            elif ax == "Z" and self.z_step_um:
                out.append(float(self.z_step_um))
            else:
                out.append(1.0)
        return tuple(out)


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


def _tiff_calibration(tif) -> tuple[float | None, float | None, dict]:
    """Pixel size and z step from OME, ImageJ or resolution tags; ``None`` when the file is uncalibrated.

    Uncalibrated means: no resolution tags; resolution 1/1 (the default of ImageJ and most writers,
    whatever the unit); ImageJ's unit "pixel" or no unit; or a size no light microscope records
    (outside :data:`PLAUSIBLE_PIXEL_UM`). ``meta["pixel_size_source"]`` names the source of a known one.
    """
    meta: dict = {}
    px = dz = None
    source = None
    if tif.is_ome and tif.ome_metadata:
        import xml.etree.ElementTree as ET

        try:
            root = ET.fromstring(tif.ome_metadata)
            pix = next(el for el in root.iter() if el.tag.endswith("Pixels"))
            units = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "m": 1e6}
            if pix.get("PhysicalSizeX") and pix.get("PhysicalSizeXUnit", "µm") in units:
                px = float(pix.get("PhysicalSizeX")) * units[pix.get("PhysicalSizeXUnit", "µm")]
                source = "OME"
            if pix.get("PhysicalSizeZ"):
                dz = float(pix.get("PhysicalSizeZ")) * units.get(pix.get("PhysicalSizeZUnit", "µm"), 1.0)
        except (ET.ParseError, StopIteration, ValueError):
            pass
    ij = tif.imagej_metadata or {}
    if ij:
        meta["imagej"] = {k: v for k, v in ij.items() if isinstance(v, (int, float, str))}
        if dz is None and ij.get("spacing"):
            dz = ij["spacing"]
    page = tif.pages.first
    desc = page.tags[DEEPR_TAG].value if DEEPR_TAG in page.tags else (page.description or "")
    if isinstance(desc, str) and desc.startswith("{"):
        try:
            d = json.loads(desc)
        except (json.JSONDecodeError, RecursionError):
            d = None
        if isinstance(d, dict):
            meta["description"] = d
            if px is None and d.get("pixel_size_um"):
                px, source = d.get("pixel_size_um"), "napari-deepr metadata"
            dz = dz or d.get("z_step_um")
    if px is None and "XResolution" in page.tags and len(page.tags["XResolution"].value) == 2:
        num, den = page.tags["XResolution"].value
        unit = int(page.tags["ResolutionUnit"].value) if "ResolutionUnit" in page.tags else 1
        res = num / den if den else 0
        if res > 0:  # 1/1 per inch or cm (writers' defaults) falls out as implausible below
            if ij:
                unit_um = _IJ_UNITS.get(str(ij.get("unit") or "").strip().lower())
                if unit_um is not None:  # "pixel" or no unit: ImageJ's uncalibrated image
                    px, source = unit_um / res, "ImageJ"
            elif unit == 3:  # centimetre
                px, source = 1e4 / res, "resolution tags"
            elif unit == 2 and res not in (72.0, 96.0, 300.0):  # inch; 72/96/300 dpi are screen and print defaults
                px, source = 25400.0 / res, "resolution tags"
    px_ok, dz_ok = _calibration_value(px), _calibration_value(dz)
    bad = [f"{k}={v!r}" for k, v, ok in (("pixel size", px, px_ok), ("z step", dz, dz_ok)) if v is not None and ok is None]
    if bad:
        # Corrupt calibration is treated as unknown (never guessed), and the reason is kept.
        meta["calibration_ignored"] = "invalid " + ", ".join(bad)
    px, dz = px_ok, dz_ok
    if px is not None and not (PLAUSIBLE_PIXEL_UM[0] <= px <= PLAUSIBLE_PIXEL_UM[1]):
        meta["pixel_size_ignored"] = f"{px:g} µm is not a microscope's sampling; treated as unknown"
        px, source = None, None
    if px is not None:
        meta["pixel_size_source"] = source
    return (px, dz, meta)


def _calibration_value(v) -> float | None:
    """A positive finite micrometre value, or ``None`` for missing, text, lists, zero, negative or NaN."""
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError, OverflowError):
        return None
    return f if math.isfinite(f) and f > 0 else None


def _read_tiff(path: Path) -> list[ImageData]:
    import tifffile

    try:
        tif = tifffile.TiffFile(path)
    except (tifffile.TiffFileError, ValueError, OSError, IndexError, KeyError, struct.error) as exc:
        raise InputError(f"{path.name} is not a readable TIFF image ({_first_line(exc)}).") from exc
    try:
        with tif:
            return _read_tiff_series(path, tif)
    except InputError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # tifffile and its codecs raise many types for damaged or unusual files
        msg = _first_line(exc)
        if "imagecodecs" in msg:
            raise InputError(
                f"{path.name} is compressed in a way that needs the imagecodecs package; install it with 'pip install imagecodecs'."
            ) from exc
        raise InputError(f"{path.name} could not be read; it may be truncated or damaged ({msg}).") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__).rstrip(".")[:200]


def _read_tiff_series(path: Path, tif) -> list[ImageData]:
    import tifffile

    out = []
    px, dz, meta = _tiff_calibration(tif)
    for i, series in enumerate(tif.series):
        axes = series.axes.replace("Q", "Z").replace("I", "Z")
        nbytes = int(np.prod(series.shape)) * series.dtype.itemsize
        if nbytes > LAZY_BYTES:
            import dask.array as da
            import zarr

            store = tifffile.imread(path, aszarr=True, series=i)
            data = da.from_zarr(zarr.open(store, mode="r"))
        else:
            data = series.asarray()
        name = path.name.split(".")[0] + (f" [{i}]" if len(tif.series) > 1 else "")
        out.append(ImageData(data, axes, px, dz, dict(meta, source=str(path), series=i), name))
    if not out:
        raise InputError(f"{path.name} holds no image data.")
    return out


def _read_zarr(path: Path) -> list[ImageData]:
    try:
        return _read_zarr_store(path)
    except InputError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # zarr and hand-written OME metadata fail in many ways
        raise InputError(f"{path.name} is not a readable zarr image ({_first_line(exc)}).") from exc


def _read_zarr_store(path: Path) -> list[ImageData]:
    import dask.array as da
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:  # zarr raises many kinds of errors for non-stores
        raise InputError(f"{path.name} is not a readable zarr store ({_first_line(exc)}).") from exc
    attrs = dict(node.attrs)
    axes = None
    px = dz = None
    if isinstance(node, zarr.Array):
        arr = node
    else:
        ms = attrs.get("multiscales") or (attrs.get("ome") or {}).get("multiscales")
        if not ms:
            keys = list(node.array_keys())
            if not keys:
                raise InputError(f"{path.name} holds no image array.")
            arr = node[keys[0]]
        else:
            try:
                ds = ms[0]["datasets"][0]
                arr = node[ds["path"]]
                ax = ms[0].get("axes")
                if ax:
                    axes = "".join((a["name"] if isinstance(a, dict) else a).upper()[0] for a in ax)
                units = {"micrometer": 1.0, "nanometer": 1e-3, "millimeter": 1e3}
                ax_units = {((a["name"] if isinstance(a, dict) else a).upper()[0]): units.get(a.get("unit")) if isinstance(a, dict) else None
                            for a in (ax or [])}
                for tr in ds.get("coordinateTransformations", []):
                    if tr.get("type") == "scale" and axes:
                        sc = dict(zip(axes, tr["scale"], strict=False))
                        # A scale without a length unit is in pixels: uncalibrated, not 1 µm.
                        if ax_units.get("X") and sc.get("X"):
                            px = sc["X"] * ax_units["X"]
                        if ax_units.get("Z") and sc.get("Z"):
                            dz = sc["Z"] * ax_units["Z"]
            except (KeyError, IndexError, TypeError, AttributeError) as exc:
                raise InputError(
                    f"{path.name} has malformed OME-Zarr multiscales metadata ({type(exc).__name__}: {_first_line(exc)})."
                ) from exc
    attrs_arr = dict(arr.attrs)
    axes = axes or attrs_arr.get("axes") or attrs.get("axes")
    if "pixel_size_um" in attrs and attrs.get("pixel_size_um") is None:
        px = None  # written by napari-deepr as uncalibrated (older stores still carry a µm unit on scale 1)
    px = px or attrs_arr.get("pixel_size_um") or attrs.get("pixel_size_um")
    dz = dz or attrs_arr.get("z_step_um") or attrs.get("z_step_um")
    if axes is None:
        axes = _guess_axes(arr.shape)
    if not isinstance(axes, str) or len(axes) != len(arr.shape):
        raise InputError(f"{path.name} names axes {axes!r} for an array with {len(arr.shape)} dimensions.")
    data = da.from_zarr(arr)
    return [ImageData(data, axes.upper(), _calibration_value(px), _calibration_value(dz), {"source": str(path)},
                      path.name.split(".")[0])]


def _guess_axes(shape: tuple[int, ...]) -> str:
    rgb = shape[-1] in (3, 4) and len(shape) >= 3
    spatial = "YXS" if rgb else "YX"
    lead = len(shape) - len(spatial)
    if lead < 0:
        raise InputError(f"An array of shape {shape} is not an image; at least 2 dimensions are needed.")
    return "TZC"[3 - lead:] + spatial if lead <= 3 else "T" * (lead - 2) + "ZC" + spatial


def read_images(path: str | os.PathLike) -> list[ImageData]:
    """Read every image series of a TIFF/OME-TIFF/ImageJ file, a zarr store or a folder.

    Parameters
    ----------
    path : str or Path
        A file, a zarr store, or a folder holding TIFF files (read in name order).

    Returns
    -------
    list of ImageData
        One entry per series (multi-position files give several).
    """
    p = _existing_input(path)
    if is_zarr_path(p):
        return _read_zarr(p)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if (is_tiff_path(f) or is_zarr_path(f)) and not f.name.startswith("."))
        if not files:
            raise InputError(f"The folder {p.name} holds no TIFF or zarr images.")
        return [img for f in files for img in read_images(f)]
    if not is_tiff_path(p):
        raise InputError(f"{p.name} is not a TIFF, OME-TIFF or zarr image.")
    return _read_tiff(p)


def _existing_input(path) -> Path:
    """The input path, refused in one sentence when it cannot be read without hanging or looping."""
    if not isinstance(path, (str, os.PathLike)):
        from .errors import ArgumentTypeError

        raise ArgumentTypeError(f"An image path must be a string or Path, not {type(path).__name__}.")
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        if p.is_symlink():
            raise InputError(f"{p} is a symbolic link to something that does not exist.") from None
        raise InputError(f"{p} does not exist.") from None
    except PermissionError:
        raise InputError(f"{p} cannot be read (permission denied).") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError(f"{p} is a symbolic link loop, so there is no file to read.") from None
        raise InputError(f"{p} cannot be read ({exc.strerror or exc}).") from None
    # A FIFO, socket or device would block the reader forever or stream endless bytes.
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise InputError(f"{p.name} is not a regular file (a pipe, socket or device); save the image to a file first.")
    if stat.S_ISREG(st.st_mode) and not os.access(p, os.R_OK):
        raise InputError(f"{p} cannot be read (permission denied).")
    return p


def read_image(path: str | os.PathLike) -> ImageData:
    """Read the first image series of a file or store, with its calibration."""
    return read_images(path)[0]


def read_stack(path: str | os.PathLike) -> ImageData:
    """Read a z-stack as ``(Z, Y, X)`` (channels/time dropped to the first index).

    Raises
    ------
    InputError
        If the file holds no Z axis with more than one plane.
    """
    return _as_zstack(read_image(path))


def read_stacks(path: str | os.PathLike) -> list[ImageData]:
    """Every z-stack in a file (all positions) or a folder, each as ``(Z, Y, X)``."""
    return [_as_zstack(img) for img in read_images(path)]


def _as_zstack(img: ImageData) -> ImageData:
    data, axes = img.data, img.axes
    if "Z" not in axes and len(axes) == 3 and "S" not in axes:
        axes = axes[0].replace(axes[0], "Z") + axes[1:]
    if "Z" not in axes:
        raise InputError(f"{img.name or 'The image'} has no z axis; a z-stack with several planes is needed.")
    index = []
    for ax in axes:
        index.append(slice(None) if ax in "ZYX" else 0)
    data = data[tuple(index)]
    new_axes = "".join(ax for ax in axes if ax in "ZYX")
    if new_axes != "ZYX":
        data = np.moveaxis(np.asarray(data), [new_axes.index(a) for a in "ZYX"], [0, 1, 2])
    return ImageData(data, "ZYX", img.pixel_size_um, img.z_step_um, img.metadata, img.name)


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
    import time

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
            idx = json.loads((p / "index.json").read_text())
            return isinstance(idx, dict) and idx.get("format") == "napari-deepr-pairs"
        except (OSError, ValueError):
            return False
    if p.is_file() and is_tiff_path(p):
        try:
            import tifffile

            with tifffile.TiffFile(p) as tif:
                return DEEPR_TAG in tif.pages.first.tags
        except Exception:  # an unreadable TIFF is certainly not one we wrote
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
    for _attempt in range(5):
        if (path.exists() or path.is_symlink()) and not overwrite and not is_tool_output(path):
            raise _refuse_replace(path)
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


def write_image(
    path: str | os.PathLike,
    data,
    *,
    axes: str | None = None,
    pixel_size_um: float | None = None,
    z_step_um: float | None = None,
    metadata: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an image as calibrated (OME-)TIFF or zarr under a temporary name, then rename.

    Parameters
    ----------
    path : str or Path
        ``.tif``/``.tiff``/``.ome.tif`` write a TIFF (BigTIFF when large) carrying OME pixel sizes,
        resolution tags and a JSON description; ``.zarr`` writes an OME-Zarr style single-scale store.
    data : array-like
        numpy or dask array.
    axes : str, optional
        One letter per dimension; guessed from the shape if omitted.
    pixel_size_um, z_step_um : float, optional
        Calibration in micrometres.
    metadata : dict, optional
        JSON-serializable facts stored beside the pixels (model name, provider, ...).
    overwrite : bool
        Replace an existing file or folder that napari-deepr did not write (its own previous
        outputs are always replaced).

    Returns
    -------
    Path
        The written path.
    """
    path = Path(path)
    if _suffix(path) not in TIFF_SUFFIXES + ZARR_SUFFIXES:
        raise SettingsError(f"{path.name}: output must end in .tif, .tiff, .ome.tif or .zarr.")
    axes = (axes or _guess_axes(tuple(data.shape))).upper()
    if len(axes) != data.ndim:
        raise InputError(f"Axes {axes!r} do not match an array with {data.ndim} dimensions.")
    if len(set(axes)) != len(axes) or not set(axes) <= set("TZCYXS"):
        raise InputError(f"Axes {axes!r} must be distinct letters from T, Z, C, Y, X and S.")
    meta = dict(metadata or {})
    meta.update(axes=axes, pixel_size_um=_calibration_value(pixel_size_um), z_step_um=_calibration_value(z_step_um))
    if not (path.parent.is_dir() and os.access(path.parent, os.W_OK | os.X_OK)):
        raise OutputError(f"The output folder {path.parent} does not exist or is not writable.")
    if (path.exists() or path.is_symlink()) and not overwrite and not is_tool_output(path):
        raise _refuse_replace(path)
    from ._safety import check_free_space, image_bytes  # refused before anything is written

    check_free_space([(path, image_bytes(path, data.shape, data.dtype, axes))])
    clean_stale_partials(path)
    tmp = _temp_sibling(path)
    try:
        if _suffix(path) in ZARR_SUFFIXES:
            _write_zarr(tmp, data, axes, meta["pixel_size_um"], meta["z_step_um"], meta)
            (tmp / MARKER).write_text("written by napari-deepr; this folder may be replaced by its next run\n")
        else:
            _write_tiff(tmp, data, axes, meta["pixel_size_um"], meta["z_step_um"], meta)
        _finish(tmp, path, overwrite)
    except OSError as exc:
        if isinstance(exc, OutputError):
            raise
        reason = {errno.ENOSPC: "the disk is full", errno.EROFS: "the disk is read-only",
                  errno.EACCES: "permission denied", errno.EDQUOT: "the disk quota is exceeded"}.get(exc.errno, _first_line(exc))
        raise OutputError(f"{path.name} could not be written ({reason}); nothing was replaced.") from exc
    finally:
        _remove(tmp)
    return path


def _json_safe(meta: dict) -> dict:
    return json.loads(json.dumps(meta, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def _write_tiff(tmp: Path, data, axes, px, dz, meta) -> None:
    import tifffile

    # OME-TIFF stores planes of Y×X (×S samples): other axes go in front, in their own order
    # (a channel-last YXC array would otherwise be stored as Y planes of X×C).
    order = [i for i, a in enumerate(axes) if a not in "YXS"] + [axes.index("Y"), axes.index("X")] + (
        [axes.index("S")] if "S" in axes else [])
    if order != list(range(len(axes))):
        data = data.transpose(order)
        axes = "".join(axes[i] for i in order)
    ome_meta: dict[str, Any] = {"axes": axes}
    if px:
        ome_meta.update(PhysicalSizeX=px, PhysicalSizeY=px, PhysicalSizeXUnit="µm", PhysicalSizeYUnit="µm")
    if dz and "Z" in axes:
        ome_meta.update(PhysicalSizeZ=dz, PhysicalSizeZUnit="µm")
    nbytes = int(np.prod(data.shape)) * np.dtype(data.dtype).itemsize
    kwargs: dict[str, Any] = dict(bigtiff=nbytes > 2**31 - 2**25, ome=True, metadata=ome_meta)
    if px:
        kwargs.update(resolution=(1e4 / px, 1e4 / px), resolutionunit="CENTIMETER")
    # OME-XML owns the ImageDescription; our facts ride in a private tag as JSON.
    kwargs["extratags"] = [(DEEPR_TAG, "s", 0, json.dumps(_json_safe(meta)), True)]
    if hasattr(data, "dask") or nbytes > LAZY_BYTES:
        # Stream plane tiles so peak memory is one tile, not the image.
        ysz, xsz = _yx_shape(data.shape, axes)
        tile = (256, 256) if min(ysz, xsz) >= 256 else None
        kwargs["tile"] = tile
        with tifffile.TiffWriter(tmp, bigtiff=kwargs.pop("bigtiff"), ome=True) as tw:
            kwargs.pop("ome")
            tw.write(_tile_iter(data, axes, tile), shape=data.shape, dtype=data.dtype, **kwargs)
    else:
        tifffile.imwrite(tmp, np.asarray(data), **kwargs)


def _yx_shape(shape, axes):
    return shape[axes.index("Y")], shape[axes.index("X")]


def _tile_iter(data, axes, tile):
    """Yield TIFF tiles (or whole planes) in the order tifffile expects."""
    yi, xi = axes.index("Y"), axes.index("X")
    lead = [i for i in range(len(axes)) if axes[i] not in "YXS"]
    ny, nx = data.shape[yi], data.shape[xi]
    for idx in np.ndindex(*[data.shape[i] for i in lead]):
        sl = [slice(None)] * data.ndim
        for i, v in zip(lead, idx, strict=True):
            sl[i] = v
        if tile is None:
            yield np.asarray(data[tuple(sl)])
            continue
        for y0 in range(0, ny, tile[0]):
            for x0 in range(0, nx, tile[1]):
                sl[yi] = slice(y0, min(y0 + tile[0], ny))
                sl[xi] = slice(x0, min(x0 + tile[1], nx))
                yield np.asarray(data[tuple(sl)])


def _write_zarr(tmp: Path, data, axes, px, dz, meta) -> None:
    import dask.array as da

    arr = data if hasattr(data, "dask") else da.from_array(np.asarray(data), chunks=_zarr_chunks(data.shape, axes))
    arr = arr.rechunk(_zarr_chunks(arr.shape, axes))
    da.to_zarr(arr, str(tmp), component="0", overwrite=True)
    write_zarr_attrs(tmp, axes, px, dz, meta)


def _zarr_chunks(shape, axes):
    return tuple(min(s, 1024) if a in "YX" else 1 if a not in "S" else s for s, a in zip(shape, axes, strict=True))


def write_zarr_attrs(store: Path, axes: str, px, dz, meta) -> None:
    """Write OME-NGFF 0.4 style multiscales metadata for a single-scale array ``0``."""
    import zarr

    kinds = {"T": "time", "Z": "space", "Y": "space", "X": "space", "C": "channel", "S": "channel"}
    names = {"S": "c"}
    scale = [
        float(px) if (a in "YX" and px) else float(dz) if (a == "Z" and dz) else 1.0 for a in axes
    ]
    ax_meta = []
    for a in axes:
        entry = {"name": names.get(a, a.lower()), "type": kinds.get(a, "space" if a in "YXZ" else "channel")}
        if (a in "YX" and px) or (a == "Z" and dz):  # no unit: the scale is in pixels (uncalibrated)
            entry["unit"] = "micrometer"
        ax_meta.append(entry)
    g = zarr.open_group(str(store), mode="a")
    g.attrs.update(
        {
            "multiscales": [
                {
                    "version": "0.4",
                    "axes": ax_meta,
                    "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}],
                }
            ],
            "napari_deepr": _json_safe(meta),
            "axes": axes,
            "pixel_size_um": px,
            "z_step_um": dz,
        }
    )
