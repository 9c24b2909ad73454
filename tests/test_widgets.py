"""napari widget tests (run under Xvfb via pytest-xvfb): refocus, pairs and training widgets."""

from __future__ import annotations

import importlib.util
import json
import time

import numpy as np
import pytest

pytest.importorskip("napari")
pytestmark = pytest.mark.gui

from onnx_builders import DPM_BIAS, DPM_GAIN, make_model_folder, reference_output


@pytest.fixture(autouse=True)
def _own_settings(tmp_path_factory, monkeypatch):
    """Each test starts from default widget settings, in a folder of its own (never the user's)."""
    from qtpy.QtCore import QSettings

    folder = tmp_path_factory.mktemp("settings")
    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, str(folder))
    yield


def _sample(shape=(256, 256), seed=0):
    rng = np.random.default_rng(seed)
    img = rng.poisson(50, shape).astype(np.float32)
    img[..., 40:80, 60:200] += 200  # structure, so the plane is not flat noise
    return img


def _refocus_widget(viewer, model):
    from napari_deepr._widgets.refocus import RefocusWidget

    w = RefocusWidget(viewer)
    viewer.window.add_dock_widget(w, name="refocus")
    w.set_model(model)
    return w


def _run_and_wait(qtbot, w, timeout=60_000):
    with qtbot.waitSignal(w.finished, timeout=timeout) as blocker:
        w.run()
    return blocker.args


def _assert_unit_drawn_beside_colour_scale(qtbot, viewer, dpm):
    """What vispy draws for the DPM layer: its colorbar, and next to it (same corner, touching, same
    top) a text holding "µm". napari 0.9.2's colorbar has no label of its own."""
    canvas = viewer.window._qt_viewer.canvas
    drawn = canvas._layer_overlay_to_visual[dpm]
    bar, name = drawn[dpm.colorbar], drawn[dpm.name_overlay]

    def placed():
        canvas._update_overlay_canvas_positions()
        return bar.node.visible and name.node.visible and name.x_size > 0

    qtbot.waitUntil(placed, timeout=5_000)
    assert "µm" in name.node.text and dpm.colorbar.position == dpm.name_overlay.position
    bx, by = bar.node.transform.translate[:2]
    nx, ny = name.node.transform.translate[:2]
    gap = bx - (nx + name.x_size)  # the text sits left of the bar, separated by napari's tile padding
    assert 0 <= gap <= 20 and abs(by - ny) < 1, (bx, by, nx, ny, name.x_size)
    # and both hide with the layer, so a hidden DPM leaves no orphan scale or label
    dpm.visible = False
    assert not bar.node.visible and not name.node.visible
    dpm.visible = True


def test_refocus_2d_layers_scale_colormap_colorbar(make_napari_viewer, qtbot, tiny_model):
    viewer = make_napari_viewer()
    img = _sample()
    layer = viewer.add_image(img, name="cells", scale=(0.325, 0.325), translate=(3.0, -2.0), units=("µm", "µm"),
                             axis_labels=("y", "x"))
    w = _refocus_widget(viewer, tiny_model)
    assert w.selected_layer() is layer
    assert w.tile_spin.value() == 128 and w.overlap_spin.value() == 32  # card defaults
    assert "matches" in w.scale_label.text()
    status, msg = _run_and_wait(qtbot, w)
    assert status == "done", msg

    out = viewer.layers["cells refocused"]
    dpm = viewer.layers["cells DPM (µm)"]
    assert out.data.dtype == np.float32 and out.data.shape == img.shape
    np.testing.assert_allclose(out.scale, layer.scale)
    np.testing.assert_allclose(out.translate, layer.translate)
    assert tuple(map(str, out.units)) == tuple(map(str, layer.units))
    assert tuple(out.axis_labels) == ("y", "x")
    # The tiny generator is a known sharpening filter: the widget's result equals an independent one.
    np.testing.assert_allclose(out.data, reference_output(img), rtol=1e-4, atol=1e-2)
    assert out.metadata["model"] == "tiny" and out.metadata["provider"] == "cpu" and out.metadata["complete"]

    # a signed model: diverging around focus, ± the trained range, µm on the colorbar
    assert dpm.colormap.name == "RdBu_r"
    assert tuple(dpm.contrast_limits) == (-5.0, 5.0)
    _assert_unit_drawn_beside_colour_scale(qtbot, viewer, dpm)
    # the DPM does not tint the result: it lies under it, opaque, until "Overlay" is ticked
    layers = list(viewer.layers)
    assert layers.index(dpm) < layers.index(out) and dpm.opacity == 1.0 and not w.overlay_check.isChecked()
    w.overlay_check.setChecked(True)
    layers = list(viewer.layers)
    assert layers.index(dpm) > layers.index(out) and dpm.opacity == 0.5
    np.testing.assert_allclose(dpm.scale, layer.scale)
    # The tiny DPM decoder maps the blurred z-scored input to gain*blur+bias, whose mean is ~bias.
    assert abs(float(dpm.data.mean()) - DPM_BIAS) < 0.2 * DPM_GAIN
    text = w.readout_label.text()
    assert text.startswith("Mean defocus") and "tilt" in text and "\n" not in text and len(text) < 90
    assert "residual" in w.readout_label.toolTip()  # the details live in the tooltip
    assert w.provider_label.text().startswith("Provider used: <b>cpu")
    _no_bar_left(qtbot, viewer)


def test_refocus_save_result_keeps_the_calibration(make_napari_viewer, qtbot, tiny_model, tmp_path):
    """'Save result…' writes calibrated TIFFs (napari's own TIFF writer drops the µm pixel size)."""
    from napari_deepr import io

    viewer = make_napari_viewer()
    viewer.add_image(_sample((128, 128)), name="img", scale=(0.325, 0.325), units=("µm", "µm"))
    w = _refocus_widget(viewer, tiny_model)
    assert not w.save_btn.isEnabled() and "calibrated TIFF (napari-deepr)" in w.save_btn.toolTip()
    status, msg = _run_and_wait(qtbot, w)
    assert status == "done" and w.save_btn.isEnabled()
    written = w.save_result(tmp_path / "out.tif")
    assert [p.rsplit("/", 1)[-1] for p in written] == ["out.tif", "out_dpm_um.tif"]
    back = io.read_image(tmp_path / "out.tif")
    assert back.pixel_size_um == pytest.approx(0.325)
    np.testing.assert_allclose(np.asarray(back.data), viewer.layers["img refocused"].data)
    assert w.save_result(tmp_path / "out.tif") == []  # the DPM file exists: nothing is overwritten


