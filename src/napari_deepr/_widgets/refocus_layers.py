"""Refocus widget, result side: the refocused, DPM and trust layers on the input's grid, and the DPM's
colour scale (sequential from 0 for |defocus| models, diverging around focus for signed ones).

A mixin of :class:`napari_deepr._widgets.refocus.RefocusWidget`; it reads the widget's ``viewer``,
``job``, ``_run`` and controls, and owns ``_out_layer``, ``_dpm_layer`` and ``_trust_layer``.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
from qtpy.QtCore import QTimer

from ..engine.refocus import RefocusJob
from ..engine.results import LAYER_FIELDS, run_metadata
from ._common import notify, set_progress, spatial_kwargs
from .refocus_form import ROLE_KEY
from .refocus_run import _lazy

#: Diverging colormap for a signed DPM: blue below, red above focus, white at 0.
DPM_COLORMAP = "RdBu_r"
#: Sequential colormap for a |defocus| DPM: dark in focus, bright far from it.
DPM_MAGNITUDE_COLORMAP = "magma"
#: Red (untrusted) through yellow (trust 0.5) to green (trusted): unlike any DPM map, so the DPM's colour
#: scale is never read against it.
TRUST_COLORS = ((0.85, 0.12, 0.10, 1.0), (1.0, 0.85, 0.15, 1.0), (0.15, 0.70, 0.25, 1.0))
#: Planes up to this many pixels are shown while their tiles run (a repaint of them is cheap).
LIVE_PREVIEW_MAX_PX = 1024 * 1024


class ResultLayers:
    """Adds, places and refreshes the result layers of a refocus run (mixin of ``RefocusWidget``)."""

    # ------------------------------------------------------------------ results
    def _expand(self, arr):
        """View of a one-plane result with the stack's leading axes restored (length 1)."""
        run = self._run
        if run.plane is None:
            return arr
        return arr.reshape((1,) * run.lead + arr.shape)

    def _replace_layer(self, name: str, factory):
        layers = self.viewer.layers
        if name in layers:
            layers.remove(name)
        with unselected(layers):
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
        self._out_layer = self._dpm_layer = self._trust_layer = None
        self._live_now = self._live(job)

        def step(fn):
            # A run that ended while its layers were being laid out (cancelled at once) adds no more.
            return lambda: fn() if self.job is job and self.worker is not None else None

        steps = [self._add_dpm_layer]
        if self._run.dpm:
            # The colour scale's first draw renders its glyphs (tick values, the name with its unit):
            # now, while the cores are idle, rather than in a repaint at the end.
            steps += glyph_steps(self.viewer, f"0123456789-.+ {self._run.dpm_name}")
            if self._live_now:  # shown from the start: the colour scale and unit too, each in its own turn
                steps += [self._show_scale, self._show_unit]
            else:  # napari builds an overlay's visuals when it is first shown: build them while hidden
                steps += [self._build_scale, self._build_unit]
        steps += [self._add_out_layer, self._add_trust_layer, self._show_trust_scale]
        in_turns([step(s) for s in steps], last=self._ready.set)

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
        offset = dict(enumerate(run.plane)) if run.plane is not None else None
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
                self._expand(job.trust_map), name=name, colormap=trust_colormap(), contrast_limits=(0.0, 1.0), opacity=0.5,
                blending="translucent", metadata=meta, visible=self._live_now, **self._geo(),
            ),
        )

    def _show_trust_scale(self) -> None:
        """The trust map's own colour scale and name, in another corner than the DPM's: with the trust
        layer over the DPM, the DPM's scale alone would be read against the trust colours."""
        lay = self._trust_layer
        if lay is None or lay not in self.viewer.layers:
            return
        lay.colorbar.position = "bottom_right"
        lay.colorbar.visible = True
        show_unit_beside_scale(lay)

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

    def _build_scale(self) -> None:
        """Let napari build the colorbar's visuals while the DPM layer is hidden (nothing is drawn)."""
        if self._dpm_layer is not None and self._dpm_layer in self.viewer.layers:
            self._dpm_layer.colorbar.visible = True  # builds them; a hidden layer draws no overlay
            self._dpm_layer.colorbar.visible = False  # they stay built; shown with the result

    def _build_unit(self) -> None:
        """Let napari build the name overlay's text visual while the DPM layer is hidden."""
        if self._dpm_layer is not None and self._dpm_layer in self.viewer.layers and show_unit_beside_scale(
                self._dpm_layer):
            self._dpm_layer.name_overlay.visible = False

    def _show_scale(self) -> None:
        """The DPM's colorbar (its tick labels cost napari glyph renders the first time)."""
        if self._dpm_layer is not None and self._dpm_layer in self.viewer.layers:
            self._dpm_layer.colorbar.visible = True

    def _show_unit(self) -> None:
        """The DPM's unit beside its colorbar (see :func:`show_unit_beside_scale`)."""
        if self._dpm_layer is not None and self._dpm_layer in self.viewer.layers:
            show_unit_beside_scale(self._dpm_layer)

    def _reveal(self, lay) -> None:
        if lay is None or lay not in self.viewer.layers:
            return
        if self._dpm_display is not None and lay is self._dpm_layer and self.job.dpm is not None:
            np.mean(self.job.dpm, axis=-1, out=self._dpm_display)
        if lay.visible:
            lay.refresh()
        else:
            lay.visible = True  # napari refreshes a layer when it becomes visible


