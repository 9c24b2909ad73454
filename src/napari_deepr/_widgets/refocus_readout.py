"""Refocus widget, DPM readout: the fit of the plane on screen (mean defocus, tilt, shape) in a worker,
its two short lines and tooltip, the out-of-range outline and the in-focus line.

A mixin of :class:`napari_deepr._widgets.refocus.RefocusWidget`; it reads the widget's ``viewer``,
``job``, ``_dpm_layer``, ``_out_layer`` and labels.
"""

from __future__ import annotations

import numpy as np
from napari.qt.threading import create_worker
from napari.utils.colormaps import DirectLabelColormap

from ..engine.dpm import dpm_geometry, out_of_range_mask
from ..engine.trust import trusted_fraction
from ._common import layer_pixel_size_um, notify, one_sentence
from .refocus_form import ROLE_KEY
from .refocus_layers import in_turns, unselected
from .refocus_run import _lazy

#: A DPM leaving the trained range on more than this fraction of pixels triggers a warning.
OUT_OF_RANGE_WARN = 0.01
#: A trust map marking more than this share of the plane untrustworthy turns the range line into a
#: warning. In-focus real images at their pixel size leave at most 2.4 % untrusted (docs/TRUST.md).
UNTRUSTED_WARN = 0.10


class DpmReadout:
    """Reads the DPM of the plane on screen after a run and on z steps (mixin of ``RefocusWidget``)."""

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
        trust = getattr(self.job, "trust_map", None)
        if trust is not None and idx and np.ndim(trust) > 2:
            trust = _lazy(trust)[idx]
        worker = create_worker(_readout_job, dpm[idx] if idx else dpm, image, bool(out_layer is not None and out_layer.rgb),
                               px, tuple(card.defocus_range_um), card.dpm_magnitude, whole, trust, _start_thread=False)
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
        steps = []
        if result[0] == "error":
            self.readout_label.show_message(result[1], "error")
        elif lay in self.viewer.layers:
            _, geometry, plane_oor, mask, has_oor, untrusted = result
            self._show_readout(run, lay, idx, note, geometry, plane_oor, untrusted)
            if mask is not None:
                # The outline of a large result is a large layer: added hidden, then shown, each in its
                # own repaint, as the result layers are.
                steps = [lambda: self._add_out_of_range(run, lay, mask, has_oor),
                         lambda: self._reveal(self._oor_layer)]
        in_turns([_alive(s) for s in steps], last=_alive(self._after_fit))

    def _after_fit(self) -> None:
        if self._readout_pending:  # the plane on screen changed while this fit ran
            self.update_readout()
            return
        self._readout_done()

    def _readout_done(self) -> None:
        then, self._after_readout = self._after_readout, None
        if then is not None:
            then()

    def _show_readout(self, run, lay, idx, note, geometry, plane_oor, untrusted) -> None:
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
        rng = f"0…{max(abs(lo), abs(hi)):g} µm" if magnitude else f"{lo:+g}…{hi:+g} µm"
        if plane_oor > OUT_OF_RANGE_WARN:
            msg = (f"{where}{100 * plane_oor:.0f}% lies beyond the trained range {rng} (yellow outline); "
                   "the refocused image is unreliable there.")
            self.range_label.show_message(msg, "warning")
            if self._announce:
                notify("warning", msg)
        elif untrusted is not None and untrusted > UNTRUSTED_WARN:
            # The DPM alone can sit inside its range on an image unlike the training data (a wrong pixel
            # size reads as 1-3 µm of defocus); the trust map sees that, so a green line would contradict it.
            msg = (f"the DPM stays within the trained range {rng}, but the trust map finds {100 * untrusted:.0f}% "
                   "of the field untrustworthy (red): the DPM and the refocused image are unreliable there.")
            self.range_label.show_message(where + msg if where else msg[0].upper() + msg[1:], "warning")
        else:
            self.range_label.show_message(f"{where}within the trained range {rng}.".capitalize()
                                          if not where else f"{where}within the trained range {rng}.", "ok")
        self.range_label.setToolTip(
            f"The model was trained on defocus {lo:+g}…{hi:+g} µm; beyond it the DPM and the refocused "
            "image are guesses. The outline layer marks those pixels in every plane.")
        self._announce = False

    def _add_out_of_range(self, run, dpm_layer, mask, has_oor) -> None:
        """The outline of the pixels beyond the trained range, in every plane; hidden until revealed."""
        self._oor_layer = None
        if name_in(self.viewer, run.oor_name):
            self.viewer.layers.remove(run.oor_name)
        if has_oor is False:
            return
        lo, hi = self.job.model.card.defocus_range_um
        cmap = DirectLabelColormap(color_dict={None: "transparent", 0: "transparent", 1: "yellow"})
        with unselected(self.viewer.layers):
            oor = self.viewer.add_labels(
                mask, name=run.oor_name, colormap=cmap, opacity=0.9, visible=False,
                metadata={ROLE_KEY: "out_of_range", "defocus_range_um": [lo, hi]},
                scale=dpm_layer.scale, translate=dpm_layer.translate, units=dpm_layer.units,
                axis_labels=dpm_layer.axis_labels,
            )
        oor.contour = 2  # an outline keeps the image and DPM beneath readable
        self._oor_layer = oor
        self.viewer.layers.selection.active = run.layer  # where napari selected it anyway

    def _show_focus_line(self, run, dpm_layer, geometry) -> bool:
        """A line where the fitted plane crosses focus (2-D results whose sample passes focus); shown or not."""
        name = run.dpm_name.replace("DPM (µm)", "in focus (DPM fit)")
        if name_in(self.viewer, name):
            self.viewer.layers.remove(name)
        if geometry.focus_line_px is None or run.lead:  # a 2-D line is drawn for 2-D results only
            return False
        with unselected(self.viewer.layers):
            self.viewer.add_shapes(
                [geometry.focus_line_px], shape_type="line", name=name, edge_color="white", edge_width=3,
                opacity=0.9, metadata={ROLE_KEY: "focus_line", "reading": geometry.reading},
                scale=dpm_layer.scale, translate=dpm_layer.translate, units=dpm_layer.units,
                axis_labels=dpm_layer.axis_labels,
            )
        self.viewer.layers.selection.active = run.layer
        return True


def _alive(fn):
    """``fn`` for a later event-loop turn: a widget closed meanwhile (Qt object deleted) ends it quietly."""
    def call():
        try:
            fn()
        except RuntimeError as exc:
            if "deleted" not in str(exc):
                raise
    return call


def _readout_job(dpm_plane, image_plane, rgb: bool, px: float, defocus_range_um, magnitude: bool, whole_dpm,
                 trust_plane=None):
    """Worker body of the readout: the plane's geometry and out-of-range share, the whole result's mask,
    and the share of the plane the trust map marks untrustworthy.

    Returns ``("ok", geometry, plane_out_of_range_fraction, mask_or_None, any_out_of_range_or_None,
    untrusted_share_or_None)``. ``mask`` stays lazy (dask) for a result on disk; its ``any`` is then
    unknown (None). A trust plane on disk is read here, off the main thread.
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
    untrusted = None if trust_plane is None else 1.0 - trusted_fraction(np.asarray(trust_plane))
    return ("ok", geometry, plane_oor, mask, has, untrusted)


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


def name_in(viewer, name: str) -> bool:
    """Whether ``viewer`` holds a layer called ``name``."""
    return any(lay.name == name for lay in viewer.layers)
