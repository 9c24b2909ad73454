"""How a run spends its budget: phase deadlines, the end reserve, stopping before an iteration that
would not fit, progress fractions, ETAs and the cosine learning-rate schedule.

The split of ``--minutes`` is described in :mod:`napari_deepr.train.loop`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from .config import GAN_SHARE


class BudgetMixin:
    """Deadlines and timing of the :class:`~napari_deepr.train.loop.Trainer`'s phases.

    Uses the trainer's ``cfg``, ``cost`` (measured seconds of a validation, an export check and a
    checkpoint), ``step_s``, ``deadline``, ``phase_start``, counters and :meth:`used`.
    """

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

    def _timed(self, fn: Callable[[], None], phase: str) -> None:
        """Run ``fn`` and count its wall time in the phase's budget (``--minutes`` is wall-clock)."""
        t0 = time.perf_counter()
        try:
            fn()
        finally:
            self.elapsed[phase] += time.perf_counter() - t0

