"""``deepr bench``: refocus throughput measured as ratios within one run.

Rows (per image size): the engine (normalize, tile, blend, map back), one raw untiled onnxruntime
call on the same model and image, PyTorch eager on the same weights (when the ``train`` extra is
installed), the compute floor (network FLOPs per pixel ÷ this CPU's measured matmul FLOP/s), and the
paper's baselines on the same image (Richardson-Lucy 100 iterations, Brent focus search evaluations).
Throughput is megapixels per second and seconds per mm² at the model's pixel size.
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import numpy as np

from .engine.contract import INT8_GENERATOR_FILE
from .engine.model import load_model
from .engine.providers import (
    default_threads,
    device_free_memory,
    get_session,
    require_bf16,
    resolve_providers,
)
from .engine.refocus import RefocusJob
from .engine.settings import BYTES_PER_TILE_PIXEL, RefocusSettings, available_memory, peak_rss_mb
from .engine.tiling import round_up
from .errors import InputError

# PyTorch eager keeps every activation of a 4096² pass alive at once (well over 20 GB for base 16),
# so it is timed only up to this size; onnxruntime reuses its buffers and runs 4096² untiled.
TORCH_MAX_SIZE = 2048
#: An untiled raw call runs only when its estimated activations fit in this share of free memory.
RAW_MEMORY_FRACTION = 0.6


def _timeit(fn, repeats: int, warmup: int = 2) -> float:
    # Two warm-up calls: the first creates the session, the first two grow onnxruntime's arena
    # (measured at 2048²: 1.5, 1.2, then 1.95-2.0 MP/s steady), and a whole slide is many calls.
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_image(size: int, pixel_size_um: float = 0.325, seed: int = 0) -> np.ndarray:
    """A physically defocused (+3 µm) tissue-like field of ``size``² pixels, uint16."""
    from .optics.psf import Optics
    from .optics.simulate import defocus
    from .optics.specimens import make_specimen

    rng = np.random.default_rng(seed)
    side = min(size, 1024)
    obj = make_specimen("tissue", (side, side), pixel_size_um, rng)
    img = defocus(obj, 3.0, Optics(pixel_size_um=pixel_size_um), photons=800.0, rng=rng)
    reps = -(-size // side)
    return np.tile(img, (reps, reps))[:size, :size]


def matmul_gflops(n: int = 2048, repeats: int = 3) -> float:
    """This CPU's sustained fp32 matmul rate (numpy/BLAS), GFLOP/s."""
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    b = np.random.default_rng(1).random((n, n), dtype=np.float32)
    t = _timeit(lambda: a @ b, repeats)
    return 2 * n**3 / t / 1e9


def onnx_flops_per_pixel(model_path, size: int = 256) -> float:
    """Multiply-adds ×2 of the generator's convolutions per input pixel, counted from the graph."""
    import onnx
    from onnx import shape_inference

    m = onnx.load(str(model_path))
    inp = m.graph.input[0]
    for d, v in zip(inp.type.tensor_type.shape.dim, (1, None, size, size), strict=True):
        if v is not None:
            d.ClearField("dim_param")
            d.dim_value = v
    m = shape_inference.infer_shapes(m, data_prop=True)
    shapes = {}
    for vi in list(m.graph.value_info) + list(m.graph.output) + list(m.graph.input):
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        shapes[vi.name] = dims
    inits = {i.name: list(i.dims) for i in m.graph.initializer}
    flops = 0.0
    for node in m.graph.node:
        if node.op_type == "Conv" and node.input[1] in inits:
            out = shapes.get(node.output[0])
            if out and 0 not in out:
                # Weight shape is (C_out, C_in / group, kH, kW): MACs = output elements × prod(w[1:]).
                flops += 2.0 * float(np.prod(out)) * float(np.prod(inits[node.input[1]][1:]))
    return flops / (size * size)


# Network-only measurements (one untiled call of the network, nothing else), fastest first in spirit.
NETWORK_ONLY = ("raw_untiled", "raw_untiled_fp16", "torch_eager", "torch_eager_bf16")

# Extra engine runs ``--variants`` can add: the settings they change (RefocusSettings fields, checked
# when this module loads), and where each can run.
VARIANTS = {
    "bf16": ({"precision": "bf16"}, "cpu"),
    "int8": ({"precision": "int8"}, "cpu"),
    "fp16": ({"precision": "fp16"}, "gpu"),
    "dpm": ({"dpm": True}, "any"),
    "dpm_fp16": ({"dpm": True, "precision": "fp16"}, "gpu"),
    # IO binding only matters when the DPM decoder reads the generator's features (GPU providers).
    "dpm_no_iobinding": ({"dpm": True, "io_binding": False}, "gpu"),
    # The per-pixel trust map: 8 (or 4) D4 passes plus the DPM and the range test (its cost vs engine_s).
    "trust": ({"trust": 8}, "any"),
    "trust4": ({"trust": 4}, "any"),
}
for _name, (_changes, _where) in VARIANTS.items():
    RefocusSettings().replace(**_changes)  # a variant names only real settings


