#!/usr/bin/env python
"""Generator width against onnxruntime CPU speed: why the bundled model caps its channels at 64.

    python benchmarks/width.py [--size 1024] [--threads 2] 16:512 16:128 16:64 12:512

Each ``BASE:MAX_CHANNELS`` generator (random weights; speed does not depend on them) is exported
the way the trainer exports, then timed in onnxruntime on one SIZE² image. Prints GFLOP per
megapixel (from the ONNX graph), parameters and MP/s.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("widths", nargs="*", default=["16:512", "16:128", "16:64", "12:512"])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    import torch

    from napari_deepr.bench import _timeit, onnx_flops_per_pixel
    from napari_deepr.engine.providers import get_session
    from napari_deepr.train.export import _dims, _export, _GeneratorGraph, feature_names
    from napari_deepr.train.nets import Generator, count_parameters

    x = np.random.default_rng(0).normal(size=(1, 1, args.size, args.size)).astype(np.float32)
    print(f"{'base:max':>9} {'params':>9} {'GFLOP/MP':>9} {'MP/s':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.widths:
            base, cap = (int(v) for v in spec.split(":"))
            g = Generator(1, base, cap).eval()
            path = Path(tmp) / f"g{base}_{cap}.onnx"
            batch, h, w = _dims()
            with torch.no_grad():
                _export(_GeneratorGraph(g), (torch.zeros(2, 1, 64, 96),), path, ["input"], ["output", *feature_names()],
                        {"input": {0: batch, 2: 32 * h, 3: 32 * w}})
            # The engine's own session options; arena off as in the README's recorded numbers.
            sess, _ = get_session(path, ["CPUExecutionProvider"], args.threads, arena=False)
            mps = args.size**2 / 1e6 / _timeit(lambda sess=sess: sess.run(["output"], {"input": x}), args.repeats)
            gflop = onnx_flops_per_pixel(path) * 1e6 / 1e9
            print(f"{spec:>9} {count_parameters(g) / 1e6:8.2f}M {gflop:9.1f} {mps:6.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
