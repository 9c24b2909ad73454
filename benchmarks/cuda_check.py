"""The GPU check for issue 7, run on a lent CUDA machine (never in tests): one script, one JSON.

    python benchmarks/cuda_check.py --pairs pairs.npz --out cuda_check.json

1. ``deepr bench --provider cuda``: engine fp32 / fp16, with the DPM decoder with and without IO
   binding, one raw untiled onnxruntime call, PyTorch eager (fp32 and bf16 autocast) on the same
   weights, against the GPU's measured matmul rates.
2. Tile size on the GPU: the engine at 8192² for tiles 512-4096 (batch 4).
3. fp16's quality cost against fp32 on simulated pairs made elsewhere (``--pairs``, from
   ``scripts/make_check_pairs.py``: the GPU machine has no psfmodels), incl. the DPM.
4. For scale: the CPU provider on this machine's cores at 4096², the paper's CPU anchor.

How to get onnxruntime-gpu onto a lent machine that reaches no package index: ``docs/gpu_check.md``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", help="npz with x, y (N, H, W) and z (N,)")
    ap.add_argument("--out", default="cuda_check.json")
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 2048, 4096])
    ap.add_argument("--bench-tiles", help="npz with t512 and t1024 = bench_image(512), bench_image(1024) made elsewhere")
    args = ap.parse_args(argv)
    if args.bench_tiles:  # the GPU machine has no psfmodels to simulate the benchmark field
        import napari_deepr.bench as nb

        saved = np.load(args.bench_tiles)

        def bench_image(size, pixel_size_um=0.325, seed=0):
            base = saved["t512"] if size <= 512 else saved["t1024"]
            reps = -(-size // base.shape[0])
            return np.tile(base, (reps, reps))[:size, :size]

        nb.bench_image = bench_image

    import onnxruntime as ort

    import napari_deepr.bench as nb
    from napari_deepr.bench import _timeit, format_table, run_bench
    from napari_deepr.engine.model import load_model
    from napari_deepr.engine.refocus import RefocusJob

    report: dict = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers()}
    out = open(args.out, "w")

    def save():
        out.seek(0)
        out.truncate()
        out.write(json.dumps(report, indent=1))
        out.flush()

    m = load_model("default")
    t0 = time.perf_counter()
    b = run_bench(sizes=args.sizes, repeats=3, baselines=False, provider="cuda",
                  variants=["fp16", "dpm", "dpm_fp16", "dpm_no_iobinding"])
    report["bench"] = b
    report["bench_wall_s"] = time.perf_counter() - t0
    print(format_table(b), flush=True)
    save()

    img = nb.bench_image(8192, m.card.pixel_size_um)
    tiles = {}
    for prec in ("fp32", "fp16"):
        for tile in (512, 1024, 2048, 4096):
            probe = RefocusJob(img, m, tile=tile, providers="cuda", precision=prec, batch=4)
            if probe.provider != "cuda" or probe.precision != prec:  # fell back: timing it would be a CPU run
                tiles[f"{prec}_tile{tile}_unavailable"] = "; ".join(probe.warnings) or probe.provider
                print(prec, tile, "unavailable:", tiles[f"{prec}_tile{tile}_unavailable"], flush=True)
                break
            t = _timeit(lambda tile=tile, prec=prec: RefocusJob(img, m, tile=tile, providers="cuda", precision=prec, batch=4).run(), 3)
            tiles[f"{prec}_tile{tile}_mp_s"] = img.size / 1e6 / t
            print(prec, tile, round(img.size / 1e6 / t, 1), "MP/s", flush=True)
    report["tiles_8192"] = tiles
    save()

    if args.pairs:
        from napari_deepr.engine.quantize import quality_delta

        d = np.load(args.pairs)
        pairs = [(d["x"][i].astype(np.float32), d["y"][i].astype(np.float32), float(d["z"][i])) for i in range(len(d["z"]))]
        report["fp16_quality"] = quality_delta(m, precision="fp16", pairs=pairs, providers="cuda")
        print("fp16 quality", report["fp16_quality"], flush=True)
        save()

    cpu_img = nb.bench_image(4096, m.card.pixel_size_um)
    t = _timeit(lambda: RefocusJob(cpu_img, m, providers="cpu").run(), 1, warmup=1)
    report["cpu_provider_4096_mp_s"] = cpu_img.size / 1e6 / t
    print("cpu provider 4096²", report["cpu_provider_4096_mp_s"], "MP/s", flush=True)
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
