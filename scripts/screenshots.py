"""Regenerate docs/screenshots/{refocus,pairs,training}.png from real napari viewers.

Run under a display (Xvfb on servers)::

    xvfb-run -a python scripts/screenshots.py [--model MODEL_DIR] [--iterations 40]

The refocus shot uses the bundled default model when it is installed, else ``--model`` /
``$DEEPR_SCREENSHOT_MODEL``, else a tiny test model built from ``tests/onnx_builders.py`` (a fixed
sharpening filter whose "DPM" is not a physical defocus; the script prints which model was used).
The training shot runs a short real training on synthetic pairs (needs torch).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "screenshots"
SIZE = (1680, 1020)


def _wait(app, predicate, timeout: float) -> bool:
    """Process Qt events until ``predicate()`` is true or ``timeout`` seconds pass."""
    t0 = time.monotonic()
    while not predicate():
        app.processEvents()
        time.sleep(0.01)
        if time.monotonic() - t0 > timeout:
            return False
    for _ in range(20):  # let pending repaints land before grabbing
        app.processEvents()
        time.sleep(0.01)
    return True


def _viewer(title: str):
    import napari

    v = napari.Viewer(title=title, show=True)
    v.window._qt_window.resize(*SIZE)
    return v


def _quiet(app, viewer) -> None:
    """Close napari's notification toasts (they cover the canvas) and give the layer list room for the
    layer names (napari elides them at its default width)."""
    from napari._qt.dialogs.qt_notification import NapariQtNotification
    from qtpy.QtCore import Qt

    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()
    window = viewer.window._qt_window
    qt_viewer = viewer.window._qt_viewer
    window.resizeDocks([qt_viewer.dockLayerControls, qt_viewer.dockLayerList], [360, 360], Qt.Orientation.Horizontal)
    for _ in range(20):
        app.processEvents()
        time.sleep(0.01)


def _save(viewer, name: str) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.png"
    viewer.screenshot(str(path), canvas_only=False, flash=False)
    print(f"wrote {path.relative_to(ROOT)}")
    return path


def _model(arg: str | None, tmp: Path) -> tuple[Path, str]:
    from napari_deepr.engine.model import load_model
    from napari_deepr.errors import ModelError

    chosen = arg or os.environ.get("DEEPR_SCREENSHOT_MODEL")
    if chosen:
        return Path(chosen), f"model from {'--model' if arg else '$DEEPR_SCREENSHOT_MODEL'}: {chosen}"
    try:
        m = load_model("default")
        return m.root, f"bundled model {m.name}"
    except ModelError:
        sys.path.insert(0, str(ROOT / "tests"))
        from onnx_builders import make_model_folder

        folder = make_model_folder(tmp, "tiny-test-model", tile=256, overlap=32)
        return folder, "TINY TEST MODEL (no bundled model installed): its DPM is not a physical defocus"


def shot_refocus(app, model: Path, note: str) -> None:
    from napari_deepr._sample_data import sample_tilted
    from napari_deepr._widgets.refocus import RefocusWidget

    v = _viewer(f"napari-deepr: refocus with DPM overlay ({note})")
    for data, kw, _ in sample_tilted():
        v.add_image(data, **kw)
    v.canvas.overlays["scale_bar"].visible = True
    w = RefocusWidget(v)
    v.window.add_dock_widget(w, name="Refocus (Deep-R)", area="right")
    w.set_model(model)
    w.refresh_layers(select=v.layers["tilted 1.5° (simulated)"])
    w.overlay_check.setChecked(True)  # the shot shows the map over the result (off by default)
    ended = []
    w.finished.connect(lambda *a: ended.append(a))  # after the readout, which follows the last tile
    w.run()
    if not _wait(app, lambda: bool(ended), 300):
        raise SystemExit("refocus did not finish in 5 minutes")
    print("refocus:", w.status_label.text(), "|", w.readout_label.text(), "|", w.range_label.text())
    v.reset_view()
    _quiet(app, v)
    _save(v, "refocus")
    v.close()


def shot_through_focus(app, model: Path, note: str) -> None:
    """The same 1.5° tilt centred on focus: a |defocus| DPM folds into a V, and the readout says so."""
    from napari_deepr._widgets.refocus import RefocusWidget
    from napari_deepr.demo import tilted_sample

    image, _, _, optics = tilted_sample(center_um=0.0)
    px = optics.pixel_size_um
    v = _viewer(f"napari-deepr: 1.5° tilt through focus ({note})")
    v.add_image(image, name="tilted 1.5° through focus (simulated)", scale=(px, px), units=("µm", "µm"))
    v.canvas.overlays["scale_bar"].visible = True
    w = RefocusWidget(v)
    v.window.add_dock_widget(w, name="Refocus (Deep-R)", area="right")
    w.set_model(model)
    w.refresh_layers(select=v.layers[0])
    ended = []
    w.finished.connect(lambda *a: ended.append(a))  # after the readout, which follows the last tile
    w.run()
    if not _wait(app, lambda: bool(ended), 300):
        raise SystemExit("refocus did not finish in 5 minutes")
    print("through focus:", w.status_label.text(), "|", w.readout_label.text())
    v.reset_view()
    _quiet(app, v)
    _save(v, "refocus_through_focus")
    v.close()


def shot_trust(app, model: Path, note: str) -> None:
    """An uncalibrated real image with pixels twice the model's (DSB 2018 nuclei, fetched by
    scripts/fetch_heldout.py): the trust map is v1's, and the status line says why it is strict."""
    import tifffile

    from napari_deepr._widgets.refocus import RefocusWidget

    path = Path.home() / ".cache/napari-deepr/heldout/dsb2018_nuclei_2d.tif"
    if not path.exists():
        print("trust: skipped,", path, "missing (python scripts/fetch_heldout.py)")
        return
    v = _viewer(f"napari-deepr: trust map of an uncalibrated image ({note})")
    v.add_image(tifffile.imread(path).astype("float32"), name="DSB 2018 nuclei (uncalibrated; really 0.65 µm px)")
    w = RefocusWidget(v)
    v.window.add_dock_widget(w, name="Refocus (Deep-R)", area="right")
    w.set_model(model)
    w.refresh_layers(select=v.layers[0])
    w.trust_check.setChecked(True)
    ended = []
    w.finished.connect(lambda *a: ended.append(a))
    w.run()
    if not _wait(app, lambda: bool(ended), 600):
        raise SystemExit("refocus with trust did not finish in 10 minutes")
    print("trust:", w.status_label.text())
    v.reset_view()
    _quiet(app, v)
    _save(v, "trust_uncalibrated")
    v.close()