def test_refocus_magnitude_dpm_is_sequential_from_zero(make_napari_viewer, qtbot, tmp_path):
    """A |defocus| model: a sequential colormap from 0 to the range's edge (no implied sign), in µm."""
    model = make_model_folder(tmp_path, "magnitude", dpm_target="magnitude", defocus_range_um=[-4, 4])
    viewer = make_napari_viewer()
    viewer.add_image(_sample(), name="img", scale=(0.325, 0.325), units=("µm", "µm"))
    w = _refocus_widget(viewer, model)
    status, msg = _run_and_wait(qtbot, w)
    assert status == "done", msg
    dpm = viewer.layers["img DPM (µm)"]
    assert dpm.colormap.name == "magma" and tuple(dpm.contrast_limits) == (0.0, 4.0)
    assert dpm.metadata["units"] == "µm" and dpm.metadata["dpm_target"] == "|defocus|"
    _assert_unit_drawn_beside_colour_scale(qtbot, viewer, dpm)
    assert w.readout_label.text().startswith("Mean |defocus|")
    assert "0…4 µm" in w.range_label.text()


def test_refocus_progress_bar_rises_and_leaves_nothing_behind(make_napari_viewer, qtbot, tiny_model, monkeypatch):
    """The activity dock's bar moves during a tiled run; a one-tile run leaves no bar behind either."""
    _slow_steps(monkeypatch, 0.05)
    viewer = make_napari_viewer()
    viewer.add_image(_sample((384, 384)), name="img")
    w = _refocus_widget(viewer, tiny_model)
    drawn = []
    w.run()
    w.worker.yielded.connect(lambda v: drawn.extend(_dock_bars(viewer)))
    with qtbot.waitSignal(w.finished, timeout=60_000) as blocker:
        pass
    assert blocker.args[0] == "done"
    total = w.job.total
    assert total > 4 and any(0 < v < m == total for v, m in drawn), drawn
    assert max(v for v, _ in drawn) >= total - 1
    _no_bar_left(qtbot, viewer)
    # one tile: the run may end while napari is still adding its bar
    w.tile_spin.setValue(512)
    status, _ = _run_and_wait(qtbot, w)
    assert status == "done" and w.job.total == 1
    _no_bar_left(qtbot, viewer)


def test_large_result_is_not_redrawn_per_tile_and_the_fit_runs_off_the_main_thread(
        make_napari_viewer, qtbot, tiny_model, monkeypatch):
    """A 2048² result: its layers are laid out before the first tile and stay hidden (no repaint) while
    tiles run, are shown at the end, and the DPM fit runs in a worker thread."""
    import threading

    from napari.layers import Image

    from napari_deepr._widgets import refocus_readout as wmod

    main = threading.get_ident()
    fitted_in, drawn = [], []
    geometry = wmod.dpm_geometry
    monkeypatch.setattr(wmod, "dpm_geometry", lambda *a, **k: (fitted_in.append(threading.get_ident()),
                                                                 geometry(*a, **k))[1])
    refresh = Image.refresh
    # a refresh of a visible layer is a slice, a texture upload and a repaint on the main thread
    monkeypatch.setattr(Image, "refresh", lambda self, *a, **k: (
        drawn.append(self.name) if self.visible else None, refresh(self, *a, **k))[1])
    viewer = make_napari_viewer(show=True)  # shown: the canvas repaints, as for a user
    viewer.add_image(_sample((2048, 2048)), name="big", scale=(0.325, 0.325), units=("µm", "µm"))
    w = _refocus_widget(viewer, tiny_model)
    w.tile_spin.setValue(512)
    # The end of the run shows one thing per repaint: each costs napari a texture upload, shader builds
    # or glyph renders, and two in one repaint stalled the event loop for their sum.
    order = []
    viewer.window._qt_viewer.canvas._scene_canvas.events.draw.connect(lambda e: order.append("draw"))
    for name in ("_reveal", "_show_scale", "_show_unit"):
        original = getattr(w, name)

        def shown(*a, f=original, name=name):
            order.append(name if not a else a[0].name if a[0] is not None else "nothing")
            return f(*a)

        setattr(w, name, shown)
    w.run()
    during, hidden, built = [], [], set()
    canvas = viewer.window._qt_viewer.canvas

    def on_tile(value):
        if hasattr(value, "done"):
            if value.done == 1:
                drawn.clear()  # from here on, tiles run
                hidden.append([not viewer.layers[n].visible for n in ("big refocused", "big DPM (µm)")])
                # the colour scale's visuals are built while the cores were idle (napari builds an
                # overlay's visuals the first time it is shown), and left hidden
                dpm = viewer.layers["big DPM (µm)"]
                built.update(type(o).__name__ for o in canvas._layer_overlay_to_visual.get(dpm, {}))
                built.update(["shown"] if dpm.colorbar.visible or dpm.name_overlay.visible else [])
            during.extend(n for n in drawn if n != "big")

    w.worker.yielded.connect(on_tile)
    with qtbot.waitSignal(w.finished, timeout=120_000) as blocker:
        pass
    assert blocker.args[0] == "done" and w.job.total > 4
    assert hidden == [[True, True]]  # the layers existed before the first tile, hidden
    assert {"ColorBarOverlay", "LayerNameOverlay"} <= built and "shown" not in built, built
    assert not during, during  # nothing of ours repainted while tiles ran
    assert viewer.layers["big refocused"].visible and viewer.layers["big DPM (µm)"].visible
    np.testing.assert_allclose(viewer.layers["big refocused"].data[:64, :64], reference_output(
        _sample((2048, 2048)))[:64, :64], rtol=1e-4, atol=1e-2)
    assert fitted_in and main not in fitted_in
    steps = [i for i, x in enumerate(order) if x not in ("draw", "nothing")]
    shown = [order[i] for i in steps]
    assert shown[:4] == ["big DPM (µm)", "_show_scale", "_show_unit", "big refocused"], order
    assert shown[4:] in ([], ["big DPM out of range"]), order  # the outline, when the DPM leaves the range
    assert all("draw" in order[a:b] for a, b in zip(steps, steps[1:], strict=False)), order
    qtbot.waitUntil(lambda: "draw" in order[steps[-1]:], timeout=5_000)


