"""Training-pairs widget, focus curve: the worker body that measures sharpness per plane and picks the
in-focus plane, and the plot of that curve on which a click chooses a plane."""

from __future__ import annotations

import numpy as np
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from qtpy.QtCore import Signal
from qtpy.QtWidgets import QSizePolicy

from ..science.focus import focus_curve
from ..stacks.infocus import select_in_focus

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
