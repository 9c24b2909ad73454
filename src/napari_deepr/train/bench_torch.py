"""PyTorch eager inference on the same weights as an exported ONNX generator (for ``deepr bench``).

The generator is rebuilt from the model card's ``config`` (width, channel cap) and its weights are
read from the ONNX initializers, which the exporter names after the PyTorch state dict
(``generator.<param>``), so the comparison runs literally the same numbers.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from .nets import Generator

PREFIX = "generator."


def generator_from_onnx(model) -> Generator:
    """A :class:`Generator` carrying the weights of ``model.generator_path``.

    Raises
    ------
    ValueError
        If the ONNX file was not exported by this trainer (missing or mismatched parameters).
    """
    cfg = dict(model.card.config or {})
    g = Generator(in_channels=model.card.channels, base=int(cfg.get("base", 16)), max_channels=int(cfg.get("max_channels", 512)))
    onx = onnx.load(str(model.generator_path))
    weights = {i.name[len(PREFIX):]: numpy_helper.to_array(i) for i in onx.graph.initializer if i.name.startswith(PREFIX)}
    state = g.state_dict()
    missing = [k for k in state if k not in weights]
    if missing:
        raise ValueError(f"{model.generator_path.name} lacks {len(missing)} generator parameters (e.g. {missing[0]}); it was not exported by napari-deepr's trainer.")
    g.load_state_dict({k: torch.from_numpy(np.array(weights[k])) for k in state})
    return g.eval()


class TorchRunner:
    """Callable running the generator eagerly on a ``(N, C, H, W)`` float32 numpy array.

    ``channels_last`` and ``bf16`` select the fastest eager settings measured on CPU; the default
    (NCHW fp32) is PyTorch's out-of-the-box behaviour. ``device="cuda"`` runs on the GPU; the timed
    call includes the copies to and from it, as the engine's does.
    """

    def __init__(self, model, threads: int | None = None, channels_last: bool = False, bf16: bool = False, device: str = "cpu"):
        if threads and device == "cpu":
            torch.set_num_threads(int(threads))
        self.device = device
        self.g = generator_from_onnx(model).to(device)
        self.channels_last, self.bf16 = channels_last, bf16
        if channels_last:
            self.g = self.g.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def __call__(self, x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
        if self.channels_last:
            t = t.to(memory_format=torch.channels_last)
        with torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.g(t).float().cpu().numpy()


def gpu_matmul_gflops(dtype: str = "tf32", n: int = 8192, repeats: int = 10) -> float:
    """GPU 0's sustained matmul rate in GFLOP/s for ``fp32``, ``tf32`` (fp32 on tensor cores, the
    default for cuDNN convolutions and onnxruntime's CUDA provider) or ``fp16``.

    Raises
    ------
    RuntimeError
        When PyTorch sees no CUDA GPU.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("PyTorch sees no CUDA GPU")
    gpu_matmul_gflops.device_name = torch.cuda.get_device_name(0)
    dt = torch.float16 if dtype == "fp16" else torch.float32
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
    try:
        a = torch.randn(n, n, device="cuda", dtype=dt)
        b = torch.randn(n, n, device="cuda", dtype=dt)
        for _ in range(3):
            a @ b
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            a @ b
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1e3 / repeats
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return 2 * n**3 / seconds / 1e9


gpu_matmul_gflops.device_name = None