def test_all_planes_steps_read_the_plane_shown_off_the_main_thread(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    """After an all-planes run, a z step re-fits only the plane on screen, in a worker, and the range
    warning names that plane."""
    import threading

    from napari_deepr._widgets import refocus_readout as wmod

    model = make_model_folder(tmp_path, "narrow", defocus_range_um=[-1.0, 1.0])
    main = threading.get_ident()
    shapes = []
    geometry = wmod.dpm_geometry
    monkeypatch.setattr(wmod, "dpm_geometry", lambda d, *a, **k: (shapes.append((d.shape, threading.get_ident())),
                                                                   geometry(d, *a, **k))[1])
    viewer = make_napari_viewer()
    stack = np.stack([_sample((128, 160), seed=s) for s in range(3)])
    stack[1] = 50.0 + np.random.default_rng(1).normal(0, 1, stack[1].shape)  # a flat plane: all in range
    viewer.add_image(stack, name="s", scale=(0.5, 0.325, 0.325))
    w = _refocus_widget(viewer, model)
    w.scope_combo.setCurrentIndex(w.scope_combo.findData("all"))
    viewer.dims.set_current_step(0, 0)
    status, msg = _run_and_wait(qtbot, w)
    assert status == "done", msg
    assert w.readout_label.text().startswith("Plane 0:")
    assert w.range_label.text().startswith("Plane 0:") and "beyond the trained range" in w.range_label.text()
    dpm = viewer.layers["s DPM (µm)"].data
    frac0 = float(((dpm[0] < -1) | (dpm[0] > 1)).mean())
    assert f"{100 * frac0:.0f}%" in w.range_label.text()
    oor = viewer.layers["s DPM out of range"]
    assert oor.data.shape == stack.shape  # the outline covers every plane, computed once
    n = len(shapes)
    viewer.dims.set_current_step(0, 2)
    assert len(shapes) == n  # the step itself fits nothing
    qtbot.waitUntil(lambda: w.readout_label.text().startswith("Plane 2:"), timeout=10_000)
    frac2 = float(((dpm[2] < -1) | (dpm[2] > 1)).mean())
    assert f"{100 * frac2:.0f}%" in w.range_label.text() or "within" in w.range_label.text()
    assert all(shape == (128, 160) and tid != main for shape, tid in shapes[n:])
    assert viewer.layers["s DPM out of range"] is oor  # not rebuilt per step



def _bundled_field(true_dpm):
    """A tissue field imaged on the defocus map ``true_dpm`` (physical PSF) and the bundled model."""
    from napari_deepr.demo import model_optics
    from napari_deepr.engine.model import load_model
    from napari_deepr.optics.simulate import defocus_map
    from napari_deepr.optics.specimens import make_specimen

    m = load_model("default")
    optics = model_optics(m)
    obj = make_specimen("tissue", true_dpm.shape, optics.pixel_size_um, np.random.default_rng(3))
    return m, defocus_map(obj, true_dpm, optics, photons=600, rng=np.random.default_rng(4)), optics.pixel_size_um


def test_refocus_readout_fits_the_tilt_through_the_fold_of_a_magnitude_dpm(make_napari_viewer, qtbot):
    """The bundled |defocus| model on a 1.5° tilted field centred on focus (physical PSF): the map folds
    into a V, and the readout gives the tilt through the fold and says its direction is ±180°."""
    from napari_deepr.optics.simulate import tilt_dpm

    m, img, px = _bundled_field(tilt_dpm((512, 512), 0.325, 1.5, 90.0, 0.0))
    if not m.card.dpm_magnitude:
        pytest.skip("the bundled DPM is signed: no fold")
    viewer = make_napari_viewer()
    viewer.add_image(img, name="tilted", scale=(px, px), units=("µm", "µm"))
    w = _refocus_widget(viewer, m.location)
    status, msg = _run_and_wait(qtbot, w)
    assert status == "done", msg
    # What the widget owns: the fold-aware fit (a plain plane through the V reads ~0.1°). How close
    # the model's map brings it to 1.5° is the model's accuracy, measured in its card (v2: mean
    # error 0.42° centred on focus over six specimen types; 1.15° on this tissue field).
    assert w.fit.crosses_focus and 1.0 < w.fit.tilt_deg < 1.8
    text, details = w.readout_label.text(), w.readout_label.toolTip()
    assert text.startswith("Mean |defocus|") and "through focus" in text and len(text) < 110
    assert "crosses focus" in details and "±180°" in details
    assert f"tilted {w.fit.tilt_deg:.2f}°" in text and w.geometry.reading in ("fold", "fold_or_curved")
    assert viewer.layers["tilted DPM (µm)"].metadata["plane_fit"]["crosses_focus"] is True
    # the in-focus line: the true one is the middle row (the tilt runs along y, centred on focus)
    line = viewer.layers["tilted in focus (DPM fit)"]
    assert line.shape_type == ["line"] and ("white line: in focus" in text or w.geometry.reading == "fold_or_curved")
    (r0, c0), (r1, c1) = line.data[0]
    assert abs(r0 - 255.5) < 40 and abs(r1 - 255.5) < 40 and abs(c1 - c0) > 400
    assert tuple(line.scale) == tuple(viewer.layers["tilted DPM (µm)"].scale)


def test_refocus_readout_reports_a_curved_sample(make_napari_viewer, qtbot):
    """A field on a cylinder of radius 1 mm (1.0-4.5 µm defocus): the readout names the curvature."""
    from napari_deepr.optics.simulate import cylinder_dpm

    m, img, px = _bundled_field(cylinder_dpm((512, 512), 0.325, 1000.0, 0.0, 1.0))
    viewer = make_napari_viewer()
    viewer.add_image(img, name="curved", scale=(px, px), units=("µm", "µm"))
    w = _refocus_widget(viewer, m.location)
    status, msg = _run_and_wait(qtbot, w)
    assert status == "done", msg
    surface = viewer.layers["curved DPM (µm)"].metadata["surface_fit"]
    assert surface["shape"] == "cylinder" and 0.8 < surface["radius_mm"][0] < 1.6
    assert "curved like a cylinder, radius" in w.readout_label.text()
    assert "curved like a cylinder of radius" in w.readout_label.toolTip()


def test_refocus_scale_warning_and_out_of_range(make_napari_viewer, qtbot, tmp_path):
    # A model trained for a narrow range, so the decoder's output leaves it on the bright structure.
    model = make_model_folder(tmp_path, "narrow", defocus_range_um=[-1.0, 1.0])
    viewer = make_napari_viewer()
    viewer.add_image(_sample(), name="img", scale=(0.65, 0.65), units=("µm", "µm"))
    w = _refocus_widget(viewer, model)
    # 0.65 µm pixels on a 0.325 µm model: resampled (said before Run); unticked, a warning instead.
    assert "resampled" in w.scale_label.text()
    w.resample_check.setChecked(False)
    assert "resampling is off" in w.scale_label.text()
    w.resample_check.setChecked(True)
    status, msg = _run_and_wait(qtbot, w)
    assert status == "done", msg
    oor = viewer.layers["img DPM out of range"]
    dpm = viewer.layers["img DPM (µm)"].data
    np.testing.assert_array_equal(oor.data.astype(bool), (dpm < -1) | (dpm > 1))
    assert oor.data.any()
    assert "beyond the trained range" in w.range_label.text()


def test_refocus_stack_current_plane_and_all_planes_dask(make_napari_viewer, qtbot, tiny_model):
    da = pytest.importorskip("dask.array")
    viewer = make_napari_viewer()
    stack = np.stack([_sample((128, 160), seed=s) for s in range(3)])
    layer = viewer.add_image(da.from_array(stack, chunks=(1, 64, 64)), name="stack", scale=(0.5, 0.325, 0.325))
    w = _refocus_widget(viewer, tiny_model)
    viewer.dims.set_current_step(0, 2)
    w.scope_combo.setCurrentIndex(w.scope_combo.findData("current"))
    status, msg = _run_and_wait(qtbot, w)
    assert status == "done", msg
    one = viewer.layers["stack refocused [plane 2]"]
    assert one.data.shape == (1, 128, 160)
    np.testing.assert_allclose(one.translate, (1.0, 0, 0))  # sits on plane 2 (z step 0.5 µm)
    np.testing.assert_allclose(one.data[0], reference_output(stack[2]), rtol=1e-4, atol=1e-2)

    w.scope_combo.setCurrentIndex(w.scope_combo.findData("all"))
    status, msg = _run_and_wait(qtbot, w)
    assert status == "done", msg
    allp = viewer.layers["stack refocused"]
    assert allp.data.shape == stack.shape
    np.testing.assert_allclose(allp.scale, layer.scale)
    for z in range(3):
        np.testing.assert_allclose(allp.data[z], reference_output(stack[z]), rtol=1e-4, atol=1e-2)
    assert viewer.layers["stack DPM (µm)"].data.shape == stack.shape


def test_refocus_large_result_goes_to_disk(make_napari_viewer, qtbot, tiny_model, monkeypatch):
    """A result larger than the free-memory budget is written to zarr and shown from disk, same values."""
    import zarr

    from napari_deepr._widgets import refocus_run as wmod

    monkeypatch.setattr(wmod, "DISK_RESULT_FRACTION", 0.0)
    viewer = make_napari_viewer()
    stack = np.stack([_sample((128, 160), seed=s) for s in range(3)])
    viewer.add_image(stack, name="stack", scale=(0.5, 0.325, 0.325))
    w = _refocus_widget(viewer, tiny_model)
    w.scope_combo.setCurrentIndex(w.scope_combo.findData("all"))
    status, msg = _run_and_wait(qtbot, w)
    assert status == "done", msg
    out = viewer.layers["stack refocused"].data
    dpm = viewer.layers["stack DPM (µm)"].data
    assert isinstance(out, zarr.Array) and isinstance(dpm, zarr.Array)
    assert out.shape == stack.shape and dpm.shape == stack.shape
    for z in range(3):
        np.testing.assert_allclose(out[z], reference_output(stack[z]), rtol=1e-4, atol=1e-2)
    assert "tilt" in w.readout_label.toolTip()  # the plane fit reads its plane from disk
    assert w.readout_label.text().startswith("Plane 1:")  # napari shows the middle plane


def test_refocus_rgb(make_napari_viewer, qtbot, tiny_model):
    viewer = make_napari_viewer()
    rgb = np.stack([_sample((128, 128), seed=s) for s in range(3)], axis=-1).clip(0, 255).astype(np.uint8)
    viewer.add_image(rgb, name="bf", rgb=True)
    w = _refocus_widget(viewer, tiny_model)
    status, msg = _run_and_wait(qtbot, w)
    assert status == "done", msg
    out = viewer.layers["bf refocused"]
    assert out.rgb and out.data.shape == rgb.shape
    np.testing.assert_allclose(out.data[..., 1], reference_output(rgb[..., 1]), rtol=1e-4, atol=1e-2)
    assert viewer.layers["bf DPM (µm)"].data.shape == (128, 128)


def test_refocus_user_error_is_one_sentence(make_napari_viewer, qtbot, tiny_model):
    viewer = make_napari_viewer()
    viewer.add_image(_sample((64, 64)), name="small")
    w = _refocus_widget(viewer, tiny_model)
    w.tile_spin.setValue(100)  # not a multiple of 32: the engine refuses with one sentence
    status, msg = _run_and_wait(qtbot, w)
    assert status == "error"
    assert "multiple of 32" in msg and "\n" not in msg
    assert w.status_label.text() == msg
    assert "small refocused" not in viewer.layers


def _slow_steps(monkeypatch, delay):
    """Make every tile batch take ``delay`` s, so cancel and responsiveness are tested on a run that lasts."""
    from napari_deepr.engine import refocus as engine

    original = engine.RefocusJob.steps

    def steps(self, cancel=None):
        for p in original(self, cancel):
            time.sleep(delay)
            yield p

    monkeypatch.setattr(engine.RefocusJob, "steps", steps)


def test_refocus_cancel_keeps_partial_output(make_napari_viewer, qtbot, tiny_model, monkeypatch):
    _slow_steps(monkeypatch, 0.1)
    viewer = make_napari_viewer()
    img = _sample((640, 256))
    viewer.add_image(img, name="big")
    w = _refocus_widget(viewer, tiny_model)
    seen = []

    def on_yield(value):
        if hasattr(value, "done"):
            seen.append(value.done)
            if value.done == 8:  # two tile rows of (64-px stride) tiles are finished by now
                w.cancel()

    w.run()
    w.worker.yielded.connect(on_yield)
    with qtbot.waitSignal(w.finished, timeout=60_000) as blocker:
        pass
    status, msg = blocker.args
    assert status == "cancelled" and "kept" in msg
    out = viewer.layers["big refocused"]
    assert not out.metadata["complete"]
    job = w.job
    assert job.done < job.total
    rows = np.abs(out.data).sum(axis=1) > 0
    assert rows[:64].all() and not rows[-64:].any()  # top rows done, bottom never started
    finished = np.flatnonzero(rows)
    ref = reference_output(img)
    np.testing.assert_allclose(out.data[finished[:-1]], ref[finished[:-1]], rtol=1e-4, atol=1e-2)


def test_event_loop_stays_responsive_during_refocus(make_napari_viewer, qtbot, tiny_model, monkeypatch):
    from qtpy.QtCore import QTimer

    _slow_steps(monkeypatch, 0.01)
    viewer = make_napari_viewer()
    viewer.add_image(np.stack([_sample((512, 512), seed=s) for s in range(4)]), name="s")
    w = _refocus_widget(viewer, tiny_model)
    w.scope_combo.setCurrentIndex(w.scope_combo.findData("all"))
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    # Responsiveness is measured while tiles run; the one-off result layers and readout added at the
    # end (main thread by design) are not part of it.
    finish, ended = w._finish, []
    w._finish = lambda result: (ended.append(time.perf_counter()), finish(result))
    qtbot.wait(300)  # the new viewer's first paint (napari's, before any refocus) is not part of it
    timer.start(20)
    status, _ = _run_and_wait(qtbot, w)
    timer.stop()
    assert status == "done"
    gaps = np.diff([t for t in ticks if t <= ended[0]])
    assert len(ticks) > 10
    assert gaps.max() < 0.5, f"the Qt event loop stalled for {gaps.max():.2f} s"


def test_no_model_installed_message(make_napari_viewer, monkeypatch, tmp_path):
    from napari_deepr._widgets import _common
    from napari_deepr._widgets.refocus import RefocusWidget

    monkeypatch.setattr("napari_deepr._widgets.refocus_form.list_models", list)
    monkeypatch.setattr(_common, "_session_models", [])
    viewer = make_napari_viewer()
    w = RefocusWidget(viewer)
    assert "No bundled model is installed" in w.card_label.text()
    assert not w.run_btn.isEnabled()


# ---------------------------------------------------------------------------------------------- training
needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                 reason="the trainer needs PyTorch (pip install 'napari-deepr[train]')")

