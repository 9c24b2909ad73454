"""Training dock widget: runs the Deep-R trainer as its own process and plots what it reports.

The trainer (``python -m napari_deepr.train``) runs under :class:`QProcess`, so napari never holds
torch, a crash cannot take the viewer down, and GPU memory is freed when it ends. It prints one JSON
object per line; this widget turns them into live loss curves, the latest validation preview as a
layer, an ETA, and one-sentence errors. Stop writes ``MODEL_DIR/STOP`` (the trainer checkpoints and
exits); Resume restarts it with ``--resume``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from qtpy.QtCore import QProcess, QProcessEnvironment, QTimer, Signal

from ..engine.contract import GENERATOR_FILE, STOP_FILE
from ._common import notify, register_model
from .training_events import TrainerEvents
from .training_form import TrainingForm, torch_available
from .training_plot import LossPlot, format_seconds


class TrainingWidget(TrainerEvents, TrainingForm):
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
        self.plot.running = True
        self._set_phase("Starting", busy=True)
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
        self.plot.running = False
        self.stop_btn.setEnabled(False)
        self.stop_btn.setText("Stop")
        self.validate()
        self._update_resume()
        self._redraw_timer.stop()
        self.plot.redraw()
        if self._status is None:
            if self._error is None:
                last = self._stderr_tail[-1] if self._stderr_tail else "no message"
                self._error = f"The trainer stopped unexpectedly (exit code {code}): {last}"
            self._status = "error"
        self.progress.setRange(0, 1)
        self.progress.setValue(1 if self._status == "done" else 0)
        self._set_phase({"done": "Done", "stopped": "Stopped", "error": "Failed"}.get(self._status, "Ended"))
        if self._status == "error":
            self.status.show_message("Training failed.", "error")
            self.message.show_message(self._error, "error")
            notify("error", self._error)
            msg = self._error
        elif self._status == "stopped":
            msg = "Stopped; a checkpoint was saved, press Resume to continue."
            self.status.show_message(msg, "warning")
        else:
            ok = self.model_dir is not None and (self.model_dir / GENERATOR_FILE).is_file()
            self.use_btn.setEnabled(ok)
            msg = f"Training finished; the model is in {self.model_dir}." if ok else \
                "Training finished but no exported model was found (was --no-export given?)."
            self.status.show_message(msg, "ok" if ok else "warning")
            notify("info", msg)
        self.finished.emit(self._status, msg)

    # ------------------------------------------------------------------ hand-over
    def use_model(self) -> None:
        """Add the trained model to the refocus widgets' pickers and choose it (opening one if needed)."""
        if self.model_dir is None or not (self.model_dir / GENERATOR_FILE).is_file():
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
