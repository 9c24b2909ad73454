"""Training pairs from axial z-stacks (the Deep-R data protocol), stored as a documented dataset.

Protocol (paper, Methods): register the planes of each stack, pick the in-focus plane for each
non-overlapping square crop (default: highest SSIM to the wavelet extended-depth-of-field image,
which follows tilt and field curvature), pair every plane within ``±range_um`` of that plane with
it, record the defocus in micrometres, and split the fields of view 0.85 / 0.15 into training and
validation sets -- by field, never by patch, so no field contributes to both.

A dataset built from ONE field is split by region instead (:func:`region_split`): a band of whole
crops along the field's longer side validates, the crops within ``gap_px`` of it (default the
generator's receptive-field radius, :data:`RECEPTIVE_FIELD_RADIUS_PX`) are left out (split
``"gap"``), and the rest trains -- so no validation pixel is refocused from training pixels and no
object straddles both sets. A field too small for the full gap keeps the largest gap it allows and
says so in ``summary.warnings``; ``index.json["validation"]`` says what the validation set is.

On-disk format (``format`` = ``"napari-deepr-pairs"``, ``version`` = 1)::

    DATASET/
      index.json
      patches/c000000.tif  c000001.tif  ...

``patches/cNNNNNN.tif`` holds one crop: a float32 ``(K, P, P)`` TIFF of the *registered* planes
of that crop within ``±range_um`` of its in-focus plane, in stack order. The in-focus plane is
one of them (``target`` in the crop record), so each pair is ``(planes[k], planes[target])``.
Files are uncompressed and contiguous, so readers can memory-map them.

``index.json``:

* ``format``, ``version``, ``created``, ``patch``, ``range_um``, ``z_step_um`` (a number, or
  ``"per-field"`` when the stacks differ), ``focus_method``, ``seed``,
* ``optics`` -- ``pixel_size_um`` (when the stacks agree) and anything given by the caller,
* ``z_sign`` -- ``"positive = planes after the in-focus plane in stack order"``, and
  ``z_sign_meaningful`` -- whether the optics make +z and -z look different,
* ``fields`` -- one record per field of view (one stack, or one position of a multi-position
  file): ``id``, ``source``, ``series``, ``name``, ``shape``, ``z_step_um``, ``pixel_size_um``,
  ``split`` (``"train"``/``"val"``), ``registration_shifts_px`` (per plane ``[dy, dx]``),
  ``crops`` (crop ids),
* ``crops`` -- ``id``, ``file``, ``field``, ``y``, ``x`` (top-left corner in the field),
  ``infocus_plane`` (index in the stack), ``planes`` (stack indices stored in the file),
  ``z_um`` (defocus of each stored plane), ``target`` (position of the in-focus plane in the file),
  ``split``,
* ``pairs`` -- ``crop``, ``plane`` (position in the crop file), ``z_um``, ``split``,
* ``validation`` -- what the validation set is: ``kind`` (``"fields"``, ``"region"`` or ``"none"``),
  a one-sentence ``description``, and for regions ``axis``, ``val_px`` (extent), ``gap_px``,
  ``gap_wanted_px``,
* ``summary`` -- counts: ``pairs``, ``train_pairs``, ``val_pairs``, ``fields``,
  ``train_fields``, ``val_fields``, ``crops``, ``pairs_per_z`` (defocus in µm rounded to 0.01 ->
  count), and ``warnings``.

Defocus sign: ``z_um = (plane - infocus_plane) * z_step_um``; whether positive ``z`` means the
focal plane above or below the sample depends on the acquisition order of the stacks.

This module does not import torch.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..engine.contract import PAIRS_INDEX_FILE
from ..errors import Cancelled
from .dataset import FORMAT, VERSION, Z_SIGN, Pairs, PairsError, load_pairs

# Pairs, PairsError and load_pairs moved to .dataset; imported here so that callers keep this path.
__all__ = ["FORMAT", "VERSION", "Z_SIGN", "Pairs", "PairsError", "build_pairs", "load_pairs", "region_split"]


@dataclass
class _Field:
    data: np.ndarray
    name: str
    source: str
    series: int
    z_step_um: float
    pixel_size_um: float | None
    resampled_from_um: float | None = None


def _load_fields(stacks: Sequence[Any], z_step_um: float | None) -> list[_Field]:
    """Read every stack (paths, folders, arrays or ImageData) as fields of view."""
    from ..io import ImageData, read_stacks

    fields: list[_Field] = []
    for i, item in enumerate(stacks):
        if isinstance(item, (str, os.PathLike)):
            images = read_stacks(item)
            source = str(item)
        elif isinstance(item, ImageData):
            images = [item]
            source = item.metadata.get("source", item.name or f"stack {i}")
        else:
            arr = np.asarray(item)
            if arr.ndim != 3:
                raise PairsError(f"Array stack {i} has shape {arr.shape}; a (Z, Y, X) stack is needed.")
            images = [ImageData(arr, "ZYX", None, None, {}, f"array{i}")]
            source = f"array {i}"
        for s, img in enumerate(images):
            data = np.asarray(img.data)
            if data.ndim != 3:
                raise PairsError(f"{img.name or source} is not a (Z, Y, X) stack (shape {data.shape}).")
            name = img.name or Path(source).stem
            if data.shape[0] < 2:
                raise PairsError(f"{name} has only one plane; a z-stack with several planes is needed.")
            if z_step_um is not None and not (isinstance(z_step_um, (int, float)) and 0 < z_step_um < float("inf")):
                raise PairsError(f"The z-step must be a positive number of micrometres, got {z_step_um!r}.")
            dz = z_step_um if z_step_um is not None else img.z_step_um
            if dz is None or not dz > 0:
                raise PairsError(f"{name} does not record its z-step; pass z_step_um (--z-step) in micrometres.")
            if not (np.issubdtype(data.dtype, np.number) and not np.iscomplexobj(data)):
                raise PairsError(f"{name} has pixels of type {data.dtype}; a real-valued numeric stack is needed.")
            if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
                raise PairsError(f"{name} contains NaN or infinite pixels; replace them before building pairs.")
            fields.append(_Field(data, name, source, s, float(dz), img.pixel_size_um))
    if not fields:
        raise PairsError("No z-stacks were given.")
    return fields


def _resampled(fields: list[_Field], pixel_out: float, progress, cancel) -> list[_Field]:
    """Every field resampled plane by plane to ``pixel_out`` µm (refused when a field's pixel size is unknown)."""
    from ..engine.domain import resample_plane, resampled_size, scale_mismatch

    for f in fields:
        if not f.pixel_size_um:
            raise PairsError(f"{f.name} does not record its pixel size, so it cannot be resampled to {pixel_out:g} µm; "
                             "give it with pixel_size_um (--pixel-size).")
    out = []
    for f in fields:
        ratio = scale_mismatch(f.pixel_size_um, pixel_out)
        if ratio is None:  # the engine would not resample either
            out.append(f)
            continue
        if progress:
            progress(0.0, f"resampling {f.name} from {f.pixel_size_um:g} to {pixel_out:g} µm")
        shape = (resampled_size(f.data.shape[1], ratio), resampled_size(f.data.shape[2], ratio))
        data = np.empty((f.data.shape[0],) + shape, dtype=np.float32)
        for k in range(f.data.shape[0]):
            _check(cancel)
            resample_plane(f.data[k][None], shape, out=data[k:k + 1])
        out.append(_Field(data, f.name, f.source, f.series, f.z_step_um, float(pixel_out), float(f.pixel_size_um)))
    return out


def _split_fields(n: int, split: float, seed: int) -> list[str]:
    """Assign ``"train"``/``"val"`` per field: ``round(n * (1 - split))`` validation fields, at least one
    when there are two or more fields, never all of them."""
    if not 0 < split <= 1:
        raise PairsError(f"split must be in (0, 1], got {split}.")
    # At least one validation field when there are two or more, never all of them.
    n_val = min(max(round(n * (1 - split)), 1), n - 1) if n >= 2 and split < 1 else 0
    order = np.random.default_rng(seed).permutation(n)
    labels = ["train"] * n
    for i in order[:n_val]:
        labels[int(i)] = "val"
    return labels


RECEPTIVE_FIELD_RADIUS_PX = 223
"""Receptive-field radius of the Deep-R generator (5 levels of 3x3 convolutions, 2x2 pooling and
bilinear up-sampling): an output pixel depends on input pixels up to 223 px away (446-px extent).
Measured from the gradient support of :class:`napari_deepr.train.nets.Generator` (a test keeps it
honest); written here because this module must not import torch."""


def region_split(grid: tuple[int, int], patch: int, split: float, gap_px: int | None = None
                 ) -> tuple[np.ndarray, dict, list[str]]:
    """Split the crops of one field by region: training band, gap, validation band.

    The validation band is ``round(n * (1 - split))`` whole crop columns (or rows, whichever axis has
    more crops) at the far end of the field, at least one; the ``ceil(gap_px / patch)`` crop columns
    next to it are left out so that the nearest training and validation pixels are at least
    ``gap_px`` apart. When the field has too few crops for that gap, the gap shrinks to what fits
    (one training column is kept) and a warning says so.

    Parameters
    ----------
    grid : (int, int)
        Crops along y and x.
    patch : int
        Crop side in pixels.
    split : float
        Fraction of the field meant for training (as ``build_pairs``' ``split``).
    gap_px : int, optional
        Wanted gap; default :data:`RECEPTIVE_FIELD_RADIUS_PX`.

    Returns
    -------
    labels : ndarray of str, shape ``grid``
        ``"train"``, ``"gap"`` or ``"val"`` per crop.
    record : dict
        The ``validation`` record of ``index.json``.
    warnings : list of str
        Sentences for ``summary.warnings``.
    """
    ny, nx = (int(grid[0]), int(grid[1]))
    gap_wanted = int(RECEPTIVE_FIELD_RADIUS_PX if gap_px is None else gap_px)
    labels = np.full((ny, nx), "train", dtype=object)
    axis = "x" if nx >= ny else "y"
    n = nx if axis == "x" else ny
    if n < 2 or split >= 1:
        rec = {"kind": "none", "description": "no held-out data: the field has a single crop along each side"
               if n < 2 else "no held-out data (split 1.0)"}
        return labels, rec, ["Only one field of view and too small to hold out a region: there is no validation set."
                             if n < 2 else "Split 1.0: there is no validation set."]
    n_val = min(max(1, round(n * (1 - split))), n - 1)
    k_gap = math.ceil(gap_wanted / patch) if gap_wanted > 0 else 0
    warns = []
    if n_val + k_gap > n - 1:
        k_gap = max(0, n - 1 - n_val)
        warns.append(
            f"The field is only {n * patch} px along {axis}, too small for a {gap_wanted}-px gap (the network's "
            f"receptive field) between the training and validation regions; the gap is {k_gap * patch} px, so "
            "validation may overstate how well the model generalizes."
        )
    idx = np.arange(n)
    lab1 = np.where(idx >= n - n_val, "val", np.where(idx >= n - n_val - k_gap, "gap", "train"))
    if axis == "x":
        labels[:, :] = lab1[None, :]
    else:
        labels[:, :] = lab1[:, None]
    val_px = n_val * patch
    rec = {
        "kind": "region", "axis": axis, "val_px": val_px, "gap_px": k_gap * patch, "gap_wanted_px": gap_wanted,
        "description": (f"held-out region of the one field: the last {val_px} px along {axis}, {k_gap * patch} px "
                        f"away from every training crop (receptive-field radius {RECEPTIVE_FIELD_RADIUS_PX} px)"),
    }
    return labels, rec, warns


def _check(cancel: Callable[[], bool] | None) -> None:
    if cancel is not None and cancel():
        raise Cancelled("Building training pairs was cancelled.")


def build_pairs(
    stacks: Sequence[Any],
    out_dir: str | os.PathLike,
    *,
    z_step_um: float | None = None,
    range_um: float = 5.0,
    patch: int = 256,
    focus_method: str = "ssim_edof",
    infocus_index: int | None = None,
    split: float = 0.85,
    seed: int = 0,
    gap_px: int | None = None,
    pixel_size_um: float | None = None,
    pixel_size_out_um: float | None = None,
    focus_per: str = "crop",
    register: bool = True,
    optics: dict | None = None,
    z_sign_meaningful: bool = True,
    progress: Callable[[float, str], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    overwrite: bool = False,
) -> dict:
    """Build a training-pairs dataset from z-stacks.

    Parameters
    ----------
    stacks : sequence
        Paths (TIFF, OME-TIFF, ImageJ hyperstacks, zarr, folders of stacks; every position of a
        multi-position file is its own field), :class:`~napari_deepr.io.ImageData` or ``(Z, Y, X)``
        arrays.
    out_dir : path
        Dataset folder to create (an existing pairs dataset there is replaced).
    z_step_um : float, optional
        Axial step; overrides the files' calibration and is required when a stack has none.
    range_um : float
        Pair every plane within ``±range_um`` of the in-focus plane.
    patch : int
        Side of the non-overlapping square crops (leftover borders are dropped).
    focus_method : str
        In-focus selection per crop (see :func:`napari_deepr.stacks.infocus.select_in_focus`).
    infocus_index : int, optional
        Manual override: this plane is in focus for every crop of every stack.
    split : float
        Fraction of fields of view used for training; the rest validate.
    seed : int
        Seed of the field split.
    gap_px : int, optional
        One field only: least distance between the training and the validation region (default the
        generator's receptive-field radius; see :func:`region_split`).
    pixel_size_um : float, optional
        Pixel size (µm) of every stack; overrides the files' calibration and is required by
        ``pixel_size_out_um`` for a stack that has none.
    pixel_size_out_um : float, optional
        Resample every stack to this pixel size first (anti-aliased, the engine's own resampling), e.g.
        to the model to be fine-tuned: a fine-tune at the parent's sampling keeps what the parent
        learned about scale instead of spending its steps relearning it (measured in docs/FINETUNE.md).
    focus_per : str
        ``"crop"`` (paper: each crop's own in-focus plane, which follows tilt and field curvature) or
        ``"field"``: one in-focus plane per field of view by the same rule on the whole field, for flat
        samples whose objects are thicker than a crop's depth of field (a small crop of thick nuclei
        has no single sharpest plane, so per-crop choices scatter).
    register : bool
        Register the planes of each stack (translation, sub-pixel) before cropping.
    optics : dict, optional
        Optics to record (``na``, ``wavelength_um``, ``immersion_index``, ``pixel_size_um``...).
    z_sign_meaningful : bool
        Whether planes above and below focus look different with these optics (true for most real
        microscopes, whose aberrations make them asymmetric). The trainer's DPM decoder learns
        signed defocus when true and ``|defocus|`` otherwise (``--dpm-target auto``).
    progress : callable, optional
        ``progress(fraction, message)``.
    cancel : callable, optional
        Returns True to abandon the build (raises :class:`~napari_deepr.errors.Cancelled`;
        nothing is left behind).
    overwrite : bool
        Replace an existing non-empty folder that is not a pairs dataset (never one holding an input).

    Returns
    -------
    dict
        The ``summary`` of ``index.json`` plus ``out_dir``.

    Raises
    ------
    PairsError
        One-plane stacks, unknown z-step, a range wider than a stack, crops larger than a field.
    """
    from .infocus import FOCUS_METHODS, select_in_focus
    from .register import register_stack

    if focus_method not in FOCUS_METHODS:
        raise PairsError(f"Unknown focus method {focus_method!r}; choose one of {', '.join(FOCUS_METHODS)}.")
    if isinstance(range_um, bool) or not isinstance(range_um, (int, float)) or not 0 < range_um < float("inf"):
        raise PairsError(f"The defocus range must be positive, got {range_um} µm.")
    if isinstance(patch, bool) or not isinstance(patch, (int, np.integer)) or patch < 32 or patch % 32:
        raise PairsError(f"The patch size must be a multiple of 32 px, got {patch}.")
    from .. import io

    if isinstance(stacks, (str, os.PathLike)):
        stacks = [stacks]
    paths = [s for s in stacks if isinstance(s, (str, os.PathLike))]
    # Refused before any reading: an output holding an input (replacing it would delete the input),
    # inside an input, or a user's own folder.
    out = io.check_output_path(out_dir, *paths, overwrite=overwrite, kind="folder")
    if focus_per not in ("crop", "field"):
        raise PairsError(f"focus_per must be 'crop' or 'field', got {focus_per!r}.")
    from ..engine.domain import check_pixel_size

    try:
        pixel_size_um = check_pixel_size(pixel_size_um)
        pixel_size_out_um = check_pixel_size(pixel_size_out_um, "The output pixel size")
    except ValueError as exc:
        raise PairsError(str(exc)) from exc
    fields = _load_fields(stacks, z_step_um)
    if pixel_size_um is not None:
        for f in fields:
            f.pixel_size_um = pixel_size_um
    if pixel_size_out_um is not None:
        fields = _resampled(fields, pixel_size_out_um, progress, cancel)
    for f in fields:
        extent = (f.data.shape[0] - 1) * f.z_step_um
        if 2 * range_um > extent + 1e-6:
            raise PairsError(
                f"The range ±{range_um:g} µm is wider than {f.name}, which spans {extent:g} µm "
                f"({f.data.shape[0]} planes × {f.z_step_um:g} µm); use a range of at most {extent / 2:g} µm."
            )
        if min(f.data.shape[1:]) < patch:
            raise PairsError(
                f"{f.name} ({f.data.shape[1]}×{f.data.shape[2]} px"
                + (f" after resampling to {f.pixel_size_um:g} µm" if f.resampled_from_um else "")
                + f") is smaller than one {patch}-px patch; use a smaller --patch."
            )
        if infocus_index is not None and not 0 <= infocus_index < f.data.shape[0]:
            raise PairsError(f"The in-focus index {infocus_index} is outside the {f.data.shape[0]} planes of {f.name}.")
    labels = _split_fields(len(fields), split, seed)
    if len(fields) == 1:
        grid = (fields[0].data.shape[1] // patch, fields[0].data.shape[2] // patch)
        region_labels, validation, split_warnings = region_split(grid, patch, split, gap_px)
    else:
        region_labels, split_warnings = None, []
        n_val = labels.count("val")
        validation = {"kind": "fields" if n_val else "none",
                      "description": f"held-out fields of view: {n_val} of {len(fields)}" if n_val
                      else "no held-out data (split 1.0)"}

    from .._safety import check_free_space, pairs_bytes, write_failed

    check_free_space([(out, pairs_bytes(fields, patch, range_um))])  # before registering and cropping
    io.clean_stale_partials(out)
    tmp = io._temp_sibling(out)
    (tmp / "patches").mkdir(parents=True)
    crops: list[dict] = []
    pairs: list[dict] = []
    field_records: list[dict] = []
    try:
        for fi, f in enumerate(fields):
            _check(cancel)
            if progress:
                progress(fi / len(fields), f"registering {f.name}")
            stack = np.asarray(f.data, dtype=np.float32)
            shifts = np.zeros((stack.shape[0], 2))
            # Each field's share of the bar: registration 0-0.4, in-focus planes 0.4-0.7, crops 0.7-1.
            def share(lo, hi, message, fi=fi):
                return None if not progress else (
                    lambda frac: progress((fi + lo + (hi - lo) * frac) / len(fields), message))

            if register:
                stack, shifts = register_stack(stack, cancel=cancel,
                                               progress=share(0.0, 0.4, f"registering {f.name}"))
            _check(cancel)
            if progress:
                progress((fi + 0.4) / len(fields), f"finding the in-focus plane of {f.name}")
            ny, nx = stack.shape[1] // patch, stack.shape[2] // patch
            if infocus_index is not None:
                focus = np.full((ny, nx), int(infocus_index))
            elif focus_per == "field":
                focus = np.full((ny, nx), int(select_in_focus(stack, method=focus_method, cancel=cancel)))
            else:
                focus = np.asarray(select_in_focus(
                    stack, method=focus_method, crop=patch, cancel=cancel,
                    progress=share(0.4, 0.7, f"finding the in-focus plane of {f.name}"),
                )).reshape(stack.shape[1] // patch, stack.shape[2] // patch)
            crop_progress = share(0.7, 1.0, f"writing the pairs of {f.name}")
            half = int(np.floor(range_um / f.z_step_um + 1e-6))
            ids = []
            for i in range(focus.shape[0]):
                for j in range(focus.shape[1]):
                    _check(cancel)
                    k0 = int(focus[i, j])
                    crop_split = labels[fi] if region_labels is None else str(region_labels[i, j])
                    planes = list(range(max(0, k0 - half), min(stack.shape[0], k0 + half + 1)))
                    y0, x0 = i * patch, j * patch
                    block = np.ascontiguousarray(stack[planes, y0:y0 + patch, x0:x0 + patch], dtype=np.float32)
                    cid = len(crops)
                    name = f"patches/c{cid:06d}.tif"
                    _write_tiff(tmp / name, block)
                    zs = [round((k - k0) * f.z_step_um, 6) for k in planes]
                    crops.append({
                        "id": cid, "file": name, "field": fi, "y": y0, "x": x0, "infocus_plane": k0,
                        "planes": planes, "z_um": zs, "target": planes.index(k0), "split": crop_split,
                    })
                    for pos, z in enumerate(zs):
                        pairs.append({"crop": cid, "plane": pos, "z_um": z, "split": crop_split})
                    ids.append(cid)
                    if crop_progress:
                        crop_progress((i * focus.shape[1] + j + 1) / focus.size)
            field_records.append({
                "id": fi, "source": f.source, "series": f.series, "name": f.name,
                "shape": list(stack.shape), "z_step_um": f.z_step_um, "pixel_size_um": f.pixel_size_um,
                "split": labels[fi] if region_labels is None else "train+val (by region)",
                "resampled_from_um": f.resampled_from_um,
                "registration_shifts_px": np.round(shifts, 4).tolist(), "crops": ids,
                "infocus_planes": focus.tolist(),
            })
        steps = {f.z_step_um for f in fields}
        pxs = {f.pixel_size_um for f in fields}
        rec_optics = dict(optics or {})
        if len(pxs) == 1 and None not in pxs:
            rec_optics.setdefault("pixel_size_um", pxs.pop())
        summary = _summary(field_records, crops, pairs)
        summary["warnings"] = [w for w in summary["warnings"] if region_labels is None] + split_warnings
        index = {
            "format": FORMAT,
            "version": VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "patch": int(patch),
            "range_um": float(range_um),
            "z_step_um": steps.pop() if len(steps) == 1 else "per-field",
            "focus_method": "manual" if infocus_index is not None else focus_method,
            "focus_per": "field" if infocus_index is not None else focus_per,
            "registered": bool(register),
            "seed": int(seed),
            "split_fraction": float(split),
            "optics": rec_optics,
            "validation": validation,
            "z_sign": Z_SIGN,
            "z_sign_meaningful": bool(z_sign_meaningful),
            "fields": field_records,
            "crops": crops,
            "pairs": pairs,
            "summary": summary,
        }
        (tmp / PAIRS_INDEX_FILE).write_text(json.dumps(index, indent=1))
        (tmp / io.MARKER).write_text("written by napari-deepr; this folder may be replaced by its next run\n")
        _check(cancel)
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # an empty folder the user made for the dataset
        io._finish(tmp, out, overwrite)
    except OSError as exc:  # a disk that filled up meanwhile: one sentence, the old dataset kept
        raise write_failed(out, exc) from exc
    finally:
        io._remove(tmp)
    if progress:
        progress(1.0, f"wrote {summary['pairs']} pairs")
    return dict(summary, out_dir=str(out))


def _write_tiff(path: Path, block: np.ndarray) -> None:
    import tifffile

    tifffile.imwrite(path, block, contiguous=True, metadata={"axes": "ZYX"})


def _summary(fields: list[dict], crops: list[dict], pairs: list[dict]) -> dict:
    per_z = Counter(f"{p['z_um']:.2f}" for p in pairs)
    warnings = []
    if not any(f["split"] == "val" for f in fields):
        warnings.append("Only one field of view: there is no validation field.")
    return {
        "pairs": len(pairs),
        "train_pairs": sum(p["split"] == "train" for p in pairs),
        "val_pairs": sum(p["split"] == "val" for p in pairs),
        "gap_pairs": sum(p["split"] == "gap" for p in pairs),
        "fields": len(fields),
        "train_fields": sum(f["split"] != "val" for f in fields),
        "val_fields": sum(f["split"] == "val" for f in fields),
        "crops": len(crops),
        "pairs_per_z": dict(sorted(per_z.items(), key=lambda kv: float(kv[0]))),
        "warnings": warnings,
    }
