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
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from magicgui import magicgui
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from qtpy.QtCore import QProcess, QProcessEnvironment, Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QFrame,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QSpinBox,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)
from superqt import QCollapsible

from ._common import MessageLabel, mark_invalid, notify, register_model, remember, settings_store


def trainer_options(
    val_every: int = 50,
    val_pairs: int = 48,
    dpm_iterations: int = -1,
    g_steps: int = 6,
    d_steps: int = 3,
    bf16: bool = False,
    init_from: str = "",
    threads: int = 0,
    workers: int = 1,
    log_every: int = 1,
):
    """Trainer options beyond the budget and network (``python -m napari_deepr.train --help``).

    Parameters
    ----------
    val_every : int
        Iterations between validations; the model with the lowest validation BerHu is kept.
    val_pairs : int
        Validation pairs scored at each validation (spread over the defocus range).
    dpm_iterations : int
        Updates of the DPM (defocus map) decoder after the refocusing network; auto lets the trainer
        decide, 0 trains no DPM decoder.
    g_steps : int
        Generator updates per iteration (the paper: 6).
    d_steps : int
        Discriminator updates per iteration (the paper: 3).
    bf16 : bool
        Force bfloat16 arithmetic; unticked, the trainer uses it where the CPU/GPU runs it natively
        (AVX512-BF16, AMX, recent GPUs) and float32 elsewhere.
    init_from : str
        Fine-tune from this model folder; empty: the bundled model whose card matches the dataset
        (the trainer says which, or why it trains from scratch).
    threads : int
        PyTorch threads (auto: all cores).
    workers : int
        Processes simulating synthetic training pairs (0: in the trainer itself).
    log_every : int
        Iterations between progress lines (the curves' resolution).
    """


