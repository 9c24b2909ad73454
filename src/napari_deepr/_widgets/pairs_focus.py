"""Training-pairs widget, focus side: the stack layer, the worker body that measures sharpness per
plane and picks the in-focus plane, the plot of that curve (a click chooses a plane), and the plane
shown in the viewer."""

from __future__ import annotations

import numpy as np
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from napari.layers import Image
from napari.qt.threading import create_worker
from qtpy.QtCore import Signal
from qtpy.QtWidgets import QSizePolicy

from ..science.focus import focus_curve
from ..stacks.infocus import select_in_focus
from ._common import one_sentence, units_of

#: Focus measures as a microscopist reads them (the internal ids stay in the combo box's data).
MEASURE_NAMES = {
    "vollath4": "Vollath F4 (autocorrelation)",
    "vollath5": "Vollath F5 (autocorrelation, noise-robust)",
    "std": "Standard deviation",
    "nvar": "Normalized variance",
    "brenner": "Brenner gradient",
    "tenengrad": "Tenengrad (Sobel gradient)",
}


def _curve_job(stack, measure: str, method: str):
    """Worker body: the focus curve and the automatically chosen plane of a ``(Z, Y, X)`` stack."""
    st = np.asarray(stack, dtype=np.float64)
    return focus_curve(st, measure), int(select_in_focus(st, method=method))


class FocusPlot(FigureCanvasQTAgg):
    """Focus measure vs z, with the chosen in-focus plane as a vertical line; clicks choose a plane."""

    clicked = Signal(int)

    def __init__(self):
        self.figure = Figure(figsize=(4.6, 2.8), dpi=90, layout="constrained")
        super().__init__(self.figure)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.setMinimumHeight(230)
        self.ax = self.figure.subplots()
        self.z = np.zeros(0)
        self.mpl_connect("button_press_event", self._on_click)
        self.show_curve(np.zeros(0), np.zeros(0), None, None, "")

    def show_curve(self, z_um, values, chosen: int | None, auto: int | None, measure: str) -> None:
        """Redraw: curve (normalised to its maximum), the automatic choice and the chosen plane."""
        self.z = np.asarray(z_um, dtype=float)
        ax = self.ax
        ax.clear()
        self.figure.set_facecolor("#262930")
        ax.set_facecolor("#1e2027")
        ax.tick_params(colors="0.8", labelsize=8)
        for spine in ax.spines.values():
            spine.set_color("0.5")
        ax.grid(True, color="0.35", lw=0.5)
        ax.set_xlabel("z (µm)", fontsize=9, color="0.85")
        label = MEASURE_NAMES.get(measure, measure).split(" (")[0]
        ax.set_ylabel(f"{label} (normalised)" if measure else "focus measure", fontsize=9, color="0.85")
        if len(values):
            v = np.asarray(values, dtype=float)
            span = v.max() - v.min()
            vn = (v - v.min()) / span if span > 0 else np.zeros_like(v)
            ax.plot(self.z, vn, "o-", ms=3, lw=1.4, color="#4fc3f7", label=label)
            if auto is not None:
                ax.axvline(self.z[auto], color="0.7", ls=":", lw=1.2, label=f"automatic (plane {auto})")
            if chosen is not None:
                ax.axvline(self.z[chosen], color="#ffb74d", lw=2.0, label=f"in focus: plane {chosen}")
                ax.plot([self.z[chosen]], [vn[chosen]], "o", ms=7, color="#ffb74d")
            leg = ax.legend(fontsize=7, loc="lower center", facecolor="#262930", edgecolor="0.5")
            for t in leg.get_texts():
                t.set_color("0.85")
        else:
            ax.text(0.5, 0.5, "choose a z-stack layer", ha="center", va="center", transform=ax.transAxes,
                    color="0.6", fontsize=9)
        self.draw_idle()

    def _on_click(self, event) -> None:
        if event.inaxes is self.ax and event.xdata is not None and len(self.z):
            self.clicked.emit(int(np.argmin(np.abs(self.z - event.xdata))))


