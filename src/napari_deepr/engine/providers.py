"""onnxruntime execution providers by short name, cached sessions and honest CPU fallback."""

from __future__ import annotations

import functools
import json
import os
import threading
import warnings
from pathlib import Path

from ..errors import InputError, ModelError

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "directml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
}
SHORT_NAMES = {v: k for k, v in PROVIDERS.items()}

_sessions: dict[tuple, object] = {}
_lock = threading.Lock()


def available_providers() -> list[str]:
    """Short names of the providers this onnxruntime build offers, best first."""
    import onnxruntime as ort

    # The Azure provider calls remote endpoints; it never runs a local graph.
    return [SHORT_NAMES.get(p, p) for p in ort.get_available_providers() if p != "AzureExecutionProvider"]


def default_threads() -> int:
    """Intra-op threads: ``$DEEPR_THREADS`` or the cores this process may use."""
    env = os.environ.get("DEEPR_THREADS")
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def resolve_providers(providers: str | list[str] | tuple[str, ...] | None, missing: list[str] | None = None) -> list[str]:
    """Turn short or full provider names into the onnxruntime list to try, CPU always last.

    Parameters
    ----------
    providers : str or list of str, optional
        Short or full names; ``None`` or ``"auto"`` picks the GPU-like providers this build offers.
    missing : list, optional
        When given, a sentence for each asked-for provider this build lacks is appended to it
        instead of being warned about (the engine folds them into its one fallback warning).

    Raises
    ------
    InputError
        For a name onnxruntime does not know at all.
    """
    import onnxruntime as ort

    if providers is None or providers == "auto":
        wanted = [p for p in ort.get_available_providers() if p in ("CUDAExecutionProvider", "CoreMLExecutionProvider", "DmlExecutionProvider")]
    else:
        if isinstance(providers, str):
            providers = [providers]
        wanted = []
        for p in providers:
            full = PROVIDERS.get(p.lower(), p)
            if full not in SHORT_NAMES and full not in ort.get_all_providers():
                known = ", ".join(PROVIDERS)
                raise InputError(f"Unknown execution provider '{p}'; choose one of: {known}.")
            wanted.append(full)
    avail = set(ort.get_available_providers())
    out = []
    for full in wanted:
        if full in avail:
            out.append(full)
        elif full != "CPUExecutionProvider":
            why = (f"The {SHORT_NAMES.get(full, full)} execution provider is not available in this onnxruntime "
                   f"({ort.__version__}, offers {', '.join(available_providers())})")
            if missing is not None:
                missing.append(why)
            else:
                warnings.warn(f"{why}; falling back to CPU.", RuntimeWarning, stacklevel=3)
    if "CPUExecutionProvider" not in out:
        out.append("CPUExecutionProvider")
    return out


def default_arena() -> bool:
    """Whether sessions keep onnxruntime's CPU memory arena (``$DEEPR_ORT_ARENA``, default on).

    With the arena, tile activations are reused between calls: 1.5× faster on CPU
    (``benchmarks/speed_changes.py``), but the process keeps the largest tile's activations until its
    sessions are cleared. Out-of-core and cluster runs turn it off, so their resident memory stays
    bounded by the tile being processed.
    """
    return os.environ.get("DEEPR_ORT_ARENA", "1") != "0"


def _session_options(threads: int | None, arena: bool = True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    so.enable_cpu_mem_arena = arena
    return so


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16; Linux ``/proc/cpuinfo``)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_provider_options(threads: int | None = None) -> dict[str, dict[str, str]]:
    """OpenVINO execution-provider options that run a float32 graph in bfloat16 on the CPU.

    onnxruntime's own CPU provider has no bfloat16 convolutions; OpenVINO's CPU plugin computes them
    with AVX512-BF16/AMX when asked through its ``INFERENCE_PRECISION_HINT``.
    """
    return {
        "OpenVINOExecutionProvider": {
            "device_type": "CPU",
            "num_of_threads": str(threads or default_threads()),
            "load_config": json.dumps({"CPU": {"INFERENCE_PRECISION_HINT": "bf16"}}),
        }
    }


