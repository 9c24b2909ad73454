"""Refocus dock widget: one defocused image layer in, a refocused layer and a defocus map (DPM) out.

The widget is thin: it gathers settings, runs :class:`napari_deepr.engine.refocus.RefocusJob` in a
napari worker thread (so the Qt event loop never waits on the network), shows per-tile progress in
the activity dock, fills the result layers as tile rows finish, and turns every user error into one
sentence.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
from napari.qt.threading import create_worker
from qtpy.QtCore import QTimer, Signal
from qtpy.QtWidgets import QFileDialog

from ..engine.refocus import RefocusJob
from ..engine.settings import RefocusSettings
from ..engine.trust import trust_sentence, trusted_fraction
from ..errors import DeepRError
from ..layout import image_layout
from ._common import (
    CancelableProgress,
    Throttle,
    add_model_listener,
    notify,
    one_sentence,
    set_progress,
)
from .refocus_form import RefocusForm
from .refocus_layers import ResultLayers, in_turns
from .refocus_readout import DpmReadout
from .refocus_run import _disk_results, _refocus_steps, _Run, layer_axes, layer_data


class RefocusWidget(ResultLayers, DpmReadout, RefocusForm):
    """Dock widget running Deep-R refocus (and the defocus map) on an image layer.

    Parameters
    ----------
    napari_viewer : napari.Viewer
        The viewer whose layers are refocused; results are added to it.

    Attributes
    ----------
    finished : Signal(str, str)
        Emitted at the end of every run with the status (``done``, ``cancelled``, ``error``) and a
        message; tests and scripts wait on it.
    """

    finished = Signal(str, str)

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.worker = None
        self.job = None
        self._cancel = threading.Event()
        self._run: _Run | None = None
        self._pbar = None
        self._throttle = Throttle(2.0)  # partial results repaint at most twice a second
        self._layers_added = False
        self._live_now = True
        self._ready = threading.Event()
        self._out_layer = self._dpm_layer = self._trust_layer = None
        self._readout_worker = None
        self._readout_pending = False
        self._after_readout = None
        self._oor_pending = False
        self._announce = False
        self._step_timer = QTimer(self)
        self._step_timer.setSingleShot(True)
        self._step_timer.setInterval(150)
        self._step_timer.timeout.connect(self.update_readout)
        self._dpm_display = None  # derived DPM shown when the engine's DPM has a colour axis
        self._fit_source = None
        self._last_model_index = 0
        # Until the user picks a model, the picker follows the layer: RGB → brightfield, gray → fluorescence.
        self._model_chosen = False
        self._build_ui()
        self._connect_viewer()
        self.refresh_models()
        self.refresh_layers()
        add_model_listener(self)

    # ------------------------------------------------------------------ run
    def run(self) -> None:
        """Start refocusing the chosen layer with the chosen model and settings (non-blocking)."""
        if self.worker is not None:
            return
        layer = self.selected_layer()
        model = self.selected_model()
        if layer is None or model is None:
            msg = "Choose an image layer first." if layer is None else "Choose a model first."
            self.status_label.show_message(msg, "error")
            notify("error", msg)
            return
        data = layer_data(layer)
        try:
            axes = layer_axes(layer, data)
        except DeepRError as exc:
            self.status_label.show_message(one_sentence(exc), "error")
            return
        lead = sum(1 for a in axes if a not in "YXS")
        plane = None
        if lead and self.scope_combo.currentData() == "current":
            plane = self._current_plane(layer, lead, data.shape)
            data = data[plane]
            axes = axes[lead:]
        want_dpm = self.dpm_check.isChecked() and model.has_dpm
        name = layer.name
        suffix = f" [plane {','.join(map(str, plane))}]" if plane is not None else ""
        self._run = _Run(layer, lead, plane, want_dpm, f"{name} refocused{suffix}",
                         f"{name} DPM (µm){suffix}", f"{name} DPM out of range{suffix}")
        disk_note, outputs = "", {}
        try:
            settings = RefocusSettings(
                dpm=want_dpm, tile=self.tile_spin.value(), overlap=self.overlap_spin.value(),
                batch=self.batch_spin.value() or None, providers=self.provider_combo.currentData(),
                precision=self.precision_combo.currentData() or "fp32",
                trust=self.passes_spin.value() if self.trust_check.isChecked() else False,
                **self._domain_settings(layer),
            )
            disk = _disk_results(image_layout(data.shape, axes, model.card.channels), want_dpm) if plane is None else None
        except DeepRError as exc:
            self.status_label.show_message(one_sentence(exc), "error")
            return
        if disk is not None:
            folder, outputs["out"], outputs["dpm_out"] = disk
            disk_note = f" (result larger than a quarter of free memory: written to {folder})"
        self._cancel = threading.Event()
        self.job = None
        self._dpm_display = None
        self._fit_source = None
        for w in (self.readout_label, self.range_label, self.provider_label):
            w.show_message("")
        self.status_label.show_message(f"Starting {model.name} on {name}…{disk_note}")
        self.run_btn.setEnabled(False)
        self.cancel_btn.setEnabled(True)
        # The bar exists before the worker starts: napari's activity dock processes events while it
        # adds a bar, and a short run could otherwise finish inside that call and leave it behind.
        self._pbar = CancelableProgress(total=0, desc=f"Refocus {name}", cancel_callback=self.cancel)
        self._layers_added = False
        self._out_layer = self._dpm_layer = self._trust_layer = None
        self._ready = threading.Event()
        self.worker = create_worker(_refocus_steps, data, model, axes, settings, self._cancel, self._ready,
                                    outputs=outputs, _start_thread=False)
        self.worker.yielded.connect(self._on_yielded)
        self.worker.returned.connect(self._on_returned)
        self.worker.errored.connect(self._on_errored)
        self.worker.start()

    def cancel(self) -> None:
        """Ask the running refocus to stop after the tile batch in flight; finished rows are kept."""
        if self.worker is not None:
            self._cancel.set()
            self.cancel_btn.setEnabled(False)
            self.status_label.show_message("Cancelling after the current tile…")

    def _current_plane(self, layer, lead: int, shape) -> tuple[int, ...]:
        # The plane on screen, in the layer's own data coordinates (its scale/translate may differ).
        pos = layer.world_to_data(self.viewer.dims.point)
        return tuple(int(np.clip(round(float(pos[i])), 0, shape[i] - 1)) for i in range(lead))

    def _on_yielded(self, value) -> None:
        if isinstance(value, RefocusJob):
            self._on_job(value)
            return
        plane = f", plane {value.plane}" if value.plane else ""
        self.status_label.show_message(f"Tile {value.done}/{value.total}{plane} on {value.provider}")
        # after the label: napari processes events while it updates the activity dock
        set_progress(self._pbar, value.done, value.total)
        self._refresh_results()

    def _on_errored(self, exc) -> None:
        # _refocus_steps catches everything; this guards against failures in napari's own plumbing.
        self._finish(("error", f"Refocus failed ({type(exc).__name__}: {one_sentence(exc)}).", self.job))

    def _on_returned(self, result) -> None:
        self._finish(result)

    def _finish(self, result) -> None:
        """The worker ended: show the results one step per event-loop turn, then the readout.

        Each step (adding a multi-megapixel layer, fitting the DPM) is split from the next so the viewer
        repaints and answers clicks between them; :attr:`finished` is emitted after the last one.
        """
        status, message, job = result
        self.worker = None
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        self.cancel_btn.setEnabled(False)
        self._ending = (status, message, job)
        steps = []
        if job is not None and self.job is not None:
            if self._live_now:
                steps += [lambda: self._refresh_results(force=True), lambda: self._reveal(self._trust_layer)]
            else:  # shown now, one thing per turn: a slice and texture upload, shaders, or glyphs each
                steps += [lambda: self._reveal(self._dpm_layer), self._show_scale, self._show_unit,
                          lambda: self._reveal(self._out_layer), lambda: self._reveal(self._trust_layer)]
        steps.append(self._complete)
        in_turns(steps)

    def _complete(self) -> None:
        status, message, job = self._ending
        self.validate()
        if job is not None and self.job is not None:
            for lay in (getattr(self, "_out_layer", None), getattr(self, "_dpm_layer", None)):
                if lay is not None:
                    lay.metadata["complete"] = status == "done"
                    lay.metadata["provider"] = job.provider
                    lay.metadata["warnings"] = list(job.warnings)
            self.provider_label.show_message(self._provider_text(job))
        for w in dict.fromkeys(job.warnings if job is not None else []):
            notify("warning", w)
        self.save_btn.setEnabled(getattr(self, "_out_layer", None) is not None)
        if status == "done":
            done = f"Done: {job.total} tile{'s' if job.total != 1 else ''} on {job.provider}."
            if job.trust_map is not None:
                share = trusted_fraction(np.asarray(job.trust_map))
                done += " " + trust_sentence(share, job.passes, job.sampling.known)
            self.status_label.show_message(done, "ok")
            if job.dpm is not None and self._dpm_layer is not None:
                self._fit_source = self._run
                self._oor_pending = True  # the whole result's out-of-range outline, once per run
                self._announce = True  # the first readout of a run also notifies its range warning
                self._after_readout = lambda: self.finished.emit(status, message)
                self.update_readout()
                return
        elif status == "cancelled":
            self.status_label.show_message(message, "warning")
            notify("info", message)
        else:
            self.status_label.show_message(message, "error")
            notify("error", message)
        self.finished.emit(status, message)

    def save_result(self, path: str | Path | None = None) -> list[str]:
        """Write the last result with napari-deepr's calibrated-TIFF writer (asks for a file when ``path`` is None).

        Returns the paths written (empty when nothing was saved).
        """
        from napari.plugins.io import save_layers

        out = getattr(self, "_out_layer", None)
        if out is None or out not in self.viewer.layers:
            self.status_label.show_message("Nothing to save yet: run a refocus first.", "error")
            return []
        if path is None:
            path, _ = QFileDialog.getSaveFileName(self, "Save the refocused image", f"{out.name}.tif",
                                                  "Calibrated TIFF (*.tif *.tiff)")
            if not path:
                return []
        path = Path(path)
        if path.suffix.lower() not in (".tif", ".tiff"):
            path = path.with_suffix(".tif")
        dpm = getattr(self, "_dpm_layer", None)
        dpm_path = path.with_name(f"{path.stem}_dpm_um{path.suffix}")
        if dpm is not None and dpm in self.viewer.layers and dpm_path.exists():
            msg = f"{dpm_path.name} already exists; choose another name (nothing was written)."
            self.status_label.show_message(msg, "error")
            return []
        written = list(save_layers(str(path), [out], plugin="napari-deepr"))
        if dpm is not None and dpm in self.viewer.layers:
            written += save_layers(str(dpm_path), [dpm], plugin="napari-deepr")
        self.status_label.show_message(f"Saved {', '.join(Path(p).name for p in written)} (µm calibration kept).", "ok")
        return written


__all__ = ["RefocusWidget", "layer_axes", "layer_data"]