TINY_TRAINER = {"g_steps": 1, "d_steps": 1, "val_every": 2, "val_pairs": 4, "dpm_iterations": 2,
                "workers": 0, "threads": 1, "log_every": 1}


def _training_widget(viewer, dataset, out, iterations):
    from napari_deepr._widgets.training import TrainingWidget

    w = TrainingWidget(viewer)
    viewer.window.add_dock_widget(w, name="train")
    w.dataset_edit.setText(str(dataset))
    w.output_edit.setText(str(out))
    w.budget_combo.setCurrentIndex(w.budget_combo.findData("iterations"))
    w.iterations_spin.setValue(iterations)
    w.device_combo.setCurrentIndex(w.device_combo.findData("cpu"))
    w.base_spin.setValue(4)
    w.batch_spin.setValue(2)
    w.patch_spin.setValue(32)
    for name, value in TINY_TRAINER.items():
        getattr(w.options, name).value = value
    return w


@needs_torch
def test_training_widget_stop_resume_and_use_model(make_napari_viewer, qtbot, tmp_path):
    from napari_deepr.engine.model import load_model

    dataset = tmp_path / "synthetic.json"
    dataset.write_text(json.dumps({"synthetic": {"z_range_um": [-3, 3], "validation_pairs": 4}}))
    out = tmp_path / "my-model"
    viewer = make_napari_viewer()
    w = _training_widget(viewer, dataset, out, iterations=6)
    stopped_once = []

    def stop_at_first_progress(status_text):
        if not stopped_once and any(e.get("event") == "progress" for e in w.events):
            stopped_once.append(True)
            w.stop()

    from qtpy.QtCore import QTimer

    timer = QTimer()
    timer.timeout.connect(lambda: stop_at_first_progress(None))
    timer.start(50)
    with qtbot.waitSignal(w.finished, timeout=120_000) as blocker:
        w.start()
    timer.stop()
    status, msg = blocker.args
    assert status == "stopped", msg
    assert (out / "checkpoint.pt").is_file() and not (out / "STOP").exists()
    assert w.resume_btn.isEnabled() and not w.use_btn.isEnabled()

    with qtbot.waitSignal(w.finished, timeout=120_000) as blocker:
        w.resume_btn.click()
    status, msg = blocker.args
    assert status == "done", f"{msg} | stderr: {w._stderr_tail[-5:]}"
    kinds = [e["event"] for e in w.events]
    assert kinds[0] == "status"  # the trainer (run with --json) says what it sets up before it starts
    start = next(e for e in w.events if e["event"] == "start")
    assert start["resumed"] and "validation" in kinds and kinds[-1] == "done"
    # Curves per term (train) and validation, from the protocol lines.
    assert {"berhu", "msssim"} <= set(w.plot.train) and "berhu_output" in w.plot.val
    assert any(k.startswith("val_") for k in w.plot.dpm)
    preview = viewer.layers["Deep-R training preview (input | output | target)"]
    np.testing.assert_allclose(preview.scale[-2:], (0.325, 0.325))  # µm, like the images it sits among
    assert all(str(u) in ("micrometer", "µm") for u in preview.units)
    assert w.use_btn.isEnabled()
    assert w.phase_label.text() == "Done" and w.progress.value() == w.progress.maximum() > 0
    model = load_model(out)
    assert model.has_dpm

    from napari_deepr._widgets.refocus import RefocusWidget

    rw = RefocusWidget(viewer)
    viewer.window.add_dock_widget(rw, name="refocus")
    w.use_btn.click()
    assert rw.model_combo.currentData() == str(out.resolve())
    viewer.add_image(_sample((96, 96)), name="img")
    rw.refresh_layers(select=viewer.layers["img"])
    status, msg = _run_and_wait(qtbot, rw)
    assert status == "done", msg
    assert np.isfinite(viewer.layers["img refocused"].data).all()


