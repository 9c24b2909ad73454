#!/usr/bin/env python
"""CPU speed of the engine before and after a refactor, in one run: old and new trees alternate.

    python benchmarks/refactor_speed.py --old /work/base/src --new src [--repeats 3] [--json docs/refactor_speed.json]

Each repeat runs one subprocess per tree (``PYTHONPATH`` set to its ``src``), old and new in turn
(the order flips every repeat, so drift on a shared machine hits both alike). A subprocess refocuses
a 2048² float32 image (``bench_image``, +3 µm defocused tissue) with the bundled model at fp32 and
default settings: two warm-up calls (session creation, onnxruntime's arena), then one timed call.
The medians over the repeats give MP/s for both trees and their ratio (new ÷ old; 1 = unchanged).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIZE = 2048

CHILD = """
import json, sys, time, warnings
import numpy as np
import napari_deepr
from napari_deepr.bench import bench_image
img = bench_image({size}).astype(np.float32)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the unknown pixel size is said once per call
    for _ in range(2):
        napari_deepr.refocus(img)
    t0 = time.perf_counter()
    out = napari_deepr.refocus(img)
    dt = time.perf_counter() - t0
print(json.dumps({{"seconds": dt, "module": napari_deepr.__file__, "checksum": float(np.float64(out.sum()))}}))
"""


def _run(src: Path, size: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src))
    proc = subprocess.run([sys.executable, "-c", CHILD.format(size=size)], env=env, capture_output=True, text=True,
                          check=True)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    if not res["module"].startswith(str(src)):
        raise SystemExit(f"{src} was not the tree imported ({res['module']})")
    return res


def _commit(src: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, help="src folder of the tree before the change")
    ap.add_argument("--new", default=str(Path(__file__).resolve().parents[1] / "src"), help="src folder after it")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=SIZE)
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args(argv)
    trees = {"old": Path(args.old).resolve(), "new": Path(args.new).resolve()}
    times: dict[str, list[float]] = {"old": [], "new": []}
    sums = {}
    for k in range(args.repeats):
        for name in (("old", "new") if k % 2 == 0 else ("new", "old")):
            res = _run(trees[name], args.size)
            times[name].append(res["seconds"])
            sums[name] = res["checksum"]
            print(f"repeat {k + 1} {name}: {args.size**2 / 1e6 / res['seconds']:.2f} MP/s", flush=True)
    mp = args.size**2 / 1e6
    med = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "what": f"napari_deepr.refocus of a {args.size}² float32 image, bundled model, fp32, default settings; "
                "median of one timed call after two warm-ups, per subprocess",
        "command": "python benchmarks/refactor_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpu": _cpu(), "cores_usable": len(os.sched_getaffinity(0)), "load_average_at_end": os.getloadavg(),
                    "note": "shared with other jobs during the run; old and new alternate so both see the same load"},
        "trees": {name: {"src": str(p), "commit": _commit(p)} for name, p in trees.items()},
        "repeats": args.repeats,
        "seconds": times,
        "mp_s": {name: mp / t for name, t in med.items()},
        "new_over_old": med["old"] / med["new"],
        "outputs_equal": sums["old"] == sums["new"],
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    print(f"old {result['mp_s']['old']:.2f} MP/s, new {result['mp_s']['new']:.2f} MP/s, "
          f"new/old {result['new_over_old']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
