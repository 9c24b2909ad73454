#!/usr/bin/env python
"""Each speed choice of the engine, measured before and after in one run (ratios, not absolute times).

    python benchmarks/speed_changes.py [--model default] [--json docs/speed_changes.json] [--repeats 3]

Rows: onnxruntime threads, graph optimisation level, CPU memory arena, the border halo at 512², the
tile overlap (receptive field) and tile size at 2048², batch of tiles, and int8 when the model ships
one. "before" is the alternative, "after" the engine's default; speed-up = before / after.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def _session(path, threads=2, level="all", arena=True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.enable_cpu_mem_arena = arena
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    from napari_deepr.bench import _timeit as _time
    from napari_deepr.bench import bench_image
    from napari_deepr.engine.model import load_model
    from napari_deepr.engine.providers import require_bf16
    from napari_deepr.engine.refocus import RefocusJob
    from napari_deepr.errors import InputError

    m = load_model(args.model)
    gen = m.generator_path
    rows = []

    def row(change, before_label, after_label, t_before, t_after, size):
        mp = size * size / 1e6
        r = {"change": change, "before": before_label, "after": after_label, "size": size,
             "before_s": t_before, "after_s": t_after, "before_mp_s": mp / t_before, "after_mp_s": mp / t_after,
             "speedup": t_before / t_after}
        rows.append(r)
        print(f"{change:28s} {before_label:>18s} -> {after_label:<18s} {size:5d}²  "
              f"{mp / t_before:5.2f} -> {mp / t_after:5.2f} MP/s  ×{t_before / t_after:.2f}", flush=True)

    x1k = bench_image(1024).astype(np.float32)
    x1k = ((x1k - x1k.mean()) / x1k.std())[None, None]
    feed = {m.input_name: x1k}
    names = [m.output_name]
    s_default = _session(gen)
    t_default = _time(lambda: s_default.run(names, feed), args.repeats)
    s1 = _session(gen, threads=1)
    row("onnxruntime intra-op threads", "1 thread", "2 threads", _time(lambda: s1.run(names, feed), args.repeats), t_default, 1024)
    sb = _session(gen, level="basic")
    row("graph optimisation", "basic", "all (fusions)", _time(lambda: sb.run(names, feed), args.repeats), t_default, 1024)
    sa = _session(gen, arena=False)
    row("CPU memory arena", "arena off", "arena on", _time(lambda: sa.run(names, feed), args.repeats), t_default, 1024)

    def engine(img, **kw):
        return lambda: RefocusJob(img, m, providers="cpu", **kw).run()

    img512 = bench_image(512)
    row("border halo", "16 px reflected", "0 (zero padding)", _time(engine(img512, halo=16), args.repeats),
        _time(engine(img512, halo=0), args.repeats), 512)
    img2k = bench_image(2048)
    row("tile overlap (2048², 1024 tiles)", "192 px", f"{m.card.overlap} px (card)",
        _time(engine(img2k, tile=1024, overlap=192), args.repeats), _time(engine(img2k, tile=1024), args.repeats), 2048)
    t_whole = _time(engine(img2k, tile=2048), args.repeats)
    row("tile size (2048²)", "512 px tiles", "2048 px (one tile)", _time(engine(img2k, tile=512), args.repeats), t_whole, 2048)
    row("tile size (2048²)", "1024 px tiles", "2048 px (one tile)", _time(engine(img2k, tile=1024), args.repeats), t_whole, 2048)
    row("tiles per call (2048², 512 px)", "batch 4", "batch 1", _time(engine(img2k, tile=512, batch=4), args.repeats),
        _time(engine(img2k, tile=512, batch=1), args.repeats), 2048)
    img1k = bench_image(1024)
    t_fp32 = _time(engine(img1k), args.repeats)
    if (m.root / "generator.int8.onnx").is_file():
        row("precision", "fp32", "int8 (static QDQ)", t_fp32, _time(engine(img1k, precision="int8"), args.repeats), 1024)
    try:
        require_bf16()
    except InputError as exc:
        print(f"bf16 not timed: {exc}")
    else:
        row("precision", "fp32 (CPU provider)", "bf16 (OpenVINO provider)", t_fp32,
            _time(engine(img1k, precision="bf16"), args.repeats), 1024)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": m.card.name, "rows": rows}, indent=1))
    print("\n| change | before | after | image | before MP/s | after MP/s | speed-up |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['change']} | {r['before']} | {r['after']} | {r['size']}² | {r['before_mp_s']:.2f} | "
              f"{r['after_mp_s']:.2f} | ×{r['speedup']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
