"""Checkpoints: the resumable ``checkpoint.pt``, the best generator ``best.pt``, stopping, and the
weights a fine-tune starts from.

A checkpoint holds only tensors, numbers, text and containers, so it loads with
``torch.load(weights_only=True)`` (:func:`load_checkpoint`): a file handed in by a user is never
unpickled freely. A stop (SIGINT, SIGTERM or ``MODEL_DIR/STOP``) raises :class:`Stopped` inside the
loop, and :func:`~napari_deepr.train.loop.train` then writes the checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import random
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._safety import atomic_path
from ..engine.contract import BEST_FILE, CHECKPOINT_FILE, DPM_FILE, GENERATOR_FILE, STOP_FILE
from . import losses as L
from .data import DatasetError

CHECKPOINT = CHECKPOINT_FILE
BEST = BEST_FILE
FORMAT_VERSION = 1

# Wall-clock seconds between checkpoints written besides those at each validation.
CHECKPOINT_EVERY_S = float(os.environ.get("DEEPR_CHECKPOINT_EVERY_S", 120))


class Stopped(Exception):
    """Raised inside the loop when a stop was requested; the caller writes the checkpoint."""


class _StopWatch:
    """Signal handlers and the stop file."""

    def __init__(self, out: Path) -> None:
        self.flag = False
        self.file = out / STOP_FILE
        self._old: dict = {}

    def __enter__(self):
        def handler(signum, frame):
            self.flag = True

        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: the stop file still works
                self._old[sig] = signal.signal(sig, handler)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def requested(self) -> bool:
        if not self.flag and self.file.exists():
            self.flag = True
        return self.flag

    def clear(self) -> None:
        if self.file.exists():
            with contextlib.suppress(OSError):  # gone already, or read-only: the next stop check says so
                self.file.unlink()



def _plain(v: Any) -> Any:
    """Tensors, numbers, text and containers only, so the file loads with ``weights_only=True``."""
    if isinstance(v, torch.Tensor) or v is None or isinstance(v, (bool, int, float, str, bytes)):
        return v
    if isinstance(v, dict):
        return {(k if isinstance(k, (str, int)) else str(k)): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        out = [_plain(x) for x in v]
        return tuple(out) if isinstance(v, tuple) else out
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, Path):
        return str(v)
    return v


def _atomic_save(obj: Any, path: Path) -> None:
    # A pid-named temporary (io's scheme): removed at exit, and by the next save after a kill -9.
    with atomic_path(path) as tmp:
        torch.save(_plain(obj), tmp)


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint or weights file without running any code it may hold.

    Only tensors, numbers, text and containers are accepted (``torch.load(weights_only=True)``): a
    file handed in by a user is never unpickled freely.

    Raises
    ------
    DatasetError
        In one sentence, for a file that holds anything else, is damaged, or is not a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path} is not a file, so it holds no checkpoint.")
    try:
        s = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise DatasetError(
            f"{path.name} holds Python objects other than tensors and plain values, so it was refused "
            "(loading it could run code); only checkpoints written by this trainer are accepted."
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise DatasetError(f"{path.name} is not a readable PyTorch checkpoint; it may be truncated or damaged ({first}).") from exc
    if not isinstance(s, dict):
        raise DatasetError(f"{path.name} holds a {type(s).__name__}, not a checkpoint dictionary.")
    return s



class CheckpointMixin:
    """The :class:`~napari_deepr.train.loop.Trainer`'s state in and out of ``checkpoint.pt``.

    Uses the trainer's networks (``G``, ``D``, ``Dec``), optimisers, counters, ``best`` records,
    ``rng`` and ``source``.
    """

    def _init_weights(self, gen: dict, dec: dict | None, source: str) -> None:
        """Load the parent's generator and DPM decoder for fine-tuning; see ``init_from``.

        The decoder is kept whenever it predicts what this run's decoder must (same DPM target),
        also for another defocus range: its scale buffer (``range_um``) comes with it, so its output
        stays in micrometres.
        """
        self.G.load_state_dict(gen)
        parent_target = self.parent.dpm_target if self.parent is not None else None
        want = "signed" if self.dpm_signed else "magnitude"
        if dec is not None and (parent_target is None or parent_target == want):
            self.Dec.load_state_dict(dec)
            self.parent_has_dpm = True
            dpm_note = "and DPM decoder"
        else:
            self.parent_has_dpm = False
            dpm_note = ("(DPM decoder fresh: the parent has none)" if dec is None else
                        f"(DPM decoder fresh: the parent's predicts {parent_target} defocus, this run {want})")
        self.emit("init", source=str(source), path=str(self.parent.weights if self.parent else source),
                  auto=bool(self.parent and self.parent.auto),
                  note=f"generator {dpm_note} start from {source}")


    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict:
        return {
            "format": FORMAT_VERSION,
            "config": dataclasses.asdict(self.cfg),
            "phase": self.phase,
            "iteration": self.iteration,
            "dpm_iteration": self.dpm_iteration,
            "elapsed": dict(self.elapsed, total=self.used()),
            "generator": self.G.state_dict(),
            "discriminator": self.D.state_dict(),
            "dpm": self.Dec.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "opt_dpm": self.opt_dec.state_dict(),
            "weights": dataclasses.asdict(self.weights),
            "best": self.best,
            "best_dpm": self.best_dpm,
            "since_best": self.since_best,
            "history": self.history,
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": self.rng.bit_generator.state,
                "python": random.getstate(),
            },
            "restarts": self.restarts,
            "source": {k: v for k, v in self.source.info.items() if k != "provenance"},
            "parent": None if self.parent is None else {
                "weights": str(self.parent.weights), "name": self.parent.name, "card": self.parent.card,
                "auto": self.parent.auto},
            "parent_eval": self.parent_eval,
            "cost": dict(self.cost),
            "parent_has_dpm": self.parent_has_dpm,
        }

    def _restore(self, s: dict) -> None:
        self.G.load_state_dict(s["generator"])
        self.D.load_state_dict(s["discriminator"])
        self.Dec.load_state_dict(s["dpm"])
        self.opt_g.load_state_dict(s["opt_g"])
        self.opt_d.load_state_dict(s["opt_d"])
        self.opt_dec.load_state_dict(s["opt_dpm"])
        self.phase = s["phase"]
        self.iteration = int(s["iteration"])
        self.dpm_iteration = int(s["dpm_iteration"])
        self.elapsed = dict(s["elapsed"])
        w = s["weights"]
        self.weights = L.LossWeights(w["adv"], w["msssim"], w["berhu"], w["balance"], dict(w.get("running", {})))
        self.best = s["best"]
        self.best_dpm = s["best_dpm"]
        self.since_best = int(s["since_best"])
        self.history = list(s["history"])
        self.parent_eval = s.get("parent_eval")
        self.cost.update({k: v for k, v in dict(s.get("cost") or {}).items() if k in self.cost})
        self.parent_has_dpm = bool(s.get("parent_has_dpm", False))
        torch.set_rng_state(s["rng"]["torch"])
        self.rng.bit_generator.state = s["rng"]["numpy"]
        random.setstate(s["rng"]["python"])

    def save_checkpoint(self, reason: str) -> Path:
        """Write the resumable ``checkpoint.pt`` atomically and announce it."""
        t0 = time.monotonic()
        _atomic_save(self._state(), self.ckpt_path)
        dt = time.monotonic() - t0
        self.cost["checkpoint"] = max(dt, self.cost["checkpoint"] or 0.0)
        self._last_save = time.monotonic()
        self.emit("checkpoint", path=str(self.ckpt_path), kind="resume", reason=reason, phase=self.phase,
                  iteration=self.iteration, dpm_iteration=self.dpm_iteration)
        return self.ckpt_path



def load_init_weights(source: str | Path) -> tuple[dict, dict | None]:
    """Generator and DPM-decoder state dicts from a model folder, an ``.onnx`` file or a checkpoint.

    The exported ONNX graphs keep the PyTorch parameter names (``generator.*``, ``decoder.*``), so a
    shipped model (which has no checkpoint) can be fine-tuned too.

    Raises
    ------
    DatasetError
        When ``source`` holds no Deep-R generator weights.
    """
    src = Path(source)
    if src.suffix in (".pt", ".pth"):
        s = load_checkpoint(src)
        gen = s.get("generator") or s.get("state")
        if not isinstance(gen, dict) or not gen:
            raise DatasetError(f"{src.name} holds no generator weights.")
        return gen, s.get("dpm")
    import onnx
    from onnx import numpy_helper

    gpath = src / GENERATOR_FILE if src.is_dir() else src
    if not gpath.is_file():
        raise DatasetError(f"There is no {GENERATOR_FILE} or checkpoint at {src}.")

    def params(path: Path, prefix: str) -> dict:
        m = onnx.load(str(path))
        return {i.name[len(prefix):]: torch.from_numpy(numpy_helper.to_array(i).copy())
                for i in m.graph.initializer if i.name.startswith(prefix)}

    gen = params(gpath, "generator.")
    if not gen:
        raise DatasetError(f"{gpath.name} was not exported by this trainer (no generator.* weights).")
    dpath = gpath.with_name(DPM_FILE)
    dec = params(dpath, "decoder.") if dpath.is_file() else None
    return gen, dec or None


def init_channels(gen: dict) -> int:
    """Image channels a generator state dict (from :func:`load_init_weights`) takes."""
    return int(gen["encoder.inc.weight"].shape[1])


def init_architecture(gen: dict) -> tuple[int, int]:
    """``(base, max_channels)`` of a generator state dict (from :func:`load_init_weights`)."""
    base = int(gen["encoder.inc.weight"].shape[0])
    widest = max(int(v.shape[0]) for k, v in gen.items() if k.endswith("weight") and v.ndim == 4)
    return base, widest
