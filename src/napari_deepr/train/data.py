"""Training data for the Deep-R trainer: on-disk pairs datasets and on-the-fly synthetic pairs.

Two sources give the trainer the same thing, batches of ``(input, target, z_um)``:

* :class:`PairsSource` -- a folder written by :func:`napari_deepr.stacks.pairs.build_pairs`
  (``index.json`` + ``patches/*.tif``). Training pairs come from the training fields, validation
  pairs from the validation fields (split by field of view when the dataset was built). Stored
  patches larger than the training patch are randomly cropped.
* :class:`SyntheticSource` -- pairs simulated on the fly by
  ``napari_deepr.optics.simulate.random_training_pair(rng, patch=..., z_range_um=..., real_images=...)``
  (one gray channel, fluorescence) or, with ``"generator": "random_brightfield_pair"``, by
  ``napari_deepr.optics.brightfield.random_brightfield_pair`` (three RGB channels, brightfield),
  selected by a JSON file ``{"synthetic": {...keyword arguments..., "real_images_dir": "..."}}``.
  Background worker processes fill a buffer that the trainer samples from, so simulation and
  training overlap. A fixed validation set is simulated once from its own seed.

Every training pair gets one of the 8 flips/rotations of the square (the same for input and target)
and each image is z-scored by its own statistics (input by the input's mean and std, target by the
target's), as in the paper; a multi-channel (RGB) image is z-scored channel by channel, as the engine
normalizes it at inference. Validation pairs are z-scored but not augmented.
"""

from __future__ import annotations

import abc
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

from ..errors import DeepRError

DEFAULT_VAL_PAIRS = 48


class DatasetError(DeepRError):
    """A training dataset that cannot be used, explained in one sentence."""


def zscore(image: np.ndarray) -> np.ndarray:
    """Zero-mean, unit-variance copy of ``image`` as float32 (flat images become zeros).

    A ``(C, H, W)`` image is normalized per channel (the engine's per-channel statistics).
    """
    a = np.asarray(image, dtype=np.float32)
    if a.ndim == 3:
        return np.stack([zscore(c) for c in a])
    m = float(a.mean())
    s = float(a.std())
    return ((a - m) / (s if s > 1e-6 else 1.0)).astype(np.float32, copy=False)


def _nchw(images: list) -> np.ndarray:
    """Stack ``(H, W)`` or ``(C, H, W)`` images into ``[N, C, H, W]``."""
    out = np.stack(images)
    return out[:, None] if out.ndim == 3 else out


def d4(image: np.ndarray, k: int) -> np.ndarray:
    """Element ``k`` (0-7) of the dihedral group of the square: ``k % 4`` quarter turns, flipped if ``k >= 4``."""
    out = np.rot90(image, k % 4, axes=(-2, -1))
    if k >= 4:
        out = out[..., ::-1]
    return np.ascontiguousarray(out)


def defocus_bins(range_um: float, z_step_um: float | None = None) -> np.ndarray:
    """Centres of the defocus bins used for per-z validation metrics.

    About 11 bins across ``[-range_um, range_um]`` on a round step (never finer than the z-step).

    Parameters
    ----------
    range_um : float
        Half range of defocus.
    z_step_um : float, optional
        Step of the stacks the pairs came from.

    Returns
    -------
    ndarray
        Sorted bin centres, symmetric about 0.
    """
    target = max(range_um / 5.0, z_step_um or 0.0, 1e-3)
    steps = [0.05, 0.1, 0.2, 0.25, 0.5, 1.0, 2.0, 2.5, 5.0, 10.0, 20.0, 50.0]
    step = next((s for s in steps if s >= target - 1e-9), steps[-1])
    n = int(np.floor(range_um / step + 1e-6))
    return np.arange(-n, n + 1) * step


def _z_batch(zs: list, patch: int) -> np.ndarray:
    """Defocus of a batch: ``[n]`` when every sample is flat, else per-pixel maps ``[n, 1, P, P]``."""
    if all(np.ndim(z) == 0 for z in zs):
        return np.asarray(zs, np.float32)
    return np.stack([np.broadcast_to(np.asarray(z, np.float32), (patch, patch)) for z in zs])[:, None].copy()


