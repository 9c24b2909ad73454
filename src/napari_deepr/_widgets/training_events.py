"""Training widget, trainer protocol: one JSON event from the trainer process updates the curves, the
phase and progress bar, the status line and the validation-preview layer.

A mixin of :class:`napari_deepr._widgets.training.TrainingWidget`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from ..engine.contract import PAIRS_INDEX_FILE
from ._common import notify
from .training_plot import format_seconds

PREVIEW_LAYER = "Deep-R training preview (input | output | target)"


class TrainerEvents:
    """Turns the trainer's JSON events into what the widget shows (mixin of ``TrainingWidget``)."""

    # ------------------------------------------------------------------ protocol
    def handle_event(self, event: dict) -> None:
        """Update curves, status, preview and messages from one trainer event."""
        self.events.append(event)
        kind = event.get("event")
        if kind == "start":
            self._gan_iterations = int(event.get("iteration") or 0)
            px = event.get("pixel_size_um")
            self._preview_px = float(px) if isinstance(px, (int, float)) and px > 0 else self._dataset_px()
            self._set_phase("Refocusing network" if event.get("phase", "gan") == "gan" else "DPM decoder", busy=True)
            for w in event.get("warnings") or []:
                notify("warning", str(w))
            self.status.show_message(
                f"Training on {event.get('device', '?')} ({event.get('source', 'pairs')} data, "
                f"patch {event.get('patch')}, ±{event.get('range_um', 0):g} µm)"
                + (" — resumed" if event.get("resumed") else ""))
        elif kind == "status":
            self._set_phase("Setting up", busy=True)
            self.status.show_message(f"Setting up: {event.get('message', '')}…")
        elif kind == "warning":
            notify("warning", str(event.get("message", "")))
        elif kind == "progress":
            self._on_progress(event)
        elif kind == "validation":
            self._on_validation(event)
        elif kind == "checkpoint" and event.get("phase") == "export":
            # The trainer says nothing while it exports and scores the model (about a minute on a CPU).
            self._set_phase("Exporting", busy=True)
            self.status.show_message("Exporting the ONNX model and measuring its quality on the validation "
                                     "pairs (about a minute)…")
        elif kind == "export":
            verdict = (event.get("comparison") or {}).get("verdict")
            self.status.show_message(f"Exported ONNX model to {event.get('path')}." + (f" {verdict}" if verdict else ""))
        elif kind == "done":
            self._status = "done"
            if event.get("model_dir"):
                self.model_dir = Path(event["model_dir"])
        elif kind == "stopped":
            self._status = "stopped"
        elif kind == "error":
            self._status = "error"
            self._error = str(event.get("message") or "The trainer reported an error.").splitlines()[0]
        self._redraw_soon()

    def _on_progress(self, ev: dict) -> None:
        phase = ev.get("phase", "gan")
        it = int(ev.get("iteration", 0))
        losses = ev.get("losses") or {}
        target = self.plot.train if phase == "gan" else self.plot.dpm
        for key, value in losses.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                target[key].append((it, float(value)))
        total = ev.get("iterations")
        rate = ev.get("it_s")
        name = "Refocusing network" if phase == "gan" else "DPM decoder"
        self._set_phase(name)
        if total:
            self.progress.setRange(0, int(total))
            self.progress.setValue(min(it, int(total)))
        else:  # a time budget: the share of the whole run spent (eta_s is for the whole run)
            spent, eta = ev.get("run_s", ev.get("elapsed_s")), ev.get("eta_s")
            if isinstance(spent, (int, float)) and isinstance(eta, (int, float)) and spent + eta > 0:
                self.progress.setRange(0, 1000)
                self.progress.setValue(int(1000 * spent / (spent + eta)))
        text = f"{name}: iteration {it}" + (f"/{total}" if total else "")
        if rate:
            text += f" · {rate:.2f} it/s"
        text += f" · ETA {format_seconds(ev.get('eta_s'))}"
        self.status.show_message(text)

    def _on_validation(self, ev: dict) -> None:
        it = int(ev.get("iteration", 0))
        m = ev.get("metrics") or {}
        if ev.get("phase") == "parent":  # the parent scored on the same pairs, before training
            if isinstance(m.get("ssim_output"), (int, float)):
                self.status.show_message(f"Parent {ev.get('parent')}: validation SSIM {m['ssim_output']:.3f} "
                                         f"(input {m.get('ssim_input', 0):.3f}).")
            return
        if ev.get("phase", "gan") == "gan":
            for metric in ("berhu", "ssim", "rmse"):
                for which, key in (("output", f"{metric}_output" if metric != "berhu" else "berhu"),
                                   ("input", f"{metric}_input")):
                    v = m.get(key)
                    if isinstance(v, (int, float)) and math.isfinite(v):
                        self.plot.val[f"{metric}_{which}"].append((it, float(v)))
            if ev.get("preview"):
                self.show_preview(ev["preview"])
        elif isinstance(m.get("dpm_mae_um"), (int, float)):
            self.plot.dpm["val_mae_um"].append((it, float(m["dpm_mae_um"])))

    def _set_phase(self, name: str, busy: bool = False) -> None:
        self.phase_label.setText(name)
        if busy:
            self.progress.setRange(0, 0)  # Qt's busy bar: no known fraction

    def _dataset_px(self) -> float | None:
        """Pixel size (µm) recorded in a pairs dataset's index, or the simulator's default for a JSON spec."""
        ds = Path(self.dataset_edit.text().strip()).expanduser()
        try:
            if ds.is_dir():
                px = (json.loads((ds / PAIRS_INDEX_FILE).read_text()).get("optics") or {}).get("pixel_size_um")
                return float(px) if px else None
            from ..optics.psf import OPTICS_20X_075

            spec = json.loads(ds.read_text()).get("synthetic") or {}
            return float((spec.get("optics") or {}).get("pixel_size_um") or OPTICS_20X_075.pixel_size_um)
        except (OSError, ValueError, AttributeError, TypeError):
            return None

    def _redraw_soon(self) -> None:
        if not self._redraw_timer.isActive():
            self._redraw_timer.start()

    def show_preview(self, path: str | os.PathLike) -> None:
        """Show a validation preview PNG as (or in) the preview layer."""
        from matplotlib.image import imread

        try:
            img = imread(str(path))
        except (OSError, ValueError, SyntaxError):
            return  # a preview being replaced while read is skipped; the next one will come
        if img.dtype != np.uint8:
            img = (np.clip(img, 0, 1) * 255).astype(np.uint8)
        if img.ndim == 3 and img.shape[-1] == 4:
            img = img[..., :3]
        rgb = img.ndim == 3
        if PREVIEW_LAYER in self.viewer.layers and self.viewer.layers[PREVIEW_LAYER].data.shape == img.shape:
            self.viewer.layers[PREVIEW_LAYER].data = img
        else:
            if PREVIEW_LAYER in self.viewer.layers:
                self.viewer.layers.remove(PREVIEW_LAYER)
            px = getattr(self, "_preview_px", None) or self._dataset_px()
            # In µm like the other layers (napari warns about mixed units otherwise); the mosaic's
            # pixels are the dataset's pixels.
            geo = {"scale": (px, px), "units": ("µm", "µm")} if px else {}
            self.viewer.add_image(img, name=PREVIEW_LAYER, rgb=rgb, metadata={"source": str(path), "pixel_size_um": px},
                                  **geo)
