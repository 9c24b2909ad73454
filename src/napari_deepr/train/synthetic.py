"""Synthetic training pairs simulated on the fly (:class:`SyntheticSource`) for the trainer.

A dataset JSON file ``{"synthetic": {...}}`` names a pair generator (:data:`GENERATORS`) and its
keyword arguments; background worker processes simulate pairs into a buffer the trainer samples
from, and a fixed validation set is simulated once from its own seed (see :mod:`.data`).
"""

from __future__ import annotations

import inspect
import json
import multiprocessing as mp
import os
import queue
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np

from .data import DEFAULT_VAL_PAIRS, DatasetError, Source, _nchw, _z_batch, d4, zscore


def load_real_images(folder: str | os.PathLike, rgb: bool = False) -> list[np.ndarray]:
    """In-focus 2-D images from a folder for the simulator (``real_images=``).

    Each TIFF gives one float32 ``(Y, X)`` image: 2-D images as they are, RGB (brightfield) images as
    the inverted mean over colour samples (bright where stained), z-stacks as their sharpest plane
    (highest normalized variance). With ``rgb`` only RGB images are used, as ``(Y, X, 3)`` arrays
    (the brightfield simulator colour-deconvolves them into stain amounts).

    Parameters
    ----------
    folder : path
        Folder with TIFF files (not recursive).
    rgb : bool
        Keep only RGB images, in colour.

    Returns
    -------
    list of ndarray
    """
    from ..io import is_tiff_path, read_image

    p = Path(folder)
    if not p.is_dir():
        raise DatasetError(f"The real-images folder {p} does not exist.")
    out = []
    for f in sorted(p.iterdir()):
        if not is_tiff_path(f):
            continue
        img = read_image(f)
        a = np.asarray(img.data, dtype=np.float32)
        axes = img.axes
        if rgb:
            if "S" not in axes or a.shape[axes.index("S")] not in (3, 4) or a.ndim != 3:
                continue
            a = np.moveaxis(a, axes.index("S"), -1)[..., :3]
            if min(a.shape[:2]) >= 32:
                out.append(np.ascontiguousarray(a))
            continue
        if "S" in axes:
            # Brightfield RGB: absorbance-like density (inverted mean), bright where stained.
            a = a.mean(axis=axes.index("S"))
            a = a.max() - a
            axes = axes.replace("S", "")
        while a.ndim > 3:
            a = a[0]
            axes = axes[1:]
        if a.ndim == 3:
            flat = a.reshape(a.shape[0], -1)
            nv = flat.var(axis=1) / np.maximum(np.abs(flat.mean(axis=1)), 1e-6)
            a = a[int(np.argmax(nv))]
        if min(a.shape) >= 32:
            out.append(np.ascontiguousarray(a))
    if not out:
        kind = "RGB TIFF image" if rgb else "TIFF image"
        raise DatasetError(f"The real-images folder {p} holds no usable {kind}.")
    return out


#: Pair generators a synthetic dataset may name (``"generator"``), with the module that holds them
#: and whether their real images are RGB.
GENERATORS = {
    "random_training_pair": ("simulate", False),
    "random_brightfield_pair": ("brightfield", True),
}


def _simulator():
    try:
        from ..optics import simulate
    except ImportError as exc:
        raise DatasetError(f"The synthetic data source needs napari_deepr.optics.simulate ({exc}).") from exc
    if not hasattr(simulate, "random_training_pair"):
        raise DatasetError("napari_deepr.optics.simulate has no random_training_pair function.")
    return simulate


def _pair_fn(name: str):
    """The pair generator called ``name`` (see :data:`GENERATORS`)."""
    if name not in GENERATORS:
        raise DatasetError(f"Unknown synthetic generator {name!r}; use one of {', '.join(GENERATORS)}.")
    if GENERATORS[name][0] == "simulate":
        return getattr(_simulator(), name)
    import importlib

    try:  # (``optics.brightfield`` as an attribute is the one-wavelength function, hence the module path)
        module = importlib.import_module("napari_deepr.optics.brightfield")
    except ImportError as exc:
        raise DatasetError(f"The brightfield data source needs napari_deepr.optics.brightfield ({exc}).") from exc
    return getattr(module, name)