@needs_torch
def test_training_widget_reports_trainer_error_as_one_sentence(make_napari_viewer, qtbot, tmp_path):
    empty = tmp_path / "not-a-dataset"
    empty.mkdir()
    (empty / "index.json").write_text("{broken")  # passes the widget's check; the trainer refuses it
    viewer = make_napari_viewer()
    w = _training_widget(viewer, empty, tmp_path / "m", iterations=2)
    with qtbot.waitSignal(w.finished, timeout=120_000) as blocker:
        w.start()
    status, msg = blocker.args
    assert status == "error"
    assert msg and "\n" not in msg and "Traceback" not in msg
    assert w.message.text() == msg and w.start_btn.isEnabled()


def test_training_widget_checks_fields_before_starting(make_napari_viewer, tmp_path):
    from napari_deepr._widgets._common import invalid_reason
    from napari_deepr._widgets.training import TrainingWidget

    viewer = make_napari_viewer()
    w = TrainingWidget(viewer)
    viewer.window.add_dock_widget(w, name="train")
    w.start()
    assert w.process is None
    assert "dataset" in w.message.text()
    # as you type: red field, reason in its tooltip, Start disabled
    assert not w.start_btn.isEnabled() and "Choose a training dataset" in invalid_reason(w.dataset_edit)
    (tmp_path / "stacks").mkdir()
    w.dataset_edit.setText(str(tmp_path / "stacks"))
    assert "not a pairs dataset" in invalid_reason(w.dataset_edit) and "not a pairs" in w.dataset_edit.toolTip()
    spec = tmp_path / "sim.json"
    spec.write_text(json.dumps({"synthetic": {}}))
    w.dataset_edit.setText(str(spec))
    w.output_edit.setText(str(tmp_path / "model"))
    assert not invalid_reason(w.dataset_edit) and w.start_btn.isEnabled()
    w.patch_spin.setValue(40)
    assert "multiple of 32" in invalid_reason(w.patch_spin) and not w.start_btn.isEnabled()
    w.patch_spin.setValue(64)
    assert not invalid_reason(w.patch_spin)
    # the trainer's options are real controls, passed as flags; "auto" passes nothing
    w.options.val_every.value = 25
    w.options.bf16.value = True
    args = w.arguments()
    assert args[args.index("--val-every") + 1] == "25" and "--bf16" in args and "--patch" in args
    assert "--dpm-iterations" not in args and "--threads" not in args and "--init-from" not in args
    w.options.dpm_iterations.value = 0
    assert w.arguments()[w.arguments().index("--dpm-iterations") + 1] == "0"
    assert not _controls_without_tooltip(w)
    assert w.phase_label.text() == "Not started"
    # the dock fits a small screen: everything scrolls
    assert w.scroll.widget() is not None and w.minimumSizeHint().height() < 400


