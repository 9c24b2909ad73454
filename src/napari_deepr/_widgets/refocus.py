"""Refocus dock widget: one defocused image layer in, a refocused layer and a defocus map (DPM) out.

The widget is thin: it gathers settings, runs :class:`napari_deepr.engine.refocus.RefocusJob` in a
napari worker thread (so the Qt event loop never waits on the network), shows per-tile progress in
the activity dock, fills the result layers as tile rows finish, and turns every user error into one
sentence.
"""

from __future__ import annotations

import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from napari.layers import Image
from napari.qt.threading import create_worker
from napari.utils.colormaps import DirectLabelColormap
from qtpy.QtCore import QTimer, Signal
from qtpy.QtWidgets import (
    QAbstractSpinBox,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
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

from ..engine.domain import model_for_image, preflight
from ..engine.dpm import dpm_geometry, out_of_range_mask
from ..engine.model import DEFAULT_MODEL, list_models, load_model
from ..engine.providers import available_providers
from ..engine.quantize import precision_choices
from ..engine.refocus import RefocusJob
from ..engine.results import LAYER_FIELDS, run_metadata, zarr_result
from ..engine.settings import RefocusSettings, available_memory
from ..engine.trust import trusted_fraction
from ..errors import Cancelled, DeepRError
from ..layout import guess_axes, image_layout
from ._common import (
    CancelableProgress,
    MessageLabel,
    Throttle,
    add_model_listener,
    layer_pixel_size_um,
    mark_invalid,
    notify,
    one_sentence,
    register_model,
    remember,
    session_models,
    set_progress,
    spatial_kwargs,
)

#: A DPM leaving the trained range on more than this fraction of pixels triggers a warning.
OUT_OF_RANGE_WARN = 0.01
#: Diverging colormap for a signed DPM: blue below, red above focus, white at 0.
DPM_COLORMAP = "RdBu_r"
#: Sequential colormap for a |defocus| DPM: dark in focus, bright far from it.
DPM_MAGNITUDE_COLORMAP = "magma"
#: Planes up to this many pixels are shown while their tiles run (a repaint of them is cheap).
LIVE_PREVIEW_MAX_PX = 1024 * 1024
CHOOSE_FOLDER = "Choose model folder…"
CHOOSE_FILE = "Choose .onnx file…"
ROLE_KEY = "napari_deepr_role"


def layer_axes(layer, data) -> str:
    """Axis letters for the engine: leading axes are planes, then ``YX`` (``YXS`` for RGB layers)."""
    return guess_axes(data.shape, rgb=bool(getattr(layer, "rgb", False)))


def layer_data(layer):
    """The full-resolution array of an image layer (level 0 of a multiscale pyramid)."""
    return layer.data[0] if layer.multiscale else layer.data


# Results bigger than this fraction of free memory are written to a zarr store on disk and shown
# from there, so refocusing a whole large stack never runs napari out of memory.
DISK_RESULT_FRACTION = 0.25


def _disk_results(lay, want_dpm: bool):
    """Zarr arrays (in a new temporary folder) for a result of layout ``lay`` too large for memory, else ``None``."""
    need = 4 * (int(np.prod(lay.shape)) + (int(np.prod(lay.map_shape)) if want_dpm else 0))
    if need <= DISK_RESULT_FRACTION * available_memory():
        return None
    folder = Path(tempfile.mkdtemp(prefix="napari-deepr-"))
    out = zarr_result(folder / "refocused.zarr", lay.shape, lay.axes)
    dpm = zarr_result(folder / "dpm_um.zarr", lay.map_shape, lay.map_axes) if want_dpm else None
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


#: How long the worker waits for the main thread to lay out the result layers before computing anyway.
LAYERS_READY_TIMEOUT_S = 30.0


def _refocus_steps(data, model, axes, settings: RefocusSettings, cancel: threading.Event,
                   ready: threading.Event | None = None, outputs: dict | None = None):
    """Worker body: build the job, then yield it and every :class:`Progress`; returns ``(status, message, job)``.

    After yielding the job it waits for ``ready``: the main thread adds the result layers while the
    cores are idle (adding a multi-megapixel layer takes napari 0.1-0.3 s, several times longer
    while the network holds both cores).
    """
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            job = RefocusJob(data, model, settings, axes=axes, **(outputs or {}))
        job.warnings.extend(str(w.message) for w in caught if issubclass(w.category, RuntimeWarning))
    except DeepRError as exc:
        return ("error", one_sentence(exc), None)
    except Exception as exc:  # noqa: BLE001 - an unexpected failure still reaches the user as one sentence
        return ("error", f"Refocus could not start ({type(exc).__name__}: {one_sentence(exc)}).", None)
    yield job
    if ready is not None:
        t_end = time.monotonic() + LAYERS_READY_TIMEOUT_S
        while not ready.wait(0.02) and not cancel.is_set() and time.monotonic() < t_end:
            pass
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
        self._throttle = Throttle(2.0)  # partial results repaint at most twice a second
        self._layers_added = False
        self._live_now = True
        self._ready = threading.Event()
        self._out_layer = self._dpm_layer = None
        self._readout_worker = None
        self._readout_pending = False
        self._after_readout = None
        self._oor_pending = False
        self._announce = False
        self._steps: list = []
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
        self.overlay_check = QCheckBox("Overlay the DPM on the result")
        self.overlay_check.setToolTip(
            "Off: the DPM lies under the refocused layer (hide that layer to see the map), so the result "
            "keeps its own colours. On: the DPM is drawn over the result at half opacity.")
        self.overlay_check.toggled.connect(self._place_dpm)
        bform.addRow(self.overlay_check)
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
        self.run_btn.setToolTip("Refocus the chosen layer (in the background; progress in the activity dock).")
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setToolTip("Stop after the tiles in flight; finished rows are kept.")
        self.cancel_btn.setEnabled(False)
        self.save_btn = QPushButton("Save result…")
        self.save_btn.setToolTip(
            "Save the refocused image, and its DPM beside it (…_dpm_um.tif), as calibrated TIFF: the pixel "
            "size in µm is kept. napari's own File ▸ Save writes TIFFs without it; there, choose "
            "'calibrated TIFF (napari-deepr)'.")
        self.save_btn.setEnabled(False)
        self.save_btn.clicked.connect(lambda: self.save_result())
        buttons.addWidget(self.run_btn)
        buttons.addWidget(self.cancel_btn)
        buttons.addWidget(self.save_btn)
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

        self.dpm_check.setProperty("deepr_default_tip", "Also estimate how far out of focus every pixel is (µm).")
        self.dpm_check.setToolTip(self.dpm_check.property("deepr_default_tip"))
        remember("refocus", {"provider": self.provider_combo, "dpm": self.dpm_check, "overlay": self.overlay_check,
                             "planes": self.scope_combo})
        self.tile_spin.valueChanged.connect(self.validate)
        self.overlap_spin.valueChanged.connect(self.validate)
        self.run_btn.clicked.connect(self.run)
        self.cancel_btn.clicked.connect(self.cancel)
        self.model_combo.currentIndexChanged.connect(self._on_model_index)
        self.layer_combo.currentIndexChanged.connect(self._match_model_to_layer)
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
        self._match_model_to_layer()
        self._update_checks()

    def _match_model_to_layer(self, *_) -> None:
        """Choose the installed model whose card fits the layer (RGB → brightfield RGB, gray →
        fluorescence), unless the user has chosen one; none fitting keeps the default model."""
        layer = self.selected_layer()
        if self._model_chosen or layer is None or not hasattr(self, "model_combo") or self.worker is not None:
            return
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                models = list_models()
        except DeepRError:
            return
        m = model_for_image("rgb" if getattr(layer, "rgb", False) else "minisblack", models, DEFAULT_MODEL)
        if m is None:
            return
        path = m.root if m.root.joinpath("generator.onnx") == m.generator_path else m.generator_path
        idx = self.model_combo.findData(str(path))
        if idx < 0 or idx == self.model_combo.currentIndex():
            return
        self.model_combo.blockSignals(True)
        self.model_combo.setCurrentIndex(idx)
        self.model_combo.blockSignals(False)
        self._last_model_index = idx
        self._on_model_changed()

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
        if selected is not None:
            self._model_chosen = True  # a model just trained or added is the one wanted
        self.refresh_models(select=selected)

    def set_model(self, path: str | Path) -> None:
        """Add a model folder or ``.onnx`` file to the picker and choose it."""
        register_model(path, select=False)
        self._model_chosen = True
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
        self._model_chosen = True  # the user picked it: layer changes no longer switch models
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
        self.dpm_check.setToolTip(self.dpm_check.property("deepr_default_tip") if model.has_dpm
                                  else "This model has no dpm.onnx, so no defocus map.")
        self._fill_precisions(model)
        self.run_btn.setEnabled(self.worker is None)
        self._update_checks()
        self.validate()

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
    def validate(self, *_) -> bool:
        """Check tile and overlap as they are typed (red field, reason in its tooltip, Run disabled)."""
        model = self.selected_model() if self.model_combo.currentData() not in (None, CHOOSE_FILE, CHOOSE_FOLDER) else None
        mult = model.card.tile_multiple if model is not None else 32
        tile, overlap = self.tile_spin.value(), self.overlap_spin.value()
        reasons = {}
        if tile % mult:
            lo = tile // mult * mult
            reasons[self.tile_spin] = f"The tile must be a multiple of {mult} px ({max(lo, mult)} or {lo + mult})."
        if overlap > tile // 2:
            reasons[self.overlap_spin] = f"The overlap can be at most half the tile ({tile // 2} px)."
        for w in (self.tile_spin, self.overlap_spin):
            mark_invalid(w, reasons.get(w))
        ok = not reasons
        # A pixel size or modality the engine would refuse keeps Run disabled too (the reason is shown above it).
        self.run_btn.setEnabled(ok and model is not None and self.worker is None and getattr(self, "_domain_ok", True))
        return ok

    def _update_checks(self, *_) -> None:
        self._domain_ok = False
        try:
            self._domain_ok = self._domain_verdicts()
        finally:
            if hasattr(self, "tile_spin"):
                self.validate()

    def _domain_verdicts(self) -> bool:
        """Show the pixel-size and modality verdicts before Run; False when the engine would refuse the run."""
        layer = self.selected_layer()
        model = self.selected_model()
        if layer is not None:
            lead = layer.ndim - (3 if layer.rgb else 2)
            self.scope_combo.setEnabled(lead > 0)
        if layer is None:
            self.scale_label.show_message("Add or open an image layer to refocus.", "info")
            return False
        if model is None:
            self.scale_label.show_message("")
            return False
        data = layer_data(layer)
        try:
            axes = layer_axes(layer, data)
        except DeepRError as exc:
            self.scale_label.show_message(one_sentence(exc), "error")
            return False
        settings = self._domain_settings(layer)
        try:  # the pixel-size verdict alone (a modality mismatch must not hide it)
            sampling = preflight(model.card, tuple(data.shape), axes, **dict(settings, force_modality=True))[0]
        except DeepRError as exc:
            self.scale_label.show_message(one_sentence(exc), "error")
            self.modality_label.show_message("")
            return False
        self.scale_label.show_message(sampling.message, sampling.level)
        try:
            modality = preflight(model.card, tuple(data.shape), axes, **settings)[1]
            self.modality_label.show_message(modality.message, modality.level)
        except DeepRError as exc:
            self.modality_label.show_message(one_sentence(exc), "error")
            return False
        return True

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
        self._out_layer = self._dpm_layer = None
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

    def _live(self, job: RefocusJob) -> bool:
        """Whether the result is shown while tiles run: only for planes small enough to repaint at once.

        A repaint of a multi-megapixel layer costs the main thread hundreds of milliseconds while the
        engine holds the cores; large results are shown once, when the run ends.
        """
        shape = job.output.shape
        plane_px = int(np.prod(shape[-3:-1] if getattr(self._run.layer, "rgb", False) else shape[-2:]))
        return plane_px <= LIVE_PREVIEW_MAX_PX

    def _on_job(self, job: RefocusJob) -> None:
        """First yield: the job exists and waits; add the result layers (one per event-loop turn), then let
        it run. Large results stay hidden until the end, so no tile makes napari repaint them."""
        self.job = job
        set_progress(self._pbar, 0, job.total)
        self.provider_label.show_message(self._provider_text(job))
        self._layers_added = False
        self._out_layer = self._dpm_layer = None
        self._live_now = self._live(job)
        ready = self._ready

        def out_then_go():
            try:
                if self.job is job:
                    self._add_out_layer()
            finally:
                ready.set()

        try:
            self._add_dpm_layer()
        except Exception:
            ready.set()
            raise
        QTimer.singleShot(0, out_then_go)

    def _meta(self) -> dict:
        job, run = self.job, self._run
        return {
            ROLE_KEY: "refocused",
            "source_layer": run.layer.name,
            **run_metadata(job, LAYER_FIELDS),
            "plane": list(run.plane) if run.plane is not None else None,
            "complete": False,
        }

    def _geo(self) -> dict:
        run = self._run
        offset = {i: v for i, v in enumerate(run.plane)} if run.plane is not None else None
        return spatial_kwargs(run.layer, offset)

    def _add_out_layer(self) -> None:
        """The refocused layer, on top of the input (and of the DPM unless it is overlaid)."""
        run, layer = self._run, self._run.layer
        out = self._expand(self.job.output)
        self._out_layer = self._replace_layer(
            run.out_name,
            lambda: self.viewer.add_image(
                out, name=run.out_name, rgb=layer.rgb, colormap=None if layer.rgb else layer.colormap.name,
                contrast_limits=layer.contrast_limits, metadata=self._meta(), visible=self._live_now, **self._geo(),
            ),
        )
        self._layers_added = True
        self._place_dpm()
        self._add_trust_layer()
        for note in self.job.notes:  # said before the tiles start
            notify("info", note)
        # The input stays selected so a second Run refocuses it again, not its result.
        self.viewer.layers.selection.active = layer

    def _add_trust_layer(self) -> None:
        """The per-pixel trust map (0-1, 1 = trust), when the run asked for one."""
        job, run, layer = self.job, self._run, self._run.layer
        self._trust_layer = None
        if job.trust_map is None:
            return
        name = f"{layer.name} trust{'' if run.plane is None else ' [plane]'}"
        meta = dict(self._meta(), **{ROLE_KEY: "trust"}, units="trust (0-1, 1 = trust)")
        self._trust_layer = self._replace_layer(
            name,
            lambda: self.viewer.add_image(
                self._expand(job.trust_map), name=name, colormap="magma", contrast_limits=(0.0, 1.0), opacity=0.5,
                blending="translucent", metadata=meta, **self._geo(),
            ),
        )

    def _add_dpm_layer(self) -> None:
        """The DPM in µm: sequential from 0 for |defocus| models, diverging around 0 for signed ones."""
        job, run, layer = self.job, self._run, self._run.layer
        if job.dpm is None:
            return
        card = job.model.card
        dpm = job.dpm
        if dpm.ndim == job.output.ndim and layer.rgb:
            # One-channel model on RGB: each colour has its DPM; show their mean (one surface).
            if isinstance(dpm, np.ndarray):
                self._dpm_display = dpm.mean(axis=-1)
                dpm = self._dpm_display
            else:  # on disk: a lazy mean, recomputed for the plane on screen
                dpm = _lazy(dpm).mean(axis=-1)
        cmap, limits = dpm_display(card)
        dmeta = dict(self._meta(), **{ROLE_KEY: "dpm"}, units="µm", defocus_range_um=list(card.defocus_range_um),
                     dpm_target="|defocus|" if card.dpm_magnitude else "signed defocus",
                     dpm_sign=card.dpm_sign if card.dpm_sign_meaningful else "not meaningful for this model")
        # napari's scale of an RGB layer already excludes the colour axis, so the geometry fits.
        self._dpm_layer = self._replace_layer(
            run.dpm_name,
            lambda: self.viewer.add_image(
                self._expand(dpm), name=run.dpm_name, colormap=cmap, contrast_limits=limits,
                opacity=1.0, blending="translucent", metadata=dmeta, visible=self._live_now, **self._geo(),
            ),
        )
        self._dpm_layer.colorbar.visible = True
        label_colorbar(self.viewer, self._dpm_layer, "µm")
        self._place_dpm()
        self.viewer.layers.selection.active = layer

    def _place_dpm(self, *_) -> None:
        """Put the DPM under the refocused layer (the result untinted) or over it at half opacity."""
        dpm, out = getattr(self, "_dpm_layer", None), getattr(self, "_out_layer", None)
        if dpm is None or dpm not in self.viewer.layers:
            return
        overlay = self.overlay_check.isChecked()
        dpm.opacity = 0.5 if overlay else 1.0
        if out is None or out not in self.viewer.layers:
            return
        layers = self.viewer.layers
        i_dpm, i_out = layers.index(dpm), layers.index(out)
        if overlay and i_dpm < i_out:
            layers.move(i_dpm, i_out + 1)
        elif not overlay and i_dpm > i_out:
            layers.move(i_dpm, i_out)

    def _provider_text(self, job) -> str:
        asked = self.provider_combo.currentData()
        text = f"Provider used: <b>{job.provider}</b>"
        if asked not in ("auto", job.provider):
            text += f" (asked for {asked}, not usable here)"
        return text

    def _refresh_results(self, force: bool = False) -> None:
        if not self._layers_added or not self._throttle.ready(force):
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
        set_progress(self._pbar, value.done, value.total)
        plane = f", plane {value.plane}" if value.plane else ""
        self.status_label.show_message(f"Tile {value.done}/{value.total}{plane} on {value.provider}")
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
        if job is not None and self.job is not None and self._layers_added:
            if self._live_now:
                steps.append(lambda: self._refresh_results(force=True))
            else:  # shown now, one layer per turn: each costs napari one slice and texture upload
                steps += [lambda: self._reveal(self._dpm_layer), lambda: self._reveal(self._out_layer)]
        steps.append(self._complete)
        self._steps = steps
        self._next_step()

    def _reveal(self, lay) -> None:
        if lay is None or lay not in self.viewer.layers:
            return
        if self._dpm_display is not None and lay is self._dpm_layer and self.job.dpm is not None:
            np.mean(self.job.dpm, axis=-1, out=self._dpm_display)
        if lay.visible:
            lay.refresh()
        else:
            lay.visible = True  # napari refreshes a layer when it becomes visible

    def _next_step(self) -> None:
        step = self._steps.pop(0)
        step()
        if self._steps:
            QTimer.singleShot(0, self._next_step)

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
                done += f" {100 * share:.0f}% of the field is trustworthy (trust ≥ 0.5)."
                if getattr(self, "_trust_layer", None) is not None:
                    self._trust_layer.refresh()
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

    # ------------------------------------------------------------------ DPM readout
    def _on_step(self, event=None) -> None:
        # A z-slider step re-reads the plane on screen, but only once the slider rests (debounced),
        # and the fit runs in a worker: stepping through a refocused stack stays instant.
        if self._fit_source is not None and self._fit_source.plane is None and self._fit_source.lead:
            self._step_timer.start()

    def _shown_index(self, run, lay, shape) -> tuple[int, ...]:
        if not run.lead:
            return ()
        return (0,) * run.lead if run.plane is not None else self._current_plane(lay, run.lead, shape)

    def update_readout(self) -> None:
        """Fit the DPM of the plane on screen (in a worker): mean defocus, tilt, shape, trained range.

        The result appears in two short lines (details in their tooltips); the first readout of a run
        also outlines where the whole result leaves the trained range.
        """
        run = self._fit_source
        lay = getattr(self, "_dpm_layer", None)
        if run is None or lay is None or lay not in self.viewer.layers or self.job is None:
            self._readout_done()
            return
        if self._readout_worker is not None:
            self._readout_pending = True  # rerun for the plane shown when the running fit ends
            return
        self._readout_pending = False
        card = self.job.model.card
        dpm = _lazy(lay.data)
        idx = self._shown_index(run, lay, dpm.shape)
        image = None
        out_layer = getattr(self, "_out_layer", None)
        if out_layer is not None and out_layer in self.viewer.layers:
            image = _lazy(out_layer.data)[idx] if idx else out_layer.data
        px = layer_pixel_size_um(run.layer) or card.pixel_size_um
        note = "" if layer_pixel_size_um(run.layer) else "pixel size taken from the model card"
        if not px:
            px, note = 1.0, "no pixel size known: tilt per pixel"
        whole = lay.data if self._oor_pending else None
        self._oor_pending = False
        worker = create_worker(_readout_job, dpm[idx] if idx else dpm, image, bool(out_layer is not None and out_layer.rgb),
                               px, tuple(card.defocus_range_um), card.dpm_magnitude, whole, _start_thread=False)
        worker.returned.connect(lambda res, ctx=(run, lay, idx, note): self._on_readout(res, ctx))
        worker.errored.connect(lambda exc, ctx=(run, lay, idx, note): self._on_readout(("error", one_sentence(exc)), ctx))
        self._readout_worker = worker
        worker.start()

    def _on_readout(self, result, ctx) -> None:
        try:
            self._on_readout_alive(result, ctx)
        except RuntimeError as exc:  # the widget (or napari) was closed while the fit ran
            if "deleted" not in str(exc):
                raise

    def _on_readout_alive(self, result, ctx) -> None:
        self._readout_worker = None
        run, lay, idx, note = ctx
        if result[0] == "error":
            self.readout_label.show_message(result[1], "error")
        elif lay in self.viewer.layers:
            _, geometry, plane_oor, mask, has_oor = result
            self._show_readout(run, lay, idx, note, geometry, plane_oor, mask, has_oor)
        if self._readout_pending:
            self.update_readout()
            return
        self._readout_done()

    def _readout_done(self) -> None:
        then, self._after_readout = self._after_readout, None
        if then is not None:
            then()

    def _show_readout(self, run, lay, idx, note, geometry, plane_oor, mask, has_oor) -> None:
        card = self.job.model.card
        magnitude = card.dpm_magnitude
        lo, hi = card.defocus_range_um
        fit = self.fit = geometry.plane
        self.geometry = geometry
        where = f"Plane {', '.join(map(str, idx))}: " if run.lead and run.plane is None else ""
        mean = f"mean |defocus| {fit.mean_um:.2f} µm" if magnitude else f"mean defocus {fit.mean_um:+.2f} µm"
        mostly_out = plane_oor > 0.5
        line = False if mostly_out else self._show_focus_line(run, lay, geometry)
        short = "shape not read (mostly outside the trained range)" if mostly_out else short_shape(geometry, line)
        text = f"{where}{mean[0].upper() + mean[1:] if not where else mean} · {short}"
        details = [f"Fitted where the refocused image has structure: {geometry.describe()}."]
        if not geometry.plane.crosses_focus and geometry.reading in ("plane", "curved"):
            details.append("The direction is the azimuth in the image, counter-clockwise from +x (right), "
                           "towards which the defocus grows.")
        if magnitude:
            details.append("This model maps |defocus| only, so a sample tilted through focus folds into a V, "
                           "and above/below focus cannot be told apart.")
        if note:
            details.append(f"({note})")
        self.readout_label.show_message(text, "info")
        self.readout_label.setToolTip("<br>".join(details))
        lay.metadata["dpm_reading"] = geometry.reading
        if geometry.surface is not None:
            lay.metadata["surface_fit"] = geometry.surface.to_dict()
        lay.metadata["plane_fit"] = fit.to_dict()
        if mask is not None:
            self._show_out_of_range(run, lay, mask, has_oor)
        rng = f"0…{max(abs(lo), abs(hi)):g} µm" if magnitude else f"{lo:+g}…{hi:+g} µm"
        if plane_oor > OUT_OF_RANGE_WARN:
            msg = (f"{where}{100 * plane_oor:.0f}% lies beyond the trained range {rng} (yellow outline); "
                   "the refocused image is unreliable there.")
            self.range_label.show_message(msg, "warning")
            if self._announce:
                notify("warning", msg)
        else:
            self.range_label.show_message(f"{where}within the trained range {rng}.".capitalize()
                                          if not where else f"{where}within the trained range {rng}.", "ok")
        self.range_label.setToolTip(
            f"The model was trained on defocus {lo:+g}…{hi:+g} µm; beyond it the DPM and the refocused "
            "image are guesses. The outline layer marks those pixels in every plane.")
        self._announce = False

    def _show_out_of_range(self, run, dpm_layer, mask, has_oor) -> None:
        if name_in(self.viewer, run.oor_name):
            self.viewer.layers.remove(run.oor_name)
        if has_oor is False:
            return
        lo, hi = self.job.model.card.defocus_range_um
        cmap = DirectLabelColormap(color_dict={None: "transparent", 0: "transparent", 1: "yellow"})
        oor = self.viewer.add_labels(
            mask, name=run.oor_name, colormap=cmap, opacity=0.9,
            metadata={ROLE_KEY: "out_of_range", "defocus_range_um": [lo, hi]},
            scale=dpm_layer.scale, translate=dpm_layer.translate, units=dpm_layer.units,
            axis_labels=dpm_layer.axis_labels,
        )
        oor.contour = 2  # an outline keeps the image and DPM beneath readable
        self.viewer.layers.selection.active = run.layer

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


def _readout_job(dpm_plane, image_plane, rgb: bool, px: float, defocus_range_um, magnitude: bool, whole_dpm):
    """Worker body of the readout: the plane's geometry and out-of-range share, the whole result's mask.

    Returns ``("ok", geometry, plane_out_of_range_fraction, mask_or_None, any_out_of_range_or_None)``.
    ``mask`` stays lazy (dask) for a result on disk; its ``any`` is then unknown (None).
    """
    plane2d = np.asarray(dpm_plane, dtype=np.float32)
    image2d = None
    if image_plane is not None:
        image2d = np.asarray(image_plane, dtype=np.float32)
        if image2d.ndim == 3 and rgb:
            image2d = image2d.mean(axis=-1)
    try:
        geometry = dpm_geometry(plane2d, px, defocus_range_um=defocus_range_um, image=image2d, magnitude=magnitude)
    except ValueError as exc:
        return ("error", one_sentence(exc))
    plane_oor = float(np.asarray(out_of_range_mask(plane2d, defocus_range_um)).mean())
    mask = has = None
    if whole_dpm is not None:
        mask = out_of_range_mask(whole_dpm, defocus_range_um).astype(np.uint8)
        if isinstance(mask, np.ndarray):
            has = bool(mask.any())
        else:
            mask = _lazy(mask)
    return ("ok", geometry, plane_oor, mask, has)


def short_shape(geometry, line_drawn: bool = False) -> str:
    """A few words on the sample's shape for the readout's first line (details go to its tooltip)."""
    p, sf, reading = geometry.plane, geometry.surface, geometry.reading
    if reading == "fold":
        return f"tilted {p.tilt_deg:.2f}° through focus" + (" (white line: in focus)" if line_drawn else "")
    curved = ""
    if sf is not None and sf.shape != "flat":
        kind = {"cylinder": "like a cylinder", "bowl": "like a bowl or dome", "saddle": "like a saddle"}.get(
            sf.shape, sf.shape)
        r = min(sf.radius_mm) if np.iterable(sf.radius_mm) else sf.radius_mm
        curved = f"curved {kind}, radius {r:.2g} mm"
    if reading == "fold_or_curved":
        return f"tilted {p.tilt_deg:.2f}° through focus, or {curved or 'curved near focus'}"
    if reading in ("curved", "curved_or_fold") and curved:
        return curved + (" (or tilted through focus)" if reading == "curved_or_fold" else "")
    return f"tilt {p.tilt_deg:.2f}°"


def dpm_display(card) -> tuple[str, tuple[float, float]]:
    """Colormap and contrast limits of a DPM layer for this model card.

    A |defocus| map has no sign: a sequential map from 0 to the trained range's edge. A signed map is
    diverging and centred on focus, ± the range.
    """
    lim = float(max(abs(card.defocus_range_um[0]), abs(card.defocus_range_um[1])))
    if card.dpm_magnitude:
        return DPM_MAGNITUDE_COLORMAP, (0.0, lim)
    return DPM_COLORMAP, (-lim, lim)


def label_colorbar(viewer, layer, text: str) -> bool:
    """Write ``text`` (the unit) beside the layer's colorbar; False where napari offers no way to.

    napari 0.9's colorbar draws tick values only; its vispy axis has a label, reached through the
    canvas. Any change in napari's internals leaves the colorbar unlabelled rather than failing.
    Known gap: under napari 0.9.2 the label is set but not drawn (napari sizes the overlay from the
    tick text and clips it); the unit is also in the layer's name and ``metadata["units"]``.
    """
    try:
        canvas = viewer.window._qt_viewer.canvas
        visual = canvas._layer_overlay_to_visual[layer][layer.colorbar]
        ticks = visual.node.ticks
        ticks.axis_label = text
        ticks.axis_font_size = max(int(layer.colorbar.font_size), 8)
        ticks.axis_label_margin = 6 + 0.9 * layer.colorbar.font_size * 3
        ticks.axis_color = ticks.text_color
        visual._on_data_change()
        layer.metadata["colorbar_label"] = text
        return True
    except Exception:  # noqa: BLE001 - private napari API: a missing label must not break a run
        return False


def name_in(viewer, name: str) -> bool:
    """Whether ``viewer`` holds a layer called ``name``."""
    return any(lay.name == name for lay in viewer.layers)


__all__ = ["RefocusWidget", "layer_axes", "layer_data"]
