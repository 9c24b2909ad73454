"""Training data for the Deep-R trainer: on-disk pairs datasets and on-the-fly synthetic pairs.

Two sources give the trainer the same thing, batches of ``(input, target, z_um)``:

* :class:`PairsSource` -- a folder written by :func:`napari_deepr.stacks.pairs.build_pairs`
  (``index.json`` + ``patches/*.tif``). Training pairs come from the training fields, validation
  pairs from the validation fields (split by field of view when the dataset was built). Stored
  patches larger than the training patch are randomly cropped.
* :class:`~.synthetic.SyntheticSource` -- pairs simulated on the fly by
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
import json
import os
from pathlib import Path

import numpy as np

from ..engine.contract import PAIRS_INDEX_FILE
from ..engine.normalization import zscore as _zscore
from ..errors import DeepRError

DEFAULT_VAL_PAIRS = 48


class DatasetError(DeepRError):
    """A training dataset that cannot be used, explained in one sentence."""


def zscore(image: np.ndarray) -> np.ndarray:
    """Zero-mean, unit-variance float32 copy of ``image``, each channel of a ``(C, H, W)`` image on its own.

    The normalization the card names (:func:`napari_deepr.engine.normalization.zscore`, statistics
    in float32), so training pairs are what the engine feeds the network.
    """
    return _zscore(image, dtype=np.float32)


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
        """Return ``n`` augmented, z-scored training pairs ``(x [n,C,P,P], y [n,C,P,P], z_um)``.

        ``z_um`` is ``[n]`` for flat samples, or per-pixel defocus maps ``[n,1,P,P]`` when any
        sample of the batch is tilted or curved.
        """

    @abc.abstractmethod
    def validation(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return the fixed validation pairs ``(x, y, z_um)`` (z-scored, not augmented)."""

    def close(self) -> None:  # noqa: B027 - optional: sources without workers or files have nothing to release
        """Release workers and files."""


# ----------------------------------------------------------------------------- on-disk pairs
class PairsSource(Source):
    """Pairs written by :func:`napari_deepr.stacks.pairs.build_pairs`.

    Such datasets hold gray planes (``build_pairs`` takes ``(Z, Y, X)`` stacks), so ``channels`` is 1;
    RGB models are trained on simulated brightfield pairs (:mod:`.synthetic`).

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
    if p.name == PAIRS_INDEX_FILE:
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
        from .synthetic import SyntheticSource

        return SyntheticSource(options, patch or 256, seed=seed, workers=workers, restart=restart,
                               base_dir=p.parent)
    raise DatasetError(f"{p.name} is neither a pairs dataset folder nor a synthetic-data JSON file.")


# Moved to .synthetic when this module was split; still importable from here.
_SYNTHETIC = ("GENERATORS", "SyntheticSource", "load_real_images", "_generate", "_optics_from_spec", "_pair_fn",
              "_worker")


def __getattr__(name: str):
    # Lazily, because .synthetic imports this module (an import at the top would be circular).
    if name in _SYNTHETIC:
        from . import synthetic

        return getattr(synthetic, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