def _generate(kwargs: dict, real: list | None, rng: np.random.Generator,
              generator: str = "random_training_pair") -> tuple[np.ndarray, np.ndarray, float]:
    fn = _pair_fn(generator)
    if real is not None:
        kwargs = dict(kwargs, real_images=real)
    x, y, z = fn(rng, **kwargs)
    # A curved or tilted sample comes with its defocus map, a flat one with a number.
    z = float(z) if np.ndim(z) == 0 else np.asarray(z, np.float32)
    return np.asarray(x, np.float32), np.asarray(y, np.float32), z


def _worker(kwargs: dict, real_dir: str | None, seed: list[int], out: Any, stop: Any,
            generator: str = "random_training_pair") -> None:
    """Background process: simulate pairs forever into ``out`` until ``stop`` is set."""
    # A forked worker inherits the trainer's stop handlers: restore plain termination, and leave
    # Ctrl-C to the trainer (which stops the workers itself).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rng = np.random.default_rng(seed)
    real = load_real_images(real_dir, rgb=GENERATORS[generator][1]) if real_dir else None
    while not stop.is_set():
        pair = _generate(kwargs, real, rng, generator)
        while not stop.is_set():
            try:
                out.put(pair, timeout=0.2)
                break
            except queue.Full:
                continue


