"""The trainer's terminal output: a progress bar and sentences, from the same events as ``--json``.

:class:`Console` receives every protocol event (see :mod:`.loop`) and draws one ``tqdm`` bar on
stderr for the whole run -- phase, iteration, losses, and the time left for the WHOLE run (setup,
generator, DPM decoder and export) -- with validations, warnings and the end written above it as
sentences. ``python -m napari_deepr.train --json`` prints the events as JSON lines instead (the
napari Train widget reads those). This module does not import torch.
"""

from __future__ import annotations

import sys
from typing import Any


def _clock(s: float | None) -> str:
    if s is None:
        return "?"
    s = max(0, int(round(s)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Console:
    """Renders protocol events for a person at a terminal.

    Parameters
    ----------
    stream : file, optional
        Where to write (default ``sys.stderr``).
    bar : bool, optional
        Draw a live bar (default: when ``stream`` is a terminal; otherwise one line per
        validation and about one progress line every 30 s, which reads well in a log file).
    """

    def __init__(self, stream=None, bar: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if bar is None else bar
        self.bar = None
        self.budget_s: float | None = None
        self._last_line = -1e9

    # ------------------------------------------------------------------ output
    def line(self, text: str) -> None:
        """Write one line above the bar."""
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def _ensure_bar(self) -> None:
        if self.bar is None and self.live:
            from tqdm import tqdm

            self.bar = tqdm(total=1000, file=self.stream, bar_format="{desc} {percentage:3.0f}%|{bar:20}| {postfix}",
                            dynamic_ncols=True, leave=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    # ------------------------------------------------------------------ events
    def __call__(self, ev: dict[str, Any]) -> None:
        kind = ev.get("event")
        handler = getattr(self, f"on_{kind}", None)
        if handler is not None:
            handler(ev)

    def on_status(self, ev: dict) -> None:
        self.line(f"deepr train: {ev.get('message', '')} ({ev.get('elapsed_s', 0):.1f} s)")

    def on_init(self, ev: dict) -> None:
        self.line(f"deepr train: the {ev.get('note', '')}.")

    def on_start(self, ev: dict) -> None:
        self.budget_s = ev.get("budget_s")
        parent = ev.get("parent")
        what = (f"fine-tuning {parent['name']}" + (" (chosen because its card matches the dataset)" if parent.get("auto") else "")
                if parent else "training from scratch")
        p = ev.get("parameters", {}).get("generator")
        cfg = ev.get("config", {})
        self.line(f"deepr train: {what}: {p:,} generator parameters, {ev.get('patch')}-px patches, batch "
                  f"{cfg.get('batch')}, lr {cfg.get('lr_g'):g} {cfg.get('lr_schedule')}, {ev.get('precision')}, "
                  f"{ev.get('threads')} threads on {ev.get('device')}"
                  + (f", budget {_clock(self.budget_s)} for the whole run" if self.budget_s else "") + ".")
        val = ev.get("validation") or {}
        self.line(f"deepr train: validation: {ev.get('validation_pairs')} pairs from {val.get('description', 'the dataset')}.")
        for note in ev.get("notes") or []:
            self.line(f"deepr train: {note}")
        for w in ev.get("warnings") or []:
            self.line(f"deepr train: warning: {w}")

    def on_plan(self, ev: dict) -> None:
        if ev.get("deadline_s") is not None and self.budget_s:
            name = "generator" if ev.get("phase") == "gan" else "DPM decoder"
            self.line(f"deepr train: {name} phase from {_clock(ev.get('used_s'))} to {_clock(ev['deadline_s'])} of "
                      f"{_clock(self.budget_s)} ({ev.get('reserve_s', 0):.0f} s kept for the final validation and export).")

    def on_progress(self, ev: dict) -> None:
        phase = "generator" if ev.get("phase") == "gan" else "DPM"
        its = ev.get("iterations")
        it = f"it {ev.get('iteration')}" + (f"/{its}" if its else "")
        losses = ev.get("losses") or {}
        keys = ("total", "berhu", "msssim") if phase == "generator" else ("mae_um",)
        loss_txt = " ".join(f"{k} {losses[k]:.4g}" for k in keys if isinstance(losses.get(k), (int, float)))
        eta = _clock(ev.get("eta_s"))
        if self.budget_s and ev.get("run_s") is not None:
            frac = min(1.0, ev["run_s"] / self.budget_s)
        else:
            frac = ev.get("fraction") or 0.0
            frac = 0.5 * frac if phase == "generator" else 0.5 + 0.5 * frac
        text = f"{it}, {loss_txt}, {ev.get('it_s', 0):.2f} it/s, run ETA {eta}"
        if self.live:
            self._ensure_bar()
            self.bar.set_description_str(phase, refresh=False)
            self.bar.n = int(1000 * frac)
            self.bar.set_postfix_str(text, refresh=True)
        else:
            run_s = ev.get("run_s") or 0.0
            if run_s - self._last_line >= 30 or ev.get("iteration") == 1:
                self._last_line = run_s
                self.line(f"deepr train: {phase} {100 * frac:3.0f}% {text}")

    def on_validation(self, ev: dict) -> None:
        m = ev.get("metrics") or {}
        if ev.get("phase") == "parent":
            self.line(f"deepr train: parent {ev.get('parent')} on the validation pairs: SSIM "
                      f"{m.get('ssim_output', 0):.3f} (input {m.get('ssim_input', 0):.3f})"
                      + (f", DPM error {m['dpm_mae_um']:.2f} µm" if m.get("dpm_mae_um") is not None else "") + ".")
        elif ev.get("phase") == "gan":
            self.line(f"deepr train: validation at iteration {ev.get('iteration')}: SSIM {m.get('ssim_output', 0):.3f} "
                      f"(input {m.get('ssim_input', 0):.3f}), BerHu {m.get('berhu', 0):.4f}"
                      + (" - best so far" if ev.get("best") else "") + ".")
        else:
            self.line(f"deepr train: DPM validation at update {ev.get('iteration')}: error {m.get('dpm_mae_um', 0):.3f} µm"
                      + (" - best so far" if ev.get("best") else "") + ".")

    def on_checkpoint(self, ev: dict) -> None:
        if ev.get("reason") == "periodic" and not self.live:
            self.line(f"deepr train: checkpoint written ({ev.get('path')}).")

    def on_export(self, ev: dict) -> None:
        files = [k for k in ("generator", "dpm", "model_json") if ev.get(k)]
        self.line(f"deepr train: exported {', '.join(files)} to {ev.get('path')} in {ev.get('wall_s', 0):.1f} s "
                  f"(largest ONNX vs PyTorch difference {max((ev.get('max_abs_error') or {'x': 0}).values()):.1g}).")
        comp = ev.get("comparison")
        if comp:
            self.line(f"deepr train: {comp['verdict']}")

    def on_done(self, ev: dict) -> None:
        self.close()
        if ev.get("already_finished"):
            self.line(f"deepr train: {ev.get('message')}")
            return
        run_s, budget = ev.get("run_s"), ev.get("budget_s")
        self.line(f"deepr train: done: {ev.get('iterations')} iterations, {ev.get('dpm_iterations')} DPM updates, "
                  f"whole run {_clock(run_s)}" + (f" of a {_clock(budget)} budget ({100 * run_s / budget:.1f} %)" if budget else "")
                  + f"; model in {ev.get('model_dir')}.")

    def on_stopped(self, ev: dict) -> None:
        self.close()
        self.line(f"deepr train: stopped at iteration {ev.get('iteration')} ({ev.get('phase')} phase); the checkpoint "
                  f"{ev.get('checkpoint')} resumes it with --resume.")

    def on_error(self, ev: dict) -> None:
        self.close()
        self.line(f"deepr train: error: {ev.get('message')}")

    def on_warning(self, ev: dict) -> None:
        self.line(f"deepr train: warning: {ev.get('message')}")
