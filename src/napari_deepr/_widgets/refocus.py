"""Refocus dock widget: one defocused image layer in, a refocused layer and a defocus map (DPM) out.

The widget is thin: it gathers settings, runs :class:`napari_deepr.engine.refocus.RefocusJob` in a
napari worker thread (so the Qt event loop never waits on the network), shows per-tile progress in
the activity dock, fills the result layers as tile rows finish, and turns every user error into one
sentence.
"""

from __future__ import annotations

import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from napari.layers import Image
from napari.qt.threading import create_worker
from napari.utils.colormaps import DirectLabelColormap
from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QDoubleSpinBox,
    QAbstractSpinBox,
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..engine.domain import preflight
from ..engine.dpm import dpm_geometry, out_of_range_mask
from ..engine.trust import trusted_fraction
from ..engine.model import list_models, load_model
from ..engine.providers import available_providers
from ..engine.quantize import precision_choices
from ..engine.refocus import RefocusJob, available_memory, result_shapes
from ..errors import Cancelled, DeepRError
from ._common import (
    CancelableProgress,
    MessageLabel,
    Throttle,
    add_model_listener,
    layer_pixel_size_um,
    notify,
    one_sentence,
    register_model,
    session_models,
    spatial_kwargs,
)

#: A DPM leaving the trained range on more than this fraction of pixels triggers a warning.
OUT_OF_RANGE_WARN = 0.01
#: Diverging colormap for the DPM: blue below, red above focus, white at 0.
DPM_COLORMAP = "RdBu_r"
CHOOSE_FOLDER = "Choose model folder…"
CHOOSE_FILE = "Choose .onnx file…"
ROLE_KEY = "napari_deepr_role"


def layer_axes(layer, data) -> str:
    """Axis letters for the engine: leading axes are planes, then ``YX`` (``YXS`` for RGB layers)."""
    spatial = "YXS" if getattr(layer, "rgb", False) else "YX"
    lead = data.ndim - len(spatial)
    if lead < 0:
        raise DeepRError(f"The layer has {data.ndim} dimension(s); refocus needs at least Y and X.")
    # Any letter other than C, S, Y, X is a plane axis for the engine; Z reads naturally for stacks.
    names = {0: "", 1: "Z", 2: "TZ"}[lead] if lead <= 2 else "PQRTUVW"[: lead - 1] + "Z"
    return names + spatial


def layer_data(layer):
    """The full-resolution array of an image layer (level 0 of a multiscale pyramid)."""
    return layer.data[0] if layer.multiscale else layer.data


# Results bigger than this fraction of free memory are written to a zarr store on disk and shown
# from there, so refocusing a whole large stack never runs napari out of memory.
DISK_RESULT_FRACTION = 0.25


def _disk_results(out_shape, dpm_shape, want_dpm: bool, axes: str):
    """Zarr arrays (in a new temporary folder) for a result too large for memory, else ``None``."""
    import zarr

    need = 4 * (int(np.prod(out_shape)) + (int(np.prod(dpm_shape)) if want_dpm else 0))
    if need <= DISK_RESULT_FRACTION * available_memory():
        return None
    folder = Path(tempfile.mkdtemp(prefix="napari-deepr-"))

    def chunks(shape, letters):
        # One plane, a band of rows and the full width: the engine writes whole tile rows.
        return tuple(1 if a not in "YXS" else (min(n, 512) if a == "Y" else n) for a, n in zip(letters, shape, strict=True))

    dpm_axes = axes
    if len(dpm_shape) != len(out_shape):  # the joint channel axis (S or C) has no DPM of its own
        i = next(i for i, a in enumerate(axes) if a in "SC" and out_shape[:i] + out_shape[i + 1:] == tuple(dpm_shape))
        dpm_axes = axes[:i] + axes[i + 1:]
    out = zarr.open_array(str(folder / "refocused.zarr"), mode="w", shape=out_shape, chunks=chunks(out_shape, axes),
                          dtype="float32", fill_value=0.0)
    dpm = None
    if want_dpm:
        dpm = zarr.open_array(str(folder / "dpm_um.zarr"), mode="w", shape=dpm_shape,
                              chunks=chunks(dpm_shape, dpm_axes), dtype="float32", fill_value=0.0)
    return folder, out, dpm