# ----------------------------------------------------------------------------- training throughput
def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return sorted(f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"))
    except OSError:
        pass
    return []


def bench_train(patch: int = 256, batch: int = 5, seconds: float = 20.0, threads: int | None = None,
                before: bool = True) -> dict:
    """Generator updates per second of the trainer's default configuration beside plain PyTorch.

    Rows, all on the same batch shape in one process:

    * ``plain`` -- the same generator (bundled architecture, base 16, max 64 channels) in float32 NCHW,
      ``loss = |G(x) - y|.mean(); loss.backward()`` on one fixed batch: PyTorch out of the box, no
      optimizer, no data, no loss of the paper -- the floor a trainer step is compared with.
    * ``default`` -- a real :class:`~napari_deepr.train.loop.Trainer` on a pairs dataset (random
      planes, ``patch``-px crops) with the defaults of a fine-tune: (1 - MS-SSIM) + BerHu, gradient
      clipping, Adam, data sampling and augmentation, bf16 autocast + channels-last where the CPU runs
      bf16 natively, threads = available CPUs. One generator update = one step of an iteration.
    * ``before`` -- the default of the trainer before issue 18, re-created: max 512 channels,
      float32, LSGAN (3 discriminator updates per 6 generator updates, counted in the time).

    Parameters
    ----------
    patch, batch : int
        Training patch side and batch size.
    seconds : float
        Rough time per row (after one warm-up iteration).
    threads : int, optional
        torch threads (default: the trainer's default).
    before : bool
        Also measure the pre-issue-18 default.

    Returns
    -------
    dict
        ``rows`` (name -> updates/s, s/update, notes), ``cpu_flags``, ``threads``, ``data_s_per_batch``.
    """
    import tempfile
    import time
    from pathlib import Path

    from ..stacks.pairs import build_pairs
    from .loop import Stopped, TrainConfig, Trainer, _StopWatch  # noqa: F401

    work = Path(tempfile.mkdtemp(prefix="deepr-bench-train-"))
    rng = np.random.default_rng(0)
    stack = (rng.random((5, 2 * patch, 2 * patch)) * 100).astype(np.float32)
    build_pairs([stack], work / "pairs", z_step_um=0.5, range_um=1.0, patch=patch, register=False,
                focus_method="nvar", split=1.0)
    rows: dict[str, dict] = {}
    out: dict = {"patch": patch, "batch": batch, "cpu_flags": _cpu_flags()}

    def trainer(**kw) -> Trainer:
        cfg = TrainConfig(dataset=str(work / "pairs"), out=str(work / f"m{len(rows)}"), iterations=10**9,
                          batch=batch, patch=patch, threads=threads, export=False, val_pairs=2, **kw)
        return Trainer(cfg, lambda ev: None)

    def time_trainer(t: Trainer) -> tuple[float, float]:
        stop = _StopWatch(t.out)
        t._gan_iteration(stop)  # warm-up
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds or n < 2:
            t._gan_iteration(stop)
            n += 1
        dt = time.perf_counter() - t0
        t.source.close()
        return n * t.cfg.g_steps / dt, dt / (n * t.cfg.g_steps)

    t = trainer(from_scratch=True, gan=False, lr_g=1e-4, lr_schedule="cosine")
    out["threads"] = torch.get_num_threads()
    out["precision"] = "bf16 autocast + channels-last" if t.bf16 else "float32 NCHW"
    # Same network, same batch, plain PyTorch.
    x, y, _ = t._batch()
    x, y = x.float().contiguous(), y.float().contiguous()
    g = Generator(t.G.in_channels, t.cfg.base, t.cfg.max_channels)
    g.load_state_dict({k: v.float() for k, v in t.G.state_dict().items()})
    g = g.to(memory_format=torch.contiguous_format).train()
    for _ in range(2):
        g.zero_grad(set_to_none=True)
        (g(x) - y).abs().mean().backward()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 3:
        g.zero_grad(set_to_none=True)
        (g(x) - y).abs().mean().backward()
        n += 1
    dt = time.perf_counter() - t0
    rows["plain"] = {"updates_s": n / dt, "s_update": dt / n,
                     "notes": "same network and batch, float32 NCHW, forward + backward only"}
    t0 = time.perf_counter()
    for _ in range(5):
        t.source.sample(t.rng, batch)
    out["data_s_per_batch"] = (time.perf_counter() - t0) / 5
    ups, s_up = time_trainer(t)
    rows["default"] = {"updates_s": ups, "s_update": s_up,
                       "notes": f"trainer default (fine-tune): {out['precision']}, MS-SSIM + BerHu, clip, Adam, data"}
    if before:
        tb = trainer(from_scratch=True, gan=True, max_channels=512, bf16=False, lr_g=5e-4, lr_schedule="constant")
        ups, s_up = time_trainer(tb)
        rows["before"] = {"updates_s": ups, "s_update": s_up,
                          "notes": "pre-issue-18 default: max 512 channels, float32 NCHW, LSGAN (3 D per 6 G updates)"}
    out["rows"] = rows
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return out


def format_train_bench(res: dict) -> str:
    """The ``deepr bench --train`` table."""
    lines = [(f"training throughput, {res['batch']} x {res['patch']}^2 px per generator update, "
              f"{res['threads']} threads, CPU flags {' '.join(res['cpu_flags']) or 'unknown'}"),
             f"{'configuration':<10} {'updates/s':>10} {'s/update':>9}  notes"]
    for name, r in res["rows"].items():
        lines.append(f"{name:<10} {r['updates_s']:>10.3f} {r['s_update']:>9.3f}  {r['notes']}")
    d = res["rows"]
    lines.append(f"default / plain forward+backward: {d['default']['updates_s'] / d['plain']['updates_s']:.2f}x; "
                 f"data sampling {1e3 * res['data_s_per_batch']:.1f} ms per batch")
    if "before" in d:
        lines.append(f"default / before: {d['default']['updates_s'] / d['before']['updates_s']:.2f}x")
    return "\n".join(lines)