def test_training_settings_are_remembered(make_napari_viewer, tmp_path):
    from napari_deepr._widgets.training import TrainingWidget

    w = TrainingWidget(make_napari_viewer())
    w.minutes_spin.setValue(12.5)
    w.options.val_every.value = 77
    w.device_combo.setCurrentIndex(w.device_combo.findData("cpu"))
    w.close()
    w2 = TrainingWidget(make_napari_viewer())
    assert w2.minutes_spin.value() == 12.5 and w2.options.val_every.value == 77
    assert w2.device_combo.currentData() == "cpu"


def test_training_widget_phases_from_trainer_events(make_napari_viewer):
    """Progress and phase follow the trainer's lines, including the silent export."""
    from napari_deepr._widgets.training import TrainingWidget

    w = TrainingWidget(make_napari_viewer())
    w.handle_event({"event": "start", "phase": "gan", "device": "cpu", "patch": 64, "range_um": 5})
    w.handle_event({"event": "progress", "phase": "gan", "iteration": 30, "iterations": 120, "losses": {"berhu": 0.3}})
    assert w.phase_label.text() == "Refocusing network" and (w.progress.value(), w.progress.maximum()) == (30, 120)
    w.handle_event({"event": "progress", "phase": "dpm", "iteration": 5, "iterations": 10, "losses": {"l2": 1.0}})
    assert w.phase_label.text() == "DPM decoder" and w.progress.value() == 5
    w.handle_event({"event": "checkpoint", "phase": "export", "kind": "resume", "reason": "phase"})
    assert w.phase_label.text() == "Exporting" and "Exporting the ONNX model" in w.status.text()


# ---------------------------------------------------------------------------------------------- pairs
@pytest.fixture(scope="module")
def sim_stack():
    from napari_deepr.optics.psf import OPTICS_20X_075
    from napari_deepr.optics.simulate import simulate_stack
    from napari_deepr.optics.specimens import make_specimen

    obj = make_specimen("mixed", (128, 128), OPTICS_20X_075.pixel_size_um, 3)
    z = np.round(np.arange(-3.0, 3.01, 0.5), 6)  # 13 planes, in focus at index 6
    stack, _, _ = simulate_stack(obj, z, OPTICS_20X_075, rng=5, photons=800.0)
    return np.asarray(stack, dtype=np.float32), z


def _pairs_widget(qtbot, viewer, stack):
    from napari_deepr._widgets.pairs import PairsWidget

    viewer.add_image(stack, name="zstack", scale=(0.5, 0.325, 0.325), units=("µm", "µm", "µm"))
    w = PairsWidget(viewer)
    viewer.window.add_dock_widget(w, name="pairs")
    if w.curve is None:
        qtbot.waitSignal(w.curve_ready, timeout=30_000).wait()
    return w


def test_pairs_widget_focus_curve_and_moving_the_plane(make_napari_viewer, qtbot, sim_stack):
    from napari_deepr.science.focus import focus_curve

    stack, _z = sim_stack
    viewer = make_napari_viewer()
    w = _pairs_widget(qtbot, viewer, stack)
    assert w.zstep_spin.value() == pytest.approx(0.5)
    np.testing.assert_allclose(w.curve, focus_curve(stack, "vollath5"))
    assert abs(w.auto_plane - 6) <= 1  # the simulated focus is plane 6 (z = 0 µm)
    assert w.plane_spin.value() == w.auto_plane and not w.override_check.isChecked()
    # Moving the plane (as a click on the curve does) overrides the automatic choice and shows it.
    w.plot.clicked.emit(3)
    assert w.plane_spin.value() == 3 and w.override_check.isChecked()
    assert viewer.dims.point[0] == pytest.approx(1.5)
    np.testing.assert_allclose(w.z_um()[[0, 3, 12]], [-1.5, 0.0, 4.5])
    with qtbot.waitSignal(w.curve_ready, timeout=30_000):
        w.measure_combo.setCurrentIndex(w.measure_combo.findData("nvar"))
    np.testing.assert_allclose(w.curve, focus_curve(stack, "nvar"))
    assert w.plane_spin.value() == 3  # a manual choice survives a change of measure


def test_pairs_widget_builds_a_dataset(make_napari_viewer, qtbot, sim_stack, tmp_path):
    pytest.importorskip("napari_deepr.stacks.pairs", reason="build_pairs is not in this checkout yet")
    stack, _z = sim_stack
    viewer = make_napari_viewer()
    w = _pairs_widget(qtbot, viewer, stack)
    out = tmp_path / "dataset"
    w.out_edit.setText(str(out))
    w.patch_spin.setValue(64)
    w.range_spin.setValue(2.0)
    w.split_spin.setValue(0.25)
    with qtbot.waitSignal(w.finished, timeout=60_000) as blocker:
        w.build_btn.click()
    status, msg = blocker.args
    assert status == "done", msg
    index = json.loads((out / "index.json").read_text())
    assert index["pairs"]
    assert index["z_step_um"] == pytest.approx(0.5)
    assert w.summary is not None and "Dataset written" in w.summary_label.text()
    assert index["focus_per"] == "crop" and index["fields"][0]["resampled_from_um"] is None

    # One plane for the whole field, resampled to 0.4 µm first: what the panel sets is what is built.
    out2 = tmp_path / "dataset2"
    w.out_edit.setText(str(out2))
    w.field_focus_check.setChecked(True)
    w.resample_spin.setValue(0.4)
    with qtbot.waitSignal(w.finished, timeout=60_000) as blocker:
        w.build_btn.click()
    assert blocker.args[0] == "done", blocker.args[1]
    index = json.loads((out2 / "index.json").read_text())
    assert index["focus_per"] == "field" and len({c["infocus_plane"] for c in index["crops"]}) == 1
    assert index["optics"]["pixel_size_um"] == pytest.approx(0.4)
    assert index["fields"][0]["shape"][1:] == [104, 104]  # 128 px × 0.325 / 0.4


