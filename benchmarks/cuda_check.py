"""The GPU check (issues 7 and 23), run on a lent CUDA machine (never in tests): one script, one JSON.

    python benchmarks/cuda_check.py --pairs pairs.npz --out cuda_check.json [--budget-s 400]

1. ``deepr bench --provider cuda``: engine fp32 / fp16, with the DPM decoder with and without IO
   binding, one raw untiled onnxruntime call, PyTorch eager (fp32 and bf16 autocast) on the same
   weights, against the GPU's measured matmul rates.
2. Tile size on the GPU: the engine at 8192² for tiles 512-4096 (batch 4).
3. fp16's quality cost against fp32 on simulated pairs made elsewhere (``--pairs``, from
   ``scripts/make_check_pairs.py``: the GPU machine has no psfmodels), incl. the DPM.
4. For scale: the CPU provider on this machine's cores at 4096², the paper's CPU anchor.
5. (issue 23) Network-only backends at the engine's fixed tile shape: onnxruntime CUDA fp32 and
   fp16 with IO binding (input and output already on the device), the same with CUDA graphs
   (``enable_cuda_graph``), the TensorRT provider (fp32 and fp16) where its libraries load, and
   PyTorch on the model's own weights (eager fp32, channels-last fp16/bf16 autocast,
   ``torch.compile``). The fastest is the bar the engine is held to (≥ 0.5×).
6. (issue 23) The default GPU tile against the best tile at 2048², 5000² and 8192² (the default
   may lose at most 20 %), fp32 and fp16.

Each section is saved as soon as it ends; ``--budget-s`` skips sections once the time is spent.

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
    ap.add_argument("--budget-s", type=float, default=400.0, help="skip the remaining sections after this many seconds")
    ap.add_argument("--only", nargs="*", default=None,
                    help="sections to run: bench tiles8192 quality cpu backends default_tile (default: all)")
    args = ap.parse_args(argv)
    start = time.perf_counter()

    def wanted(name: str) -> bool:
        if args.only is not None and name not in args.only:
            return False
        left = args.budget_s - (time.perf_counter() - start)
        if left <= 0:
            report.setdefault("skipped_for_time", []).append(name)
            save()
            return False
        return True

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
    from napari_deepr.bench import format_table, run_bench
    from napari_deepr.engine.model import load_model

    report: dict = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers()}
    out = open(args.out, "w")  # noqa: SIM115 - kept open: save() appends after every measurement

    def save():
        out.seek(0)
        out.truncate()
        out.write(json.dumps(report, indent=1))
        out.flush()

    m = load_model("default")
    if wanted("backends"):
        report["backends"] = network_backends(m, sizes=(2048, 4096), log=print)
        save()
    if wanted("default_tile"):
        report["default_tile"] = default_tile_loss(m, nb.bench_image, sizes=(2048, 5000, 8192), log=print)
        save()
    if not wanted("bench"):
        return _rest(args, report, save, m, nb, wanted)
    t0 = time.perf_counter()
    b = run_bench(sizes=args.sizes, repeats=3, baselines=False, provider="cuda",
                  variants=["fp16", "dpm", "dpm_fp16", "dpm_no_iobinding"])
    report["bench"] = b
    report["bench_wall_s"] = time.perf_counter() - t0
    print(format_table(b), flush=True)
    save()

    return _rest(args, report, save, m, nb, wanted)


def _rest(args, report, save, m, nb, wanted) -> int:
    from napari_deepr.bench import _timeit
    from napari_deepr.engine.refocus import RefocusJob

    if not wanted("tiles8192"):
        return _quality_and_cpu(args, report, save, m, nb, wanted)
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
    return _quality_and_cpu(args, report, save, m, nb, wanted)


def _quality_and_cpu(args, report, save, m, nb, wanted) -> int:
    from napari_deepr.bench import _timeit
    from napari_deepr.engine.refocus import RefocusJob

    if args.pairs and wanted("quality"):
        from napari_deepr.engine.quantize import quality_delta

        d = np.load(args.pairs)
        pairs = [(d["x"][i].astype(np.float32), d["y"][i].astype(np.float32), float(d["z"][i])) for i in range(len(d["z"]))]
        report["fp16_quality"] = quality_delta(m, precision="fp16", pairs=pairs, providers="cuda")
        print("fp16 quality", report["fp16_quality"], flush=True)
        save()

    if not wanted("cpu"):
        return 0
    cpu_img = nb.bench_image(4096, m.card.pixel_size_um)
    t = _timeit(lambda: RefocusJob(cpu_img, m, providers="cpu").run(), 1, warmup=1)
    report["cpu_provider_4096_mp_s"] = cpu_img.size / 1e6 / t
    print("cpu provider 4096²", report["cpu_provider_4096_mp_s"], "MP/s", flush=True)
    save()
    return 0


def _rate(fn, mp: float, repeats: int = 5) -> float:
    from napari_deepr.bench import _timeit

    return mp / _timeit(fn, repeats, warmup=3)


def network_backends(m, sizes=(2048, 4096), log=print) -> dict:
    """Network-only MP/s of every backend this machine can run, on one fixed-shape tile per size.

    A backend that cannot start is recorded with its reason (first line), never fatal.
    """
    import numpy as np
    import onnxruntime as ort

    from napari_deepr.engine.fp16 import fp16_variant
    from napari_deepr.engine.providers import _session_options

    out: dict = {}
    avail = ort.get_available_providers()
    graphs = {"fp32": m.generator_path}
    try:
        graphs["fp16"] = fp16_variant(m.generator_path)
    except Exception as exc:  # noqa: BLE001
        out["fp16_unavailable"] = str(exc).splitlines()[0]
    for size in sizes:
        x = np.random.default_rng(0).standard_normal((1, 1, size, size)).astype(np.float32)
        mp = size * size / 1e6
        res = out.setdefault(str(size), {})
        for prec, path in graphs.items():
            for name, prov in (("cuda", [("CUDAExecutionProvider", {})]),
                               ("cuda_graph", [("CUDAExecutionProvider", {"enable_cuda_graph": "1"})]),
                               ("tensorrt", [("TensorrtExecutionProvider", {"trt_fp16_enable": str(prec == "fp16")}),
                                             ("CUDAExecutionProvider", {})])):
                key = f"ort_{name}_{prec}_iobinding"
                if prov[0][0] not in avail:
                    res[key] = f"unavailable: {prov[0][0]} not in {avail}"
                    continue
                try:
                    # TensorRT builds from the fp32 graph (its own fp16 flag); CUDA runs the fp16 copy.
                    graph = m.generator_path if name == "tensorrt" else path
                    sess = ort.InferenceSession(str(graph), _session_options(None, True), providers=prov)
                    xin = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
                    yout = ort.OrtValue.ortvalue_from_shape_and_type(x.shape, np.float32, "cuda", 0)
                    b = sess.io_binding()
                    b.bind_ortvalue_input(m.input_name, xin)
                    b.bind_ortvalue_output(m.output_name, yout)
                    for extra in [o.name for o in sess.get_outputs() if o.name != m.output_name]:
                        b.bind_output(extra, "cuda")
                    res[key] = _rate(lambda sess=sess, b=b: sess.run_with_iobinding(b), mp)
                except Exception as exc:  # noqa: BLE001
                    res[key] = f"failed: {str(exc).splitlines()[0][:200]}"
                log(size, key, res[key], flush=True)
        try:
            import torch

            from napari_deepr.train.bench_torch import generator_from_onnx

            g = generator_from_onnx(m).cuda().eval()
            xt = torch.from_numpy(x).cuda()
            torch.backends.cudnn.benchmark = True
            for key, cl, dt, comp in (("torch_eager_fp32", False, None, False),
                                      ("torch_eager_bf16_cl", True, torch.bfloat16, False),
                                      ("torch_eager_fp16_cl", True, torch.float16, False),
                                      ("torch_compile_bf16_cl", True, torch.bfloat16, True)):
                try:
                    net = g.to(memory_format=torch.channels_last) if cl else g
                    inp = xt.to(memory_format=torch.channels_last) if cl else xt
                    fn = torch.compile(net, mode="max-autotune") if comp else net

                    def call(fn=fn, inp=inp, dt=dt):
                        with torch.inference_mode(), torch.autocast("cuda", dtype=dt, enabled=dt is not None):
                            fn(inp)
                        torch.cuda.synchronize()

                    res[key] = _rate(call, mp)
                except Exception as exc:  # noqa: BLE001
                    res[key] = f"failed: {str(exc).splitlines()[0][:200]}"
                log(size, key, res[key], flush=True)
        except Exception as exc:  # noqa: BLE001
            res["torch_unavailable"] = f"{type(exc).__name__}: {exc}"
        rates = {k: v for k, v in res.items() if isinstance(v, float)}
        if rates:
            best = max(rates, key=rates.get)
            res["fastest"] = {"backend": best, "mp_s": rates[best]}
    return out


def default_tile_loss(m, bench_image, sizes=(2048, 5000, 8192), tiles=(1024, 2048, 2816, 4096), log=print) -> dict:
    """The engine at its default GPU tile against fixed tiles, per image size and precision.

    Issue 23 asks that the default loses at most 20 % to the best tile at any size.
    """
    from napari_deepr.engine.refocus import RefocusJob

    out: dict = {}
    for size in sizes:
        img = bench_image(size, m.card.pixel_size_um)
        mp = img.size / 1e6
        for prec in ("fp32", "fp16"):
            res = out.setdefault(f"{size}_{prec}", {})
            probe = RefocusJob(img, m, providers="cuda", precision=prec)
            if probe.provider != "cuda" or probe.precision != prec:
                res["unavailable"] = "; ".join(probe.warnings) or probe.provider
                continue
            res["default_tile"], res["default_batch"] = probe.tile, probe.batch
            res["default"] = _rate(lambda img=img, prec=prec: RefocusJob(img, m, providers="cuda", precision=prec).run(), mp, 2)
            for tile in tiles:
                if tile > size + 64 and tile != tiles[0]:
                    continue
                res[f"tile{tile}"] = _rate(
                    lambda tile=tile, img=img, prec=prec: RefocusJob(img, m, providers="cuda", precision=prec, tile=tile).run(), mp, 2)
            best = max(v for k, v in res.items() if k.startswith("tile") or k == "default")
            res["default_vs_best"] = res["default"] / best
            log(size, prec, res, flush=True)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
