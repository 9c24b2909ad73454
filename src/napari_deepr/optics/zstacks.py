"""Simulated axial z-stacks (with drift and per-plane defocus maps) and the calibrated sample set
written by ``deepr simulate``."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from .psf import OPTICS_20X_075, Optics, defocus_psf, psf_size
from .simulate import (
    Blurrer,
    _blend,
    _depth_grid,
    _fourier_shift,
    _percentile_scale,
    camera,
    defocus,
    defocus_map,
)
from .specimens import make_specimen
from .surfaces import tilt_dpm


def simulate_stack(
    obj: np.ndarray,
    z_um: Sequence[float],
    optics: Optics | None = None,
    *,
    dpm_offset: np.ndarray | None = None,
    drift_px: float | np.ndarray = 0.0,
    rng: np.random.Generator | int | None = None,
    return_shifts: bool = False,
    max_step_um: float = 0.25,
    **noise: Any,
) -> tuple[np.ndarray, ...]:
    """Axial z-stack of a thin sample, with its ground truth and per-plane defocus maps.

    Parameters
    ----------
    obj : numpy.ndarray
        In-focus emitter density (2-D).
    z_um : sequence of float
        Stage defocus of each plane (micrometres).
    optics : Optics, optional
        Optics.
    dpm_offset : numpy.ndarray, optional
        Sample surface height map (µm) added to every plane's defocus, e.g. :func:`tilt_dpm`;
        None for a flat sample.
    drift_px : float or numpy.ndarray
        Lateral stage drift. A float is the standard deviation (pixels) of a random walk between
        consecutive planes, anchored at zero on the plane nearest z = 0; an array ``(Z, 2)``
        gives each plane's (dy, dx) shift of the sample explicitly.
    rng : numpy.random.Generator or int, optional
        Random generator or seed (noise and drift).
    return_shifts : bool
        Also return the ``(Z, 2)`` sample shifts.
    max_step_um : float
        Depth-grid spacing for spatially varying defocus (see :func:`defocus_map`).
    **noise
        ``photons``, ``read_noise``, ``offset``, ``background``, ``gain``, ``noise``
        (see :func:`defocus`). The exposure is fixed for the whole stack.

    Returns
    -------
    stack : numpy.ndarray
        uint16 ``(Z, Y, X)`` (float32 expected ADU with ``noise=False``).
    ground_truth : numpy.ndarray
        float32 ``(Y, X)``: the expected (noiseless) ADU of an in-focus exposure of the unshifted
        sample, ``obj ⊛ PSF(0)`` with the same exposure, background and offset.
    dpm : numpy.ndarray
        float32 ``(Z, Y, X)`` defocus per pixel of each plane (in the camera frame, i.e. shifted
        with the drift).
    shifts : numpy.ndarray
        Only with ``return_shifts``: float ``(Z, 2)`` sample shifts in pixels.
    """
    optics = OPTICS_20X_075 if optics is None else optics
    rng = np.random.default_rng(rng)
    obj = np.asarray(obj, dtype=np.float64)
    zs = np.asarray(z_um, dtype=float).ravel()
    if zs.size == 0:
        raise ValueError("z_um is empty.")
    photons = float(noise.pop("photons", 500.0))
    background = float(noise.pop("background", 0.0))
    cam = {
        "read_noise": float(noise.pop("read_noise", 2.0)),
        "offset": float(noise.pop("offset", 100.0)),
        "gain": float(noise.pop("gain", 1.0)),
        "noise": bool(noise.pop("noise", True)),
    }
    if noise:
        raise TypeError(f"Unexpected keyword arguments: {sorted(noise)}.")

    if np.ndim(drift_px) == 0:
        steps = rng.normal(0.0, float(drift_px), (zs.size, 2)) if drift_px else np.zeros((zs.size, 2))
        shifts = np.cumsum(steps, axis=0)
        shifts -= shifts[int(np.argmin(np.abs(zs)))]
    else:
        shifts = np.asarray(drift_px, dtype=float).reshape(zs.size, 2)

    offset_map = None if dpm_offset is None else np.asarray(dpm_offset, dtype=np.float64)
    if offset_map is not None and offset_map.shape != obj.shape:
        raise ValueError(f"dpm_offset shape {offset_map.shape} differs from {obj.shape}.")
    lo = float(zs.min() + (0 if offset_map is None else offset_map.min()))
    hi = float(zs.max() + (0 if offset_map is None else offset_map.max()))
    extra = math.ceil(np.abs(shifts).max()) + 2
    b = Blurrer(obj, psf_size(max(abs(lo), abs(hi)), optics) // 2 + extra)
    infocus = b.blur(defocus_psf(0.0, optics, copy=False))
    scale = _percentile_scale(infocus, photons)

    stack, dpms = [], []
    for k, z in enumerate(zs):
        sh = tuple(shifts[k])
        if offset_map is None:
            img = b.blur(defocus_psf(float(z), optics, copy=False), sh)
            dpm = np.full(obj.shape, z, dtype=np.float32)
        else:
            dpm = z + offset_map
            depths = _depth_grid(float(dpm.min()), float(dpm.max()), None, max_step_um)
            img = _blend(b, dpm, depths, optics)
            if any(sh):
                img = _fourier_shift(img, sh)
                dpm = ndimage.shift(dpm, sh, order=1, mode="nearest")
            dpm = dpm.astype(np.float32)
        stack.append(camera(scale * img + background, rng=rng, **cam))
        dpms.append(dpm)
    gt = (scale * infocus + background) / cam["gain"] + cam["offset"]
    out = (np.stack(stack), gt.astype(np.float32), np.stack(dpms).astype(np.float32))
    return out + (shifts,) if return_shifts else out


def write_sample_set(
    out_dir: str | Path,
    *,
    specimen: str = "mixed",
    size: int = 512,
    z_um: Sequence[float] = (-4, -2, 0, 2, 4),
    tilt_deg: float = 1.5,
    seed: int = 0,
    optics: Optics | None = None,
    stack_step_um: float = 0.5,
    photons: float = 500.0,
) -> list[Path]:
    """Write a calibrated simulated sample set (used by ``deepr simulate``).

    Files (ImageJ/OME-calibrated TIFFs via :func:`napari_deepr.io.write_image`):

    * ``object.tif``: the emitter density (float32);
    * ``ground_truth.tif``: expected in-focus image (float32 ADU);
    * ``defocus_{z:+.1f}um.tif``: uniformly defocused noisy images (uint16), one per ``z_um``;
    * ``tilted_{tilt:.1f}deg.tif`` and ``tilted_{tilt:.1f}deg_dpm.tif``: a field tilted by
      ``tilt_deg`` along the rows (uint16) and its defocus map (float32, µm);
    * ``zstack.tif``: a ``(Z, Y, X)`` stack from ``min(z_um)`` to ``max(z_um)`` in
      ``stack_step_um`` steps with a little lateral drift (0.15 px random walk), uint16;
    * ``samples.json``: a sidecar describing every file (optics, z values, units, seed).

    Returns
    -------
    list of Path
        Written files, the JSON sidecar last.
    """
    from ..io import write_image  # io is below optics in the layering; imported lazily

    optics = OPTICS_20X_075 if optics is None else optics
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    px = optics.pixel_size_um
    obj = make_specimen(specimen, (size, size), px, rng)
    meta_common = {"simulated": True, "optics": optics.to_dict(), "specimen": specimen,
                   "seed": seed, "photons": photons, "generator": "napari_deepr.optics.simulate"}
    written: list[Path] = []
    files: list[dict[str, Any]] = []

    def _w(name: str, arr: np.ndarray, desc: dict[str, Any], axes: str = "YX", dz=None) -> None:
        meta = dict(meta_common, **desc)
        p = write_image(out / name, arr, axes=axes, pixel_size_um=px, z_step_um=dz, metadata=meta)
        written.append(Path(p))
        files.append({"file": name, "axes": axes, "dtype": str(arr.dtype), **desc})

    _w("object.tif", obj, {"kind": "object", "units": "emitter density (a.u.)"})
    zs = [float(z) for z in z_um]
    stack_z = np.round(np.arange(min(zs), max(zs) + stack_step_um / 2, stack_step_um), 6)
    stack, gt, _ = simulate_stack(obj, stack_z, optics, drift_px=0.15, rng=rng, photons=photons)
    _w("ground_truth.tif", gt, {"kind": "ground_truth", "defocus_um": 0.0, "units": "ADU (expected)"})
    for z in zs:
        img = defocus(obj, z, optics, photons=photons, rng=rng)
        _w(f"defocus_{z:+.1f}um.tif", img, {"kind": "uniform_defocus", "defocus_um": z})
    if tilt_deg:
        dpm = tilt_dpm((size, size), px, tilt_deg)
        img = defocus_map(obj, dpm, optics, photons=photons, rng=rng)
        tag = f"tilted_{tilt_deg:.1f}deg"
        desc = {"kind": "tilted", "tilt_deg": tilt_deg, "direction_deg": 90.0,
                "delta_z_um": float(dpm.max() - dpm.min())}
        _w(f"{tag}.tif", img, desc)
        _w(f"{tag}_dpm.tif", dpm, {"kind": "dpm", "of": f"{tag}.tif", "units": "um"})
    _w("zstack.tif", stack, {"kind": "zstack", "z_um": stack_z.tolist(), "z_step_um": stack_step_um,
                             "drift_px_per_plane": 0.15,
                             "in_focus_index": int(np.argmin(np.abs(stack_z)))},
       axes="ZYX", dz=stack_step_um)
    sidecar = out / "samples.json"
    tmp = sidecar.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"format": "napari-deepr-samples/1", **meta_common, "files": files},
                              indent=2))
    tmp.replace(sidecar)
    written.append(sidecar)
    return written