def _lazy(a):
    """numpy arrays as they are; zarr/dask-backed results as dask arrays (computed piece by piece)."""
    if isinstance(a, np.ndarray):
        return a
    import dask.array as da

    return a if isinstance(a, da.Array) else da.from_array(a, chunks=getattr(a, "chunks", "auto"))


@dataclass
class _Run:
    """What one run needs on the main thread to place and describe its results."""

    layer: Image
    lead: int
    plane: tuple[int, ...] | None  # the plane refocused in "current plane" mode, else None
    dpm: bool
    out_name: str
    dpm_name: str
    oor_name: str


def _refocus_steps(data, model, axes, settings: dict, cancel: threading.Event):
    """Worker body: build the job, then yield it and every :class:`Progress`; returns ``(status, message, job)``."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            job = RefocusJob(data, model, axes=axes, **settings)
        job.warnings.extend(str(w.message) for w in caught if issubclass(w.category, RuntimeWarning))
    except DeepRError as exc:
        return ("error", one_sentence(exc), None)
    except Exception as exc:  # noqa: BLE001 - an unexpected failure still reaches the user as one sentence
        return ("error", f"Refocus could not start ({type(exc).__name__}: {one_sentence(exc)}).", None)
    yield job
    try:
        yield from job.steps(cancel)
    except Cancelled:
        return ("cancelled", f"Cancelled after {job.done} of {job.total} tiles; finished rows are kept.", job)
    except DeepRError as exc:
        return ("error", one_sentence(exc), job)
    except Exception as exc:  # noqa: BLE001 - any failure becomes one sentence for the user
        return ("error", f"Refocus failed ({type(exc).__name__}: {one_sentence(exc)}).", job)
    return ("done", "", job)


class RefocusWidget(QWidget):
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
        self._throttle = Throttle(5.0)
        self._dpm_display = None  # derived DPM shown when the engine's DPM has a colour axis
        self._fit_source = None
        self._last_model_index = 0
        self._build_ui()
        self._connect_viewer()
        self.refresh_models()
        self.refresh_layers()
        add_model_listener(self)

    # ------------------------------------------------------------------ UI
    def _build_ui(self) -> None:
        root = QVBoxLayout(self)
        form = QFormLayout()
        self.layer_combo = QComboBox()
        self.layer_combo.setToolTip("The defocused image layer (defaults to the selected layer).")
        form.addRow("Image layer", self.layer_combo)
        self.model_combo = QComboBox()
        self.model_combo.setToolTip("Installed models, models added this session, or one chosen from disk.")
        form.addRow("Model", self.model_combo)
        root.addLayout(form)

        self.card_label = MessageLabel()
        self.scale_label = MessageLabel()
        root.addWidget(self.card_label)
        root.addWidget(self.scale_label)

        box = QGroupBox("Settings")
        bform = QFormLayout(box)
        self.provider_combo = QComboBox()
        self.provider_combo.addItem("auto (best available)", "auto")
        for p in available_providers():
            self.provider_combo.addItem(p, p)
        self.provider_combo.setToolTip("onnxruntime execution providers available in this installation.")
        bform.addRow("Provider", self.provider_combo)
        self.precision_combo = QComboBox()
        bform.addRow("Precision", self.precision_combo)
        tiles = QHBoxLayout()
        self.tile_spin = QSpinBox()
        self.tile_spin.setRange(32, 8192)
        self.tile_spin.setSingleStep(32)
        self.tile_spin.setToolTip("Tile side in pixels (a multiple of the model's tile multiple).")
        self.overlap_spin = QSpinBox()
        self.overlap_spin.setRange(0, 4096)
        self.overlap_spin.setToolTip("Overlap between tiles; blended so no seams appear.")
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(0, 64)
        self.batch_spin.setSpecialValueText("auto")
        self.batch_spin.setValue(0)
        self.batch_spin.setToolTip(
            "Tiles per network call (more uses more memory; helps on GPUs). "
            "auto: 1 on the CPU, on a GPU as many as fit in a quarter of its free memory (at most 4)."
        )
        for lab, w, digits in (("tile", self.tile_spin, 4), ("overlap", self.overlap_spin, 4), ("batch", self.batch_spin, 2)):
            if digits > 2:
                # napari's style puts - and + on both sides and clips four digits ("2048"): type, scroll or
                # use the arrow keys instead.
                w.setButtonSymbols(QAbstractSpinBox.ButtonSymbols.NoButtons)
            widest = "auto8" if w is self.batch_spin else "8" * (digits + 1)
            w.setMinimumWidth(w.fontMetrics().horizontalAdvance(widest) + 16)
            tiles.addWidget(QLabel(lab))
            tiles.addWidget(w, 1)
        bform.addRow(tiles)
        self.dpm_check = QCheckBox("Compute DPM (defocus map, µm)")
        self.dpm_check.setChecked(True)
        bform.addRow(self.dpm_check)
        self.scope_combo = QComboBox()
        self.scope_combo.addItem("current plane", "current")
        self.scope_combo.addItem("all planes", "all")
        self.scope_combo.setToolTip("For stacks and time series: refocus the plane on screen or every plane.")
        bform.addRow("Planes", self.scope_combo)
        # What the model was made for: the same verdicts as the API and deepr, shown before Run.
        self.pixel_spin = QDoubleSpinBox()
        self.pixel_spin.setRange(0.0, 100.0)
        self.pixel_spin.setDecimals(4)
        self.pixel_spin.setSingleStep(0.005)
        self.pixel_spin.setSpecialValueText("from layer")
        self.pixel_spin.setToolTip("The image's pixel size in µm; 'from layer' uses the layer's µm scale (unknown if it has none).")
        bform.addRow("Pixel size (µm)", self.pixel_spin)
        self.resample_check = QCheckBox("Resample to the model's pixel size")
        self.resample_check.setChecked(True)
        self.resample_check.setToolTip("Resample to the model's sampling and back when the pixel sizes differ by more than 5 %.")
        bform.addRow(self.resample_check)
        self.force_check = QCheckBox("Force another modality (output may be invented)")
        bform.addRow(self.force_check)
        trust_row = QHBoxLayout()
        self.trust_check = QCheckBox("Trust map, passes")
        self.trust_check.setToolTip("Per-pixel trust (0-1) from flipped/turned passes and a range test; costs one run per pass.")
        self.passes_spin = QSpinBox()
        self.passes_spin.setRange(1, 8)
        self.passes_spin.setValue(8)
        trust_row.addWidget(self.trust_check)
        trust_row.addWidget(self.passes_spin)
        bform.addRow(trust_row)
        root.addWidget(box)
        self.modality_label = MessageLabel()
        root.addWidget(self.modality_label)
        for w in (self.pixel_spin,):
            w.valueChanged.connect(self._update_checks)
        for w in (self.resample_check, self.force_check):
            w.toggled.connect(self._update_checks)

        buttons = QHBoxLayout()
        self.run_btn = QPushButton("Run")
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        buttons.addWidget(self.run_btn)
        buttons.addWidget(self.cancel_btn)
        root.addLayout(buttons)

        self.status_label = MessageLabel()
        self.provider_label = MessageLabel()
        self.readout_label = MessageLabel()
        self.readout_label.setStyleSheet("font-weight: bold;")
        self.range_label = MessageLabel()
        for w in (self.status_label, self.provider_label, self.readout_label, self.range_label):
            root.addWidget(w)
            w.setVisible(False)
        root.addStretch(1)

        self.run_btn.clicked.connect(self.run)
        self.cancel_btn.clicked.connect(self.cancel)
        self.model_combo.currentIndexChanged.connect(self._on_model_index)
        self.layer_combo.currentIndexChanged.connect(self._update_checks)

    def _connect_viewer(self) -> None:
        layers = self.viewer.layers
        layers.events.inserted.connect(self._on_inserted)
        layers.events.removed.connect(lambda e: self.refresh_layers())
        layers.events.moved.connect(lambda e: self.refresh_layers())
        layers.selection.events.active.connect(self._on_active)
        for layer in layers:
            layer.events.name.connect(lambda e: self.refresh_layers())
        self.viewer.dims.events.current_step.connect(self._on_step)

    # ------------------------------------------------------------------ layers
    def _image_layers(self) -> list[Image]:
        return [lay for lay in self.viewer.layers if isinstance(lay, Image)]

    def refresh_layers(self, select: Image | None = None) -> None:
        """Re-list image layers, keeping the current choice unless ``select`` is given."""
        current = select or self.selected_layer()
        self.layer_combo.blockSignals(True)
        self.layer_combo.clear()
        for lay in self._image_layers():
            self.layer_combo.addItem(lay.name, lay)
        if current is None:
            active = self.viewer.layers.selection.active
            current = active if isinstance(active, Image) else None
        if current is None:
            # Prefer a layer that is not one of our results (those rarely need refocusing again).
            own = [lay for lay in self._image_layers() if ROLE_KEY not in lay.metadata]
            current = own[-1] if own else None
        if current is not None:
            idx = self.layer_combo.findText(current.name)
            if idx >= 0:
                self.layer_combo.setCurrentIndex(idx)
        self.layer_combo.blockSignals(False)
        self._update_checks()

    def _on_inserted(self, event) -> None:
        event.value.events.name.connect(lambda e: self.refresh_layers())
        self.refresh_layers()

    def _on_active(self, event) -> None:
        lay = event.value
        # Follow the user's selection, but not the result layers this widget adds itself.
        if isinstance(lay, Image) and ROLE_KEY not in lay.metadata and self.worker is None:
            self.refresh_layers(select=lay)

    def selected_layer(self) -> Image | None:
        """The image layer chosen in the picker (None when there is none)."""
        lay = self.layer_combo.currentData()
        return lay if lay is not None and lay in self.viewer.layers else None

    # ------------------------------------------------------------------ models
    def refresh_models(self, select: str | Path | None = None) -> None:
        """Re-list installed and session models; keep or set the chosen one."""
        keep = select or self.model_combo.currentData()
        self.model_combo.blockSignals(True)
        self.model_combo.clear()
        paths: list[Path] = []
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a broken model folder must not hide the others
                installed = list_models()
        except DeepRError:
            installed = []
        for m in installed:
            paths.append(m.root if m.root.joinpath("generator.onnx") == m.generator_path else m.generator_path)
            self.model_combo.addItem(f"{m.name}  (installed)", str(paths[-1]))
        for p in session_models():
            if p not in paths:
                self.model_combo.addItem(f"{p.stem if p.is_file() else p.name}  ({p.parent})", str(p))
                paths.append(p)
        self._no_model = not paths
        if self._no_model:
            self.model_combo.addItem("No bundled model is installed", None)
        self.model_combo.insertSeparator(self.model_combo.count())
        self.model_combo.addItem(CHOOSE_FOLDER, CHOOSE_FOLDER)
        self.model_combo.addItem(CHOOSE_FILE, CHOOSE_FILE)
        idx = self.model_combo.findData(str(keep)) if keep else -1
        self.model_combo.setCurrentIndex(max(idx, 0))
        self._last_model_index = self.model_combo.currentIndex()
        self.model_combo.blockSignals(False)
        self._on_model_changed()

    def models_changed(self, selected: Path | None) -> None:
        """Called when a model is registered elsewhere (training widget, another refocus widget)."""
        self.refresh_models(select=selected)

    def set_model(self, path: str | Path) -> None:
        """Add a model folder or ``.onnx`` file to the picker and choose it."""
        register_model(path, select=False)
        self.refresh_models(select=Path(path).expanduser().resolve())

    def _on_model_index(self, index: int) -> None:
        data = self.model_combo.itemData(index)
        if data in (CHOOSE_FOLDER, CHOOSE_FILE):
            if data == CHOOSE_FOLDER:
                path = QFileDialog.getExistingDirectory(self, "Deep-R model folder")
            else:
                path, _ = QFileDialog.getOpenFileName(self, "Deep-R generator", "", "ONNX model (*.onnx)")
            if path:
                self.set_model(path)
            else:
                self.model_combo.blockSignals(True)
                self.model_combo.setCurrentIndex(self._last_model_index)
                self.model_combo.blockSignals(False)
            return
        self._last_model_index = index
        self._on_model_changed()

    def selected_model(self):
        """The chosen :class:`DeepRModel`, or None (the card label then says why)."""
        data = self.model_combo.currentData()
        if not data or data in (CHOOSE_FOLDER, CHOOSE_FILE):
            return None
        try:
            return load_model(data)
        except DeepRError as exc:
            self.card_label.show_message(one_sentence(exc), "error")
            return None

    def _on_model_changed(self) -> None:
        model = self.selected_model()
        if model is None:
            if getattr(self, "_no_model", False):
                self.card_label.show_message(
                    "No bundled model is installed. Choose a model folder or .onnx file above, "
                    "or train one with the Train (Deep-R) widget.",
                    "warning",
                )
            self.run_btn.setEnabled(False)
            self._update_checks()
            return
        card = model.card
        sign = f"<br>DPM sign: {card.dpm_sign}" if card.dpm_sign_meaningful else ""
        dpm = "with DPM decoder" if model.has_dpm else "no DPM decoder"
        self.card_label.show_message(f"<b>{card.name}</b> v{card.version}: {card.summary()}; {dpm}.{sign}")
        self.tile_spin.setSingleStep(card.tile_multiple)
        self.tile_spin.setMinimum(card.tile_multiple)
        self.tile_spin.setValue(card.tile)
        self.overlap_spin.setValue(card.overlap)
        self.dpm_check.setEnabled(model.has_dpm)
        self.dpm_check.setChecked(model.has_dpm)
        self.dpm_check.setToolTip("" if model.has_dpm else "This model has no dpm.onnx, so no defocus map.")
        self._fill_precisions(model)
        self.run_btn.setEnabled(self.worker is None)
        self._update_checks()

    def _fill_precisions(self, model) -> None:
        """fp32 always; bf16 where OpenVINO can run it; int8 where the model folder has its variant;
        fp16 where a GPU provider is installed."""
        keep = self.precision_combo.currentData()
        self.precision_combo.clear()
        self.precision_combo.addItem("fp32 (reference)", "fp32")
        notes = ["fp32: the exported network as trained."]
        for prec, label, usable, why in precision_choices(model):
            if usable:
                self.precision_combo.addItem(label, prec)
            notes.append(why)
        self.precision_combo.setToolTip("\n".join(notes))
        idx = self.precision_combo.findData(keep)
        self.precision_combo.setCurrentIndex(max(idx, 0))

    # ------------------------------------------------------------------ checks
    def _update_checks(self, *_) -> None:
        layer = self.selected_layer()
        model = self.selected_model()
        if layer is not None:
            lead = layer.ndim - (3 if layer.rgb else 2)
            self.scope_combo.setEnabled(lead > 0)
        if layer is None:
            self.scale_label.show_message("Add or open an image layer to refocus.", "info")
            return
        if model is None:
            self.scale_label.show_message("")
            return
        data = layer_data(layer)
        try:
            axes = layer_axes(layer, data)
        except DeepRError as exc:
            self.scale_label.show_message(one_sentence(exc), "error")
            return
        settings = self._domain_settings(layer)
        try:  # the pixel-size verdict alone (a modality mismatch must not hide it)
            sampling = preflight(model.card, tuple(data.shape), axes, **dict(settings, force_modality=True))[0]
        except DeepRError as exc:
            self.scale_label.show_message(one_sentence(exc), "error")
            self.modality_label.show_message("")
            return
        self.scale_label.show_message(sampling.message, sampling.level)
        try:
            modality = preflight(model.card, tuple(data.shape), axes, **settings)[1]
            self.modality_label.show_message(modality.message, modality.level)
        except DeepRError as exc:
            self.modality_label.show_message(one_sentence(exc), "error")

    def _domain_settings(self, layer) -> dict:
        """Pixel size (the field, else the layer's µm scale, else unknown), resampling and modality forcing."""
        px = self.pixel_spin.value() or layer_pixel_size_um(layer)
        return {"pixel_size_um": px or None, "resample": self.resample_check.isChecked(),
                "force_modality": self.force_check.isChecked()}

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
        settings = {
            "dpm": want_dpm,
            "tile": self.tile_spin.value(),
            "overlap": self.overlap_spin.value(),
            "batch": self.batch_spin.value() or None,
            "providers": self.provider_combo.currentData(),
            "precision": self.precision_combo.currentData() or "fp32",
            "trust": self.passes_spin.value() if self.trust_check.isChecked() else False,
            **self._domain_settings(layer),
        }
        disk_note = ""
        if plane is None:
            try:
                disk = _disk_results(*result_shapes(data.shape, axes, model.card.channels), want_dpm, axes)
            except DeepRError as exc:
                self.status_label.show_message(one_sentence(exc), "error")
                return
            if disk is not None:
                folder, settings["out"], settings["dpm_out"] = disk
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
        self.worker = create_worker(_refocus_steps, data, model, axes, settings, self._cancel,
                                    _start_thread=False)
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

    # ------------------------------------------------------------------ results
    def _expand(self, arr):
        """View of a one-plane result with the stack's leading axes restored (length 1)."""
        run = self._run
        if run.plane is None:
            return arr
        return arr.reshape((1,) * run.lead + arr.shape)

    def _replace_layer(self, name: str, factory):
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        return factory()

    def _on_job(self, job: RefocusJob) -> None:
        """First yield: the job exists, so the result layers can be created over its buffers."""
        self.job = job
        run = self._run
        layer = run.layer
        card = job.model.card
        offset = {i: v for i, v in enumerate(run.plane)} if run.plane is not None else None
        geo = spatial_kwargs(layer, offset)
        meta = {
            ROLE_KEY: "refocused",
            "source_layer": layer.name,
            "model": card.name,
            "model_version": card.version,
            "model_path": str(job.model.root),
            "provider": job.provider,
            "tile": job.tile,
            "overlap": job.overlap,
            "plane": list(run.plane) if run.plane is not None else None,
            "complete": False,
        }
        out = self._expand(job.output)
        self._out_layer = self._replace_layer(
            run.out_name,
            lambda: self.viewer.add_image(
                out, name=run.out_name, rgb=layer.rgb, colormap=None if layer.rgb else layer.colormap.name,
                contrast_limits=layer.contrast_limits, metadata=meta, **geo,
            ),
        )
        self._dpm_layer = None
        if job.dpm is not None:
            dpm = job.dpm
            if dpm.ndim == job.output.ndim and layer.rgb:
                # One-channel model on RGB: each colour has its DPM; show their mean (one surface).
                if isinstance(dpm, np.ndarray):
                    self._dpm_display = dpm.mean(axis=-1)
                    dpm = self._dpm_display
                else:  # on disk: a lazy mean, recomputed for the plane on screen
                    dpm = _lazy(dpm).mean(axis=-1)
            # napari's scale of an RGB layer already excludes the colour axis, so the geometry fits.
            dgeo = dict(geo)
            lim = float(max(abs(card.defocus_range_um[0]), abs(card.defocus_range_um[1])))
            dmeta = dict(meta, **{ROLE_KEY: "dpm"}, units="µm", defocus_range_um=list(card.defocus_range_um),
                         dpm_sign=card.dpm_sign if card.dpm_sign_meaningful else "not meaningful for this model")
            self._dpm_layer = self._replace_layer(
                run.dpm_name,
                lambda: self.viewer.add_image(
                    self._expand(dpm), name=run.dpm_name, colormap=DPM_COLORMAP, contrast_limits=(-lim, lim),
                    opacity=0.5, blending="translucent", metadata=dmeta, **dgeo,
                ),
            )
            self._dpm_layer.colorbar.visible = True
        self._trust_layer = None
        if job.trust_map is not None:
            self._trust_layer = self._replace_layer(
                f"{layer.name} trust{'' if run.plane is None else ' [plane]'}",
                lambda: self.viewer.add_image(
                    self._expand(job.trust_map), name=f"{layer.name} trust{'' if run.plane is None else ' [plane]'}",
                    colormap="magma", contrast_limits=(0.0, 1.0), opacity=0.5, blending="translucent",
                    metadata=dict(meta, **{ROLE_KEY: "trust"}, units="trust (0-1, 1 = trust)"), **dict(geo),
                ),
            )
        for note in job.notes:  # said before the tiles start
            notify("info", note)
        # The input stays selected so a second Run refocuses it again, not its result.
        self.viewer.layers.selection.active = layer
        self._pbar = CancelableProgress(total=job.total, desc=f"Refocus {layer.name}", cancel_callback=self.cancel)
        self.provider_label.show_message(self._provider_text(job))

    def _provider_text(self, job) -> str:
        asked = self.provider_combo.currentData()
        text = f"Provider used: <b>{job.provider}</b>"
        if asked not in ("auto", job.provider):
            text += f" (asked for {asked}, not usable here)"
        return text

    def _refresh_results(self, force: bool = False) -> None:
        if not self._throttle.ready(force):
            return
        if self._dpm_display is not None and self.job is not None and self.job.dpm is not None:
            np.mean(self.job.dpm, axis=-1, out=self._dpm_display)
        for lay in (getattr(self, "_out_layer", None), getattr(self, "_dpm_layer", None)):
            if lay is not None and lay in self.viewer.layers:
                lay.refresh()

    def _on_yielded(self, value) -> None:
        if isinstance(value, RefocusJob):
            self._on_job(value)
            return
        if self._pbar is not None:
            self._pbar.n = value.done
            self._pbar.refresh()
        plane = f", plane {value.plane}" if value.plane else ""
        self.status_label.show_message(f"Tile {value.done}/{value.total}{plane} on {value.provider}")
        self._refresh_results()

    def _on_errored(self, exc) -> None:
        # _refocus_steps catches everything; this guards against failures in napari's own plumbing.
        self._finish(("error", f"Refocus failed ({type(exc).__name__}: {one_sentence(exc)}).", self.job))

    def _on_returned(self, result) -> None:
        self._finish(result)

    def _finish(self, result) -> None:
        status, message, job = result
        self.worker = None
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        self.run_btn.setEnabled(self.selected_model() is not None)
        self.cancel_btn.setEnabled(False)
        if job is not None and self.job is not None:
            self._refresh_results(force=True)
            for lay in (getattr(self, "_out_layer", None), getattr(self, "_dpm_layer", None)):
                if lay is not None:
                    lay.metadata["complete"] = status == "done"
                    lay.metadata["provider"] = job.provider
                    lay.metadata["warnings"] = list(job.warnings)
            self.provider_label.show_message(self._provider_text(job))
        for w in dict.fromkeys(job.warnings if job is not None else []):
            notify("warning", w)
        if status == "done":
            done = f"Done: {job.total} tile{'s' if job.total != 1 else ''} on {job.provider}."
            if job.trust_map is not None:
                share = trusted_fraction(np.asarray(job.trust_map))
                done += f" {100 * share:.0f}% of the field is trustworthy (trust ≥ 0.5)."
                if getattr(self, "_trust_layer", None) is not None:
                    self._trust_layer.refresh()
            self.status_label.show_message(done, "ok")
            if job.dpm is not None:
                self._fit_source = self._run
                self.update_readout()
        elif status == "cancelled":
            self.status_label.show_message(message, "warning")
            notify("info", message)
        else:
            self.status_label.show_message(message, "error")
            notify("error", message)
        self.finished.emit(status, message)

    # ------------------------------------------------------------------ DPM readout
    def _on_step(self, event=None) -> None:
        if self._fit_source is not None and self._fit_source.plane is None and self._fit_source.lead:
            self.update_readout()

    def update_readout(self) -> None:
        """Fit a plane to the DPM on screen: mean defocus, tilt, direction; mark the out-of-range region."""
        run = self._fit_source
        lay = getattr(self, "_dpm_layer", None)
        if run is None or lay is None or lay not in self.viewer.layers or self.job is None:
            return
        card = self.job.model.card
        dpm = _lazy(lay.data)
        if run.lead:
            idx = (0,) * run.lead if run.plane is not None else self._current_plane(lay, run.lead, dpm.shape)
            plane2d = np.asarray(dpm[idx])
        else:
            idx = ()
            plane2d = np.asarray(dpm)
        # Fit only where the refocused image has structure: the DPM of empty background is a guess.
        image2d = None
        out_layer = getattr(self, "_out_layer", None)
        if out_layer is not None and out_layer in self.viewer.layers:
            image2d = np.asarray(out_layer.data[idx] if idx else out_layer.data, dtype=np.float32)
            if image2d.ndim == 3 and out_layer.rgb:
                image2d = image2d.mean(axis=-1)
        px = layer_pixel_size_um(run.layer) or card.pixel_size_um
        note = "" if layer_pixel_size_um(run.layer) else " (pixel size from the model card)"
        if not px:
            px, note = 1.0, " (no pixel size known: tilt per pixel)"
        magnitude = card.dpm_magnitude
        try:
            geometry = dpm_geometry(plane2d, px, defocus_range_um=card.defocus_range_um, image=image2d,
                                    magnitude=magnitude)
        except ValueError as exc:
            self.readout_label.show_message(one_sentence(exc), "error")
            return
        fit = self.fit = geometry.plane
        self.geometry = geometry
        line = self._show_focus_line(run, lay, geometry)
        self.readout_label.show_message(
            f"{f'Mean |defocus| {fit.mean_um:.2f}' if magnitude else f'Mean defocus {fit.mean_um:+.2f}'} µm · "
            f"{geometry.describe()}{note}"
            + (" · the white line marks where the sample is in focus"
               + (" if it is tilted" if geometry.reading == "fold_or_curved" else "") if line else ""),
            "info",
        )
        lay.metadata["dpm_reading"] = geometry.reading
        if geometry.surface is not None:
            lay.metadata["surface_fit"] = geometry.surface.to_dict()
        lay.metadata["plane_fit"] = fit.to_dict()
        mask = out_of_range_mask(dpm, card.defocus_range_um)  # lazy (dask) when the DPM is on disk
        frac = float(mask.mean())
        if name_in(self.viewer, run.oor_name):
            self.viewer.layers.remove(run.oor_name)
        lo, hi = card.defocus_range_um
        if frac > 0:
            cmap = DirectLabelColormap(color_dict={None: "transparent", 0: "transparent", 1: "yellow"})
            oor = self.viewer.add_labels(
                mask.astype(np.uint8), name=run.oor_name, colormap=cmap, opacity=0.9,
                metadata={ROLE_KEY: "out_of_range", "defocus_range_um": [lo, hi]},
                scale=lay.scale, translate=lay.translate, units=lay.units, axis_labels=lay.axis_labels,
            )
            oor.contour = 2  # an outline keeps the image and DPM beneath readable
            self.viewer.layers.selection.active = run.layer
        if frac > OUT_OF_RANGE_WARN:
            msg = (f"{100 * frac:.0f}% of the DPM lies outside the trained range {lo:+g}…{hi:+g} µm "
                   "(outlined in yellow); refocused values there are unreliable.")
            self.range_label.show_message(msg, "warning")
            notify("warning", msg)
        else:
            self.range_label.show_message(f"The DPM stays within the trained range {lo:+g}…{hi:+g} µm.", "ok")


    def _show_focus_line(self, run, dpm_layer, geometry) -> bool:
        """A line where the fitted plane crosses focus (2-D results whose sample passes focus); shown or not."""
        name = run.dpm_name.replace("DPM (µm)", "in focus (DPM fit)")
        if name_in(self.viewer, name):
            self.viewer.layers.remove(name)
        if geometry.focus_line_px is None or run.lead:  # a 2-D line is drawn for 2-D results only
            return False
        self.viewer.add_shapes(
            [geometry.focus_line_px], shape_type="line", name=name, edge_color="white", edge_width=3, opacity=0.9,
            metadata={ROLE_KEY: "focus_line", "reading": geometry.reading},
            scale=dpm_layer.scale, translate=dpm_layer.translate, units=dpm_layer.units,
            axis_labels=dpm_layer.axis_labels,
        )
        self.viewer.layers.selection.active = run.layer
        return True


def name_in(viewer, name: str) -> bool:
    """Whether ``viewer`` holds a layer called ``name``."""
    return any(lay.name == name for lay in viewer.layers)


__all__ = ["RefocusWidget", "layer_axes", "layer_data"]
