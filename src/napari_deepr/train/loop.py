"""The Deep-R training loop: GAN phase, DPM-decoder phase, export, with a JSON-lines protocol.

Phases, in order (the phase is saved in the checkpoint, so ``--resume`` continues where it stopped):

1. ``gan`` -- each *iteration* makes ``d_steps`` discriminator updates and ``g_steps`` generator
   updates (paper: 3 and 6), each on a fresh batch. Generator objective: weighted LSGAN +
   (1 - MS-SSIM) + BerHu (:mod:`.losses`); with ``gan=False`` only the last two. Adam (5e-4 / 1e-6),
   gradient-norm clipping (BerHu's quadratic branch diverges without it on sparse bright objects).
   Every ``val_every`` iterations the validation set is scored (BerHu, SSIM of input and output per
   defocus bin, RMSE), a preview PNG is written, the best generator by validation BerHu is kept, the
   resumable checkpoint is refreshed and early stopping is checked (``patience`` validations).
2. ``dpm`` -- the best generator is frozen; the DPM decoder (the up path on the generator's
   features) learns the uniform defocus of each pair with an L2 loss (Adam 1e-4).
3. ``export`` -- final validation table, ``generator.onnx``, ``dpm.onnx``, ``model.json``.

Start (:mod:`.parent`): without ``init_from`` the run fine-tunes from the bundled model whose card
matches the dataset (modality, one channel, pixel size within 10 %, range inside the model's), with
fine-tuning defaults (lr 1e-4, cosine decay, no discriminator -- the bundled model was trained
without one -- and the parent's DPM target); ``from_scratch`` opts out and trains the bundled
architecture (base 16, max 64 channels) with the paper's settings (lr 5e-4 constant, LSGAN).

Budget: ``minutes`` bounds the WHOLE run -- setup, generator, DPM decoder, final validation and
export -- counted across resumes, and is split like this: setup (opening data, loading the parent,
tracing the ONNX graphs, scoring the parent) runs first and is measured; a reserve for the end
(final validation + filling the traced graphs with the trained weights + their check in
onnxruntime + the last checkpoint), estimated from the measured validation and export-check times,
is set aside; of the rest the generator gets 75 % and the DPM decoder 25 % (``dpm_minutes`` fixes
the DPM share instead; with ``dpm_iterations=0`` the generator gets it all). Each phase stops
before an iteration or a validation that would not fit, using the measured duration of the last
ones, so the run ends within a few percent of the budget. Without ``minutes``, ``iterations`` and
``dpm_iterations`` count updates as in the paper; with neither, the run gets 10 minutes.
Checkpoints: at each validation, at least every :data:`CHECKPOINT_EVERY_S` (120 s) of training, at
each phase change and on a stop. Stopping (SIGINT, SIGTERM or a file ``MODEL_DIR/STOP``) writes
``MODEL_DIR/checkpoint.pt`` and returns the ``stopped`` status; ``--resume`` continues it, and on a
finished run either says it is finished or, given a larger budget, trains on.

Validation: every ``val_every`` iterations and, with a time budget, at least every tenth of it; the
best generator by validation BerHu is exported. The validation set is what the data source says it
is (held-out fields, a held-out region of a single field with a gap of at least the receptive field,
or simulated pairs); a fine-tune is scored with its parent on the same pairs before training, and
the export says which of the two is better.

Protocol: :func:`train` calls ``emit(dict)`` for every event; ``__main__`` prints them as JSON lines.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._safety import atomic_path, temporary_beside
from . import losses as L
from .data import DatasetError, Source, bin_of, defocus_bins, open_source
from .nets import TILE_MULTIPLE, Discriminator, DPMDecoder, Generator, count_parameters
from .parent import Parent, choose_parent, mismatches, resolve_parent

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
STOP_FILE = "STOP"
FORMAT_VERSION = 1

# Keys a --resume run may change; everything else (architecture, losses, data) comes from the checkpoint.
RUNTIME_KEYS = ("iterations", "minutes", "dpm_iterations", "dpm_minutes", "device", "threads", "workers",
                "patience", "val_every", "log_every", "export", "bf16", "lr_dpm", "dpm_target", "name", "version",
                "modality", "tile", "overlap")


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in the checkpoint and in ``model.json``).

    Attributes
    ----------
    dataset : str
        Pairs folder or synthetic-data JSON file.
    out : str
        Model folder.
    iterations, minutes : optional
        ``minutes`` bounds the whole run (see the module docstring for the split); ``iterations``
        the GAN phase's iterations (whichever ends first). Neither: 10 minutes.
    dpm_iterations, dpm_minutes : optional
        DPM-phase budget. Neither: 25 % of the training time with ``minutes``, else a quarter of
        the GAN updates (``g_steps * iterations / 4``), at least 20. ``dpm_iterations=0`` skips the
        DPM decoder.
    device : str
        ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    base, max_channels, d_base : int
        Generator width, width cap, discriminator width.
    patch, batch : int
        Patch side (multiple of 32; default: stored size, 256 for synthetic) and batch size.
    g_steps, d_steps : int
        Generator and discriminator updates per iteration.
    lr_g, lr_d, lr_dpm : float
        Adam learning rates (``lr_g`` None: 1e-4 fine-tuning, 5e-4 from scratch).
    lr_schedule : str, optional
        ``constant`` (paper) or ``cosine`` (decays to 5 % over the budget); None: cosine when
        fine-tuning, constant from scratch.
    clip : float
        Gradient-norm clip for every network.
    gan : bool, optional
        Use the discriminator and the adversarial term (None: only from scratch -- a fresh
        discriminator would pull a fine-tuned generator away from its parent).
    adv_weight, msssim_weight, berhu_weight : float
        lambda, nu, xi of the generator loss.
    balance : str
        ``fixed`` or ``auto`` (re-balance to equal contributions at each validation).
    berhu_frac : float
        BerHu threshold as a fraction of the target std.
    dpm_target : str
        ``signed`` (defocus with its sign), ``magnitude`` (``|defocus|``) or ``auto``: signed only
        when the data source says the optics make +z and -z differ (aberrated simulator optics;
        pairs datasets record ``z_sign_meaningful``). With symmetric optics a signed target cannot
        be learned -- the best prediction is 0 -- so the decoder learns the magnitude instead.
    val_every, val_pairs, patience : int
        Validation period (iterations), validation set size, early-stopping patience (validations;
        0 disables).
    seed : int
        Seed of weights, sampling and augmentation.
    bf16 : bool, optional
        bfloat16 autocast for forward/backward. None: on where the hardware runs bf16 natively (CPU
        flags ``avx512_bf16`` or ``amx_bf16``; a CUDA GPU with bf16), off elsewhere, where it is
        emulated and many times slower.
    threads : int, optional
        torch intra-op threads (default: the CPUs this process may use).
    workers : int
        Synthetic-data worker processes.
    log_every : int
        Iterations between progress events.
    export : bool
        Export the model folder at the end.
    name, version, modality : str
        Model card fields.
    tile, overlap : int, optional
        Model card inference defaults (default: 1024, and an overlap of at least 96 px that covers
        twice the geometric blur radius at the edge of the defocus range).
    init_from : str, optional
        Fine-tuning: start the generator and the DPM decoder from a model name (model search path),
        a model folder / ``generator.onnx`` or a ``checkpoint.pt`` / ``best.pt``; the network width
        is taken from it. Optimisers, budgets and iteration counts start fresh. None: the bundled
        model whose card matches the dataset, if any (see :mod:`.parent`).
    from_scratch : bool
        Do not start from any model.
    """

    dataset: str = ""
    out: str = ""
    iterations: int | None = None
    minutes: float | None = None
    dpm_iterations: int | None = None
    dpm_minutes: float | None = None
    device: str = "auto"
    base: int = 16
    max_channels: int = 64
    d_base: int = 16
    patch: int | None = None
    batch: int = 5
    g_steps: int = 6
    d_steps: int = 3
    lr_g: float | None = None
    lr_d: float = 1e-6
    lr_dpm: float = 1e-4
    lr_schedule: str | None = None
    clip: float = 1.0
    gan: bool | None = None
    adv_weight: float = 0.1
    msssim_weight: float = 5.0
    berhu_weight: float = 1.0
    balance: str = "fixed"
    berhu_frac: float = 0.1
    val_every: int = 50
    val_pairs: int = 48
    patience: int = 20
    dpm_target: str = "auto"
    seed: int = 0
    bf16: bool | None = None
    threads: int | None = None
    workers: int = 1
    log_every: int = 1
    export: bool = True
    name: str | None = None
    version: str = "1.0.0"
    modality: str = "widefield fluorescence"
    tile: int | None = None
    overlap: int | None = None
    extra_card: dict = field(default_factory=dict)
    init_from: str | None = None
    from_scratch: bool = False

    def validate(self) -> None:
        """Raise :class:`DatasetError`-style ValueErrors for impossible settings (one sentence)."""
        if self.iterations is not None and self.iterations < 0:
            raise ValueError("--iterations must be zero or more.")
        if self.minutes is not None and self.minutes <= 0:
            raise ValueError("--minutes must be positive.")
        if self.patch is not None and (self.patch < 32 or self.patch % TILE_MULTIPLE):
            raise ValueError(f"--patch must be a positive multiple of {TILE_MULTIPLE}.")
        if self.batch < 1 or self.g_steps < 1 or self.d_steps < 0:
            raise ValueError("--batch and --g-steps must be at least 1 and --d-steps at least 0.")
        if self.lr_schedule not in (None, "constant", "cosine"):
            raise ValueError("--lr-schedule must be constant or cosine.")
        if self.balance not in ("fixed", "auto"):
            raise ValueError("--balance must be fixed or auto.")
        if self.dpm_target not in ("auto", "signed", "magnitude"):
            raise ValueError("--dpm-target must be auto, signed or magnitude.")
        if self.val_every < 1:
            raise ValueError("--val-every must be at least 1.")
        zero_ok = ("dpm_iterations", "patience", "overlap", "workers")  # workers 0: data made in-process
        for name in ("dpm_iterations", "patience", "threads", "workers", "tile", "overlap", "log_every"):
            v = getattr(self, name, None)
            lo = 0 if name in zero_ok else 1
            if v is not None and v < lo:
                raise ValueError(f"--{name.replace('_', '-')} must be at least {lo}.")
        if self.dpm_minutes is not None and not self.dpm_minutes > 0:
            raise ValueError("--dpm-minutes must be positive.")
        for name in ("lr_g", "lr_d", "lr_dpm", "clip"):
            v = getattr(self, name)
            if v is None and name == "lr_g":
                continue
            if not (v > 0 and math.isfinite(v)):
                raise ValueError(f"--{name.replace('_', '-')} must be a positive number.")
        for name in ("adv_weight", "msssim_weight", "berhu_weight"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"--{name.replace('_', '-')} must be zero or a positive number.")
        if self.base < 1 or self.max_channels < self.base or self.d_base < 1:
            raise ValueError("--base and --d-base must be at least 1 and --max-channels at least --base.")
        if self.from_scratch and self.init_from:
            raise ValueError("--from-scratch and --init-from contradict each other; give one of them.")


