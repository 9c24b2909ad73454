"""The engine's host-side cost, and what it means on a GPU, without a GPU.

On a lent H200 (``docs/bench_cuda_h200.json``) the engine ran at 26-38 MP/s while one raw untiled
onnxruntime CUDA call ran at 139-186 MP/s: the host work (reading, normalizing, blending, writing)
bounds it. This script measures that work with the network replaced by a stand-in:

- ``host``: the stand-in returns at once, so the time is host work alone (ms per megapixel);
- ``emulated``: the stand-in sleeps as long as the GPU needed (``--device-mp-s``, the H200's raw
  rate) with the GIL released, as a CUDA call does, so pipelining shows.

    python benchmarks/host_overhead.py --json docs/host_overhead.json

Run it against an older checkout (``PYTHONPATH=OLD/src``) for before/after in one session.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from napari_deepr.bench import _timeit
from napari_deepr.engine.model import load_model
from napari_deepr.engine.refocus import RefocusJob

try:  # the network call lives on the Runner since the engine was cut at its seams
    from napari_deepr.engine.runner import Runner as _Network
    from napari_deepr.engine.settings import RefocusSettings

    _NETWORK_CALL, HAS_PIPELINE = "run", "pipeline" in RefocusSettings.__dataclass_fields__
except ImportError:  # an older checkout (PYTHONPATH=OLD/src)
    _Network, _NETWORK_CALL = RefocusJob, "_run_network"
    HAS_PIPELINE = "pipeline" in RefocusJob.__init__.__code__.co_varnames


def stand_in(delay_s_per_mp: float):
    def run(self, x):
        if delay_s_per_mp:
            time.sleep(x.shape[0] * x.shape[-1] * x.shape[-2] / 1e6 * delay_s_per_mp)
        out = x.copy()  # the network returns a fresh array, as onnxruntime does
        return out, (out[:, :1].copy() if self.want_dpm else None)

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--device-mp-s", type=float, default=174.0, help="raw network rate on the GPU (H200: 174 MP/s at 4096²)")
    ap.add_argument("--json")
    args = ap.parse_args()
    m = load_model("default")
    rng = np.random.default_rng(0)
    res: dict = {"device_mp_s": args.device_mp_s, "sizes": {}}
    has_pipeline = HAS_PIPELINE
    for size in args.sizes:
        img = (rng.random((size, size)) * 4000).astype(np.uint16)
        mp = size * size / 1e6
        row = {}
        for dpm in (False, True):
            tag = "dpm" if dpm else "image"
            setattr(_Network, _NETWORK_CALL, stand_in(0.0))
            row[f"{tag}_host_ms_per_mp"] = 1e3 * _timeit(lambda dpm=dpm, img=img: RefocusJob(img, m, dpm=dpm, tile=2048, batch=4).run(), 3, warmup=1) / mp
            setattr(_Network, _NETWORK_CALL, stand_in(1.0 / args.device_mp_s))
            kw = {"pipeline": False} if has_pipeline else {}
            row[f"{tag}_emulated_mp_s"] = mp / _timeit(lambda dpm=dpm, kw=kw, img=img: RefocusJob(img, m, dpm=dpm, tile=2048, batch=4, **kw).run(), 3, warmup=1)
            if has_pipeline:
                row[f"{tag}_emulated_pipelined_mp_s"] = mp / _timeit(
                    lambda dpm=dpm, img=img: RefocusJob(img, m, dpm=dpm, tile=2048, batch=4, pipeline=True).run(), 3, warmup=1
                )
        res["sizes"][str(size)] = row
        print(size, {k: round(v, 1) for k, v in row.items()}, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
