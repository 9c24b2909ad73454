"""Refocus widget, form side: the controls, the image-layer and model pickers, and the checks made as
the user types (tile and overlap, the pixel-size and modality verdicts) that enable Run.

The base class of :class:`napari_deepr._widgets.refocus.RefocusWidget`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from napari.layers import Image
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

from ..engine.contract import GENERATOR_FILE
from ..engine.domain import model_for_image, preflight
from ..engine.model import DEFAULT_MODEL, list_models, load_model
from ..engine.providers import available_providers
from ..engine.quantize import precision_choices
from ..errors import DeepRError
from ._common import (
    MessageLabel,
    layer_pixel_size_um,
    mark_invalid,
    one_sentence,
    register_model,
    remember,
    session_models,
)
from .refocus_run import layer_axes, layer_data

CHOOSE_FOLDER = "Choose model folder…"
CHOOSE_FILE = "Choose .onnx file…"
ROLE_KEY = "napari_deepr_role"


class RefocusForm(QWidget):
    """The refocus widget's controls, pickers and as-you-type checks (base of ``RefocusWidget``)."""

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
        path = m.root if m.root.joinpath(GENERATOR_FILE) == m.generator_path else m.generator_path
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
            paths.append(m.root if m.root.joinpath(GENERATOR_FILE) == m.generator_path else m.generator_path)
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