def _controls_without_tooltip(w):
    """Visible controls of ``w`` a user can set or press that have no tooltip (by their text)."""
    from qtpy.QtWidgets import QAbstractButton, QComboBox, QDoubleSpinBox, QLineEdit, QSpinBox

    controls = {c for t in (QComboBox, QSpinBox, QDoubleSpinBox, QLineEdit, QAbstractButton) for c in w.findChildren(t)
                if not c.objectName().startswith("qt_")}  # Qt's own line edit inside a spin box
    return [getattr(c, "text", lambda: "")() or type(c).__name__ for c in controls
            if c.isVisibleTo(w) and not c.toolTip()]


def _dock_bars(viewer):
    """``(value, maximum)`` of every progress bar in napari's activity dock, as drawn on screen."""
    from napari._qt.widgets.qt_progress_bar import QtLabeledProgressBar

    return [(pb.qt_progress_bar.value(), pb.qt_progress_bar.maximum())
            for pb in viewer.window._qt_window.findChildren(QtLabeledProgressBar)]


def _no_bar_left(qtbot, viewer):
    """The activity dock holds no progress bar once the run is over (deleteLater needs the event loop)."""
    from napari.utils import progress

    qtbot.waitUntil(lambda: not _dock_bars(viewer), timeout=5_000)
    assert not [p for p in progress._all_instances if "efocus" in str(p) or "airs" in str(p)]


def test_pairs_widget_builds_after_moving_the_plane(make_napari_viewer, qtbot, sim_stack, tmp_path):
    """Moving the in-focus plane, then Build: every patch pairs with that plane, with the bar rising."""
    stack, _z = sim_stack
    viewer = make_napari_viewer()
    w = _pairs_widget(qtbot, viewer, stack)
    out = tmp_path / "moved"
    w.out_edit.setText(str(out))
    w.patch_spin.setValue(64)
    w.range_spin.setValue(1.0)
    w.plot.clicked.emit(5)  # a click on the curve moves the plane
    assert w.override_check.isChecked() and w.build_btn.isEnabled()
    drawn = []
    w._relay.progress.connect(lambda *_: drawn.extend(_dock_bars(viewer)))  # runs after the widget's slot
    with qtbot.waitSignal(w.finished, timeout=60_000) as blocker:
        w.build_btn.click()
    status, msg = blocker.args
    assert status == "done", msg
    index = json.loads((out / "index.json").read_text())
    assert {c["infocus_plane"] for c in index["crops"]} == {5}
    assert index["focus_method"] == "manual"
    assert {p["z_um"] for p in index["pairs"]} == {-1.0, -0.5, 0.0, 0.5, 1.0}
    # one field: all training, and the summary says so in numbers
    text = w.summary_label.text()
    assert f"{index['summary']['train_pairs']} for training" in text and "0 for validation" in text
    assert any(0 < v < m for v, m in drawn), drawn  # the dock's bar moved during the build
    # the end has the last word, even when napari delivered it inside a progress update
    assert w.status_label.text() == "Dataset built."
    _no_bar_left(qtbot, viewer)


@pytest.mark.parametrize("phase", ["registering", "finding the in-focus plane"])
def test_pairs_cancel_stops_the_build_and_leaves_nothing(make_napari_viewer, qtbot, sim_stack, tmp_path, monkeypatch,
                                                         phase):
    """Cancel during the two long steps, registration and the paper's in-focus choice (all-in-focus
    fusion, then SSIM per patch): the worker stops before the next plane or patch, and no dataset,
    partial folder or progress bar is left behind."""
    from napari_deepr.stacks import infocus, register

    mod, name = (register, "estimate_shift") if phase == "registering" else (infocus, "_score")
    work, original = [], getattr(mod, name)

    def slowed(*a, **k):  # each plane (registration) or patch (in-focus choice) takes 0.2 s
        work.append(1)
        time.sleep(0.2)
        return original(*a, **k)

    stack, _z = sim_stack  # 13 planes of 128 × 128 px: 12 planes to register, 16 patches of 32 px
    viewer = make_napari_viewer()
    w = _pairs_widget(qtbot, viewer, stack)
    monkeypatch.setattr(mod, name, slowed)  # after the focus curve, which scores the stack once
    out = tmp_path / "dataset"
    w.out_edit.setText(str(out))
    w.patch_spin.setValue(32)
    w.range_spin.setValue(1.0)
    assert w.method_combo.currentData() == "ssim_edof" and w.build_btn.isEnabled()
    seen, at_cancel = [], []

    def on_progress(done, total, message):
        seen.append(message)
        # the second report of the phase comes after its first plane or patch: cancel inside the loop
        if message.startswith(phase) and seen.count(message) == 2 and not at_cancel:
            at_cancel.append(len(work))
            w.cancel_btn.click()

    w._relay.progress.connect(on_progress)
    with qtbot.waitSignal(w.finished, timeout=60_000) as blocker:
        w.build_btn.click()
    status, msg = blocker.args
    assert status == "cancelled", (msg, seen)
    assert at_cancel and len(work) - at_cancel[0] <= 2, (at_cancel, len(work))  # the one in flight, at most
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no dataset, no partial sibling
    assert w.summary is None and w.build_btn.isEnabled() and not w.cancel_btn.isEnabled()
    assert "Cancelled" in w.status_label.text()
    _no_bar_left(qtbot, viewer)


