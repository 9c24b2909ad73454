"""Training dock widget: runs the Deep-R trainer as its own process and plots what it reports.

The trainer (``python -m napari_deepr.train``) runs under :class:`QProcess`, so napari never holds
torch, a crash cannot take the viewer down, and GPU memory is freed when it ends. It prints one JSON
object per line; this widget turns them into live loss curves, the latest validation preview as a
layer, an ETA, and one-sentence errors. Stop writes ``MODEL_DIR/STOP`` (the trainer checkpoints and
exits); Resume restarts it with ``--resume``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shlex
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from qtpy.QtCore import QProcess, QProcessEnvironment, QTimer, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLineEdit,
    QPushButton,
    QSizePolicy,
    QSpinBox,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)

from ._common import MessageLabel, notify, register_model

PREVIEW_LAYER = "Deep-R training preview (input | output | target)"
STOP_FILE = "STOP"
#: Loss terms shown on the training plot, with readable names; others are plotted under their key.
TERM_NAMES = {"berhu": "BerHu", "msssim": "1 − MS-SSIM", "adv": "adversarial (G)", "d": "discriminator",
              "total": "G total", "l2": "DPM L2", "mae_um": "DPM |error| µm"}


def torch_available() -> bool:
    """Whether PyTorch can be imported by the trainer process (checked without importing it here)."""
    return importlib.util.find_spec("torch") is not None


def format_seconds(s: float | None) -> str:
    """``1 h 02 min``, ``6 min 20 s`` or ``12 s``."""
    if s is None or not math.isfinite(s):
        return "?"
    s = round(s)
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"


class LossPlot(FigureCanvasQTAgg):
    """Three panels: generator/discriminator loss terms, validation metrics, and the DPM phase."""

    def __init__(self):
        self.figure = Figure(figsize=(5.2, 5.6), dpi=90, layout="constrained")
        super().__init__(self.figure)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.setMinimumHeight(420)
        self.ax_train, self.ax_val, self.ax_dpm = self.figure.subplots(3, 1)
        self.reset()

    def reset(self) -> None:
        """Forget all curves."""
        self.train: dict[str, list] = defaultdict(list)
        self.val: dict[str, list] = defaultdict(list)
        self.dpm: dict[str, list] = defaultdict(list)
        self.redraw()

    def redraw(self) -> None:
        """Draw the stored curves (cheap enough at ≤ 2 Hz for thousands of points)."""
        style = {"color": "0.85"}
        self.figure.set_facecolor("#262930")
        for ax, title in ((self.ax_train, "training losses (generator terms, discriminator)"),
                          (self.ax_val, "validation: output vs input"),
                          (self.ax_dpm, "DPM decoder")):
            ax.clear()
            ax.set_facecolor("#1e2027")
            ax.set_title(title, fontsize=9, **style)
            ax.tick_params(colors="0.8", labelsize=8)
            for spine in ax.spines.values():
                spine.set_color("0.5")
            ax.grid(True, color="0.35", lw=0.5)
        for key, pts in self.train.items():
            it, v = zip(*pts, strict=True)
            self.ax_train.plot(it, v, lw=1.2, label=TERM_NAMES.get(key, key))
        if any(v > 0 for pts in self.train.values() for _, v in pts):
            self.ax_train.set_yscale("log")
        colors = {"berhu": "#ff7f0e", "ssim": "#1f77b4", "rmse": "#2ca02c"}
        for key, pts in self.val.items():
            it, v = zip(*pts, strict=True)
            metric, which = key.rsplit("_", 1)
            self.ax_val.plot(it, v, "o-" if which == "output" else "s--", ms=3, lw=1.2,
                             color=colors.get(metric), alpha=1.0 if which == "output" else 0.6,
                             label=f"{metric.upper() if metric != 'berhu' else 'BerHu'} {which}")
        for key, pts in self.dpm.items():
            it, v = zip(*pts, strict=True)
            self.ax_dpm.plot(it, v, "o-" if key.startswith("val") else "-", ms=3, lw=1.2,
                             label=TERM_NAMES.get(key, key.replace("val_", "validation ").replace("_um", " µm")))
        self.ax_train.set_xlabel("iteration", fontsize=8, **style)
        self.ax_val.set_xlabel("iteration", fontsize=8, **style)
        self.ax_dpm.set_xlabel("DPM iteration", fontsize=8, **style)
        for ax in (self.ax_train, self.ax_val, self.ax_dpm):
            if ax.lines:
                leg = ax.legend(fontsize=7, loc="upper right", facecolor="#262930", edgecolor="0.5", ncol=2)
                for text in leg.get_texts():
                    text.set_color("0.85")
            else:
                ax.text(0.5, 0.5, "waiting for the trainer…", ha="center", va="center",
                        transform=ax.transAxes, color="0.6", fontsize=8)
        self.draw_idle()


class TrainingWidget(QWidget):
    """Dock widget that trains a Deep-R model from a pairs dataset and hands it to the refocus widget.

    Parameters
    ----------
    napari_viewer : napari.Viewer
        The viewer that receives the validation preview layer.

    Attributes
    ----------
    finished : Signal(str, str)
        Emitted when the trainer process ends: status (``done``, ``stopped``, ``error``) and a message.
    events : list of dict
        Every protocol event received in the current run (for scripts and tests).
    """

    finished = Signal(str, str)

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.process: QProcess | None = None
        self.events: list[dict] = []
        self.model_dir: Path | None = None
        self._buffer = b""
        self._stderr_tail: list[str] = []
        self._error: str | None = None
        self._status: str | None = None
        self._gan_iterations = 0
        self._build_ui()
        self._redraw_timer = QTimer(self)
        self._redraw_timer.setSingleShot(True)
        self._redraw_timer.setInterval(500)  # at most two redraws per second while lines pour in
        self._redraw_timer.timeout.connect(self.plot.redraw)
        if not torch_available():
            self.start_btn.setEnabled(False)
            self.resume_btn.setEnabled(False)
            self.message.show_message(
                "Training needs PyTorch, which is not installed here; install it with "
                "pip install 'napari-deepr[train]'.", "error")

    # ------------------------------------------------------------------ UI
    def _path_row(self, placeholder: str, buttons: list[tuple[str, callable]]) -> tuple[QWidget, QLineEdit]:
        row = QWidget()
        lay = QHBoxLayout(row)
        lay.setContentsMargins(0, 0, 0, 0)
        edit = QLineEdit()
        edit.setPlaceholderText(placeholder)
        lay.addWidget(edit, 1)
        for text, fn in buttons:
            b = QPushButton(text)
            b.setMaximumWidth(70)
            b.clicked.connect(fn)
            lay.addWidget(b)
        return row, edit

    def _build_ui(self) -> None:
        root = QVBoxLayout(self)
        form = QFormLayout()
        row, self.dataset_edit = self._path_row(
            "pairs folder (deepr pairs) or synthetic .json",
            [("Folder…", self._pick_dataset_dir), ("JSON…", self._pick_dataset_json)])
        form.addRow("Dataset", row)
        row, self.output_edit = self._path_row("new or existing model folder", [("Folder…", self._pick_output)])
        form.addRow("Model folder", row)
        budget = QWidget()
        blay = QHBoxLayout(budget)
        blay.setContentsMargins(0, 0, 0, 0)
        self.budget_combo = QComboBox()
        self.budget_combo.addItem("minutes", "minutes")
        self.budget_combo.addItem("iterations", "iterations")
        self.minutes_spin = QDoubleSpinBox()
        self.minutes_spin.setRange(0.1, 100000)
        self.minutes_spin.setValue(30)
        self.minutes_spin.setDecimals(1)
        self.iterations_spin = QSpinBox()
        self.iterations_spin.setRange(1, 10_000_000)
        self.iterations_spin.setValue(2000)
        self.budget_stack = QStackedWidget()
        self.budget_stack.addWidget(self.minutes_spin)
        self.budget_stack.addWidget(self.iterations_spin)
        self.budget_combo.currentIndexChanged.connect(self.budget_stack.setCurrentIndex)
        blay.addWidget(self.budget_stack, 1)
        blay.addWidget(self.budget_combo)
        form.addRow("Budget", budget)
        self.device_combo = QComboBox()
        for d in ("auto", "cpu", "cuda"):
            self.device_combo.addItem(d, d)
        form.addRow("Device", self.device_combo)
        net = QWidget()
        nlay = QHBoxLayout(net)
        nlay.setContentsMargins(0, 0, 0, 0)
        self.base_spin = QSpinBox()
        self.base_spin.setRange(4, 128)
        self.base_spin.setValue(16)
        self.base_spin.setToolTip("Generator width at full resolution (16 CPU default, 32 paper-sized).")
        self.patch_spin = QSpinBox()
        self.patch_spin.setRange(0, 2048)
        self.patch_spin.setSingleStep(32)
        self.patch_spin.setSpecialValueText("dataset's")
        self.patch_spin.setToolTip("Training patch side (multiple of 32); 'dataset's' uses the stored patch size.")
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(1, 256)
        self.batch_spin.setValue(5)
        for lab, w in (("width", self.base_spin), ("patch", self.patch_spin), ("batch", self.batch_spin)):
            nlay.addWidget(MessageLabel(lab))
            nlay.addWidget(w)
        form.addRow("Network", net)
        self.extra_edit = QLineEdit()
        self.extra_edit.setPlaceholderText("more trainer options, e.g. --val-every 100 --dpm-iterations 500")
        form.addRow("Options", self.extra_edit)
        root.addLayout(form)

        buttons = QHBoxLayout()
        self.start_btn = QPushButton("Start")
        self.stop_btn = QPushButton("Stop")
        self.stop_btn.setToolTip("Ask the trainer to save a checkpoint and exit; Resume continues from it.")
        self.resume_btn = QPushButton("Resume")
        self.use_btn = QPushButton("Use this model")
        self.use_btn.setToolTip("Add the exported model to the Refocus widget's model picker and choose it.")
        for b in (self.start_btn, self.stop_btn, self.resume_btn, self.use_btn):
            buttons.addWidget(b)
        self.stop_btn.setEnabled(False)
        self.resume_btn.setEnabled(False)
        self.use_btn.setEnabled(False)
        root.addLayout(buttons)
        self.status = MessageLabel()
        self.status.setStyleSheet("font-weight: bold;")
        self.message = MessageLabel()
        root.addWidget(self.status)
        root.addWidget(self.message)
        self.status.setVisible(False)
        self.message.setVisible(False)
        self.plot = LossPlot()
        root.addWidget(self.plot, 1)

        self.start_btn.clicked.connect(lambda: self.start(resume=False))
        self.resume_btn.clicked.connect(lambda: self.start(resume=True))
        self.stop_btn.clicked.connect(self.stop)
        self.use_btn.clicked.connect(self.use_model)
        self.output_edit.textChanged.connect(self._update_resume)

    def _pick_dataset_dir(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Training pairs folder")
        if path:
            self.dataset_edit.setText(path)

    def _pick_dataset_json(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Synthetic dataset", "", "JSON (*.json)")
        if path:
            self.dataset_edit.setText(path)

    def _pick_output(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Model folder")
        if path:
            self.output_edit.setText(path)

    def _update_resume(self, *_) -> None:
        out = self.output_edit.text().strip()
        can = bool(out) and (Path(out) / "checkpoint.pt").is_file() and self.process is None and torch_available()
        self.resume_btn.setEnabled(can)

    # ------------------------------------------------------------------ process
    def arguments(self, resume: bool = False) -> list[str]:
        """The trainer command line (after ``python``) for the current settings.

        Raises
        ------
        ValueError
            With one sentence when a required field is missing or the extra options do not parse.
        """
        dataset = self.dataset_edit.text().strip()
        out = self.output_edit.text().strip()
        if not dataset:
            raise ValueError("Choose a training dataset (a pairs folder or a synthetic .json file).")
        if not out:
            raise ValueError("Choose a model folder for the trained model.")
        if not Path(dataset).exists():
            raise ValueError(f"The dataset {dataset} does not exist.")
        args = ["-m", "napari_deepr.train", dataset, "-o", out]
        if self.budget_combo.currentData() == "minutes":
            args += ["--minutes", f"{self.minutes_spin.value():g}"]
        else:
            args += ["--iterations", str(self.iterations_spin.value())]
        args += ["--device", self.device_combo.currentData(), "--base", str(self.base_spin.value()),
                 "--batch", str(self.batch_spin.value())]
        if self.patch_spin.value():
            if self.patch_spin.value() % 32:
                raise ValueError("The patch size must be a multiple of 32.")
            args += ["--patch", str(self.patch_spin.value())]
        try:
            args += shlex.split(self.extra_edit.text())
        except ValueError as exc:
            raise ValueError(f"The extra options do not parse ({exc}).") from exc
        if resume:
            args.append("--resume")
        return args

    def start(self, resume: bool = False) -> None:
        """Start (or resume) the trainer process; returns at once."""
        if self.process is not None:
            return
        try:
            args = self.arguments(resume)
        except ValueError as exc:
            self.message.show_message(str(exc), "error")
            notify("error", str(exc))
            return
        self.model_dir = Path(self.output_edit.text().strip()).expanduser()
        if not resume:
            self.plot.reset()
        self.events = []
        self._buffer = b""
        self._stderr_tail = []
        self._error = None
        self._status = None
        self.message.show_message("")
        self.status.show_message("Starting the trainer…" if not resume else "Resuming from the checkpoint…")
        proc = QProcess(self)
        env = QProcessEnvironment.systemEnvironment()
        env.insert("PYTHONUNBUFFERED", "1")  # lines must arrive as they are printed, not at exit
        proc.setProcessEnvironment(env)
        proc.setProgram(sys.executable)
        proc.setArguments(args)
        proc.readyReadStandardOutput.connect(self._read_stdout)
        proc.readyReadStandardError.connect(self._read_stderr)
        proc.finished.connect(self._on_finished)
        proc.errorOccurred.connect(self._on_process_error)
        self.process = proc
        self.start_btn.setEnabled(False)
        self.resume_btn.setEnabled(False)
        self.use_btn.setEnabled(False)
        self.stop_btn.setEnabled(True)
        self.stop_btn.setText("Stop")
        proc.start()

    def stop(self) -> None:
        """Ask the trainer to checkpoint and exit (stop file); a second press terminates it (SIGTERM)."""
        if self.process is None or self.model_dir is None:
            return
        if self.stop_btn.text() == "Stop":
            try:
                self.model_dir.mkdir(parents=True, exist_ok=True)
                (self.model_dir / STOP_FILE).write_text("stop requested from napari\n")
            except OSError as exc:
                self.message.show_message(f"Could not ask the trainer to stop ({exc}); terminating it.", "warning")
                self.process.terminate()
                return
            self.status.show_message("Stopping: the trainer is saving a checkpoint…")
            self.stop_btn.setText("Force stop")
        else:
            # SIGTERM also makes the trainer checkpoint; it is only slower to notice inside long steps.
            self.process.terminate()

    def _read_stdout(self) -> None:
        self._buffer += bytes(self.process.readAllStandardOutput())
        *lines, self._buffer = self._buffer.split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                self._stderr_tail = (self._stderr_tail + [line])[-30:]  # stray print: keep for diagnosis
                continue
            if isinstance(event, dict):
                self.handle_event(event)

    def _read_stderr(self) -> None:
        text = bytes(self.process.readAllStandardError()).decode("utf-8", "replace")
        self._stderr_tail = (self._stderr_tail + [ln for ln in text.splitlines() if ln.strip()])[-30:]

    def _on_process_error(self, err) -> None:
        if err == QProcess.ProcessError.FailedToStart:
            self._error = f"The trainer could not start ({self.process.errorString()})."
            self._on_finished(-1, None)

    def _on_finished(self, code, _status) -> None:
        if self.process is None:
            return
        self._read_stdout()
        self.process = None
        self.stop_btn.setEnabled(False)
        self.stop_btn.setText("Stop")
        self.start_btn.setEnabled(torch_available())
        self._update_resume()
        self._redraw_timer.stop()
        self.plot.redraw()
        if self._status is None:
            if self._error is None:
                last = self._stderr_tail[-1] if self._stderr_tail else "no message"
                self._error = f"The trainer stopped unexpectedly (exit code {code}): {last}"
            self._status = "error"
        if self._status == "error":
            self.status.show_message("Training failed.", "error")
            self.message.show_message(self._error, "error")
            notify("error", self._error)
            msg = self._error
        elif self._status == "stopped":
            msg = "Stopped; a checkpoint was saved, press Resume to continue."
            self.status.show_message(msg, "warning")
        else:
            ok = self.model_dir is not None and (self.model_dir / "generator.onnx").is_file()
            self.use_btn.setEnabled(ok)
            msg = f"Training finished; the model is in {self.model_dir}." if ok else \
                "Training finished but no exported model was found (was --no-export given?)."
            self.status.show_message(msg, "ok" if ok else "warning")
            notify("info", msg)
        self.finished.emit(self._status, msg)

    # ------------------------------------------------------------------ protocol
    def handle_event(self, event: dict) -> None:
        """Update curves, status, preview and messages from one trainer event."""
        self.events.append(event)
        kind = event.get("event")
        if kind == "start":
            self._gan_iterations = int(event.get("iteration") or 0)
            for w in event.get("warnings") or []:
                notify("warning", str(w))
            self.status.show_message(
                f"Training on {event.get('device', '?')} ({event.get('source', 'pairs')} data, "
                f"patch {event.get('patch')}, ±{event.get('range_um', 0):g} µm)"
                + (" — resumed" if event.get("resumed") else ""))
        elif kind == "progress":
            self._on_progress(event)
        elif kind == "validation":
            self._on_validation(event)
        elif kind == "export":
            self.status.show_message(f"Exported ONNX model to {event.get('path')}.")
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
        name = "GAN" if phase == "gan" else "DPM decoder"
        text = f"{name} phase: iteration {it}" + (f"/{total}" if total else "")
        if rate:
            text += f" · {rate:.2f} it/s"
        text += f" · ETA {format_seconds(ev.get('eta_s'))}"
        self.status.show_message(text)

    def _on_validation(self, ev: dict) -> None:
        it = int(ev.get("iteration", 0))
        m = ev.get("metrics") or {}
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
            self.viewer.add_image(img, name=PREVIEW_LAYER, rgb=rgb, metadata={"source": str(path)})

    # ------------------------------------------------------------------ hand-over
    def use_model(self) -> None:
        """Add the trained model to the refocus widgets' pickers and choose it (opening one if needed)."""
        if self.model_dir is None or not (self.model_dir / "generator.onnx").is_file():
            self.message.show_message("No exported model to use yet.", "error")
            return
        from . import _common

        if not list(_common._model_listeners):
            try:
                self.viewer.window.add_plugin_dock_widget("napari-deepr", "Refocus (Deep-R)")
            except Exception:  # noqa: BLE001 - plugin not registered (e.g. run from a script): dock the class directly
                from .refocus import RefocusWidget

                self.viewer.window.add_dock_widget(RefocusWidget(self.viewer), name="Refocus (Deep-R)")
        register_model(self.model_dir, select=True)
        self.message.show_message(f"{self.model_dir.name} is now chosen in the Refocus widget.", "ok")

    def closeEvent(self, event) -> None:
        """Ask a running trainer to checkpoint and stop when the widget closes."""
        if self.process is not None and self.model_dir is not None:
            try:
                (self.model_dir / STOP_FILE).write_text("widget closed\n")
            except OSError:
                self.process.terminate()
        super().closeEvent(event)


__all__ = ["LossPlot", "TrainingWidget", "format_seconds", "torch_available"]