def _variant_unavailable(name: str, m, on_gpu: bool) -> str | None:
    """Why a variant cannot run here, or None."""
    if name not in VARIANTS:
        return f"unknown variant; choose from {', '.join(VARIANTS)}"
    where = VARIANTS[name][1]
    if where == "cpu" and on_gpu:
        return "a CPU precision; this run is on a GPU provider"
    if where == "gpu" and not on_gpu:
        return "needs a GPU provider (--provider cuda)"
    if VARIANTS[name][0].get("dpm") and not m.has_dpm:
        return "the model has no DPM decoder"
    if name == "int8" and not (m.root / INT8_GENERATOR_FILE).is_file():
        return f"no {INT8_GENERATOR_FILE} (run 'deepr quantize')"
    if name == "bf16":
        try:
            require_bf16()
        except InputError as exc:
            return str(exc)
    return None


def run_bench(
    model="default",
    sizes=(512, 4096),
    repeats: int = 3,
    threads: int | None = None,
    torch_eager: bool = True,
    baselines: bool = True,
    tile: int | None = None,
    overlap: int | None = None,
    variants=(),
    provider: str = "cpu",
) -> dict:
    """Measure refocus throughput; every number in one run so ratios are meaningful.

    Parameters
    ----------
    provider : str
        ``cpu`` (default) or a GPU provider such as ``cuda``; the engine, the raw call and PyTorch
        eager all run there, and the floor is that device's matmul rate.
    variants : sequence of str
        Extra engine runs from :data:`VARIANTS` (precisions, the DPM decoder, IO binding off).

    Returns
    -------
    dict
        ``machine``, ``model``, ``floor`` and one entry per size with MP/s, s/mm² and ratios.
    """
    import onnxruntime as ort

    m = load_model(model)
    threads = threads or default_threads()
    px = m.card.pixel_size_um or 0.325
    mp_per_mm2 = (1000.0 / px) ** 2 / 1e6
    providers = resolve_providers(provider)
    sess, used = get_session(m.generator_path, providers, threads)
    on_gpu = used not in ("cpu", "openvino")
    if provider != "cpu" and not on_gpu:
        raise InputError(f"The {provider} provider did not start here (onnxruntime {ort.__version__}); nothing to measure on it.")
    result: dict = {
        "machine": {
            "cpu": platform.processor() or platform.machine(), "cores_used": threads, "os_cpus": os.cpu_count(),
            "onnxruntime": f"{ort.__version__} ({', '.join(ort.get_available_providers())})",
        },
        "model": {"name": m.card.name, "path": str(m.root), "provider": used},
        "mp_per_mm2": mp_per_mm2,
        "sizes": {},
    }
    fpp = onnx_flops_per_pixel(m.generator_path)
    if on_gpu:
        try:  # the GPU's matmul rates come from PyTorch (the train extra); without it, no floor
            from .train.bench_torch import gpu_matmul_gflops

            # fp32 convolutions run on tensor cores as TF32 by default (cuDNN, onnxruntime's CUDA provider).
            gf = gpu_matmul_gflops("tf32")
            result["machine"]["gpu"] = gpu_matmul_gflops.device_name
            result["machine"]["gpu_strict_fp32_gflops"] = gpu_matmul_gflops("fp32")
            result["floor_fp16"] = {"matmul_gflops": gpu_matmul_gflops("fp16")}
            result["floor_fp16"]["floor_mp_s"] = result["floor_fp16"]["matmul_gflops"] * 1e9 / fpp / 1e6
        except Exception as exc:  # noqa: BLE001
            gf = float("nan")
            result["floor_unavailable"] = f"the GPU's matmul rate needs PyTorch with CUDA ({type(exc).__name__}: {exc})"
    else:
        gf = matmul_gflops()
    floor_mps = gf * 1e9 / fpp / 1e6 if fpp else float("nan")
    result["floor"] = {"gflop_per_mp": fpp * 1e6 / 1e9, "matmul_gflops": gf, "floor_mp_s": floor_mps}
    for name in variants:
        why = _variant_unavailable(name, m, on_gpu)
        if why:
            result.setdefault("variants_unavailable", {})[name] = why
    variants = [v for v in variants if v not in result.get("variants_unavailable", {})]
    torch_runner = None
    if torch_eager:
        try:
            from .train.bench_torch import TorchRunner

            torch_runner = TorchRunner(m, threads=threads, device="cuda" if on_gpu else "cpu")
        except Exception as exc:  # noqa: BLE001 - torch is an optional extra
            result["torch_eager_unavailable"] = f"{type(exc).__name__}: {exc}"
    base = RefocusSettings(tile=tile, overlap=overlap, providers=provider, threads=threads)
    for size in sizes:
        img = bench_image(size, px)
        mp = size * size / 1e6
        row: dict = {"megapixels": mp}
        # Large images: one timed repeat fewer (each pass takes seconds; the median barely moves).
        big_repeats = max(1, repeats - 1) if size > 2048 else repeats

        def job(settings=base, img=img):
            return RefocusJob(img, m, settings)

        plan = job()
        row["tiles"] = plan.plan_y.n * plan.plan_x.n
        # Pixels the network actually processes (tiles incl. overlap and border padding) per image pixel.
        row["tile_area_ratio"] = plan.plan_y.n * plan.plan_x.n * plan.plan_y.tile * plan.plan_x.tile / (size * size)

        t_engine = _timeit(lambda: job().run(), repeats)
        row["engine_s"] = t_engine
        for name in list(variants):
            kw = VARIANTS[name][0]
            settings = base.replace(**kw)
            probe = job(settings)
            expected = "openvino" if settings.precision == "bf16" else used  # bf16 runs through OpenVINO
            if probe.provider != expected or probe.precision != settings.precision:
                # e.g. a GPU provider that cannot load the fp16 graph: the engine fell back, so this is not the variant
                why = "; ".join(probe.warnings) or f"fell back to {probe.provider}"
                result.setdefault("variants_unavailable", {})[name] = why
                variants.remove(name)
                continue
            row[f"engine_{name}_s"] = _timeit(lambda settings=settings: job(settings).run(), repeats)
        x = img.astype(np.float32)
        x = (x - x.mean()) / x.std()
        pad = round_up(size, m.card.tile_multiple) - size
        x = np.pad(x, ((0, pad), (0, pad)), mode="reflect")[None, None]
        # An untiled call holds every activation at once (4096²: ~10 GiB; the process peaked at 21.5 GB
        # here): skip it, saying why, where it would not fit, rather than let the benchmark be OOM-killed.
        need, free = x.size * BYTES_PER_TILE_PIXEL, (_device_memory(used) if on_gpu else available_memory())
        t_raw = None
        if need > RAW_MEMORY_FRACTION * free:
            row["raw_untiled_skipped"] = (
                f"an untiled {size}² call needs about {need / 2**30:.0f} GiB; {free / 2**30:.0f} GiB are free"
            )
        else:
            try:
                t_raw = _timeit(lambda x=x: sess.run([m.output_name], {m.input_name: x}), big_repeats)
                row["raw_untiled_s"] = t_raw
            except Exception as exc:  # noqa: BLE001 - measured: CUDA's Resize refuses 8192² (int32 indexing)
                row["raw_untiled_skipped"] = f"the untiled {size}² call failed: {str(exc).splitlines()[0][-160:]}"
        if on_gpu and t_raw is not None:
            # The same call in half precision: the fastest onnxruntime backend a GPU offers here.
            try:
                from .engine.fp16 import fp16_variant

                s16, used16 = get_session(fp16_variant(m.generator_path), providers, threads, fallback=False)
                if used16 != used:
                    raise InputError(f"the fp16 graph ran on {used16}")
                row["raw_untiled_fp16_s"] = _timeit(lambda s16=s16, x=x: s16.run([m.output_name], {m.input_name: x}),
                                                    big_repeats)
            except Exception as exc:  # noqa: BLE001 - a backend that cannot run is reported, not fatal
                row["raw_untiled_fp16_skipped"] = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        if torch_runner is not None and (on_gpu or size <= TORCH_MAX_SIZE):
            row["torch_eager_s"] = _timeit(lambda x=x: torch_runner(x), big_repeats)
            if {"bf16", "fp16", "dpm_fp16"} & set(variants):
                fast = type(torch_runner)(m, threads=threads, channels_last=True, bf16=True, device=torch_runner.device)
                row["torch_eager_bf16_s"] = _timeit(lambda fast=fast, x=x: fast(x), big_repeats)
        for name, t in list(row.items()):
            if name.endswith("_s"):
                key = name[:-2]
                row[f"{key}_mp_s"] = mp / t
                row[f"{key}_s_per_mm2"] = mp_per_mm2 / (mp / t)
        if t_raw is not None:
            row["engine_vs_raw"] = t_raw / t_engine
            # DESIGN.md's tiling overhead: tiled time ÷ (untiled time × area ratio); 1 = no cost beyond the extra pixels.
            raw_area = x.shape[-1] * x.shape[-2] / (size * size)
            row["tiling_overhead"] = t_engine / (t_raw / raw_area * row["tile_area_ratio"])
        if "torch_eager_s" in row:
            row["engine_vs_torch"] = row["torch_eager_s"] / t_engine
        # The fastest network-only rate measured in this run (no tiling, normalization or blending):
        # what the network can do on this device, so the engine's fraction of it is visible.
        nets = {k: row[f"{k}_mp_s"] for k in NETWORK_ONLY if f"{k}_mp_s" in row}
        if nets:
            best = max(nets, key=nets.get)
            row["network_best"] = {"backend": best, "mp_s": nets[best]}
            row["engine_vs_best_network"] = row["engine_mp_s"] / nets[best]
        row["engine_fraction_of_floor"] = row["engine_mp_s"] / floor_mps if floor_mps == floor_mps else None
        if "engine_fp16_mp_s" in row and "floor_fp16" in result:
            row["engine_fp16_fraction_of_fp16_floor"] = row["engine_fp16_mp_s"] / result["floor_fp16"]["floor_mp_s"]
        row["peak_rss_mb"] = peak_rss_mb()
        if baselines and size <= 1024:
            row.update(_baselines(img, px))
        result["sizes"][str(size)] = row
    return result