def test_pairs_widget_validates_as_you_type(make_napari_viewer, qtbot, sim_stack, tmp_path):
    from napari_deepr._widgets._common import invalid_reason

    stack, _z = sim_stack  # 13 planes × 0.5 µm = 6 µm, 128 × 128 px
    viewer = make_napari_viewer()
    w = _pairs_widget(qtbot, viewer, stack)
    assert not w.build_btn.isEnabled() and "Choose a folder" in invalid_reason(w.out_edit)
    w.out_edit.setText(str(tmp_path / "new"))
    assert not invalid_reason(w.out_edit)
    assert w.patch_spin.value() == 256 and not w.build_btn.isEnabled()  # the default patch is too large here
    assert "at most 128 px" in invalid_reason(w.patch_spin)
    assert "ff6b6b" in w.patch_spin.styleSheet() and "at most 128 px" in w.patch_spin.toolTip()
    w.patch_spin.setValue(128)
    assert w.build_btn.isEnabled() and w.patch_spin.styleSheet() == ""
    w.range_spin.setValue(4.0)
    assert "at most ±3 µm" in invalid_reason(w.range_spin) and not w.build_btn.isEnabled()
    w.range_spin.setValue(3.0)
    assert w.build_btn.isEnabled() and w.range_spin.styleSheet() == ""
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep me")
    w.out_edit.setText(str(tmp_path / "full"))
    assert "other files" in invalid_reason(w.out_edit) and not w.build_btn.isEnabled()
    assert not _controls_without_tooltip(w)
    assert w.measure_combo.currentText().startswith("Vollath F5")


def test_pairs_settings_are_remembered(make_napari_viewer, qtbot, sim_stack):
    stack, _z = sim_stack
    viewer = make_napari_viewer()
    w = _pairs_widget(qtbot, viewer, stack)
    w.patch_spin.setValue(96)
    w.measure_combo.setCurrentIndex(w.measure_combo.findData("nvar"))
    w.close()
    viewer2 = make_napari_viewer()
    w2 = _pairs_widget(qtbot, viewer2, stack)
    assert w2.patch_spin.value() == 96 and w2.measure_combo.currentData() == "nvar"


# ---------------------------------------------------------------------------------------------- manifest
def test_plugin_widgets_reader_and_writer_through_napari(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    for name in ("Refocus (Deep-R)", "Training pairs (Deep-R)", "Train (Deep-R)"):
        _dock, widget = viewer.window.add_plugin_dock_widget("napari-deepr", name)
        assert widget is not None
    stack = (np.arange(4 * 40 * 48) % 997).reshape(4, 40, 48).astype(np.float32)
    layer = viewer.add_image(stack, name="s", scale=(0.5, 0.325, 0.325), units=("µm", "µm", "µm"))
    path = tmp_path / "s.tif"
    viewer.layers.save(str(path), selected=False, plugin="napari-deepr")
    [opened] = viewer.open(str(path), plugin="napari-deepr")
    np.testing.assert_array_equal(np.asarray(opened.data), stack)
    np.testing.assert_allclose(opened.scale, layer.scale)
    assert all(str(u) in ("micrometer", "µm") for u in opened.units)


def test_precision_box_offers_measured_variants_and_runs_them(make_napari_viewer, qtbot, tiny_model, tmp_path):
    import json
    import shutil

    model = tmp_path / "tiny8"
    shutil.copytree(tiny_model, model)
    # a stand-in int8 file (the tiny graph itself) with a measured cost beside it
    shutil.copy(model / "generator.onnx", model / "generator.int8.onnx")
    (model / "int8_quality.json").write_text(json.dumps({"delta": -0.004}))
    viewer = make_napari_viewer()
    viewer.add_image(_sample(), name="cells")
    w = _refocus_widget(viewer, model)
    labels = [w.precision_combo.itemText(i) for i in range(w.precision_combo.count())]
    assert labels[0].startswith("fp32") and "int8 (quantized, SSIM -0.004)" in labels
    assert "int8" in w.precision_combo.toolTip()
    w.precision_combo.setCurrentIndex(w.precision_combo.findData("int8"))
    status, msg = _run_and_wait(qtbot, w)
    assert status == "done", msg
    assert w.job.precision == "int8" and w.job.generator_path.name == "generator.int8.onnx"
    assert "cells refocused" in viewer.layers
    # batch left at "auto": the engine chooses (1 on the CPU)
    assert w.batch_spin.text() == "auto" and w.job.batch == 1
    assert "fp16" in w.precision_combo.toolTip() and w.precision_combo.findData("fp16") == -1  # no GPU here


def test_refocus_widget_shows_modality_and_trust(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    rgb = (np.random.default_rng(0).random((96, 96, 3)) * 255).astype(np.uint8)
    viewer.add_image(rgb, name="he", rgb=True)
    from napari_deepr.engine.model import load_model

    w = _refocus_widget(viewer, load_model("default").location)
    assert "pixel size is unknown" in w.scale_label.text()
    assert "trained on widefield fluorescence" in w.modality_label.text()  # before Run
    w.force_check.setChecked(True)
    assert "Forced" in w.modality_label.text()
    w.trust_check.setChecked(True)
    w.passes_spin.setValue(2)
    status, msg = _run_and_wait(qtbot, w)
    assert status == "done", msg
    trust = viewer.layers["he trust"].data
    assert trust.shape == (96, 96) and "trustworthy" in w.status_label.text()
    # an uncalibrated image gets the strict map, and the status line says so
    assert "pixel size is unknown, so the map also asks" in w.status_label.text()
    # red to green, unlike the DPM's map, whose colour scale may be on screen
    cmap = viewer.layers["he trust"].colormap
    np.testing.assert_allclose(cmap.map(np.array([0.0, 1.0]))[:, :3], [[0.85, 0.12, 0.10], [0.15, 0.70, 0.25]], atol=1e-6)
    # its own colour scale and name, in another corner than the DPM's scale
    tl, dl = viewer.layers["he trust"], viewer.layers["he DPM (µm)"]
    assert tl.colorbar.visible and tl.name_overlay.visible and tl.colorbar.position != dl.colorbar.position
    assert tl.name_overlay.position == tl.colorbar.position
    # the range line cannot call a field "within the trained range" in green while the trust map
    # marks it untrustworthy: the same DPM read against a map trusting 60 % and then all of it
    dpm = viewer.layers["he DPM (µm)"].data
    assert float(((dpm < 0) | (dpm > 5)).mean()) <= 0.01  # else the range warning would come first
    w.job.trust_map = np.where(np.arange(96)[None, :] < 58, 1.0, 0.0) * np.ones((96, 1))
    w.update_readout()
    qtbot.waitUntil(lambda: "trust map finds 40% of the field untrustworthy" in w.range_label.text(), timeout=10_000)
    assert w.range_label.text().startswith("The DPM stays within the trained range 0…5 µm")
    w.job.trust_map = np.ones((96, 96))
    w.update_readout()
    qtbot.waitUntil(lambda: w.range_label.text().startswith("Within the trained range"), timeout=10_000)
