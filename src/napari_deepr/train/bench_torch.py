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