def _device_memory(provider: str) -> int:
    """Free memory of the device ``provider`` runs on, in bytes (its trait row's query); 16 GiB when unknown."""
    return device_free_memory(provider) or 16 * 2**30


def _baselines(img: np.ndarray, px: float) -> dict:
    """Paper baselines on the same image: RL-100 time per MP and Brent search evaluations."""
    out: dict = {}
    try:
        from .optics.psf import Optics, defocus_psf
        from .optics.simulate import defocus
        from .optics.specimens import make_specimen
        from .science.deconvolve import richardson_lucy
        from .science.focus import brent_focus_search, vollath5

        optics = Optics(pixel_size_um=px)
        psf = defocus_psf(3.0, optics)
        crop = img[:512, :512].astype(np.float64)
        t0 = time.perf_counter()
        richardson_lucy(crop, psf, iterations=100)
        out["rl100_s_per_mp"] = (time.perf_counter() - t0) / (crop.size / 1e6)
        rng = np.random.default_rng(1)
        obj = make_specimen("tissue", (256, 256), px, rng)
        z_best, n = brent_focus_search(lambda z: defocus(obj, z, optics, rng=rng).astype(np.float64), (-2.0, 8.0), vollath5)
        out["brent_evaluations"] = int(n)
        out["brent_error_um"] = float(abs(z_best))
    except Exception as exc:  # noqa: BLE001 - baselines are extras of the benchmark, never its reason to fail
        out["baselines_error"] = f"{type(exc).__name__}: {exc}"
    return out