class SyntheticSource(Source):
    """Pairs simulated on the fly by ``optics.simulate.random_training_pair``.

    Parameters
    ----------
    spec : dict
        The ``"synthetic"`` object of the dataset JSON: keyword arguments of the pair generator plus
        the trainer's own keys ``generator`` (``random_training_pair``, the default, or
        ``random_brightfield_pair`` for RGB brightfield), ``real_images_dir`` (folder of in-focus
        images passed as ``real_images``; only its RGB images for brightfield), ``validation_pairs``
        (default 48) and ``validation_seed``. ``patch`` is set by the trainer.
    patch : int
        Patch side (multiple of 32).
    seed : int
        Seed of the training stream (workers get ``[seed, worker, restart]``).
    workers : int
        Background simulation processes; 0 simulates each batch in the trainer's process.
    buffer : int
        Pairs kept for sampling when workers are used; each batch takes the newest pairs first and
        fills up with random reuse from the buffer when simulation is slower than training.
    restart : int
        Distinguishes worker seeds after a resume.
    base_dir : path, optional
        Folder that relative ``real_images_dir`` paths are resolved against.
    """

    OWN_KEYS = ("real_images_dir", "validation_pairs", "validation_seed", "name", "description", "generator")

    def __init__(self, spec: dict, patch: int, seed: int = 0, workers: int = 1, buffer: int = 256,
                 restart: int = 0, base_dir: str | os.PathLike | None = None) -> None:
        self.generator = str(spec.get("generator") or "random_training_pair")
        pair_fn = _pair_fn(self.generator)
        rgb_real = GENERATORS[self.generator][1]
        if patch % 32:
            raise DatasetError(f"The training patch ({patch} px) must be a multiple of 32.")
        self.patch = int(patch)
        self.kwargs = {k: v for k, v in spec.items() if k not in self.OWN_KEYS}
        self.kwargs["patch"] = self.patch
        optics = _optics_from_spec(self.kwargs.get("optics"))
        if optics is not None:
            self.kwargs["optics"] = optics
        params = inspect.signature(pair_fn).parameters
        accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        unknown = [k for k in self.kwargs if k not in params and not accepts_any]
        if unknown:
            raise DatasetError(f"{self.generator} does not accept the option(s) {', '.join(unknown)}.")
        real_dir = spec.get("real_images_dir")
        if real_dir and base_dir is not None and not Path(real_dir).is_absolute():
            real_dir = str((Path(base_dir) / real_dir).resolve())
        self.real_dir = real_dir
        self.real = load_real_images(real_dir, rgb=rgb_real) if real_dir else None
        z_range = self.kwargs.get("z_range_um", params["z_range_um"].default if "z_range_um" in params else 5.0)
        if z_range is inspect.Parameter.empty:
            raise DatasetError("The synthetic dataset needs z_range_um.")
        z_arr = np.atleast_1d(np.asarray(z_range, dtype=float))
        if z_arr.size == 1:
            z_arr = np.array([-abs(z_arr[0]), abs(z_arr[0])])
            self.kwargs["z_range_um"] = (float(z_arr[0]), float(z_arr[1]))
        self.z_limits = (float(z_arr.min()), float(z_arr.max()))
        self.range_um = float(np.abs(z_arr).max())
        # One test call validates the options with a clear message before any worker starts.
        try:
            x, y, _ = self._make(self.kwargs, self.real, np.random.default_rng([seed, 10**6]))
        except (TypeError, ValueError) as exc:
            raise DatasetError(f"The synthetic dataset options are invalid: {str(exc).splitlines()[0]}") from exc
        if x.shape[-2:] != (self.patch, self.patch) or y.shape != x.shape:
            raise DatasetError(
                f"{self.generator} returned {x.shape} images for a {self.patch}-px patch."
            )
        self.channels = int(x.shape[0]) if x.ndim == 3 else 1
        self.seed = seed
        self.workers = int(workers)
        self.buffer_size = max(int(buffer), 8)
        self.buffer: list[tuple[np.ndarray, np.ndarray, float]] = [(x, y, _)]
        self.fresh: list[tuple[np.ndarray, np.ndarray, float]] = []
        self.generated = 1
        self.val_pairs = int(spec.get("validation_pairs", DEFAULT_VAL_PAIRS))
        self.val_seed = int(spec.get("validation_seed", 12345))
        self._procs: list = []
        self._queue = None
        self._stop = None
        if self.workers > 0:
            methods = mp.get_all_start_methods()
            ctx = mp.get_context("fork" if "fork" in methods else "spawn")
            self._queue = ctx.Queue(maxsize=4 * self.workers + 8)
            self._stop = ctx.Event()
            for w in range(self.workers):
                proc = ctx.Process(
                    target=_worker,
                    args=(self.kwargs, self.real_dir, [seed, w, restart], self._queue, self._stop, self.generator),
                    daemon=True,
                )
                proc.start()
                self._procs.append(proc)
        self._rng_sync = np.random.default_rng([seed, 999_999, restart])
        base = optics if optics is not None else _default_optics()
        wl_range = self.kwargs.get("wavelength_range_um", _param_default(params, "wavelength_range_um"))
        card_optics = {
            "na": base.na,
            "pixel_size_um": base.pixel_size_um,
            "immersion_index": base.immersion_index,
            "wavelength_um": round(float(np.mean(wl_range)), 4) if wl_range is not None else base.wavelength_um,
            "wavelength_range_um": list(wl_range) if wl_range is not None else None,
        }
        dpm_sign = "positive = focal plane above the sample (stage too high)"
        sign_meaningful = bool(getattr(base, "aberrated", False))
        module = GENERATORS[self.generator][0]
        if module == "brightfield":
            wls = [float(w) for w in self.kwargs.get("wavelengths_um", _param_default(params, "wavelengths_um"))]
            card_optics["wavelength_um"] = round(float(np.median(wls)), 4)
            card_optics["wavelengths_um"] = wls
            card_optics["wavelength_range_um"] = None
            card_optics["condenser_ratio_range"] = list(self.kwargs.get(
                "condenser_ratio_range", _param_default(params, "condenser_ratio_range")))
            dpm_sign = "positive = focal plane beyond the specimen, seen from the objective"
            # With symmetric optics only the specimen's phase tells +z from -z in brightfield.
            opd = self.kwargs.get("phase_opd_range_um", _param_default(params, "phase_opd_range_um"))
            sign_meaningful = bool(opd is not None and max(opd) > 0)
        self.info = {
            "kind": "synthetic",
            "path": None,
            "optics": card_optics,
            "range_um": self.range_um,
            "z_step_um": None,
            "dpm_sign": dpm_sign,
            "dpm_sign_meaningful": sign_meaningful,
            "channels": self.channels,
            "validation": {"kind": "simulated", "description": f"{self.val_pairs} simulated validation pairs "
                           f"(fixed seed {self.val_seed}, spread evenly over the defocus range)"},
            "provenance": {
                "simulator": f"napari_deepr.optics.{module}.{self.generator}",
                "optics": base.to_dict() if hasattr(base, "to_dict") else None,
                "options": {k: v for k, v in self.kwargs.items() if _jsonable(v)},
                "real_images_dir": real_dir,
                "real_images": len(self.real or []),
            },
        }

    def _make(self, kwargs: dict, real, rng):
        # The fluorescence generator is called with the historical three arguments (tests replace
        # _generate with a three-argument stand-in); others name themselves.
        if self.generator == "random_training_pair":
            return _generate(kwargs, real, rng)
        return _generate(kwargs, real, rng, self.generator)

    def _drain(self, block_for: int = 0) -> None:
        if self._queue is None:
            return
        got = 0
        deadline = time.monotonic() + 600
        while True:
            try:
                item = self._queue.get(timeout=1.0) if got < block_for else self._queue.get_nowait()
            except queue.Empty:
                if got < block_for:
                    if not any(p.is_alive() for p in self._procs):
                        raise DatasetError("The synthetic data workers stopped unexpectedly.") from None
                    if time.monotonic() > deadline:
                        raise DatasetError("The synthetic data workers produced nothing for 10 minutes.") from None
                    continue
                break
            got += 1
            self.generated += 1
            self.fresh.append(item)

    def _take(self, rng: np.random.Generator, n: int) -> list[tuple[np.ndarray, np.ndarray, float]]:
        if self.workers <= 0:
            return [self._make(self.kwargs, self.real, self._rng_sync) for _ in range(n)]
        need = max(0, min(n, 2 * n - len(self.buffer)) - len(self.fresh))
        self._drain(block_for=need)
        out = self.fresh[:n]
        self.fresh = self.fresh[n:]
        for item in out:
            if len(self.buffer) < self.buffer_size:
                self.buffer.append(item)
            else:
                self.buffer[int(rng.integers(0, len(self.buffer)))] = item
        while len(out) < n:
            out.append(self.buffer[int(rng.integers(0, len(self.buffer)))])
        return out

    def sample(self, rng, n):
        """See :meth:`Source.sample`."""
        xs, ys, zs = [], [], []
        for x, y, z in self._take(rng, n):
            k = int(rng.integers(0, 8))
            xs.append(zscore(d4(x, k)))
            ys.append(zscore(d4(y, k)))
            zs.append(z if np.ndim(z) == 0 else d4(z, k))
        return _nchw(xs), _nchw(ys), _z_batch(zs, self.patch)

    def validation(self):
        """See :meth:`Source.validation` (simulated once from ``validation_seed``, z spread evenly)."""
        if getattr(self, "_val", None) is None:
            rng = np.random.default_rng(self.val_seed)
            lo, hi = self.z_limits
            zs_plan = np.linspace(lo, hi, self.val_pairs)
            xs, ys, zs = [], [], []
            for i in range(self.val_pairs):
                # A degenerate range (z, z) pins the defocus, spreading validation evenly over z.
                kw = dict(self.kwargs, z_range_um=(float(zs_plan[i]), float(zs_plan[i])))
                x, y, z = self._make(kw, self.real, rng)
                xs.append(zscore(x))
                ys.append(zscore(y))
                zs.append(z)
            self._val = (_nchw(xs), _nchw(ys), np.asarray(zs, np.float32))
        return self._val

    def close(self) -> None:
        """Stop the worker processes."""
        if self._stop is not None:
            self._stop.set()
        for p in self._procs:
            p.join(timeout=2)
            if p.is_alive():
                p.terminate()
                p.join(timeout=2)
        self._procs = []
        if self._queue is not None:
            self._queue.cancel_join_thread()
            self._queue.close()
            self._queue = None


def _default_optics():
    from ..optics.psf import OPTICS_20X_075

    return OPTICS_20X_075


def _param_default(params, name: str):
    p = params.get(name)
    if p is None or p.default is inspect.Parameter.empty:
        return None
    return p.default


def _optics_from_spec(value: Any):
    """``optics`` of the JSON spec: a dict of :class:`~napari_deepr.optics.psf.Optics` fields or a preset name."""
    if value is None:
        return None
    from ..optics import psf

    if isinstance(value, psf.Optics):
        return value
    if isinstance(value, str):
        presets = {"20x_0.75": psf.OPTICS_20X_075, "40x_0.95": psf.OPTICS_40X_095}
        if value.lower() not in presets:
            raise DatasetError(f"Unknown optics preset {value!r}; use one of {', '.join(presets)} or a dict of fields.")
        return presets[value.lower()]
    if isinstance(value, dict):
        try:
            return psf.Optics.from_dict(value)
        except (TypeError, ValueError) as exc:
            raise DatasetError(f"The synthetic optics are invalid: {exc}") from exc
    raise DatasetError("The synthetic optics must be a preset name or an object of Optics fields.")


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False
