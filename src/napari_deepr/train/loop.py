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
matches the dataset (modality, channels, pixel size within 10 %, range inside the model's), with
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
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._safety import temporary_beside
from ..engine.contract import PREVIEWS_DIR
from . import losses as L
from .budget import BudgetMixin
from .card import CardMixin, _stdout_to_stderr
from .checkpoint import (
    BEST,
    CHECKPOINT,
    CHECKPOINT_EVERY_S,
    FORMAT_VERSION,
    STOP_FILE,
    CheckpointMixin,
    Stopped,
    _atomic_save,
    _plain,
    _StopWatch,
    init_architecture,
    init_channels,
    load_checkpoint,
    load_init_weights,
)
from .config import (
    DEFAULT_MINUTES,
    GAN_SHARE,
    RUNTIME_KEYS,
    TrainConfig,
    _resolve_device,
    available_cpus,
    native_bf16,
)
from .data import DatasetError, Source, defocus_bins, open_source
from .nets import Discriminator, DPMDecoder, Generator, count_parameters
from .parent import Parent, choose_parent, mismatches, resolve_parent, scale_ratio
from .phases import PhasesMixin
from .validation import ValidationMixin

# Re-exported: these lived here before the loop was split into config, budget, checkpoint,
# validation, phases and card modules, and callers import them from here.
__all__ = [
    "BEST", "CHECKPOINT", "CHECKPOINT_EVERY_S", "DEFAULT_MINUTES", "FORMAT_VERSION", "GAN_SHARE", "RUNTIME_KEYS",
    "STOP_FILE", "Stopped", "TrainConfig", "Trainer", "available_cpus", "init_architecture", "init_channels",
    "load_checkpoint",
    "load_init_weights", "native_bf16", "train", "_atomic_save", "_plain",
]


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


class Trainer(ValidationMixin, PhasesMixin, BudgetMixin, CheckpointMixin, CardMixin):
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
        (self.out / PREVIEWS_DIR).mkdir(exist_ok=True)
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
                if "channels" not in self.parent.card:
                    # A bare checkpoint has no card: its first convolution says how many channels it takes.
                    init_weights = load_init_weights(self.parent.weights)
                    self.parent.card["channels"] = init_channels(init_weights[0])
                refusals, warns = mismatches(self.parent.card, self.source.info, config.modality)
                if refusals:
                    raise DatasetError(refusals[0])
                self.warnings += warns
            elif not config.from_scratch:
                self.parent, note = choose_parent(self.source.info, config.modality)
                (self.notes if self.parent else self.warnings).append(note)
            if self.parent is not None:
                init_weights = init_weights or load_init_weights(self.parent.weights)
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

    def _prepare(self) -> None:
        """Setup that needs the networks: score the parent, trace the ONNX graphs, measure costs."""
        from .export import GRAPHS, trace_graphs

        if self.saved is None:
            t0 = time.monotonic()
            if self.parent is not None:
                self.status(f"scoring the parent {self.parent.name} on the {len(self.val[2])} validation pairs")
                ratio = scale_ratio(self.parent.card, self.source.info)
                m = self.evaluate(with_dpm=self.parent_has_dpm, ratio=ratio)
                m.pop("_preview")
                self.parent_eval = {"name": self.parent.name, "metrics": {k: v for k, v in m.items() if k != "per_z"},
                                    "per_z": m["per_z"], "resampled_ratio": ratio}
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