def trust_colormap():
    """The trust layer's colormap (:data:`TRUST_COLORS`, trust 0 to 1)."""
    from napari.utils.colormaps import Colormap

    return Colormap(colors=TRUST_COLORS, controls=(0.0, 0.5, 1.0), name="trust (red 0, yellow 0.5, green 1)")


def dpm_display(card) -> tuple[str, tuple[float, float]]:
    """Colormap and contrast limits of a DPM layer for this model card.

    A |defocus| map has no sign: a sequential map from 0 to the trained range's edge. A signed map is
    diverging and centred on focus, ± the range.
    """
    lim = float(max(abs(card.defocus_range_um[0]), abs(card.defocus_range_um[1])))
    if card.dpm_magnitude:
        return DPM_MAGNITUDE_COLORMAP, (0.0, lim)
    return DPM_COLORMAP, (-lim, lim)


def show_unit_beside_scale(layer) -> bool:
    """Draw the layer's name, and so the unit in its ``(µm)``, beside its colorbar.

    napari 0.9's colorbar draws tick values only; a label set on its vispy axis is never drawn (the
    overlay is sized from the tick text, so the label lands outside the canvas). The layer's own name
    overlay is public napari and is tiled next to the colorbar when both sit in the same corner; the
    DPM layer's name ends in "(µm)", so the unit is drawn where the colour scale is read, and both hide
    with the layer. Returns whether the name is shown (False on a napari without name overlays).
    """
    overlay = getattr(layer, "name_overlay", None)
    if overlay is None:
        return False
    overlay.position = layer.colorbar.position
    overlay.visible = True
    return True


@contextmanager
def unselected(layers):
    """Add layers without napari selecting them.

    napari selects every layer it adds; the input stays selected (a second Run refocuses it, not its
    result), and selecting a layer and back cost the main thread a layer-controls switch each way
    (365 ms of adding a 2048² result on the loaded 2-core machine). The flag is private napari API:
    without it, napari selects the new layer and the callers select the input again.
    """
    activate = getattr(layers, "_activate_on_insert", None)
    if activate is None:
        yield
        return
    layers._activate_on_insert = False
    try:
        yield
    finally:
        layers._activate_on_insert = activate


def glyph_steps(viewer, text: str, per_step: int = 4) -> list:
    """Steps that render the glyphs of ``text`` into the canvas's font atlas, a few per step.

    napari draws canvas text with glyphs rendered on the CPU the first time each character is drawn
    (6-25 ms each on two cores); a colorbar's first repaint rendered all of its glyphs at once. The
    atlas belongs to the canvas and lasts for the session. napari's canvas font is private API: where
    it is not found, there are no steps and the glyphs are rendered at first draw, as before.
    """
    try:
        info = viewer.window._qt_viewer.canvas.font_info()
        font = info.font_manager.get_font(info.face)
    except Exception:  # noqa: BLE001 - private napari API; warming glyphs is only an optimisation
        return []
    chars = [c for c in dict.fromkeys(text) if not c.isspace()]

    def render(chunk):
        def step():
            for c in chunk:
                font[c]  # noqa: B018 - looking a glyph up renders it once into the atlas
        return step

    return [render(chars[i:i + per_step]) for i in range(0, len(chars), per_step)]


#: Milliseconds between the steps that lay out or show results. Each step (adding a layer, showing a
#: hidden one, its colour scale, its unit) costs napari's next repaint a slice, a texture upload,
#: shader builds or glyph renders; a real timer (at 0 ms the next step ran before that repaint) lets
#: each repaint happen on its own, so no two pile up in one stall of the event loop.
TURN_MS = 15


def in_turns(steps, last=None, delay_ms: int = TURN_MS) -> None:
    """Run ``steps`` one per event-loop turn (the first now), then ``last``.

    A step that raises drops the steps after it; ``last`` still runs (a worker waiting on it must not
    wait for nothing).
    """
    pending = list(steps)

    def next_step():
        try:
            if pending:
                pending.pop(0)()
        except BaseException:
            pending.clear()
            raise
        finally:
            if not pending and last is not None:
                last()
        if pending:
            QTimer.singleShot(delay_ms, next_step)

    next_step()