def format_table(result: dict) -> str:
    """Human-readable table of a :func:`run_bench` result."""
    lines = [
        (f"model {result['model']['name']} on {result['model']['provider']}"
         f"{' (' + result['machine']['gpu'] + ')' if result['machine'].get('gpu') else ''}, {result['machine']['cores_used']} threads; "
         f"floor {result['floor']['floor_mp_s']:.2f} MP/s ({result['floor']['gflop_per_mp']:.1f} GFLOP/MP at "
         f"{result['floor']['matmul_gflops']:.0f} GFLOP/s matmul)"),
        f"{'size':>6} {'what':<22} {'MP/s':>7} {'s/mm²':>7}",
    ]
    for size, row in result["sizes"].items():
        keys = ["engine"] + [f"engine_{v}" for v in VARIANTS] + list(NETWORK_ONLY)
        for key in keys:
            if f"{key}_mp_s" in row:
                lines.append(f"{size:>6} {key:<22} {row[f'{key}_mp_s']:7.2f} {row[f'{key}_s_per_mm2']:7.2f}")
        extra = f"engine/raw {row['engine_vs_raw']:.2f}" if "engine_vs_raw" in row else f"raw call skipped: {row['raw_untiled_skipped']}"
        if "engine_vs_torch" in row:
            extra += f", engine/torch {row['engine_vs_torch']:.2f}"
        if row.get("engine_fraction_of_floor"):
            extra += f", {100 * row['engine_fraction_of_floor']:.0f}% of floor"
        if "network_best" in row:
            best = row["network_best"]
            extra += (f", fastest network-only {best['mp_s']:.2f} MP/s ({best['backend']}): "
                      f"engine at {100 * row['engine_vs_best_network']:.0f}%")
        extra += f", {row['tiles']} tile(s)"
        if "tiling_overhead" in row:
            extra += f", tiling overhead {row['tiling_overhead']:.2f}"
        extra += f", peak RSS {row['peak_rss_mb']:.0f} MB"
        if "rl100_s_per_mp" in row:
            extra += f"; RL-100 {row['rl100_s_per_mp']:.2f} s/MP, Brent {row['brent_evaluations']} images"
        lines.append(f"{'':>6} {extra}")
    return "\n".join(lines)
