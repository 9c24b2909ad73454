"""Readers of TIFF (OME, ImageJ, plain) and zarr (OME-Zarr or plain) images with their calibration.

Used through :func:`napari_deepr.io.read_images`. A pixel size is known only when the file records
one a light microscope could have (never the 1 pixel per inch of writers' defaults); an array
without axes gets :func:`napari_deepr.layout.guess_axes`'s reading.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from ._files import DEEPR_TAG, LAZY_BYTES, PLAUSIBLE_PIXEL_UM, _calibration_value, _first_line
from .errors import InputError
from .layout import guess_axes

#: Length units in ImageJ's ``unit`` field, in µm; "pixel" (ImageJ's default) or none means uncalibrated.
_IJ_UNITS = {"micron": 1.0, "microns": 1.0, "um": 1.0, "µm": 1.0, "\\u00b5m": 1.0, "μm": 1.0, "nm": 1e-3,
             "nanometer": 1e-3, "mm": 1e3, "millimeter": 1e3, "cm": 1e4, "m": 1e6, "meter": 1e6}


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


def _read_tiff(path: Path) -> list:
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


def _read_tiff_series(path: Path, tif) -> list:
    import tifffile

    from .io import ImageData

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


def _read_zarr(path: Path) -> list:
    try:
        return _read_zarr_store(path)
    except InputError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # zarr and hand-written OME metadata fail in many ways
        raise InputError(f"{path.name} is not a readable zarr image ({_first_line(exc)}).") from exc


def _read_zarr_store(path: Path) -> list:
    import dask.array as da
    import zarr

    from .io import ImageData

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
        axes = guess_axes(arr.shape, dtype=arr.dtype)
    if not isinstance(axes, str) or len(axes) != len(arr.shape):
        raise InputError(f"{path.name} names axes {axes!r} for an array with {len(arr.shape)} dimensions.")
    data = da.from_zarr(arr)
    return [ImageData(data, axes.upper(), _calibration_value(px), _calibration_value(dz), {"source": str(path)},
                      path.name.split(".")[0])]

