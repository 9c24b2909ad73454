"""The two training phases: GAN iterations of the generator, then the DPM decoder on the frozen
generator's features, each with its periodic validation and checkpoints."""

from __future__ import annotations

import dataclasses
import time

import torch

from . import losses as L
from .checkpoint import BEST, CHECKPOINT_EVERY_S, Stopped, _atomic_save, _StopWatch


class PhasesMixin:
    """The :class:`~napari_deepr.train.loop.Trainer`'s update steps (see the module docstring of
    :mod:`napari_deepr.train.loop` for the paper's settings)."""

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
            err = (pred.float() - target) / scale
            loss = L.weighted_mean(err.abs() if cfg.dpm_loss == "l1" else err ** 2, weight)
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
                          losses={cfg.dpm_loss: float(loss.detach()), "mae_um": mae}, it_s=rate,
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

