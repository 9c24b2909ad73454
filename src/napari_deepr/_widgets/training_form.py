"""Training widget, form side: dataset and model-folder pickers, budget and network controls, the
trainer's other options as a magicgui form, the checks made as the user types, and the trainer command
line built from them.

The base class of :class:`napari_deepr._widgets.training.TrainingWidget`.
"""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

from magicgui import magicgui
from qtpy.QtCore import Qt
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
    QSpinBox,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)
from superqt import QCollapsible

from ..engine.contract import CHECKPOINT_FILE, PAIRS_INDEX_FILE
from ._common import MessageLabel, mark_invalid, remember, settings_store
from .training_plot import LossPlot


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

def torch_available() -> bool:
    """Whether PyTorch can be imported by the trainer process (checked without importing it here)."""
    return importlib.util.find_spec("torch") is not None



class TrainingForm(QWidget):
    """The training widget's controls, checks and command line (base of ``TrainingWidget``)."""

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
        for name in OPTION_AUTO:
            # the spin box's minimum is the "let the trainer choose" value: show it as a word
            native = getattr(self.options, name).native
            if hasattr(native, "setSpecialValueText"):
                native.setSpecialValueText("auto")
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
                # a value from another version of the widget that no longer parses: keep the default
                with contextlib.suppress(TypeError, ValueError):
                    w.value = type(w.value)(value) if not isinstance(w.value, bool) else str(value).lower() in ("true", "1")

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
            elif p.is_dir() and not (p / PAIRS_INDEX_FILE).is_file():
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
        can = bool(out) and (Path(out) / CHECKPOINT_FILE).is_file() and self.process is None and torch_available()
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
