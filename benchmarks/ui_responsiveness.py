"""How long the napari event loop stalls while the Refocus widget runs (the UI's responsiveness).

A 10 ms QTimer ticks in a real napari viewer (under Xvfb on servers) while the Refocus widget
refocuses a 2048 × 2048 field with the bundled model in 512-px tiles (25 tiles with the card's
96-px overlap), DPM on. The longest gap between ticks is how long a click or a repaint would have
waited. Reported separately:

* ``tiles``: from Run until the last tile is done (the engine runs in a worker thread; the main
  thread only shows progress and, throttled, the partial result); ``start`` is its part before the
  first tile, while the result layers are laid out;
* ``finish``: the end of the run (the result layers completed, the DPM readout and out-of-range
  outline);
* ``z_steps``: after refocusing every plane of a 4 × 1024² stack, how long each step of the z slider
  takes (the readout follows the plane on screen);
* ``pairs_cancel``: how long the Training pairs widget takes to stop after Cancel, pressed 1 s into
  the registration of a 25 × 1024² stack, and 0.2, 1 and 3 s into the choice of the in-focus planes
  (the all-in-focus fusion, then SSIM per 256-px patch), and whether anything was left on disk.

Run::

    xvfb-run -a python benchmarks/ui_responsiveness.py --label after --json docs/ui_responsiveness.json

The JSON file keeps one entry per label, so a before/after pair measured on the same machine can be
compared. Target: the longest gap below 250 ms on two cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np


def _field(size: int, z_um: float, seed: int):
    from napari_deepr.demo import model_optics
    from napari_deepr.engine.model import load_model
    from napari_deepr.optics.simulate import defocus_map
    from napari_deepr.optics.specimens import make_specimen

    m = load_model("default")
    optics = model_optics(m)
    obj = make_specimen("tissue", (size, size), optics.pixel_size_um, np.random.default_rng(seed))
    img = defocus_map(obj, np.full((size, size), z_um, np.float32), optics, photons=600,
                      rng=np.random.default_rng(seed + 1))
    return m, np.asarray(img, np.float32), optics.pixel_size_um


class Ticker:
    """Records the time of every 10 ms timer tick the Qt event loop manages to deliver."""

    def __init__(self, interval_ms: int = 10):
        from qtpy.QtCore import QTimer

        self.ticks: list[float] = []
        self.timer = QTimer()
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(lambda: self.ticks.append(time.perf_counter()))

    def gaps(self, t0: float, t1: float) -> np.ndarray:
        t = [t0] + [x for x in self.ticks if t0 <= x <= t1] + [t1]
        return np.diff(t)


def _wait(app, predicate, timeout: float) -> None:
    t0 = time.monotonic()
    while not predicate():
        app.processEvents()
        time.sleep(0.002)
        if time.monotonic() - t0 > timeout:
            raise SystemExit("timed out")


def run_2d(app, size: int, tile: int) -> dict:
    import napari

    from napari_deepr._widgets.refocus import RefocusWidget

    m, img, px = _field(size, 3.0, 7)
    v = napari.Viewer(show=True)
    v.add_image(img, name="field", scale=(px, px), units=("µm", "µm"))
    w = RefocusWidget(v)
    v.window.add_dock_widget(w, name="Refocus (Deep-R)")
    w.set_model(m.location)
    w.tile_spin.setValue(tile)
    for _ in range(50):  # the first paint of the new viewer is napari's, not ours
        app.processEvents()
        time.sleep(0.01)
    # napari's own cost of adding one such layer, in this viewer, now: the floor of any plugin's gap
    t0 = time.perf_counter()
    probe = v.add_image(np.zeros_like(img), name="probe", scale=(px, px), contrast_limits=(0, 1))
    app.processEvents()
    add_layer_ms = 1000 * (time.perf_counter() - t0)
    v.layers.remove(probe)
    for _ in range(30):
        app.processEvents()
        time.sleep(0.01)
    marks: dict[str, float] = {}
    finish = w._finish

    def timed_finish(result):
        marks["last_tile"] = time.perf_counter()
        finish(result)
        marks["finished"] = time.perf_counter()

    w._finish = timed_finish
    tick = Ticker()
    tick.timer.start()
    marks["run"] = time.perf_counter()
    w.run()
    # the first tile's progress: before it, the result layers are laid out while the worker waits
    w.worker.yielded.connect(lambda v: marks.setdefault("first_tile", time.perf_counter()) if hasattr(v, "done")
                             else None)
    _wait(app, lambda: "finished" in marks, 600)
    for _ in range(30):  # repaints the end of the run queued
        app.processEvents()
        time.sleep(0.01)
    marks["settled"] = time.perf_counter()
    tick.timer.stop()
    tiles = tick.gaps(marks["run"], marks["last_tile"])
    start = tick.gaps(marks["run"], marks.get("first_tile", marks["last_tile"]))
    end = tick.gaps(marks["last_tile"], marks["settled"])
    out = {
        "image": f"{size}x{size}", "tile": tile, "tiles": w.job.total, "provider": w.job.provider,
        "run_s": round(marks["last_tile"] - marks["run"], 2),
        "tiles_max_gap_ms": round(1000 * float(tiles.max()), 1),
        "tiles_p95_gap_ms": round(1000 * float(np.percentile(tiles, 95)), 1),
        "tiles_median_gap_ms": round(1000 * float(np.median(tiles)), 1),
        "start_max_gap_ms": round(1000 * float(start.max()), 1),
        "finish_max_gap_ms": round(1000 * float(end.max()), 1),
        "finish_gaps_over_100ms": [round(1000 * float(g)) for g in end if g > 0.1],
        "status": w.status_label.text(),
        "napari_add_2048_layer_ms_idle": round(add_layer_ms, 1),
    }
    v.close()
    return out


def run_stack_steps(app, size: int, planes: int) -> dict:
    import napari

    from napari_deepr._widgets.refocus import RefocusWidget

    m, img, px = _field(size, 3.0, 11)
    stack = np.stack([np.roll(img, 37 * k, axis=1) for k in range(planes)])
    v = napari.Viewer(show=True)
    v.add_image(stack, name="stack", scale=(1.0, px, px), units=("µm", "µm", "µm"))
    w = RefocusWidget(v)
    v.window.add_dock_widget(w, name="Refocus (Deep-R)")
    w.set_model(m.location)
    w.scope_combo.setCurrentIndex(w.scope_combo.findData("all"))
    w.run()
    _wait(app, lambda: w.worker is None, 900)
    for _ in range(50):
        app.processEvents()
        time.sleep(0.01)
    tick = Ticker()
    tick.timer.start()
    steps = []
    for z in [1, 2, 3, 0, 1, 2][: 2 * planes]:
        t0 = time.perf_counter()
        v.dims.set_current_step(0, z % planes)
        app.processEvents()
        steps.append(time.perf_counter() - t0)
        # give deferred work (a debounced readout) its chance, and count its stall too
        t_end = time.perf_counter() + 0.6
        while time.perf_counter() < t_end:
            app.processEvents()
            time.sleep(0.002)
    _wait(app, lambda: w._readout_worker is None, 60)
    t_last = time.perf_counter()
    tick.timer.stop()
    gaps = tick.gaps(tick.ticks[0] if tick.ticks else t_last, t_last)
    out = {
        "stack": f"{planes}x{size}x{size}",
        "step_call_ms": [round(1000 * s, 1) for s in steps],
        "max_gap_ms_while_stepping": round(1000 * float(gaps.max()), 1),
        "readout": w.readout_label.text(),
        "range_note": w.range_label.text(),
    }
    v.close()
    return out


def run_pairs_cancel(app, tiles: int, delays: list[tuple[str, float]]) -> dict:
    """Cancel latency of the pairs widget: press Cancel ``delay`` s after the phase ``phase`` starts."""
    import tempfile

    import napari

    from napari_deepr._sample_data import sample_zstack
    from napari_deepr._widgets.pairs import PairsWidget

    data, kwargs, _ = sample_zstack()[1]
    stack = np.tile(np.asarray(data), (1, tiles, tiles))  # 25 planes of (512·tiles)² px
    v = napari.Viewer(show=True)
    v.add_image(stack, **kwargs)
    w = PairsWidget(v)
    v.window.add_dock_widget(w, name="Training pairs (Deep-R)")
    _wait(app, lambda: w.curve is not None and w.curve_worker is None, 300)
    w.patch_spin.setValue(256)
    w.method_combo.setCurrentIndex(w.method_combo.findData("ssim_edof"))  # the paper's, and the default
    _wait(app, lambda: w.curve_worker is None, 300)
    runs = []
    for phase, delay in delays:
        parent = Path(tempfile.mkdtemp(prefix="deepr-pairs-cancel-"))
        w.out_edit.setText(str(parent / "dataset"))
        ended, started = {}, {}

        def on_progress(_done, _total, message, started=started, phase=phase):
            if message.startswith(phase) and "t" not in started:
                started["t"] = time.perf_counter()

        def on_finished(status, _msg, ended=ended):
            ended.update(status=status, t=time.perf_counter())

        w._relay.progress.connect(on_progress)
        w.finished.connect(on_finished)
        w.build()
        _wait(app, lambda e=ended, s=started, d=delay: e or ("t" in s and time.perf_counter() - s["t"] >= d), 900)
        pressed = time.perf_counter()
        w.cancel()
        _wait(app, lambda e=ended: bool(e), 900)
        w._relay.progress.disconnect(on_progress)
        w.finished.disconnect(on_finished)
        runs.append({"phase": phase, "cancel_after_s": delay, "status": ended["status"],
                     "latency_s": round(ended["t"] - pressed, 2),
                     "left_on_disk": sorted(p.name for p in parent.iterdir())})
    v.close()
    return {"stack": f"{stack.shape[0]}x{stack.shape[1]}x{stack.shape[2]}", "patch": 256, "runs": runs}


def _own_settings() -> None:
    """Point the widgets' remembered settings (QSettings, per user) at a new empty folder: a benchmark
    must run with the defaults, and must not change what the user's napari remembers."""
    import tempfile

    from qtpy.QtCore import QSettings

    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope,
                      tempfile.mkdtemp(prefix="deepr-bench-settings-"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", default="run")
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--stack-size", type=int, default=1024)
    ap.add_argument("--planes", type=int, default=4)
    ap.add_argument("--skip-stack", action="store_true")
    ap.add_argument("--skip-pairs", action="store_true")
    ap.add_argument("--pairs-tiles", type=int, default=2, help="the sample z-stack tiled N × N for pairs")
    ap.add_argument("--only-pairs", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("QT_API", "pyqt6")
    from napari.qt import get_qapp
    from qtpy.QtWidgets import QApplication

    app = get_qapp()
    assert isinstance(app, QApplication)
    _own_settings()
    result = {
        "label": args.label,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "load_avg_before": round(os.getloadavg()[0], 2),
    }
    if not args.only_pairs:
        result["refocus_2d"] = run_2d(app, args.size, args.tile)
    if not args.skip_stack and not args.only_pairs:
        result["all_planes_z_steps"] = run_stack_steps(app, args.stack_size, args.planes)
    if not args.skip_pairs:
        result["pairs_cancel"] = run_pairs_cancel(app, args.pairs_tiles, [
            ("registering", 1.0), ("finding the in-focus plane", 0.2), ("finding the in-focus plane", 1.0),
            ("finding the in-focus plane", 3.0)])
    result["load_avg_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result, indent=1, ensure_ascii=False))
    if args.json:
        old = json.loads(args.json.read_text()) if args.json.is_file() else {}
        old[args.label] = result
        args.json.write_text(json.dumps(old, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
