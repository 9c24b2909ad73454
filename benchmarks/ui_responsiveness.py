"""How long the napari event loop stalls while the Refocus widget runs (the UI's responsiveness).

A 10 ms QTimer ticks in a real napari viewer (under Xvfb on servers) while the Refocus widget
refocuses a 2048 × 2048 field with the bundled model in 512-px tiles (25 tiles with the card's
96-px overlap), DPM on. The longest gap between ticks is how long a click or a repaint would have
waited. Reported separately:

* ``tiles``: from Run until the last tile is done (the engine runs in a worker thread; the main
  thread only shows progress and, throttled, the partial result);
* ``finish``: the end of the run (the result layers completed, the DPM readout and out-of-range
  outline);
* ``z_steps``: after refocusing every plane of a 4 × 1024² stack, how long each step of the z slider
  takes (the readout follows the plane on screen).

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
    _wait(app, lambda: "finished" in marks, 600)
    for _ in range(30):  # repaints the end of the run queued
        app.processEvents()
        time.sleep(0.01)
    marks["settled"] = time.perf_counter()
    tick.timer.stop()
    tiles = tick.gaps(marks["run"], marks["last_tile"])
    end = tick.gaps(marks["last_tile"], marks["settled"])
    out = {
        "image": f"{size}x{size}", "tile": tile, "tiles": w.job.total, "provider": w.job.provider,
        "run_s": round(marks["last_tile"] - marks["run"], 2),
        "tiles_max_gap_ms": round(1000 * float(tiles.max()), 1),
        "tiles_p95_gap_ms": round(1000 * float(np.percentile(tiles, 95)), 1),
        "tiles_median_gap_ms": round(1000 * float(np.median(tiles)), 1),
        "finish_max_gap_ms": round(1000 * float(end.max()), 1),
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", default="run")
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--stack-size", type=int, default=1024)
    ap.add_argument("--planes", type=int, default=4)
    ap.add_argument("--skip-stack", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("QT_API", "pyqt6")
    from napari.qt import get_qapp
    from qtpy.QtWidgets import QApplication

    app = get_qapp()
    assert isinstance(app, QApplication)
    result = {
        "label": args.label,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "load_avg_before": round(os.getloadavg()[0], 2),
        "refocus_2d": run_2d(app, args.size, args.tile),
    }
    if not args.skip_stack:
        result["all_planes_z_steps"] = run_stack_steps(app, args.stack_size, args.planes)
    result["load_avg_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result, indent=1, ensure_ascii=False))
    if args.json:
        old = json.loads(args.json.read_text()) if args.json.is_file() else {}
        old[args.label] = result
        args.json.write_text(json.dumps(old, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