def require_bf16() -> list[str]:
    """The provider list for ``precision="bf16"``, or one clear sentence why it cannot run here.

    Raises
    ------
    InputError
        When this onnxruntime build has no OpenVINO execution provider.
    """
    import onnxruntime as ort

    if "OpenVINOExecutionProvider" not in ort.get_available_providers():
        raise InputError(
            "bf16 on CPU runs through onnxruntime's OpenVINO execution provider, which this onnxruntime "
            f"({ort.__version__}) lacks; install it with 'pip uninstall -y onnxruntime && pip install onnxruntime-openvino'."
        )
    if not cpu_has_bf16():
        warnings.warn(
            "This CPU has no native bfloat16 (AVX512-BF16/AMX), so bf16 will not be faster than fp32.",
            RuntimeWarning,
            stacklevel=3,
        )
    return ["OpenVINOExecutionProvider", "CPUExecutionProvider"]


def get_session(
    path: str | Path,
    providers: list[str],
    threads: int | None = None,
    arena: bool | None = None,
    provider_options: dict[str, dict[str, str]] | None = None,
    fallback: bool = True,
):
    """One cached InferenceSession per (file, providers, options, threads); falls back to CPU if creation fails.

    With ``fallback=False`` a failure raises :class:`~napari_deepr.errors.ModelError` instead (the
    engine then tries its next precision or provider and warns once).

    Returns
    -------
    session : onnxruntime.InferenceSession
    used : str
        Short name of the provider that actually runs the graph (``session.get_providers()[0]``).
    """
    import onnxruntime as ort

    path = Path(path)
    st = path.stat()
    arena = default_arena() if arena is None else bool(arena)
    opts = provider_options or {}
    key = (str(path), st.st_mtime_ns, tuple(providers), threads, arena, json.dumps(opts, sort_keys=True))
    with _lock:
        sess = _sessions.get(key)
        if sess is None:
            try:
                sess = ort.InferenceSession(
                    str(path), _session_options(threads, arena),
                    providers=[(p, opts[p]) if p in opts else p for p in providers],
                )
            except Exception as exc:
                if fallback and providers != ["CPUExecutionProvider"]:
                    warnings.warn(
                        f"Could not start {SHORT_NAMES.get(providers[0], providers[0])} for {path.name} ({_first_line(exc)}); falling back to CPU.",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    return get_session(path, ["CPUExecutionProvider"], threads, arena)
                raise ModelError(f"onnxruntime could not load {path.name}: {_first_line(exc)}") from exc
            _sessions[key] = sess
    return sess, SHORT_NAMES.get(sess.get_providers()[0], sess.get_providers()[0])


_gpu_memory_cache: dict[int, tuple[float, int | None]] = {}
#: Seconds a GPU free-memory reading is reused: asking nvidia-smi costs ~0.1 s, more than a 2048² tile.
GPU_MEMORY_TTL_S = 30.0


def gpu_free_memory(device: int = 0) -> int | None:
    """Free memory of NVIDIA GPU ``device`` in bytes (NVML, else ``nvidia-smi``), or None if unknown.

    onnxruntime does not report it; tile and batch sizes on a GPU are chosen from it. Readings are
    reused for :data:`GPU_MEMORY_TTL_S` seconds.
    """
    import time

    now = time.monotonic()
    hit = _gpu_memory_cache.get(device)
    if hit is not None and now - hit[0] < GPU_MEMORY_TTL_S:
        return hit[1]
    value = _read_gpu_free_memory(device)
    _gpu_memory_cache[device] = (now, value)
    return value


def _read_gpu_free_memory(device: int) -> int | None:
    try:
        import pynvml  # nvidia-ml-py, where installed

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(device)).free)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no NVML: try the command-line tool
        pass
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=memory.free", "--format=csv,noheader,nounits", f"--id={device}"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
        return int(float(out.split()[0]) * 2**20)
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def clear_sessions() -> None:
    """Drop cached sessions (frees GPU memory)."""
    with _lock:
        _sessions.clear()


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
