"""Shared helpers of the napari-deepr widgets: layer calibration, messages, progress, model registry.

Qt and napari are imported here (and only in the front-end modules), never in the engine.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from pathlib import Path
from typing import ClassVar

import numpy as np
from napari.utils import cancelable_progress
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QSettings, Qt
from qtpy.QtWidgets import (
    QAbstractButton,
    QComboBox,
    QDoubleSpinBox,
    QLabel,
    QLineEdit,
    QSizePolicy,
    QSpinBox,
    QWidget,
)

#: Units that napari/pint writes for micrometres; anything else means "not calibrated in µm".
MICRON_UNITS = {"µm", "um", "micrometer", "micrometre", "micron", "μm"}

#: Models the user added in this session (chosen from disk or trained), newest last. The refocus
#: widgets list these beside the installed models, so "Use this model" in the training widget and a
#: folder chosen in one refocus widget show up everywhere.
_session_models: list[Path] = []
_model_listeners: weakref.WeakSet = weakref.WeakSet()


def session_models() -> list[Path]:
    """Model folders or ``.onnx`` files added during this napari session (newest last)."""
    return list(_session_models)


def register_model(path: str | Path, select: bool = False) -> Path:
    """Add a model to every refocus widget's picker.

    Parameters
    ----------
    path : str or Path
        A model folder or a generator ``.onnx`` file.
    select : bool
        Also make it the chosen model in the open refocus widgets.

    Returns
    -------
    Path
        The resolved path that was registered.
    """
    p = Path(path).expanduser().resolve()
    if p in _session_models:
        _session_models.remove(p)
    _session_models.append(p)
    for listener in list(_model_listeners):
        try:
            listener.models_changed(p if select else None)
        except RuntimeError:  # its Qt widget was closed and deleted; Python still held the wrapper
            _model_listeners.discard(listener)
    return p


def add_model_listener(obj) -> None:
    """Ask ``obj.models_changed(selected_path_or_None)`` to be called when a model is registered."""
    _model_listeners.add(obj)


def units_of(layer) -> tuple[str, ...]:
    """The layer's units as plain strings (napari stores pint units)."""
    try:
        return tuple(str(u) for u in layer.units)
    except AttributeError:  # napari without per-axis units
        return ("pixel",) * layer.ndim


def is_micron(unit: str) -> bool:
    """Whether a unit string names micrometres."""
    return unit.strip().lower().replace("μ", "µ") in {u.lower() for u in MICRON_UNITS}


def layer_pixel_size_um(layer) -> float | None:
    """Lateral pixel size of an image layer in µm, or None when its scale is not calibrated in µm.

    napari's default is scale 1 in "pixel" units, which says nothing about the optics; a scale other
    than 1 with pixel units is taken as µm, because many readers set the scale but not the units.
    """
    x_axis = layer.ndim - 1
    scale = float(layer.scale[x_axis])
    unit = units_of(layer)[x_axis]
    if is_micron(unit):
        return scale
    if unit in ("pixel", "px", "") and scale != 1.0:
        return scale
    return None


def spatial_kwargs(layer, lead_offset: dict[int, int] | None = None) -> dict:
    """``scale``, ``translate``, ``units`` and ``axis_labels`` of ``layer`` for a new layer on the same grid.

    Parameters
    ----------
    layer : napari.layers.Image
        The source layer.
    lead_offset : dict, optional
        ``{axis: index}``: shift the new layer's origin along these (plane) axes so a one-plane result
        sits on the plane it came from.
    """
    scale = np.asarray(layer.scale, dtype=float)
    translate = np.asarray(layer.translate, dtype=float).copy()
    for ax, idx in (lead_offset or {}).items():
        translate[ax] += idx * scale[ax]
    out = {"scale": tuple(scale), "translate": tuple(translate)}
    try:
        out["units"] = units_of(layer)
        out["axis_labels"] = tuple(layer.axis_labels)
    except AttributeError:
        pass
    return out