def bin_of(z_um: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Index of the nearest bin centre for each defocus."""
    z = np.asarray(z_um, dtype=float).reshape(-1, 1)
    return np.abs(z - centres.reshape(1, -1)).argmin(axis=1)


class Source(abc.ABC):
    """Interface of a training data source.

    Attributes
    ----------
    info : dict
        Description for the model card: ``kind``, ``path``, ``optics``, ``range_um``,
        ``z_step_um``, ``dpm_sign``, ``dpm_sign_meaningful``, ``provenance``.
    patch : int
        Side of the training patches.
    """

    info: dict
    patch: int
    channels: int = 1

    @abc.abstractmethod
    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return ``n`` augmented, z-scored training pairs ``(x [n,1,P,P], y [n,1,P,P], z_um)``.

        ``z_um`` is ``[n]`` for flat samples, or per-pixel defocus maps ``[n,1,P,P]`` when any
        sample of the batch is tilted or curved.
        """

    @abc.abstractmethod
    def validation(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return the fixed validation pairs ``(x, y, z_um)`` (z-scored, not augmented)."""

    def close(self) -> None:
        """Release workers and files."""


# ----------------------------------------------------------------------------- on-disk pairs
class PairsSource(Source):
    """Pairs written by :func:`napari_deepr.stacks.pairs.build_pairs`.

    Parameters
    ----------
    folder : path
        The dataset folder (holding ``index.json``).
    patch : int, optional
        Training patch side; stored patches are randomly cropped to it (default: stored size).
    val_pairs : int
        Most validation pairs used, spread evenly over the defocus bins.
    seed : int
        Seed of the validation subset choice.
    """

    def __init__(self, folder: str | os.PathLike, patch: int | None = None, val_pairs: int = DEFAULT_VAL_PAIRS,
                 seed: int = 0) -> None:
        from ..stacks.pairs import load_pairs

        try:
            self.pairs = load_pairs(folder)
        except (OSError, ValueError, KeyError) as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DatasetError(f"{folder} is not a usable pairs dataset: {msg}") from exc
        stored = int(self.pairs.patch)
        self.patch = int(patch or stored)
        if self.patch > stored:
            raise DatasetError(
                f"The dataset's patches are {stored} px, smaller than the requested training patch of {self.patch} px."
            )
        if self.patch % 32:
            raise DatasetError(f"The training patch ({self.patch} px) must be a multiple of 32.")
        self.train_ids = self.pairs.pair_ids("train")
        self.val_ids = self.pairs.pair_ids("val")
        if len(self.train_ids) == 0:
            raise DatasetError(f"{folder} holds no training pairs.")
        self.warnings: list[str] = []
        self.validation_record = dict(self.pairs.index.get("validation") or {})
        if not self.validation_record:
            n_val_fields = len(self.pairs.fields("val"))
            self.validation_record = {"kind": "fields", "description": f"held-out fields of view: {n_val_fields}"}
        if len(self.val_ids) == 0 and len(self.pairs.fields()) == 1:
            # A one-field dataset written before region splits existed: split it by region now,
            # the same way build_pairs does, rather than validate on the training crops.
            self._split_by_region()
        if len(self.val_ids) == 0:
            self.val_ids = self.train_ids
            self.validation_record = {
                "kind": "training", "description": "the training crops themselves (the dataset holds no "
                "held-out field or region), so the numbers measure fit, not generalization"}
            self.warnings.append(
                "The dataset has no validation field or region, so validation uses the training crops; "
                "build it from a larger field or from two fields to measure generalization."
            )
        range_um = float(self.pairs.index["range_um"])
        z_step = self.pairs.index.get("z_step_um")
        centres = defocus_bins(range_um, z_step if isinstance(z_step, (int, float)) else None)
        zs = np.array([self.pairs.pairs[i]["z_um"] for i in self.val_ids])
        rng = np.random.default_rng(seed)
        chosen: list[int] = []
        if len(self.val_ids) > val_pairs:
            bins = bin_of(zs, centres)
            per_bin = max(1, val_pairs // max(1, len(np.unique(bins))))
            for b in np.unique(bins):
                members = np.flatnonzero(bins == b)
                chosen += list(rng.choice(members, min(per_bin, len(members)), replace=False))
            chosen = sorted(chosen)[: max(val_pairs, len(np.unique(bins)))]
            self.val_ids = [self.val_ids[i] for i in chosen]
        optics = dict(self.pairs.index.get("optics") or {})
        self.info = {
            "kind": "pairs",
            "path": str(Path(folder).resolve()),
            "optics": optics,
            "range_um": range_um,
            "z_step_um": z_step,
            "dpm_sign": self.pairs.index.get(
                "z_sign", "positive = planes after the in-focus plane in the stacks' order"
            ),
            "dpm_sign_meaningful": bool(self.pairs.index.get("z_sign_meaningful", True)),
            "validation": self.validation_record,
            "modality": optics.get("modality"),
            "provenance": {
                "dataset": str(Path(folder).resolve()),
                "summary": self.pairs.index.get("summary", {}),
                "sources": [f.get("source") for f in self.pairs.index.get("fields", [])],
                "focus_method": self.pairs.index.get("focus_method"),
            },
        }

    def _split_by_region(self) -> None:
        from ..stacks.pairs import region_split

        crops = self.pairs.crops
        p = int(self.pairs.patch)
        ys = sorted({int(c["y"]) for c in crops})
        xs = sorted({int(c["x"]) for c in crops})
        labels, record, warns = region_split((len(ys), len(xs)), p, float(self.pairs.index.get("split_fraction", 0.85)))
        if record["kind"] != "region":
            return
        crop_label = {c["id"]: labels[ys.index(int(c["y"])), xs.index(int(c["x"]))] for c in crops}
        self.train_ids = [i for i, q in enumerate(self.pairs.pairs) if crop_label[q["crop"]] == "train"]
        self.val_ids = [i for i, q in enumerate(self.pairs.pairs) if crop_label[q["crop"]] == "val"]
        self.validation_record = record
        self.warnings += warns

    def _crop(self, a: np.ndarray, rng: np.random.Generator | None, y0: int | None = None,
              x0: int | None = None) -> tuple[int, int]:
        h, w = a.shape[-2:]
        if rng is None:
            return (h - self.patch) // 2, (w - self.patch) // 2
        return int(rng.integers(0, h - self.patch + 1)), int(rng.integers(0, w - self.patch + 1))

    def _pair(self, pid: int, rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray, float]:
        x, y, z = self.pairs.pair(pid)
        oy, ox = self._crop(x, rng)
        sl = (slice(oy, oy + self.patch), slice(ox, ox + self.patch))
        return np.asarray(x[sl], np.float32), np.asarray(y[sl], np.float32), float(z)

    def sample(self, rng, n):
        """See :meth:`Source.sample`."""
        xs, ys, zs = [], [], []
        for pid in rng.choice(self.train_ids, size=n, replace=len(self.train_ids) < n):
            x, y, z = self._pair(int(pid), rng)
            k = int(rng.integers(0, 8))
            xs.append(zscore(d4(x, k)))
            ys.append(zscore(d4(y, k)))
            zs.append(z)
        return _nchw(xs), _nchw(ys), np.asarray(zs, np.float32)

    def validation(self):
        """See :meth:`Source.validation`."""
        xs, ys, zs = [], [], []
        for pid in self.val_ids:
            x, y, z = self._pair(int(pid), None)
            xs.append(zscore(x))
            ys.append(zscore(y))
            zs.append(z)
        return _nchw(xs), _nchw(ys), np.asarray(zs, np.float32)


# ----------------------------------------------------------------------------- synthetic
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


def open_source(dataset: str | os.PathLike, patch: int | None, *, seed: int = 0, workers: int = 1,
                val_pairs: int = DEFAULT_VAL_PAIRS, restart: int = 0) -> Source:
    """Open the data source named on the trainer's command line.

    Parameters
    ----------
    dataset : path
        A pairs folder, or a JSON file ``{"synthetic": {...}}``.
    patch : int, optional
        Training patch side (default: the stored patch size for pairs, 256 for synthetic data).
    seed, workers, val_pairs, restart
        See :class:`PairsSource` and :class:`SyntheticSource`.

    Returns
    -------
    Source

    Raises
    ------
    DatasetError
        With one sentence when the dataset cannot be used.
    """
    p = Path(dataset)
    if not p.exists():
        raise DatasetError(f"The dataset {p} does not exist.")
    if p.is_dir():
        return PairsSource(p, patch, val_pairs=val_pairs, seed=seed)
    if p.name == "index.json":
        return PairsSource(p.parent, patch, val_pairs=val_pairs, seed=seed)
    if p.suffix.lower() == ".json":
        try:
            spec = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DatasetError(f"{p.name} is not valid JSON ({exc}).") from exc
        if not isinstance(spec, dict) or not isinstance(spec.get("synthetic"), dict):
            raise DatasetError(f'{p.name} must hold an object {{"synthetic": {{...}}}}.')
        options = dict(spec["synthetic"])
        options.setdefault("validation_pairs", val_pairs)
        return SyntheticSource(options, patch or 256, seed=seed, workers=workers, restart=restart,
                               base_dir=p.parent)
    raise DatasetError(f"{p.name} is neither a pairs dataset folder nor a synthetic-data JSON file.")