# Wall-clock seconds between checkpoints written besides those at each validation.
CHECKPOINT_EVERY_S = float(os.environ.get("DEEPR_CHECKPOINT_EVERY_S", 120))
DEFAULT_MINUTES = 10.0
GAN_SHARE = 0.75
"""Share of the training time (after setup and the end reserve) that goes to the generator."""


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 natively (else autocast emulates it, many times slower).

    CPU: the ``avx512_bf16`` or ``amx_bf16`` flags of ``/proc/cpuinfo`` (Linux); elsewhere False.
    """
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:
        pass
    return False


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


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
            try:
                self._old[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass
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
            try:
                self.file.unlink()
            except OSError:
                pass


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DatasetError("CUDA was requested but this PyTorch sees no CUDA GPU; use --device cpu.")
    if name not in ("cpu", "cuda"):
        raise DatasetError(f"Unknown device {name!r}; use auto, cpu or cuda.")
    return torch.device(name)


def _clean(v: Any) -> Any:
    """Make a value JSON-safe: NaN/inf become None, numpy scalars become Python numbers."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, (np.floating, float)):
        f = float(v)
        return f if math.isfinite(f) else None
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, Path):
        return str(v)
    return v


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


class Trainer:
    """One training run; use :func:`train` rather than this class directly.

    Parameters
    ----------
    config : TrainConfig
        Settings (for ``resume``, the checkpoint's settings win except :data:`RUNTIME_KEYS`).
    emit : callable
        Receives every event dict.
    resume : bool
        Continue from ``MODEL_DIR/checkpoint.pt``.
    redo_dpm : bool
        With ``resume``: keep the trained generator but train a fresh DPM decoder (new
        ``--lr-dpm``, ``--dpm-target`` and DPM budget), then export again.
    """

    def __init__(self, config: TrainConfig, emit: Callable[[dict], None], resume: bool = False,
                 redo_dpm: bool = False, t0: float | None = None) -> None:
        self.emit_raw = emit
        # Wall clock of this process's start: --minutes counts everything from there.
        self.t0 = time.monotonic() if t0 is None else t0
        self.used_before = 0.0
        self.out = Path(config.out)
        if self.out.exists() and not self.out.is_dir():
            raise DatasetError(f"The model folder {self.out} is a file; choose a folder name.")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DatasetError(f"The model folder {self.out} cannot be created ({exc.strerror or exc}).") from exc
        (self.out / "previews").mkdir(exist_ok=True)
        self.ckpt_path = self.out / CHECKPOINT
        self.saved: dict | None = None
        self.warnings: list[str] = []
        self.notes: list[str] = []
        self.already_finished = False
        if resume:
            if not self.ckpt_path.exists():
                raise DatasetError(f"There is no checkpoint to resume in {self.out}.")
            self.saved = load_checkpoint(self.ckpt_path)
            if not isinstance(self.saved.get("config"), dict) or "generator" not in self.saved:
                raise DatasetError(f"{self.ckpt_path.name} is not a resumable checkpoint of this trainer.")
            base = dict(self.saved["config"])
            for k in RUNTIME_KEYS:
                v = getattr(config, k)
                if v is not None and v != TrainConfig.__dataclass_fields__[k].default:
                    base[k] = v
            base["dataset"] = config.dataset
            base["out"] = config.out
            config = TrainConfig(**{k: v for k, v in base.items() if k in TrainConfig.__dataclass_fields__})
            self.used_before = float(dict(self.saved.get("elapsed") or {}).get("total", 0.0))
        config.validate()
        self.status("opening the dataset")
        restart = int(self.saved["restarts"]) + 1 if self.saved else 0
        self.restarts = restart
        self.source: Source = open_source(config.dataset, config.patch, seed=config.seed, workers=config.workers,
                                          val_pairs=config.val_pairs, restart=restart)
        try:
            self._setup(config, redo_dpm)
        except BaseException:
            self.source.close()
            raise

    def _setup(self, config: TrainConfig, redo_dpm: bool) -> None:
        self.warnings += getattr(self.source, "warnings", [])
        self.patch = self.source.patch
        self.range_um = float(self.source.info["range_um"])
        init_weights = None
        self.parent: Parent | None = None
        if self.saved is None:
            if config.init_from:
                self.status(f"loading {config.init_from}")
                self.parent = resolve_parent(config.init_from)
                refusals, warns = mismatches(self.parent.card, self.source.info, config.modality)
                if refusals:
                    raise DatasetError(refusals[0])
                self.warnings += warns
            elif not config.from_scratch:
                self.parent, note = choose_parent(self.source.info, config.modality)
                (self.notes if self.parent else self.warnings).append(note)
            if self.parent is not None:
                init_weights = load_init_weights(self.parent.weights)
                base_w, cap = init_architecture(init_weights[0])
                config = dataclasses.replace(config, base=base_w, max_channels=cap, init_from=str(self.parent.weights))
            config = self._defaults(config)
        else:
            p = self.saved.get("parent")
            if isinstance(p, dict) and p.get("weights"):
                self.parent = Parent(Path(p["weights"]), p.get("name", ""), dict(p.get("card") or {}), bool(p.get("auto")))
        config.validate()
        self.cfg = config
        self.threads = int(config.threads or available_cpus())
        torch.set_num_threads(self.threads)
        self.device = _resolve_device(config.device)
        self.native_bf16 = native_bf16(self.device)
        self.bf16 = self.native_bf16 if config.bf16 is None else bool(config.bf16)
        if config.bf16 and not self.native_bf16:
            self.warnings.append("This processor has no native bfloat16 (avx512_bf16/amx), so --bf16 is emulated and "
                                 "much slower than float32; leave it off here.")
        torch.manual_seed(config.seed)
        self.rng = np.random.default_rng([config.seed, self.restarts])
        random.seed(config.seed)
        # channels_last pays off only with bf16 autocast: measured on a 2-core AVX-512 CPU (base 16,
        # 256 px, batch 5) one fp32 generator step takes 1.4 s NCHW but 6.9 s channels_last, while
        # bf16 takes 0.98 s NCHW and 0.74 s channels_last.
        self.cl = torch.channels_last if self.bf16 else torch.contiguous_format
        # Image channels come from the data (1 gray, 3 for RGB brightfield); the card records them.
        self.channels = int(getattr(self.source, "channels", 1))
        self.G = Generator(self.channels, config.base, config.max_channels, init=init_weights is None and not self.saved).to(
            self.device, memory_format=self.cl)
        self.D = Discriminator(self.channels, config.d_base, config.max_channels).to(self.device, memory_format=self.cl)
        self.Dec = DPMDecoder(self.G.chans, max(self.range_um, 1e-3)).to(self.device, memory_format=self.cl)
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=config.lr_g, betas=(0.9, 0.999))
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=config.lr_d, betas=(0.9, 0.999))
        self.opt_dec = torch.optim.Adam(self.Dec.parameters(), lr=config.lr_dpm, betas=(0.9, 0.999))
        self.weights = L.LossWeights(config.adv_weight, config.msssim_weight, config.berhu_weight, config.balance)
        self.iteration = 0
        self.dpm_iteration = 0
        self.phase = "gan"
        self.elapsed = {"gan": 0.0, "dpm": 0.0, "setup": 0.0, "export": 0.0, "total": 0.0}
        self.best = {"berhu": math.inf, "iteration": 0, "state": None, "metrics": None}
        self.best_dpm = {"mae": math.inf, "iteration": 0, "state": None}
        self.since_best = 0
        self.history: list[dict] = []
        self._last_dpm_val = -1
        self.last_terms: dict = {}
        self.parent_eval: dict | None = None
        self.parent_has_dpm = False
        self.cost = {"val": None, "val_dpm": None, "export_check": None, "checkpoint": None}
        self.deadline: dict[str, float | None] = {}
        self.phase_start: dict[str, float] = {}
        self.step_s: dict[str, float] = {}
        self.val_interval_s: float | None = None
        self._resumed_finished = False
        if init_weights is not None:
            self._init_weights(*init_weights, source=self.parent.name)
        if self.saved:
            self._restore(self.saved)
            self.elapsed.setdefault("setup", 0.0)
            self.elapsed.setdefault("export", 0.0)
            self.elapsed["total"] = self.used_before
            if redo_dpm:
                if self.phase == "gan":
                    raise DatasetError("The generator has not finished training, so there is no DPM phase to redo yet.")
                torch.manual_seed(config.seed + 1)
                self.Dec = DPMDecoder(self.G.chans, max(self.range_um, 1e-3)).to(self.device, memory_format=self.cl)
                self.opt_dec = torch.optim.Adam(self.Dec.parameters(), lr=config.lr_dpm, betas=(0.9, 0.999))
                self.phase = "dpm"
                self.dpm_iteration = 0
                self.elapsed["dpm"] = 0.0
                self.best_dpm = {"mae": math.inf, "iteration": 0, "state": None}
            else:
                for group in self.opt_dec.param_groups:
                    group["lr"] = config.lr_dpm
            if self.phase == "done":
                self._reopen_finished()
        self.status("preparing the validation set")
        val = self.source.validation()
        self.val = tuple(np.asarray(a) for a in val)
        z_step = self.source.info.get("z_step_um")
        self.bins = defocus_bins(self.range_um, z_step if isinstance(z_step, (int, float)) else None)

    def _defaults(self, config: TrainConfig) -> TrainConfig:
        """Fill the settings left open (None) with fine-tuning or from-scratch defaults."""
        tune = self.parent is not None
        changes: dict[str, Any] = {}
        if config.lr_g is None:
            changes["lr_g"] = 1e-4 if tune else 5e-4
        if config.lr_schedule is None:
            changes["lr_schedule"] = "cosine" if tune else "constant"
        if config.gan is None:
            changes["gan"] = not tune
        if config.iterations is None and config.minutes is None:
            changes["minutes"] = DEFAULT_MINUTES
            self.notes.append(f"No budget was given, so the run takes {DEFAULT_MINUTES:g} minutes (--minutes).")
        if config.dpm_target == "auto" and tune and self.parent.dpm_target:
            # The child keeps what its parent's DPM means; switching silently flipped users' maps.
            changes["dpm_target"] = self.parent.dpm_target
        return dataclasses.replace(config, **changes)

    def _reopen_finished(self) -> None:
        """``--resume`` on a finished run: say so, or train on when the budget was raised."""
        cfg = self.cfg
        more_time = cfg.minutes is not None and 60.0 * cfg.minutes - self.used_before > 30.0
        more_its = cfg.iterations is not None and cfg.iterations > self.iteration and cfg.minutes is None
        done_txt = (f"{self.iteration} iterations, {self.used_before / 60:.1f} minutes"
                    + (f" of {cfg.minutes:g}" if cfg.minutes else ""))
        if more_time or more_its:
            self.notes.append(f"This run had finished ({done_txt}); it trains on with the larger budget.")
            self.phase = "gan"
            self._resumed_finished = True
        else:
            self.already_finished = True
            self.notes.append(f"This run already finished ({done_txt}); pass --resume with a larger --minutes "
                              "or --iterations to train it further.")

    # ------------------------------------------------------------------ helpers
    def status(self, message: str) -> None:
        """A progress line during setup (the first one within a second of the start)."""
        self.emit("status", phase="setup", message=message, elapsed_s=round(time.monotonic() - self.t0, 2))

    def used(self) -> float:
        """Seconds of this run so far, across resumes (the clock ``--minutes`` is measured on)."""
        return self.used_before + time.monotonic() - self.t0

    def emit(self, event: str, **fields: Any) -> None:
        self.emit_raw(_clean({"event": event, **fields}))

    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _to(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(self.device).contiguous(memory_format=self.cl)

    def _batch(self, n: int | None = None):
        x, y, z = self.source.sample(self.rng, n or self.cfg.batch)
        return self._to(x), self._to(y), torch.from_numpy(z).to(self.device)

    # ------------------------------------------------------------------ budget
    def _gan_its(self) -> int | None:
        return self.cfg.iterations

    def _dpm_its(self) -> int | None:
        it = self.cfg.dpm_iterations
        if it is None and self.cfg.minutes is None and self.cfg.dpm_minutes is None:
            it = max(20, (self.cfg.iterations or 0) * self.cfg.g_steps // 4)
        return it

    def _dpm_skipped(self) -> bool:
        return self.cfg.dpm_iterations == 0

    def end_reserve(self) -> float:
        """Seconds set aside for the end: final validation, export fill-in and check, last checkpoint."""
        val = self.cost["val_dpm"] or self.cost["val"] or 5.0
        check = self.cost["export_check"] if self.cost["export_check"] is not None else 3.0
        ckpt = self.cost["checkpoint"] or 0.5
        # Both were measured on this machine during setup or the last validation (a dry export
        # runs in setup), so small margins suffice.
        return 1.1 * val + 1.1 * check + ckpt + 0.3 if self.cfg.export else 1.1 * val + ckpt + 0.3

    def _plan(self, phase: str) -> None:
        """Set the phase's deadline on the run clock (see the module docstring for the split)."""
        cfg = self.cfg
        now = self.used()
        self.phase_start[phase] = now
        deadline = None
        if cfg.minutes is not None:
            end = 60.0 * cfg.minutes - self.end_reserve()
            if phase == "gan":
                if self._dpm_skipped():
                    deadline = end
                elif cfg.dpm_minutes is not None:
                    deadline = end - 60.0 * cfg.dpm_minutes
                else:
                    deadline = now + GAN_SHARE * max(0.0, end - now)
            else:
                deadline = end
        elif phase == "dpm" and cfg.dpm_minutes is not None:
            deadline = now + 60.0 * cfg.dpm_minutes
        elif phase == "gan" and cfg.dpm_minutes is not None and cfg.iterations is None:
            deadline = None
        self.deadline[phase] = deadline
        if phase == "gan" and deadline is not None and deadline - now < 10 * (self.step_s.get("gan") or 1.0):
            self.emit("warning", message=f"Setup took {now:.0f} s of the {60 * cfg.minutes:.0f}-s budget, which leaves "
                      "almost no time to train; give a larger --minutes.")
        if phase == "gan" and cfg.minutes is not None:
            # Validate at least every tenth of the budget (and no more often than 4x its cost).
            self.val_interval_s = max(6.0 * cfg.minutes, 4.0 * (self.cost["val"] or 1.0))
        self.emit("plan", phase=phase, deadline_s=deadline, budget_s=60.0 * cfg.minutes if cfg.minutes else None,
                  used_s=round(now, 2), reserve_s=round(self.end_reserve(), 2),
                  iterations=self._gan_its() if phase == "gan" else self._dpm_its())

    def _fraction(self, phase: str) -> float:
        its = self._gan_its() if phase == "gan" else self._dpm_its()
        done = self.iteration if phase == "gan" else self.dpm_iteration
        f = 0.0
        if its:
            f = max(f, done / its)
        dl = self.deadline.get(phase)
        if dl is not None:
            start = self.phase_start.get(phase, 0.0)
            f = max(f, (self.used() - start) / max(dl - start, 1e-6))
        return min(f, 1.0)

    def _finished(self, phase: str) -> bool:
        its = self._gan_its() if phase == "gan" else self._dpm_its()
        done = self.iteration if phase == "gan" else self.dpm_iteration
        if its is not None and done >= its:
            return True
        dl = self.deadline.get(phase)
        if dl is None:
            return False
        # Stop before an iteration that would not fit, keeping room for the phase's last validation.
        final_val = (self.cost["val"] if phase == "gan" else self.cost["val_dpm"]) or 0.0
        return self.used() + self.step_s.get(phase, 0.0) + final_val > dl

    def _past_deadline(self, phase: str) -> bool:
        dl = self.deadline.get(phase)
        if dl is None:
            return False
        one = self.step_s.get(phase, 0.0) / max(1, self.cfg.g_steps + (self.cfg.d_steps if self.cfg.gan else 0))
        return self.used() + one + (self.cost["val"] or 0.0) > dl

    def _fits(self, phase: str, seconds: float | None) -> bool:
        """Whether ``seconds`` more work still fits before the phase's deadline."""
        dl = self.deadline.get(phase)
        return dl is None or self.used() + (seconds or 0.0) + self.step_s.get(phase, 0.0) <= dl

    def _eta(self, phase: str, rate: float) -> float | None:
        """Seconds until the whole run (both phases and the export) ends."""
        if self.cfg.minutes is not None:
            return max(0.0, 60.0 * self.cfg.minutes - self.used())
        its = self._gan_its() if phase == "gan" else self._dpm_its()
        done = self.iteration if phase == "gan" else self.dpm_iteration
        if its is None or rate <= 0:
            dl = self.deadline.get(phase)
            return max(0.0, dl - self.used()) if dl is not None else None
        eta = (its - done) / rate
        if phase == "gan" and not self._dpm_skipped():
            dpm_its = self._dpm_its()
            if dpm_its:
                eta += dpm_its * self.step_s.get("gan", 1.0 / rate) / (2 * max(self.cfg.g_steps, 1))
        return eta + self.end_reserve()

    def _set_lr(self) -> None:
        if self.cfg.lr_schedule != "cosine":
            return
        f = self._fraction("gan")
        scale = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * f))
        for opt, lr in ((self.opt_g, self.cfg.lr_g), (self.opt_d, self.cfg.lr_d)):
            for group in opt.param_groups:
                group["lr"] = lr * scale

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

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, with_dpm: bool = False) -> dict:
        """Score the validation set: BerHu, SSIM and RMSE of input and output, per defocus bin.

        Parameters
        ----------
        with_dpm : bool
            Also report the DPM decoder's mean absolute error (µm) per bin.

        Returns
        -------
        dict
            ``berhu``, ``berhu_input``, ``ssim_input``, ``ssim_output``, ``rmse_input``,
            ``rmse_output`` (means), ``per_z`` (list of per-bin dicts) and the outputs used for the
            preview under ``_preview``.
        """
        self.G.eval()
        self.Dec.eval()
        x_all, y_all, z_all = self.val
        n = len(z_all)
        rec = {k: np.zeros(n) for k in ("berhu_in", "berhu_out", "ssim_in", "ssim_out", "rmse_in", "rmse_out",
                                           "dpm_mae")}
        outputs = np.zeros_like(x_all)
        bs = max(1, self.cfg.batch * 2)
        for s in range(0, n, bs):
            x = self._to(x_all[s:s + bs])
            y = self._to(y_all[s:s + bs])
            # Same precision as training (bf16 where native): fp32 on channels-last weights is ~5x slower.
            with self._autocast():
                out, feats = self.G.forward_with_features(x)
            out = out.float()
            outputs[s:s + bs] = out.float().cpu().numpy()
            sl = slice(s, s + len(x))
            rec["berhu_in"][sl] = L.berhu(x, y, self.cfg.berhu_frac, reduce=False).cpu().numpy()
            rec["berhu_out"][sl] = L.berhu(out, y, self.cfg.berhu_frac, reduce=False).cpu().numpy()
            rec["ssim_in"][sl] = L.ssim(x, y).cpu().numpy()
            rec["ssim_out"][sl] = L.ssim(out, y).cpu().numpy()
            rec["rmse_in"][sl] = ((x - y) ** 2).flatten(1).mean(1).sqrt().cpu().numpy()
            rec["rmse_out"][sl] = ((out - y) ** 2).flatten(1).mean(1).sqrt().cpu().numpy()
            if with_dpm:
                with self._autocast():
                    dpm = self.Dec(*feats).float()
                z = self._dpm_target(torch.as_tensor(z_all[sl], device=self.device))
                # Scored where the in-focus target has structure (same rule as the training weight).
                mask = (L.structure_weight(y, floor=0.0) > 0).float()
                rec["dpm_mae"][sl] = L.weighted_mean((dpm - z).abs(), mask, reduce=False).cpu().numpy()
        bins = bin_of(z_all, self.bins)
        per_z = []
        for b in np.unique(bins):
            m = bins == b
            row = {
                "z_um": float(self.bins[b]),
                "n": int(m.sum()),
                "ssim_input": float(rec["ssim_in"][m].mean()),
                "ssim_output": float(rec["ssim_out"][m].mean()),
                "rmse_input": float(rec["rmse_in"][m].mean()),
                "rmse_output": float(rec["rmse_out"][m].mean()),
                "berhu_input": float(rec["berhu_in"][m].mean()),
                "berhu_output": float(rec["berhu_out"][m].mean()),
            }
            if with_dpm:
                row["dpm_mae_um"] = float(rec["dpm_mae"][m].mean())
            per_z.append(row)
        metrics = {
            "berhu": float(rec["berhu_out"].mean()),
            "berhu_input": float(rec["berhu_in"].mean()),
            "ssim_input": float(rec["ssim_in"].mean()),
            "ssim_output": float(rec["ssim_out"].mean()),
            "rmse_input": float(rec["rmse_in"].mean()),
            "rmse_output": float(rec["rmse_out"].mean()),
            "n": n,
            "per_z": per_z,
        }
        if with_dpm:
            metrics["dpm_mae_um"] = float(rec["dpm_mae"].mean())
        metrics["_preview"] = outputs
        self.G.train()
        self.Dec.train()
        return metrics

    def write_preview(self, outputs: np.ndarray, tag: str) -> str:
        """Save an input / output / target mosaic of up to 5 validation pairs spread over z."""
        from PIL import Image, ImageDraw

        x_all, y_all, z_all = self.val
        order = np.argsort(z_all)
        pick = order[np.unique(np.linspace(0, len(order) - 1, min(5, len(order))).round().astype(int))]
        tiles = []
        rgb = x_all.shape[1] == 3
        for i in pick:
            # RGB (brightfield) previews in colour, each channel stretched by the target's percentiles
            tgt = np.moveaxis(y_all[i], 0, -1) if rgb else y_all[i, 0]
            src = (np.moveaxis(x_all[i], 0, -1), np.moveaxis(outputs[i], 0, -1), tgt) if rgb else (
                x_all[i, 0], outputs[i, 0], tgt)
            axis = (0, 1) if rgb else None
            lo, hi = np.percentile(tgt, 0.5, axis=axis), np.percentile(tgt, 99.8, axis=axis)
            hi = np.where(hi > lo, hi, lo + 1)
            row = [np.clip((a - lo) / (hi - lo), 0, 1) for a in src]
            gap = np.ones((tgt.shape[0], 4) + tgt.shape[2:])
            tiles.append(np.concatenate([row[0], gap, row[1], gap, row[2]], axis=1))
            tiles.append(np.ones((4,) + tiles[-1].shape[1:]))
        mosaic = (np.concatenate(tiles[:-1], axis=0) * 255).astype(np.uint8)
        img = Image.fromarray(mosaic).convert("RGB")
        draw = ImageDraw.Draw(img)
        p = x_all.shape[-1]
        for r, i in enumerate(pick):
            draw.text((3, r * (p + 4) + 2), f"z={float(z_all[i]):+.2f}um", fill=(255, 64, 64))
        for c, label in enumerate(("input", "output", "target")):
            draw.text((c * (p + 4) + 3, img.height - 12), label, fill=(64, 160, 255))
        path = self.out / "previews" / f"{tag}.png"
        with atomic_path(path) as tmp:
            img.save(tmp, format="PNG")
        return str(path)

    # ------------------------------------------------------------------ phases
    def _gan_iteration(self, stop: _StopWatch) -> dict:
        cfg = self.cfg
        terms_sum: dict[str, float] = {}
        if cfg.gan and cfg.d_steps:
            self.D.requires_grad_(True)
            for _ in range(cfg.d_steps):
                x, y, _ = self._batch()
                with torch.no_grad(), self._autocast():
                    fake = self.G(x)
                self.opt_d.zero_grad(set_to_none=True)
                with self._autocast():
                    loss_d = L.lsgan_d_loss(self.D(fake.detach()), self.D(y))
                loss_d.backward()
                torch.nn.utils.clip_grad_norm_(self.D.parameters(), cfg.clip)
                self.opt_d.step()
                terms_sum["d"] = terms_sum.get("d", 0.0) + float(loss_d.detach()) / cfg.d_steps
                if stop.requested():
                    raise Stopped
            self.D.requires_grad_(False)
        for step in range(cfg.g_steps):
            if step and self._past_deadline("gan"):
                break  # a slow machine: end the iteration early rather than overrun the budget
            x, y, _ = self._batch()
            self.opt_g.zero_grad(set_to_none=True)
            with self._autocast():
                fake = self.G(x)
                d_fake = self.D(fake) if cfg.gan else None
            loss, terms = L.generator_loss(fake, y, self.weights, d_fake, cfg.berhu_frac)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"The generator loss became {float(loss)} at iteration {self.iteration + 1}; "
                    "lower --lr-g or --clip."
                )
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.G.parameters(), cfg.clip)
            self.opt_g.step()
            self.weights.observe(terms)
            for k, v in terms.items():
                terms_sum[k] = terms_sum.get(k, 0.0) + v / cfg.g_steps
            if stop.requested():
                raise Stopped
        return terms_sum

    def _validate_gan(self) -> None:
        t0 = time.monotonic()
        m = self.evaluate()
        preview = self.write_preview(m.pop("_preview"), f"val_{self.iteration:07d}")
        self.cost["val"] = time.monotonic() - t0
        self._last_val = time.monotonic()
        improved = m["berhu"] < self.best["berhu"]
        if improved:
            self.best = {"berhu": m["berhu"], "iteration": self.iteration,
                         "state": {k: v.detach().cpu().clone() for k, v in self.G.state_dict().items()},
                         "metrics": {k: v for k, v in m.items() if k != "per_z"} | {"per_z": m["per_z"]}}
            self.since_best = 0
            _atomic_save({"generator": self.best["state"], "iteration": self.iteration, "metrics": m,
                          "config": dataclasses.asdict(self.cfg)}, self.out / BEST)
        else:
            self.since_best += 1
        rebalanced = self.weights.rebalance()
        self.history.append({"iteration": self.iteration, "berhu": m["berhu"], "ssim_output": m["ssim_output"],
                             "ssim_input": m["ssim_input"], "elapsed_s": self.elapsed["gan"]})
        early = bool(self.cfg.patience and self.since_best >= self.cfg.patience)
        self.emit("validation", phase="gan", iteration=self.iteration, metrics=m, preview=preview,
                  best=improved, best_iteration=self.best["iteration"], best_berhu=self.best["berhu"],
                  weights=self.weights.as_dict() if rebalanced else None, early_stop=early)
        if improved:
            self.emit("checkpoint", path=str(self.out / BEST), kind="best", phase="gan", iteration=self.iteration)
        self.save_checkpoint("validation")
        if early:
            self.early_stopped = True

    def _step_time(self, phase: str, dt: float) -> None:
        # The larger of the last step and the running mean: a slow step (a validation's cache
        # misses, a busy machine) makes the deadline check more careful at once.
        ema = self.step_s.get(phase)
        ema = dt if ema is None else 0.8 * ema + 0.2 * dt
        self.step_s[phase] = max(ema, dt)

    def _val_due(self, phase: str, count: int, every: int) -> bool:
        if count % every == 0:
            return True
        return bool(self.val_interval_s and time.monotonic() - self._last_val > self.val_interval_s)

    def run_gan(self, stop: _StopWatch) -> None:
        cfg = self.cfg
        self.G.train()
        self.D.train()
        self.early_stopped = False
        self._last_save = time.monotonic()
        self._last_val = time.monotonic()
        rate = 0.0
        it_b = self._gan_its()
        while not self._finished("gan") and not self.early_stopped:
            self._set_lr()
            t0 = time.perf_counter()
            try:
                terms = self._gan_iteration(stop)
            finally:
                self.elapsed["gan"] += time.perf_counter() - t0
            self.iteration += 1
            dt = time.perf_counter() - t0
            self._step_time("gan", dt)
            rate = 1.0 / dt if rate == 0 else 0.8 * rate + 0.2 / dt
            self.last_terms = terms
            if self.iteration % cfg.log_every == 0 or self.iteration == 1:
                self.emit("progress", phase="gan", iteration=self.iteration, iterations=it_b,
                          losses=terms, it_s=rate, pairs_s=rate * cfg.batch * (cfg.g_steps + (cfg.d_steps if cfg.gan else 0)),
                          eta_s=self._eta("gan", rate), elapsed_s=self.elapsed["gan"], run_s=self.used(),
                          fraction=self._fraction("gan"), lr_g=self.opt_g.param_groups[0]["lr"])
            if self._val_due("gan", self.iteration, cfg.val_every) and self._fits("gan", 2 * (self.cost["val"] or 0)):
                self._timed(self._validate_gan, "gan")
            elif time.monotonic() - self._last_save > CHECKPOINT_EVERY_S:
                # A run killed (-9, power loss) between validations still resumes from here.
                self.save_checkpoint("periodic")
            if stop.requested():
                raise Stopped
        if not self.history or self.history[-1]["iteration"] != self.iteration:
            self._timed(self._validate_gan, "gan")

    def _timed(self, fn: Callable[[], None], phase: str) -> None:
        """Run ``fn`` and count its wall time in the phase's budget (``--minutes`` is wall-clock)."""
        t0 = time.perf_counter()
        try:
            fn()
        finally:
            self.elapsed[phase] += time.perf_counter() - t0

    @property
    def dpm_signed(self) -> bool:
        """Whether the DPM decoder learns signed defocus (else its magnitude).

        ``auto`` was resolved when the run started: a fine-tune keeps its parent's target; a run
        from scratch learns the sign only when the data source says the optics make it visible.
        """
        mode = self.cfg.dpm_target
        if mode == "auto":
            return bool(self.source.info.get("dpm_sign_meaningful", False))
        return mode == "signed"

    def _dpm_target(self, z: torch.Tensor) -> torch.Tensor:
        # [n] for flat samples, [n, 1, P, P] maps for tilted or curved ones.
        z = z.float()
        if z.dim() == 1:
            z = z.view(-1, 1, 1, 1)
        return z if self.dpm_signed else z.abs()

    def _load_best_generator(self) -> None:
        if self.best.get("state") is not None:
            self.G.load_state_dict(self.best["state"])
        self.G.eval()
        self.G.requires_grad_(False)

    def run_dpm(self, stop: _StopWatch) -> None:
        cfg = self.cfg
        self._load_best_generator()
        self.Dec.train()
        it_b = self._dpm_its()
        if it_b == 0:
            return
        rate = 0.0
        scale = max(self.range_um, 1e-3)
        val_every = max(1, cfg.val_every * cfg.g_steps // 2)
        self._last_save = time.monotonic()
        self._last_val = time.monotonic()
        if self.cost["val_dpm"] is None and self.cost["val"] is not None:
            self.cost["val_dpm"] = 1.3 * self.cost["val"]  # the DPM validation also runs the decoder
        while not self._finished("dpm"):
            t0 = time.perf_counter()
            x, y, z = self._batch()
            with torch.no_grad(), self._autocast():
                _, feats = self.G.forward_with_features(x)
            weight = L.structure_weight(y)
            self.opt_dec.zero_grad(set_to_none=True)
            with self._autocast():
                pred = self.Dec(*feats)
            target = self._dpm_target(z)
            loss = L.weighted_mean(((pred.float() - target) / scale) ** 2, weight)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.Dec.parameters(), cfg.clip)
            self.opt_dec.step()
            self.dpm_iteration += 1
            dt = time.perf_counter() - t0
            self._step_time("dpm", dt)
            self.elapsed["dpm"] += dt
            rate = 1.0 / dt if rate == 0 else 0.8 * rate + 0.2 / dt
            if self.dpm_iteration % cfg.log_every == 0 or self.dpm_iteration == 1:
                mae = float(L.weighted_mean((pred.detach().float() - target).abs(), weight))
                self.emit("progress", phase="dpm", iteration=self.dpm_iteration, iterations=it_b,
                          losses={"l2": float(loss.detach()), "mae_um": mae}, it_s=rate,
                          eta_s=self._eta("dpm", rate), elapsed_s=self.elapsed["dpm"], run_s=self.used(),
                          fraction=self._fraction("dpm"))
            if self._val_due("dpm", self.dpm_iteration, val_every) and self._fits("dpm", 2 * (self.cost["val_dpm"] or 0)):
                self._timed(self._validate_dpm, "dpm")
            elif time.monotonic() - self._last_save > CHECKPOINT_EVERY_S:
                self.save_checkpoint("periodic")
            if stop.requested():
                raise Stopped
        if self._last_dpm_val != self.dpm_iteration:
            self._timed(self._validate_dpm, "dpm")

    def _validate_dpm(self) -> None:
        t0 = time.monotonic()
        self._last_dpm_val = self.dpm_iteration
        m = self.evaluate(with_dpm=True)
        m.pop("_preview")
        self.cost["val_dpm"] = time.monotonic() - t0
        self._last_val = time.monotonic()
        improved = m["dpm_mae_um"] < self.best_dpm["mae"]
        if improved:
            self.best_dpm = {"mae": m["dpm_mae_um"], "iteration": self.dpm_iteration,
                             "state": {k: v.detach().cpu().clone() for k, v in self.Dec.state_dict().items()}}
        self.emit("validation", phase="dpm", iteration=self.dpm_iteration,
                  metrics={"dpm_mae_um": m["dpm_mae_um"],
                           "per_z": [{"z_um": r["z_um"], "n": r["n"], "dpm_mae_um": r["dpm_mae_um"]}
                                     for r in m["per_z"]]},
                  best=improved, best_iteration=self.best_dpm["iteration"])
        self.save_checkpoint("validation")

    def card(self, quality: dict, export_dpm: bool) -> dict:
        """The ``model.json`` content for this run."""
        import onnx
        import onnxruntime

        from .. import __version__

        info = self.source.info
        optics = dict(info.get("optics") or {})
        px = optics.get("pixel_size_um")
        na = optics.get("na")
        tile = self.cfg.tile or 1024
        overlap = self.cfg.overlap
        if overlap is None:
            radius_px = 0.0
            if px and na:
                n_imm = float(optics.get("immersion_index") or 1.0)
                s = min(float(na) / n_imm, 0.99)
                radius_px = self.range_um * s / math.sqrt(1 - s * s) / float(px)
            overlap = int(max(96, math.ceil(2 * radius_px / 32) * 32))
        overlap = min(overlap, tile // 2)
        cfg = {k: v for k, v in dataclasses.asdict(self.cfg).items() if k not in ("extra_card",)}
        card = {
            "name": self.cfg.name or self.out.name,
            "version": self.cfg.version,
            "modality": "brightfield" if (self.channels == 3 and self.cfg.modality == TrainConfig.modality) else self.cfg.modality,
            "channels": self.channels,
            "photometric": "rgb" if self.channels == 3 else "minisblack",
            "pixel_size_um": px,
            "na": na,
            "wavelength_um": optics.get("wavelength_um"),
            "immersion_index": optics.get("immersion_index"),
            "defocus_range_um": [-self.range_um, self.range_um],
            "normalization": "zscore_per_plane" if self.channels == 1 else "zscore_per_plane_per_channel",
            "output_scaling": "input_mean_std",
            "tile_multiple": TILE_MULTIPLE,
            "min_size": TILE_MULTIPLE,
            "tile": tile,
            "overlap": overlap,
            "dpm_sign": info.get("dpm_sign") if self.dpm_signed else
            "magnitude only: the DPM is |defocus| in µm (these optics make +z and -z look alike)",
            "dpm_sign_meaningful": self.dpm_signed and export_dpm,
            "dpm_target": "signed" if self.dpm_signed else "magnitude",
            "has_dpm": export_dpm,
            "architecture": {
                "generator": "residual U-Net, 5 down + 5 up blocks, LeakyReLU 0.1, global residual",
                "base": self.cfg.base, "max_channels": self.cfg.max_channels,
                "parameters": count_parameters(self.G) or sum(p.numel() for p in self.G.parameters()),
                "features": [f"feat{i}" for i in range(self.G.num_features)],
            },
            "provenance": {
                **(info.get("provenance") or {}),
                "source_kind": info.get("kind"),
                "trainer": "python -m napari_deepr.train",
                "gan_iterations": self.iteration,
                "best_iteration": self.best["iteration"],
                "dpm_iterations": self.dpm_iteration,
                "wall_s": {k: round(v, 1) for k, v in dict(self.elapsed, total=self.used()).items()},
                "parent": None if self.parent is None else {
                    "name": self.parent.name, "version": self.parent.card.get("version"),
                    "path": str(self.parent.weights), "chosen": "automatically (matching card)" if self.parent.auto
                    else "--init-from"},
                "budget": {"minutes": self.cfg.minutes, "split": f"setup, then {int(GAN_SHARE * 100)} % generator / "
                           f"{100 - int(GAN_SHARE * 100)} % DPM decoder of the rest after a reserve for the export"},
                "precision": "bf16 autocast" if self.bf16 else "float32",
                "device": str(self.device),
                "threads": torch.get_num_threads(),
                "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
            "quality": quality,
            "config": cfg,
            "versions": {
                "napari_deepr": __version__,
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__,
                "numpy": np.__version__,
                "python": sys.version.split()[0],
            },
        }
        card.update(self.cfg.extra_card or {})
        return card

    def _compare(self, m: dict, with_dpm: bool) -> dict | None:
        """The fine-tune against its parent on the same validation pairs (None without a parent)."""
        pe = self.parent_eval
        if not pe:
            return None
        pm = pe["metrics"]
        better = m["ssim_output"] > pm["ssim_output"] and m["berhu"] <= pm["berhu"]
        words = (f"on the same {m['n']} validation pairs the fine-tuned model is "
                 f"{'better than' if better else 'NOT better than'} its parent {pe['name']}: SSIM "
                 f"{m['ssim_output']:.3f} vs {pm['ssim_output']:.3f} (input {m['ssim_input']:.3f}), BerHu "
                 f"{m['berhu']:.4f} vs {pm['berhu']:.4f}")
        out = {"parent": pe["name"], "better": bool(better), "ssim_output": m["ssim_output"],
               "parent_ssim_output": pm["ssim_output"], "berhu": m["berhu"], "parent_berhu": pm["berhu"],
               "ssim_input": m["ssim_input"], "n": m["n"],
               "per_z": [{"z_um": r["z_um"], "n": r["n"], "ssim_input": r["ssim_input"], "ssim_output": r["ssim_output"],
                          "parent_ssim_output": q["ssim_output"]}
                         for r, q in zip(m["per_z"], pe["per_z"]) if abs(r["z_um"] - q["z_um"]) < 1e-6]}
        if with_dpm and "dpm_mae_um" in m and pm.get("dpm_mae_um") is not None:
            out["dpm_mae_um"] = m["dpm_mae_um"]
            out["parent_dpm_mae_um"] = pm["dpm_mae_um"]
            words += f", DPM error {m['dpm_mae_um']:.2f} vs {pm['dpm_mae_um']:.2f} µm"
        out["verdict"] = words[0].upper() + words[1:] + ("." if better else "; keep using the parent for such images.")
        return out

    def run_export(self) -> dict:
        from .export import export_model

        self._load_best_generator()
        export_dpm = self.dpm_iteration > 0
        if export_dpm and self.best_dpm.get("state") is not None:
            self.Dec.load_state_dict(self.best_dpm["state"])
        m = self.evaluate(with_dpm=export_dpm)
        m.pop("_preview")
        validation = dict(self.source.info.get("validation") or {})
        quality = {
            "dataset": validation.get("description", "validation pairs"),
            "validation": validation,
            "metric_notes": "SSIM: Gaussian 11-px window, data range of the z-scored target; RMSE and BerHu "
                            "on z-scored images; DPM MAE in µm against the pair's uniform defocus.",
            "mean": {k: v for k, v in m.items() if k != "per_z"},
            "per_z": m["per_z"],
        }
        comparison = self._compare(m, export_dpm)
        if comparison is not None:
            quality["parent_comparison"] = comparison
        card = self.card(quality, export_dpm)
        with _stdout_to_stderr():
            res = export_model(self.G, self.Dec if export_dpm else None, self.out, card, graphs=self._graphs_dir())
        return res | {"quality": quality, "comparison": comparison}

    def _graphs_dir(self) -> Path | None:
        """A folder whose ``generator.onnx`` (and ``dpm.onnx``) are traced graphs of this architecture.

        The parent's own ONNX files are such graphs (the exporter names initializers after the state
        dict), and so is the bundled model for a from-scratch run of its architecture; only other
        architectures are traced (into ``MODEL_DIR/.graphs``).
        """
        from ..engine.model import bundled_models_dir
        from .export import GRAPHS

        need_dpm = not self._dpm_skipped()
        cands = [self.out / GRAPHS]
        if self.parent is not None:
            w = Path(self.parent.weights)
            cands.append(w if w.is_dir() else w.parent)
        b = bundled_models_dir()
        if b is not None:
            for sub in sorted(b.iterdir()) if b.is_dir() else []:
                arch = {}
                try:
                    arch = json.loads((sub / "model.json").read_text()).get("architecture") or {}
                except (OSError, ValueError):
                    pass
                if arch.get("base") == self.cfg.base and arch.get("max_channels") == self.cfg.max_channels:
                    cands.append(sub)
        for c in cands:
            if (c / "generator.onnx").is_file() and (not need_dpm or (c / "dpm.onnx").is_file()):
                return c
        return None

    def _prepare(self) -> None:
        """Setup that needs the networks: score the parent, trace the ONNX graphs, measure costs."""
        from .export import GRAPHS, trace_graphs

        if self.saved is None:
            t0 = time.monotonic()
            if self.parent is not None:
                self.status(f"scoring the parent {self.parent.name} on the {len(self.val[2])} validation pairs")
                m = self.evaluate(with_dpm=self.parent_has_dpm)
                m.pop("_preview")
                self.parent_eval = {"name": self.parent.name, "metrics": {k: v for k, v in m.items() if k != "per_z"},
                                    "per_z": m["per_z"]}
                self.emit("validation", phase="parent", iteration=0, metrics=m, parent=self.parent.name)
            else:
                self.status(f"scoring the untrained network on the {len(self.val[2])} validation pairs")
                m = self.evaluate()
                m.pop("_preview")
            dt = time.monotonic() - t0
            self.cost["val"] = dt / (1.3 if self.parent_has_dpm else 1.0)
        graphs = self._graphs_dir()
        if self.cfg.export and graphs is None:
            self.status("tracing the ONNX graphs (done now so that the export at the end is quick)")
            with _stdout_to_stderr():
                trace_graphs(self.G, None if self._dpm_skipped() else self.Dec, self.out)
            graphs = self.out / GRAPHS
        if self.cfg.export and self.cost["export_check"] is None and graphs is not None:
            # A dry run of the end: fill the graphs with the current weights, write, check in
            # onnxruntime -- so the reserve for the real one is measured, not guessed.
            from .export import export_model

            self.status("measuring the export")
            t0 = time.monotonic()
            with temporary_beside(self.out / "dry-export", folder=True) as tmp, _stdout_to_stderr():
                export_model(self.G, None if self._dpm_skipped() else self.Dec, tmp, {"name": "dry-run"},
                             graphs=graphs)
            self.cost["export_check"] = time.monotonic() - t0
        if "gan" not in self.step_s and self.phase == "gan":
            # One generator step without an update: compiles the kernels (the first step is several
            # times slower) and measures a step, so the first deadline check is already informed.
            self.status("warming up")
            t0 = time.monotonic()
            x, y, _ = self._batch()
            with self._autocast():
                fake = self.G(x)
            loss, _ = L.generator_loss(fake, y, self.weights, None, self.cfg.berhu_frac)
            loss.backward()
            self.G.zero_grad(set_to_none=True)
            per = time.monotonic() - t0
            self.step_s["gan"] = per * (self.cfg.g_steps + (self.cfg.d_steps if self.cfg.gan else 0))

    def run(self, stop: _StopWatch) -> dict:
        cfg = self.cfg
        if self.already_finished:
            self.emit("done", model_dir=str(self.out), iterations=self.iteration, dpm_iterations=self.dpm_iteration,
                      already_finished=True, message=self.notes[-1], run_s=self.used_before,
                      budget_s=60.0 * cfg.minutes if cfg.minutes else None)
            return {}
        self.emit(
            "start", model_dir=str(self.out), dataset=str(cfg.dataset), source=self.source.info.get("kind"),
            device=str(self.device), threads=torch.get_num_threads(), patch=self.patch,
            range_um=self.range_um, phase=self.phase, resumed=self.saved is not None,
            pixel_size_um=(self.source.info.get("optics") or {}).get("pixel_size_um"),
            iteration=self.iteration, dpm_iteration=self.dpm_iteration,
            parameters={"generator": count_parameters(self.G), "discriminator": count_parameters(self.D),
                        "dpm": count_parameters(self.Dec)},
            validation_pairs=len(self.val[2]), validation=self.source.info.get("validation"),
            config=dataclasses.asdict(cfg), warnings=self.warnings, notes=self.notes,
            parent=None if self.parent is None else {"name": self.parent.name, "path": str(self.parent.weights),
                                                     "auto": self.parent.auto},
            precision="bf16 autocast" if self.bf16 else "float32", native_bf16=self.native_bf16,
            budget_s=60.0 * cfg.minutes if cfg.minutes else None,
        )
        self._prepare()
        # Everything this process did until now is setup (reading data, loading, tracing, scoring).
        self.elapsed["setup"] = self.elapsed.get("setup", 0.0) + (self.used() - self.used_before)
        t_start = time.perf_counter()
        if self.phase == "gan":
            self._plan("gan")
            self.run_gan(stop)
            self.phase = "dpm"
            self.save_checkpoint("phase")
        if self.phase == "dpm":
            self._plan("dpm")
            self.run_dpm(stop)
            self.phase = "export"
            self.save_checkpoint("phase")
        result: dict = {}
        comparison = None
        if self.phase == "export" and cfg.export:
            t0 = time.perf_counter()
            self.status("final validation and export")
            res = self.run_export()
            q = res.pop("quality")
            comparison = res.pop("comparison")
            self.elapsed["export"] = time.perf_counter() - t0
            self.emit("export", path=str(self.out), wall_s=round(time.perf_counter() - t0, 2), **res, quality=q,
                      comparison=comparison)
            result = res
        self.phase = "done"
        self.save_checkpoint("done")
        run_s = self.used()
        self.elapsed["total"] = run_s
        budget_s = 60.0 * cfg.minutes if cfg.minutes else None
        self.emit("done", model_dir=str(self.out), iterations=self.iteration, dpm_iterations=self.dpm_iteration,
                  best_iteration=self.best["iteration"], best_val_berhu=self.best["berhu"],
                  best_metrics={k: v for k, v in (self.best.get("metrics") or {}).items() if k != "per_z"},
                  wall_s=round(time.perf_counter() - t_start, 1), elapsed_s=self.elapsed,
                  run_s=round(run_s, 2), budget_s=budget_s,
                  budget_ratio=round(run_s / budget_s, 4) if budget_s else None,
                  verdict=comparison["verdict"] if comparison else None)
        return result


class _stdout_to_stderr:
    """Keep exporter chatter off stdout (stdout carries only the JSON protocol)."""

    def __enter__(self):
        self._old = sys.stdout
        sys.stdout = sys.stderr

    def __exit__(self, *exc):
        sys.stdout = self._old


def train(config: TrainConfig, emit: Callable[[dict], None], resume: bool = False, redo_dpm: bool = False,
          t0: float | None = None) -> str:
    """Run (or resume) a training run to the end or until stopped.

    Parameters
    ----------
    config : TrainConfig
        Settings.
    emit : callable
        Receives each protocol event as a dict.
    resume : bool
        Continue from ``MODEL_DIR/checkpoint.pt``.
    redo_dpm : bool
        With ``resume``: train a fresh DPM decoder on the finished generator and export again.
    t0 : float, optional
        ``time.monotonic()`` at the process start, from which ``minutes`` is counted (default now).

    Returns
    -------
    str
        ``"done"`` or ``"stopped"``.

    Raises
    ------
    DatasetError, ValueError
        For unusable datasets or settings (the CLI turns them into exit code 2).
    """
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    with _StopWatch(out) as stop:
        stop.clear()
        trainer = Trainer(config, emit, resume=resume or redo_dpm, redo_dpm=redo_dpm, t0=t0)
        try:
            trainer.run(stop)
        except Stopped:
            trainer.save_checkpoint("stopped")
            stop.clear()
            trainer.emit("stopped", checkpoint=str(trainer.ckpt_path), phase=trainer.phase,
                         iteration=trainer.iteration, dpm_iteration=trainer.dpm_iteration)
            return "stopped"
        finally:
            trainer.source.close()
    return "done"


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

    gpath = src / "generator.onnx" if src.is_dir() else src
    if not gpath.is_file():
        raise DatasetError(f"There is no generator.onnx or checkpoint at {src}.")

    def params(path: Path, prefix: str) -> dict:
        m = onnx.load(str(path))
        return {i.name[len(prefix):]: torch.from_numpy(numpy_helper.to_array(i).copy())
                for i in m.graph.initializer if i.name.startswith(prefix)}

    gen = params(gpath, "generator.")
    if not gen:
        raise DatasetError(f"{gpath.name} was not exported by this trainer (no generator.* weights).")
    dpath = gpath.with_name("dpm.onnx")
    dec = params(dpath, "decoder.") if dpath.is_file() else None
    return gen, dec or None


def init_architecture(gen: dict) -> tuple[int, int]:
    """``(base, max_channels)`` of a generator state dict (from :func:`load_init_weights`)."""
    base = int(gen["encoder.inc.weight"].shape[0])
    widest = max(int(v.shape[0]) for k, v in gen.items() if k.endswith("weight") and v.ndim == 4)
    return base, widest