class FocusCurve:
    """Chooses the stack layer, computes its focus curve in a worker and moves the in-focus plane
    (mixin of ``PairsWidget``; it reads the widget's ``viewer``, pickers, spin boxes and ``plot``)."""

    # ------------------------------------------------------------------ layer and curve
    def _stack_layers(self) -> list[Image]:
        return [lay for lay in self.viewer.layers if isinstance(lay, Image) and not lay.rgb and lay.ndim >= 3]

    def refresh_layers(self) -> None:
        """Re-list stack layers, keeping the current choice."""
        current = self.selected_layer()
        self.layer_combo.blockSignals(True)
        self.layer_combo.clear()
        for lay in self._stack_layers():
            self.layer_combo.addItem(lay.name, lay)
        idx = self.layer_combo.findText(current.name) if current is not None else self.layer_combo.count() - 1
        self.layer_combo.setCurrentIndex(max(idx, 0) if self.layer_combo.count() else -1)
        self.layer_combo.blockSignals(False)
        if self.selected_layer() is not current:
            self._on_layer()

    def selected_layer(self) -> Image | None:
        """The chosen stack layer, or None."""
        lay = self.layer_combo.currentData()
        return lay if lay is not None and lay in self.viewer.layers else None

    def stack(self) -> np.ndarray | None:
        """The chosen layer as a ``(Z, Y, X)`` array (first index of any axis before Z)."""
        lay = self.selected_layer()
        if lay is None:
            return None
        data = lay.data[0] if lay.multiscale else lay.data
        while data.ndim > 3:
            data = data[0]  # a time series of stacks: the first stack (one field per layer)
        return data

    def _on_layer(self, *_) -> None:
        lay = self.selected_layer()
        if lay is None:
            self.curve = None
            self.plot.show_curve([], [], None, None, "")
            return
        z_axis = lay.ndim - 3
        unit = units_of(lay)[z_axis]
        dz = float(lay.scale[z_axis])
        self.zstep_spin.setValue(dz)
        if unit == "pixel" and dz == 1.0:
            self.status_label.show_message(
                "The layer has no z calibration; set the z step (µm) before building.", "warning")
        else:
            self.status_label.show_message("")
        nz = int(lay.data.shape[-3] if not lay.multiscale else lay.data[0].shape[-3])
        self.plane_spin.blockSignals(True)
        self.plane_spin.setRange(0, nz - 1)
        self.plane_spin.blockSignals(False)
        self.range_spin.setValue(min(5.0, max(0.1, dz * (nz - 1) / 2)))
        self.override_check.setChecked(False)
        self.validate()
        self.compute_curve()

    def compute_curve(self) -> None:
        """Compute the focus curve and automatic in-focus plane in a worker (stacks can be large)."""
        stack = self.stack()
        if stack is None:
            return
        if self.curve_worker is not None:
            # One computation at a time: rerun with the latest settings when the running one ends.
            self._curve_pending = True
            return
        self._curve_pending = False
        self.status_label.show_message("Computing the focus curve…")
        worker = create_worker(_curve_job, stack, self.measure_combo.currentData(),
                               self.method_combo.currentData(), _start_thread=False)
        worker.returned.connect(lambda res, w=worker: self._on_curve(res, w))
        worker.errored.connect(lambda exc, w=worker: self._on_curve_error(exc, w))
        self.curve_worker = worker
        worker.start()

    def _on_curve(self, result, worker) -> None:
        self.curve_worker = None
        if getattr(self, "_curve_pending", False):
            self.compute_curve()  # settings changed while this one ran: its result is stale
            return
        self.curve, self.auto_plane = result
        if not self.override_check.isChecked():
            self.plane_spin.blockSignals(True)
            self.plane_spin.setValue(self.auto_plane)
            self.plane_spin.blockSignals(False)
            self._show_plane(self.auto_plane)
        self.status_label.show_message("")
        self._redraw()
        self.curve_ready.emit()

    def _on_curve_error(self, exc, worker) -> None:
        self.curve_worker = None
        self.status_label.show_message(one_sentence(exc), "error")

    def z_um(self) -> np.ndarray:
        """Plane positions in µm relative to the chosen in-focus plane."""
        n = self.plane_spin.maximum() + 1
        return (np.arange(n) - self.plane_spin.value()) * self.zstep_spin.value()

    def _redraw(self) -> None:
        if self.curve is None:
            return
        lay = self.selected_layer()
        origin = float(lay.translate[lay.ndim - 3]) if lay is not None else 0.0
        # World z (as the viewer's slider shows it), so the plot and the viewer agree.
        z = origin + np.arange(len(self.curve)) * self.zstep_spin.value()
        self.plot.show_curve(z, self.curve, self.plane_spin.value(), self.auto_plane,
                             self.measure_combo.currentData())

    def set_plane(self, index: int) -> None:
        """Choose plane ``index`` as in focus for every patch (what a click on the curve does)."""
        self.plane_spin.setValue(int(index))

    def _on_plane_spin(self, value: int) -> None:
        self.override_check.setChecked(True)
        self._show_plane(value)
        self._redraw()

    def _show_plane(self, value: int) -> None:
        lay = self.selected_layer()
        if lay is not None:
            # Show the chosen plane in the viewer, so the user sees what "in focus" means here.
            z = lay.ndim - 3
            axis = self.viewer.dims.ndim - lay.ndim + z  # layers are right-aligned in world dims
            self.viewer.dims.set_point(axis, value * float(lay.scale[z]) + float(lay.translate[z]))
