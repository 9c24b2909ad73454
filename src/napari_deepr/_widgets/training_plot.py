"""Training widget, curves: the loss and validation plot fed by the trainer's JSON lines, and the ETA
format."""

from __future__ import annotations

import math
from collections import defaultdict

from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from qtpy.QtWidgets import QSizePolicy

#: Loss terms shown on the training plot, with readable names; others are plotted under their key.
TERM_NAMES = {"berhu": "BerHu", "msssim": "1 − MS-SSIM", "adv": "adversarial (G)", "d": "discriminator",
              "total": "G total", "l2": "DPM L2", "mae_um": "DPM |error| µm"}


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
                # "best": the fixed upper-right corner hid the validation curves, which start high
                leg = ax.legend(fontsize=7, loc="best", facecolor="#262930", edgecolor="0.5", ncol=2)
                for text in leg.get_texts():
                    text.set_color("0.85")
            else:
                ax.text(0.5, 0.5, "waiting for the trainer…" if self.running else "curves appear here during training",
                        ha="center", va="center",
                        transform=ax.transAxes, color="0.6", fontsize=8)
        self.draw_idle()