#: magicgui widget options of the trainer form: ranges, and "auto" for the special minimum.
OPTION_WIDGETS = {
    "val_every": {"label": "validate every", "min": 1, "max": 100_000},
    "val_pairs": {"label": "validation pairs", "min": 1, "max": 10_000},
    "dpm_iterations": {"label": "DPM decoder updates", "min": -1, "max": 10_000_000},
    "g_steps": {"label": "generator steps", "min": 1, "max": 100},
    "d_steps": {"label": "discriminator steps", "min": 0, "max": 100},
    "bf16": {"label": "bfloat16"},
    "init_from": {"label": "fine-tune from", "widget_type": "FileEdit", "mode": "d"},
    "threads": {"label": "threads", "min": 0, "max": 512},
    "workers": {"label": "data workers", "min": 0, "max": 64},
    "log_every": {"label": "log every", "min": 1, "max": 100_000},
}
#: Option -> the value that means "let the trainer choose" (the flag is then not passed).
OPTION_AUTO = {"dpm_iterations": -1, "threads": 0}

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
        self.setMinimumHeight(360)
        self.ax_train, self.ax_val, self.ax_dpm = self.figure.subplots(3, 1)
        self.running = False
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
            from matplotlib.ticker import LogLocator, NullFormatter

            self.ax_train.set_yscale("log")
            # only decades get labels: minor labels (2×10⁻¹, 3×10⁻¹…) overlap into an unreadable smear
            self.ax_train.yaxis.set_major_locator(LogLocator(base=10, numticks=6))
            self.ax_train.yaxis.set_minor_formatter(NullFormatter())
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
                ax.text(0.5, 0.5, "waiting for the trainer…" if self.running else "curves appear here during training",
                        ha="center", va="center",
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
            b.setToolTip(f"Choose the {'JSON file' if 'JSON' in text else 'folder'}.")
            b.clicked.connect(fn)
            lay.addWidget(b)
        return row, edit

    def _build_ui(self) -> None:
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        # Everything scrolls: the dock never asks for more height than the screen has.
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        outer.addWidget(scroll)
        inner = QWidget()
        scroll.setWidget(inner)
        self.scroll = scroll
        root = QVBoxLayout(inner)
        form = QFormLayout()
        form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
        row, self.dataset_edit = self._path_row(
            "pairs folder (deepr pairs) or synthetic .json",
            [("Folder…", self._pick_dataset_dir), ("JSON…", self._pick_dataset_json)])
        self.dataset_edit.setToolTip("A dataset built by the Training pairs widget (or deepr pairs), or a JSON "
                                     "file describing simulated training data.")
        form.addRow("Dataset", row)
        row, self.output_edit = self._path_row("new or existing model folder", [("Folder…", self._pick_output)])
        self.output_edit.setToolTip("Where the checkpoints, previews and the exported ONNX model go. A folder "
                                    "with a checkpoint can be resumed.")
        form.addRow("Model folder", row)
        budget = QWidget()
        blay = QHBoxLayout(budget)
        blay.setContentsMargins(0, 0, 0, 0)
        self.budget_combo = QComboBox()
        self.budget_combo.addItem("minutes", "minutes")
        self.budget_combo.addItem("iterations", "iterations")
        self.budget_combo.setToolTip("Train for a wall-clock time or a number of iterations.")
        self.minutes_spin = QDoubleSpinBox()
        self.minutes_spin.setRange(0.1, 100000)
        self.minutes_spin.setValue(30)
        self.minutes_spin.setDecimals(1)
        self.minutes_spin.setToolTip("Minutes of the refocusing network's training (the DPM decoder and "
                                     "the export come after it).")
        self.iterations_spin = QSpinBox()
        self.iterations_spin.setRange(1, 10_000_000)
        self.iterations_spin.setValue(2000)
        self.iterations_spin.setToolTip("Iterations of the refocusing network (each: generator and "
                                        "discriminator steps).")
        self.budget_stack = QStackedWidget()
        self.budget_stack.addWidget(self.minutes_spin)
        self.budget_stack.addWidget(self.iterations_spin)
        self.budget_combo.currentIndexChanged.connect(self.budget_stack.setCurrentIndex)
        blay.addWidget(self.budget_stack, 1)
        blay.addWidget(self.budget_combo)
        form.addRow("Budget", budget)
        self.device_combo = QComboBox()
        for d, text in (("auto", "auto (GPU if present)"), ("cpu", "CPU"), ("cuda", "GPU (CUDA)")):
            self.device_combo.addItem(text, d)
        self.device_combo.setToolTip("Where PyTorch trains; auto takes a CUDA GPU when one is usable.")
        form.addRow("Device", self.device_combo)
        self.base_spin = QSpinBox()
        self.base_spin.setRange(4, 128)
        self.base_spin.setValue(16)
        self.base_spin.setToolTip("Generator width at full resolution (16 CPU default, 32 paper-sized).")
        form.addRow("Network width", self.base_spin)
        self.patch_spin = QSpinBox()
        self.patch_spin.setRange(0, 2048)
        self.patch_spin.setSingleStep(32)
        self.patch_spin.setSpecialValueText("from dataset")
        self.patch_spin.setSuffix(" px")
        self.patch_spin.setMinimumWidth(self.patch_spin.fontMetrics().horizontalAdvance("from dataset") + 40)
        self.patch_spin.setToolTip("Training patch side (multiple of 32); 'from dataset' uses the stored patch size.")
        form.addRow("Patch", self.patch_spin)
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(1, 256)
        self.batch_spin.setValue(5)
        self.batch_spin.setToolTip("Pairs per update (the paper: 5); more needs more memory.")
        form.addRow("Batch", self.batch_spin)
        root.addLayout(form)

        # The trainer's other options as a typed magicgui form (tooltips from the docstring above).
        self.options = magicgui(trainer_options, auto_call=False, call_button=False, **OPTION_WIDGETS)
        for name, auto in OPTION_AUTO.items():
            native = getattr(self.options, name).native
            native.setSpecialValueText("auto") if hasattr(native, "setSpecialValueText") else None
        self.options.dpm_iterations.native.setToolTip(
            "Updates of the DPM (defocus map) decoder: auto lets the trainer decide, 0 trains none.")
        tip = self.options.init_from.tooltip or "Fine-tune from this exported model folder."
        for child in self.options.init_from.native.findChildren((QLineEdit, QPushButton)):
            child.setToolTip(tip)  # magicgui's file picker is a line edit and a button
        self.options_box = QCollapsible("More trainer options")
        self.options_box.addWidget(self.options.native)
        for child in self.options_box.findChildren(QPushButton):
            if not child.toolTip():
                child.setToolTip("Validation, DPM decoder, update ratio, fine-tuning and threads "
                                 "(the trainer's other flags).")
        root.addWidget(self.options_box)

        buttons = QHBoxLayout()
        self.start_btn = QPushButton("Start")
        self.start_btn.setToolTip("Start training in a separate process (napari stays free).")
        self.stop_btn = QPushButton("Stop")
        self.stop_btn.setToolTip("Ask the trainer to save a checkpoint and exit; Resume continues from it.")
        self.resume_btn = QPushButton("Resume")
        self.resume_btn.setToolTip("Continue from the checkpoint in the model folder.")
        self.use_btn = QPushButton("Use model")
        self.use_btn.setToolTip("Add the exported model to the Refocus widget's model picker and choose it.")
        for b in (self.start_btn, self.stop_btn, self.resume_btn, self.use_btn):
            buttons.addWidget(b)
        self.stop_btn.setEnabled(False)
        self.resume_btn.setEnabled(False)
        self.use_btn.setEnabled(False)
        root.addLayout(buttons)
        prow = QHBoxLayout()
        self.phase_label = QLabel("Not started")
        self.phase_label.setToolTip("Training runs in phases: the refocusing network (GAN), then the DPM "
                                    "decoder, then the ONNX export with a quality check.")
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setTextVisible(True)
        prow.addWidget(self.phase_label)
        prow.addWidget(self.progress, 1)
        root.addLayout(prow)
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
        remember("train", {"dataset": self.dataset_edit, "budget": self.budget_combo, "minutes": self.minutes_spin,
                           "iterations": self.iterations_spin, "device": self.device_combo, "width": self.base_spin,
                           "patch": self.patch_spin, "batch": self.batch_spin})
        self._remember_options()
        for w in (self.dataset_edit, self.output_edit):
            w.textChanged.connect(self.validate)
        self.patch_spin.valueChanged.connect(self.validate)
        self.validate()

    def _remember_options(self) -> None:
        """Restore the magicgui form from the last session and save each change (QSettings, like the rest)."""
        store = settings_store()
        for w in self.options:
            key = f"train/options/{w.name}"
            value = store.value(key)
            if value is not None:
                try:
                    w.value = type(w.value)(value) if not isinstance(w.value, bool) else str(value).lower() in ("true", "1")
                except (TypeError, ValueError):
                    pass

            def save(v, key=key):
                st = settings_store()
                st.setValue(key, str(v) if not isinstance(v, (bool, int, float)) else v)
                st.sync()

            w.changed.connect(save)

    def validate(self, *_) -> bool:
        """Check the fields as they are typed: red with the reason in the tooltip; Start waits until valid."""
        reasons = {}
        dataset = self.dataset_edit.text().strip()
        if not dataset:
            reasons[self.dataset_edit] = "Choose a training dataset (a pairs folder or a synthetic .json file)."
        else:
            p = Path(dataset).expanduser()
            if not p.exists():
                reasons[self.dataset_edit] = f"{p.name} does not exist."
            elif p.is_dir() and not (p / "index.json").is_file():
                reasons[self.dataset_edit] = (f"{p.name} holds no index.json, so it is not a pairs dataset; "
                                              "build one with the Training pairs widget.")
            elif p.is_file() and p.suffix.lower() != ".json":
                reasons[self.dataset_edit] = f"{p.name} is neither a pairs folder nor a .json description."
        out = self.output_edit.text().strip()
        if not out:
            reasons[self.output_edit] = "Choose a folder for the trained model."
        elif Path(out).expanduser().is_file():
            reasons[self.output_edit] = f"{Path(out).name} is a file; choose a folder."
        patch = self.patch_spin.value()
        if patch and patch % 32:
            reasons[self.patch_spin] = f"The patch must be a multiple of 32 px ({max(32, patch // 32 * 32)} or {patch // 32 * 32 + 32})."
        elif 0 < patch < 32:
            reasons[self.patch_spin] = "The patch must be at least 32 px."
        for w in (self.dataset_edit, self.output_edit, self.patch_spin):
            mark_invalid(w, reasons.get(w))
        ok = not reasons
        self.start_btn.setEnabled(ok and self.process is None and torch_available())
        return ok

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
        if not self.validate():
            bad = [w.property("deepr_invalid") for w in (self.dataset_edit, self.output_edit, self.patch_spin)]
            raise ValueError(next(r for r in bad if r))
        if not dataset:
            raise ValueError("Choose a training dataset (a pairs folder or a synthetic .json file).")
        if not out:
            raise ValueError("Choose a model folder for the trained model.")
        if not Path(dataset).exists():
            raise ValueError(f"The dataset {dataset} does not exist.")
        # --json: the trainer's events as JSON lines (its default output is a bar for a terminal).
        args = ["-m", "napari_deepr.train", dataset, "-o", out, "--json"]
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
        for w in self.options:
            value = w.value
            flag = "--" + w.name.replace("_", "-")
            if isinstance(value, bool):
                if value:
                    args.append(flag)
            elif w.name == "init_from":
                if str(value).strip() not in ("", "."):
                    args += [flag, str(value)]
            elif OPTION_AUTO.get(w.name) != value:
                args += [flag, str(value)]
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
                px = (json.loads((ds / "index.json").read_text()).get("optics") or {}).get("pixel_size_um")
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