def one_sentence(exc: BaseException) -> str:
    """The first line of an exception's message (never a traceback), naming the type when it is empty."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    return text.splitlines()[0]


def notify(kind: str, message: str) -> None:
    """Show ``message`` as a napari notification of ``kind`` (``info``, ``warning``, ``error``)."""
    {"info": show_info, "warning": show_warning, "error": show_error}[kind](message)


class MessageLabel(QLabel):
    """A word-wrapped label for status, warnings and errors, coloured by severity."""

    COLORS: ClassVar[dict[str, str]] = {"info": "", "ok": "#6ecf6e", "warning": "#f0b429", "error": "#ff6b6b"}

    def __init__(self, text: str = "", parent=None):
        super().__init__(text, parent)
        self.setWordWrap(True)
        self.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Minimum)

    def show_message(self, text: str, kind: str = "info") -> None:
        """Set the text and its colour; an empty text hides the label."""
        color = self.COLORS.get(kind, "")
        self.setStyleSheet(f"color: {color};" if color else "")
        self.setText(text)
        self.setVisible(bool(text))


class CancelableProgress(cancelable_progress):
    """An activity-dock progress bar whose cancel button calls ``cancel_callback`` at once.

    napari's ``cancelable_progress`` only runs the callback when it is iterated; our bars are updated
    by hand from worker signals, so the callback must fire from :meth:`cancel` itself.
    """

    def cancel(self) -> None:
        """Mark the bar cancelled and ask the running work to stop."""
        super().cancel()
        if self.cancel_callback is not None:
            self.cancel_callback()


def set_progress(pbar, n: int, total: int | None = None) -> None:
    """Move a napari progress bar to ``n`` (of ``total``) so the activity dock redraws it.

    napari 0.9's activity dock listens to ``progress.events.value``, which only ``update()`` emits;
    assigning ``pbar.n`` and calling ``refresh()`` changes the number but never the bar on screen.
    """
    if pbar is None:
        return
    if total is not None and total != pbar.total:
        pbar.total = total  # emits events.total: the bar's range follows
    delta = int(n) - int(pbar.n)
    if delta:
        pbar.update(delta)


# ---------------------------------------------------------------------------------------- settings
#: QSettings organisation/application; tests point QSettings' user scope at a temporary folder.
SETTINGS_ORG = "napari-deepr"
SETTINGS_APP = "widgets"


def settings_store() -> QSettings:
    """The INI-format store holding the widgets' remembered settings (per user)."""
    return QSettings(QSettings.Format.IniFormat, QSettings.Scope.UserScope, SETTINGS_ORG, SETTINGS_APP)


def _value_of(w: QWidget):
    if isinstance(w, QComboBox):
        return w.currentData() if w.currentData() is not None else w.currentText()
    if isinstance(w, (QSpinBox, QDoubleSpinBox)):
        return w.value()
    if isinstance(w, QAbstractButton):
        return bool(w.isChecked())
    if isinstance(w, QLineEdit):
        return w.text()
    raise TypeError(f"cannot remember a {type(w).__name__}")


def _restore(w: QWidget, value) -> None:
    if value is None:
        return
    if isinstance(w, QComboBox):
        idx = w.findData(value)
        if idx < 0:
            idx = w.findText(str(value))
        if idx >= 0:
            w.setCurrentIndex(idx)
    elif isinstance(w, QSpinBox):
        w.setValue(int(float(value)))
    elif isinstance(w, QDoubleSpinBox):
        w.setValue(float(value))
    elif isinstance(w, QAbstractButton):
        w.setChecked(str(value).lower() in ("true", "1"))
    elif isinstance(w, QLineEdit):
        w.setText(str(value))


def remember(group: str, controls: dict[str, QWidget]) -> None:
    """Restore ``controls`` from the last napari session and save every change as it happens.

    Parameters
    ----------
    group : str
        Section of the settings file (one per widget, e.g. ``"pairs"``).
    controls : dict
        Setting name -> Qt control (combo box, spin box, check box or line edit).
    """
    store = settings_store()
    for name, w in controls.items():
        key = f"{group}/{name}"
        with contextlib.suppress(TypeError, ValueError):  # a value from another version of the widget: keep the default
            _restore(w, store.value(key))
        signal = {QComboBox: "currentIndexChanged", QSpinBox: "valueChanged", QDoubleSpinBox: "valueChanged",
                  QLineEdit: "textChanged"}.get(type(w), "toggled")
        if isinstance(w, QAbstractButton):
            signal = "toggled"

        def save(*_, key=key, w=w):
            s = settings_store()
            s.setValue(key, _value_of(w))
            s.sync()

        getattr(w, signal).connect(save)


# -------------------------------------------------------------------------------------- validation
INVALID_STYLE = "border: 2px solid #ff6b6b; border-radius: 3px;"


def mark_invalid(w: QWidget, reason: str | None) -> None:
    """Draw ``w`` red with ``reason`` first in its tooltip (``None`` restores it): the stardist pattern.

    The control's own explanation stays in the tooltip below the reason, so hovering a red field says
    what is wrong and what the field is for.
    """
    base = w.property("deepr_tooltip")
    if base is None:
        base = w.toolTip()
        w.setProperty("deepr_tooltip", base)
    if reason:
        w.setStyleSheet(INVALID_STYLE)
        w.setToolTip(f"<b>{reason}</b>" + (f"<br><br>{base}" if base else ""))
    else:
        w.setStyleSheet("")
        w.setToolTip(base)
    w.setProperty("deepr_invalid", reason or "")


def invalid_reason(w: QWidget) -> str:
    """Why ``w`` is marked invalid, or an empty string."""
    return w.property("deepr_invalid") or ""


class Throttle:
    """Lets an action through at most ``rate`` times per second (layer refreshes cost a repaint)."""

    def __init__(self, rate: float = 5.0):
        self.interval = 1.0 / rate
        self._last = 0.0

    def ready(self, force: bool = False) -> bool:
        """Whether enough time has passed since the last accepted call (always True when forced)."""
        now = time.monotonic()
        if force or now - self._last >= self.interval:
            self._last = now
            return True
        return False