def shot_pairs(app) -> None:
    from napari_deepr._sample_data import sample_zstack
    from napari_deepr._widgets.pairs import PairsWidget

    v = _viewer("napari-deepr: training pairs from a z-stack")
    for data, kw, _ in sample_zstack():
        v.add_image(data, **kw)
    w = PairsWidget(v)
    v.window.add_dock_widget(w, name="Training pairs (Deep-R)", area="right")
    if not _wait(app, lambda: w.curve is not None and w.curve_worker is None, 120):
        raise SystemExit("focus curve did not finish")
    print("pairs: automatic in-focus plane", w.auto_plane, "by", w.method_combo.currentText())
    # In use: the default (paper) in-focus method, a ±4 µm range, and the dataset built.
    w.range_spin.setValue(4.0)
    w.out_edit.setText(tempfile.mkdtemp(prefix="deepr-shot-pairs-") + "/dataset")
    ended = []
    w.finished.connect(lambda *a: ended.append(a))
    w.build()
    if not _wait(app, lambda: bool(ended), 600):
        raise SystemExit("building pairs did not finish in 10 minutes")
    print("pairs:", ended[0][0], "|", w.summary_label.text())
    v.reset_view()
    _quiet(app, v)
    _save(v, "pairs")
    v.close()


def shot_training(app, iterations: int) -> None:
    from napari_deepr._widgets.training import TrainingWidget

    tmp = Path(tempfile.mkdtemp(prefix="deepr-shot-train-"))
    dataset = tmp / "synthetic.json"
    dataset.write_text(json.dumps({"synthetic": {"z_range_um": [-4, 4], "validation_pairs": 8}}))
    v = _viewer("napari-deepr: training")
    w = TrainingWidget(v)
    v.window.add_dock_widget(w, name="Train (Deep-R)", area="right")
    w.dataset_edit.setText(str(dataset))
    w.output_edit.setText(str(tmp / "model"))
    w.budget_combo.setCurrentIndex(w.budget_combo.findData("iterations"))
    w.iterations_spin.setValue(iterations)
    w.device_combo.setCurrentIndex(w.device_combo.findData("cpu"))
    w.base_spin.setValue(8)
    w.batch_spin.setValue(4)
    w.patch_spin.setValue(64)
    for name, value in {"g_steps": 2, "d_steps": 1, "val_every": 5, "dpm_iterations": 30, "workers": 0}.items():
        getattr(w.options, name).value = value
    w.start()
    _wait(app, lambda: w.process is None, 540)
    print("training:", w.status.text(), "|", w.message.text())
    v.reset_view()
    _quiet(app, v)
    _save(v, "training")
    v.close()


def main(argv=None) -> int:
    """Make the screenshots (or the ones named with --only)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model folder or .onnx for the refocus shot")
    p.add_argument("--iterations", type=int, default=40, help="training iterations for the training shot")
    p.add_argument("--only", nargs="*", choices=("refocus", "through_focus", "pairs", "training", "trust"))
    args = p.parse_args(argv)
    import napari  # noqa: F401  (creates the Qt application napari expects)
    from napari._qt.qt_event_loop import get_qapp
    from qtpy.QtWidgets import QApplication

    app = get_qapp()
    assert isinstance(app, QApplication)
    # The widgets remember their settings per user (QSettings): the shots start from the defaults and
    # leave the user's remembered settings alone.
    from qtpy.QtCore import QSettings

    settings_dir = tempfile.mkdtemp(prefix="deepr-shot-settings-")
    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, settings_dir)
    which = args.only or ["refocus", "through_focus", "pairs", "training", "trust"]
    with tempfile.TemporaryDirectory() as tmp:
        if "refocus" in which:
            model, note = _model(args.model, Path(tmp))
            print("refocus model:", note)
            shot_refocus(app, model, note)
        if "through_focus" in which:
            model, note = _model(args.model, Path(tmp))
            shot_through_focus(app, model, note)
        if "trust" in which:
            model, note = _model(args.model, Path(tmp))
            shot_trust(app, model, note)
        if "pairs" in which:
            shot_pairs(app)
        if "training" in which:
            shot_training(app, args.iterations)
    return 0


if __name__ == "__main__":
    sys.exit(main())
