"""Training-pairs dock widget: a z-stack layer in, a Deep-R pairs dataset (``deepr pairs``) out.

It plots a focus measure against z with the chosen in-focus plane marked, lets the user move that
plane (spin box or a click on the plot), and builds the dataset with
:func:`napari_deepr.stacks.pairs.build_pairs` in a worker thread with progress and cancel.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
from napari.qt.threading import create_worker
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..engine.contract import PAIRS_INDEX_FILE
from ..errors import Cancelled, DeepRError
from ..science.focus import FOCUS_MEASURES
from ..stacks.infocus import FOCUS_METHODS
from ._common import (
    CancelableProgress,
    MessageLabel,
    invalid_reason,
    mark_invalid,
    notify,
    one_sentence,
    remember,
    set_progress,
    units_of,
)
from .pairs_focus import MEASURE_NAMES, FocusCurve, FocusPlot

METHOD_NAMES = {
    "ssim_edof": "Sharpest vs. all-in-focus image, per patch (paper)",
    "nvar": "Highest normalized variance",
    "vollath5": "Highest Vollath F5 (autocorrelation)",
    "max_std": "Highest standard deviation",
    "min_contrast": "Lowest contrast (unstained brightfield cells)",
}


class _Relay(QObject):
    """Carries ``build_pairs`` progress from the worker thread to the Qt thread (queued signal)."""

    progress = Signal(int, int, str)


class PairsWidget(FocusCurve, QWidget):
    """Dock widget building a Deep-R training-pairs dataset from a z-stack layer.

    Parameters
    ----------
    napari_viewer : napari.Viewer
        The viewer holding the stack.

    Attributes
    ----------
    finished : Signal(str, str)
        Emitted when a build ends: status (``done``, ``cancelled``, ``error``) and a message.
    curve_ready : Signal()
        Emitted when the focus curve of the chosen stack has been computed.
    summary : dict or None
        What ``build_pairs`` returned for the last successful build.
    """

    finished = Signal(str, str)
    curve_ready = Signal()

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.curve: np.ndarray | None = None
        self.auto_plane: int | None = None
        self.summary: dict | None = None
        self.worker = None
        self.curve_worker = None
        self._cancel = threading.Event()
        self._pbar = None
        self._relay = _Relay()
        self._relay.progress.connect(self._on_progress)
        self._build_ui()
        layers = self.viewer.layers
        layers.events.inserted.connect(lambda e: self.refresh_layers())
        layers.events.removed.connect(lambda e: self.refresh_layers())
        self.refresh_layers()

    # ------------------------------------------------------------------ UI
    def _build_ui(self) -> None:
        root = QVBoxLayout(self)
        form = QFormLayout()
        self.layer_combo = QComboBox()
        self.layer_combo.setToolTip("A z-stack (Z, Y, X) image layer, e.g. opened by dropping a TIFF stack on "
                                    "napari. One layer is one field of view.")
        form.addRow("Z-stack", self.layer_combo)
        self.zstep_spin = QDoubleSpinBox()
        self.zstep_spin.setRange(0.001, 1000)
        self.zstep_spin.setDecimals(3)
        self.zstep_spin.setSuffix(" µm")
        self.zstep_spin.setToolTip("Axial step between planes (from the layer's z scale when calibrated).")
        form.addRow("Z step", self.zstep_spin)
        self.measure_combo = QComboBox()
        for name in FOCUS_MEASURES:
            self.measure_combo.addItem(MEASURE_NAMES.get(name, name), name)
        self.measure_combo.setCurrentIndex(self.measure_combo.findData("vollath5"))
        self.measure_combo.setToolTip("How sharp each plane is, plotted against z below (a guide for your "
                                      "eye; the in-focus method decides).")
        form.addRow("Focus measure", self.measure_combo)
        self.method_combo = QComboBox()
        for m in FOCUS_METHODS:
            self.method_combo.addItem(METHOD_NAMES.get(m, m), m)
        self.method_combo.setToolTip("How the in-focus plane is chosen when you do not set it by hand. "
                                     "Fluorescence: the paper's per-patch method or a sharpness maximum; "
                                     "unstained brightfield cells are least contrasted in focus.")
        form.addRow("In-focus method", self.method_combo)
        root.addLayout(form)

        self.plot = FocusPlot()
        root.addWidget(self.plot, 1)
        prow = QHBoxLayout()
        self.plane_spin = QSpinBox()
        self.plane_spin.setToolTip("The in-focus plane; also set by clicking on the curve.")
        self.override_check = QCheckBox("use this plane for every patch")
        self.override_check.setToolTip(
            "Checked when you move the plane: every patch pairs with it. Unchecked: the method picks per patch.")
        prow.addWidget(QLabel("In-focus plane"))
        prow.addWidget(self.plane_spin)
        prow.addWidget(self.override_check, 1)
        root.addLayout(prow)

        bform = QFormLayout()
        self.range_spin = QDoubleSpinBox()
        self.range_spin.setRange(0.1, 1000)
        self.range_spin.setValue(5.0)
        self.range_spin.setPrefix("± ")
        self.range_spin.setSuffix(" µm")
        self.range_spin.setToolTip("Pair every plane within this distance of the in-focus plane with it; "
                                   "the trained model is valid only inside this range.")
        bform.addRow("Defocus range", self.range_spin)
        self.patch_spin = QSpinBox()
        self.patch_spin.setRange(32, 4096)
        self.patch_spin.setSingleStep(32)
        self.patch_spin.setValue(256)
        self.patch_spin.setSuffix(" px")
        self.patch_spin.setToolTip("Side of the square crops cut from each plane (a multiple of 32 px); "
                                   "each crop gets its own in-focus plane, which follows tilt.")
        bform.addRow("Patch", self.patch_spin)
        self.field_focus_check = QCheckBox("one in-focus plane for the whole field")
        self.field_focus_check.setToolTip(
            "The method picks one plane from the whole field instead of one per patch: for flat samples whose "
            "objects are thicker than a patch's depth of field (small patches of thick nuclei have no single "
            "sharpest plane).")
        bform.addRow("", self.field_focus_check)
        self.resample_spin = QDoubleSpinBox()
        self.resample_spin.setRange(0.0, 100.0)
        self.resample_spin.setDecimals(3)
        self.resample_spin.setSingleStep(0.005)
        self.resample_spin.setSuffix(" µm")
        self.resample_spin.setSpecialValueText("off")
        self.resample_spin.setToolTip(
            "Resample the stack to this pixel size first (anti-aliased), e.g. 0.325 µm for deepr-fluo-20x when "
            "you will fine-tune it: the fine-tune then keeps the model's scale instead of relearning it. "
            "Needs a calibrated layer.")
        bform.addRow("Resample to", self.resample_spin)
        self.split_spin = QDoubleSpinBox()
        self.split_spin.setRange(0.0, 0.9)
        self.split_spin.setDecimals(2)
        self.split_spin.setSingleStep(0.05)
        self.split_spin.setValue(0.15)
        self.split_spin.setToolTip("Fraction kept for validation: of the fields of view (split by field, not by "
                                   "patch), or, for a single z-stack, a band of it at the far end with a gap to "
                                   "the training patches.")
        bform.addRow("Validation split", self.split_spin)
        out_row = QWidget()
        olay = QHBoxLayout(out_row)
        olay.setContentsMargins(0, 0, 0, 0)
        self.out_edit = QLineEdit()
        self.out_edit.setPlaceholderText("new dataset folder")
        self.out_edit.setToolTip("A new or empty folder for the dataset (index.json and patch TIFFs); the "
                                 "Train widget reads it.")
        browse = QPushButton("Folder…")
        browse.setToolTip("Choose the dataset folder.")
        browse.clicked.connect(self._pick_out)
        olay.addWidget(self.out_edit, 1)
        olay.addWidget(browse)
        bform.addRow("Output", out_row)
        root.addLayout(bform)

        buttons = QHBoxLayout()
        self.build_btn = QPushButton("Build pairs")
        self.build_btn.setToolTip("Register the planes, find focus per patch and write the pairs.")
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setToolTip("Stop building; nothing is left in the output folder.")
        self.cancel_btn.setEnabled(False)
        buttons.addWidget(self.build_btn)
        buttons.addWidget(self.cancel_btn)
        root.addLayout(buttons)
        self.status_label = MessageLabel()
        self.summary_label = MessageLabel()
        root.addWidget(self.status_label)
        root.addWidget(self.summary_label)
        self.status_label.setVisible(False)
        self.summary_label.setVisible(False)

        self.zstep_spin.setToolTip("Axial step between planes (from the layer's z scale when calibrated).")
        remember("pairs", {"measure": self.measure_combo, "method": self.method_combo,
                           "patch": self.patch_spin, "split": self.split_spin,
                           "field_focus": self.field_focus_check, "resample_um": self.resample_spin})
        for w in (self.zstep_spin, self.range_spin, self.patch_spin, self.plane_spin):
            w.valueChanged.connect(self.validate)
        self.out_edit.textChanged.connect(self.validate)
        self.layer_combo.currentIndexChanged.connect(self._on_layer)
        self.measure_combo.currentIndexChanged.connect(lambda *_: self.compute_curve())
        self.method_combo.currentIndexChanged.connect(lambda *_: self.compute_curve())
        self.plane_spin.valueChanged.connect(self._on_plane_spin)
        self.plot.clicked.connect(self.set_plane)
        self.build_btn.clicked.connect(self.build)
        self.cancel_btn.clicked.connect(self.cancel)

    def _pick_out(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Dataset folder")
        if path:
            self.out_edit.setText(path)

    # ------------------------------------------------------------------ validation
    def validate(self, *_) -> bool:
        """Check the settings as they are typed: a wrong field turns red with the reason in its tooltip,
        and Build stays disabled until every field is valid. Returns whether Build may run."""
        lay = self.selected_layer()
        reasons: dict = {}
        if lay is not None:
            shape = (lay.data[0] if lay.multiscale else lay.data).shape[-3:]
            nz, ny, nx = (int(n) for n in shape)
            dz = self.zstep_spin.value()
            extent = (nz - 1) * dz
            patch = self.patch_spin.value()
            if patch % 32:
                reasons[self.patch_spin] = f"The patch must be a multiple of 32 px ({patch // 32 * 32} or {patch // 32 * 32 + 32})."
            elif patch > min(ny, nx):
                best = min(ny, nx) // 32 * 32
                reasons[self.patch_spin] = (f"A {patch}-px patch does not fit in this {ny}×{nx}-px image; "
                                            + (f"choose at most {best} px." if best >= 32 else "the image is too small."))
            if 2 * self.range_spin.value() > extent + 1e-6:
                reasons[self.range_spin] = (f"±{self.range_spin.value():g} µm is wider than the stack, which spans "
                                            f"{extent:g} µm ({nz} planes × {dz:g} µm); choose at most ±{extent / 2:g} µm.")
        out = self.out_edit.text().strip()
        note = ""
        if not out:
            reasons[self.out_edit] = "Choose a folder for the dataset."
        else:
            p = Path(out).expanduser()
            if p.exists() and not p.is_dir():
                reasons[self.out_edit] = f"{p.name} is a file; choose a folder."
            elif p.is_dir() and (p / PAIRS_INDEX_FILE).is_file():
                note = f"{p.name} already holds a pairs dataset; building replaces it."
            elif p.is_dir() and any(p.iterdir()):
                reasons[self.out_edit] = f"{p.name} holds other files; choose an empty or new folder."
        for w in (self.patch_spin, self.range_spin, self.out_edit):
            mark_invalid(w, reasons.get(w))
        ok = lay is not None and not reasons
        self.build_btn.setEnabled(ok and self.worker is None)
        shown = [r for w, r in reasons.items() if w is not self.out_edit or out]
        self.build_btn.setToolTip(
            "Register the planes, find focus per patch and write the pairs." if ok
            else "Fix the red fields first: " + " ".join(shown) if shown
            else "Choose a z-stack layer and an output folder first.")
        if note and self.worker is None:
            self.status_label.show_message(note, "warning")
        return ok

    # ------------------------------------------------------------------ build
    def build(self) -> None:
        """Build the dataset in a worker thread (non-blocking)."""
        if self.worker is not None:
            return
        lay = self.selected_layer()
        out = self.out_edit.text().strip()
        if lay is None or not self.validate():
            bad = [invalid_reason(w) for w in (self.out_edit, self.patch_spin, self.range_spin) if invalid_reason(w)]
            msg = "Choose a z-stack layer first." if lay is None else bad[0]
            self.status_label.show_message(msg, "error")
            notify("error", msg)
            return
        try:
            from ..stacks.pairs import build_pairs
        except ImportError:
            msg = "This installation has no pairs builder (napari_deepr.stacks.pairs); update napari-deepr."
            self.status_label.show_message(msg, "error")
            notify("error", msg)
            return
        from .. import io

        stack = self.stack()
        px = float(lay.scale[-1]) if (units_of(lay)[-1] != "pixel" or lay.scale[-1] != 1.0) else None
        image = io.ImageData(stack, "ZYX", px, self.zstep_spin.value(),
                             dict(lay.metadata, source_layer=lay.name), lay.name)
        kwargs = {
            "z_step_um": self.zstep_spin.value(),
            "range_um": self.range_spin.value(),
            "patch": self.patch_spin.value(),
            "focus_method": self.method_combo.currentData(),
            # build_pairs takes one plane index for every patch, and the fraction of fields that *train*.
            "infocus_index": int(self.plane_spin.value()) if self.override_check.isChecked() else None,
            "split": 1.0 - self.split_spin.value(),
            "seed": 0,
            "focus_per": "field" if self.field_focus_check.isChecked() else "crop",
            "pixel_size_out_um": self.resample_spin.value() or None,
        }
        self._cancel = threading.Event()
        self.summary = None
        self.summary_label.show_message("")
        self.status_label.show_message("Building pairs…")
        self.build_btn.setEnabled(False)
        self.cancel_btn.setEnabled(True)
        self._pbar = CancelableProgress(total=0, desc=f"Pairs from {lay.name}", cancel_callback=self.cancel)
        relay, cancel = self._relay, self._cancel
        last = [None]

        def report(fraction, message=""):
            # build_pairs reports every plane and patch (hundreds on a large stack); the bar moves in
            # 0.1 % steps, so only a new step or a new phase crosses to the Qt thread.
            step = (int(round(1000 * fraction)), str(message))
            if step != last[0]:
                last[0] = step
                relay.progress.emit(step[0], 1000, step[1])

        def job():
            try:
                summary = build_pairs([image], Path(out), **kwargs, progress=report, cancel=cancel.is_set)
            except Cancelled:
                return ("cancelled", "Cancelled; the partial dataset was not kept.", None)
            except DeepRError as exc:
                return ("error", one_sentence(exc), None)
            except Exception as exc:  # noqa: BLE001 - still one sentence for the user, never a silent stop
                return ("error", f"Building pairs failed ({type(exc).__name__}: {one_sentence(exc)}).", None)
            return ("done", "", summary)

        self.worker = create_worker(job, _start_thread=False)
        self.worker.returned.connect(self._on_built)
        self.worker.errored.connect(
            lambda exc: self._on_built(("error", f"Building pairs failed ({one_sentence(exc)}).", None)))
        self.worker.start()

    def cancel(self) -> None:
        """Ask the build to stop at its next progress check."""
        if self.worker is not None:
            self._cancel.set()
            self.cancel_btn.setEnabled(False)
            self.status_label.show_message("Cancelling…")

    def _on_progress(self, done: int, total: int, msg: str) -> None:
        if self.worker is None:
            return  # a report queued before the build ended must not overwrite how it ended
        # The label first: napari processes events while it updates the activity dock, so the build's
        # end (_on_built) can run inside set_progress and must have the last word.
        self.status_label.show_message(f"{msg or 'Working'} ({100 * done / max(total, 1):.0f}%)")
        pbar = self._pbar  # may be closed re-entrantly while napari's progress updates the dock
        if pbar is not None:
            set_progress(pbar, done, total or None)
            if self._pbar is pbar:
                pbar.set_description(msg or "pairs")

    def _on_built(self, result) -> None:
        status, message, summary = result
        self.worker = None
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        self.cancel_btn.setEnabled(False)
        self.validate()
        if status == "done":
            self.summary = summary
            message = describe_summary(summary, self.out_edit.text().strip())
            self.status_label.show_message("Dataset built.", "ok")
            self.summary_label.show_message(message)
            notify("info", message)
        elif status == "cancelled":
            self.status_label.show_message(message, "warning")
        else:
            self.status_label.show_message(message, "error")
            notify("error", message)
        self.finished.emit(status, message)


def describe_summary(summary, out: str) -> str:
    """A short human summary of what ``build_pairs`` returned: pairs, and how many train and validate."""
    if not isinstance(summary, dict):
        return f"Dataset written to {out}."
    where = summary.get("out_dir") or summary.get("out") or out
    n = summary.get("pairs")
    tr, va = summary.get("train_pairs"), summary.get("val_pairs")
    ftr, fva = summary.get("train_fields"), summary.get("val_fields")
    text = f"Dataset written to {where}: {n} pairs from {summary.get('crops', '?')} patches"
    if isinstance(tr, int) and isinstance(va, int) and summary.get("fields") == 1 and va > 0:
        # One field: split by region (stacks.pairs.region_split), with a gap left out.
        text += (f"; {tr} for training and {va} for validation from a held-out region of the one field"
                 + (f" ({summary['gap_pairs']} pairs left out as a gap between them)" if summary.get("gap_pairs") else ""))
    elif isinstance(tr, int) and isinstance(va, int):
        text += (f"; {tr} for training ({ftr} field{'s' if ftr != 1 else ''}), "
                 f"{va} for validation ({fva} field{'s' if fva != 1 else ''})")
    text += "."
    for w in summary.get("warnings") or []:
        text += f" {w}"
    if va == 0:
        text += (" With no validation field or region, the trainer validates on the training crops, "
                 "which flatters its validation scores; add a second z-stack of another field if you can.")
    return text


__all__ = ["FocusPlot", "PairsWidget", "describe_summary"]
