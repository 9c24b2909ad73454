"""The training-pairs dataset on disk: its format constants, its error and its reader.

The format (``DATASET/index.json`` + ``patches/cNNNNNN.tif``) is described in
:mod:`napari_deepr.stacks.pairs`, whose :func:`~napari_deepr.stacks.pairs.build_pairs` writes it;
:class:`Pairs` reads it for the trainer and the front ends. This module does not import torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..engine.contract import PAIRS_INDEX_FILE
from ..errors import DeepRError

FORMAT = "napari-deepr-pairs"
VERSION = 1
Z_SIGN = "positive = planes after the in-focus plane in stack order"


class PairsError(DeepRError):
    """A stack or setting that cannot give training pairs, explained in one sentence."""


class Pairs:
    """Reader of a pairs dataset (see the module docstring for the format).

    Attributes
    ----------
    root : Path
        The dataset folder.
    index : dict
        The parsed ``index.json``.
    crops, pairs : list of dict
        Shortcuts to ``index["crops"]`` and ``index["pairs"]``.
    patch : int
        Crop side.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        path = self.root / PAIRS_INDEX_FILE
        if not path.is_file():
            raise PairsError(f"{self.root} holds no {PAIRS_INDEX_FILE}, so it is not a pairs dataset.")
        try:
            index = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PairsError(f"{path} is not valid JSON ({exc}).") from exc
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise PairsError(f"{path} is not a napari-deepr pairs index.")
        if int(index.get("version", 0)) > VERSION:
            raise PairsError(f"{path} has format version {index.get('version')}; this napari-deepr reads up to {VERSION}.")
        for key in ("patch", "range_um", "crops", "pairs"):
            if key not in index:
                raise PairsError(f"{path} lacks the field {key!r}.")
        self.index = index
        self.crops = index["crops"]
        self.pairs = index["pairs"]
        self.patch = int(index["patch"])
        self._cache: dict[int, np.ndarray] = {}
        missing = [c["file"] for c in self.crops if not (self.root / c["file"]).is_file()]
        if missing:
            raise PairsError(f"{len(missing)} patch file(s) of {self.root.name} are missing, e.g. {missing[0]}.")

    def __len__(self) -> int:
        return len(self.pairs)

    def pair_ids(self, split: str | None = None) -> list[int]:
        """Indices of the pairs in ``split`` (``"train"``, ``"val"`` or None for all)."""
        return [i for i, p in enumerate(self.pairs) if split is None or p["split"] == split]

    def crop_array(self, cid: int) -> np.ndarray:
        """The ``(K, P, P)`` float32 planes of crop ``cid`` (memory-mapped when possible)."""
        arr = self._cache.get(cid)
        if arr is None:
            import tifffile

            path = self.root / self.crops[cid]["file"]
            try:
                arr = tifffile.memmap(path, mode="r")
            except ValueError:
                arr = tifffile.imread(path)
            if arr.ndim == 2:
                arr = arr[None]
            self._cache[cid] = arr
        return arr

    def pair(self, pid: int) -> tuple[np.ndarray, np.ndarray, float]:
        """``(defocused, in_focus, z_um)`` of pair ``pid`` as float32 ``(P, P)`` arrays."""
        p = self.pairs[pid]
        crop = self.crops[p["crop"]]
        arr = self.crop_array(p["crop"])
        return (np.asarray(arr[p["plane"]], np.float32), np.asarray(arr[crop["target"]], np.float32),
                float(p["z_um"]))

    def fields(self, split: str | None = None) -> set[int]:
        """Field ids with pairs in ``split``."""
        return {self.crops[p["crop"]]["field"] for p in self.pairs if split is None or p["split"] == split}


def load_pairs(out_dir: str | os.PathLike) -> Pairs:
    """Open a dataset written by :func:`build_pairs`.

    Raises
    ------
    PairsError
        When the folder is not a readable pairs dataset.
    """
    return Pairs(out_dir)
