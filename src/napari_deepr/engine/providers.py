"""onnxruntime execution providers: one table of their traits, cached sessions and honest CPU fallback.

Everything the engine needs to know about a provider is one row of :data:`TRAITS`: where its
activations live (the host's memory or a device's), whether it runs float16 or bfloat16 graphs
natively, the device its outputs can stay on between the generator and the DPM decoder (IO binding),
whether ``providers="auto"`` picks it, and how its free memory is asked. Adding a provider is one
row (and its tests); the engine, the precision menu and the messages read the table.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, ModelError


@dataclass(frozen=True)
class ProviderTraits:
    """What the engine needs to know about one execution provider.

    Attributes
    ----------
    short : str
        The name users type (``cuda``).
    ort : str
        onnxruntime's name (``CUDAExecutionProvider``).
    host : bool
        The activations live in the host's memory (tile from ``MemAvailable``, batch 1, no pipeline).
    fp16 : bool
        Runs float16 graphs natively (``precision="fp16"``).
    bf16 : bool
        Runs float32 graphs in bfloat16 when asked (``precision="bf16"``).
    binding : str or None
        onnxruntime device name the generator's features stay on for the DPM decoder (IO binding);
        None where they cannot.
    auto : bool
        Chosen by ``providers=None`` / ``"auto"`` when this onnxruntime offers it.
    memory : str or None
        How the device's free memory is asked (``"nvidia"``: NVML or nvidia-smi, ``"rocm"``:
        rocm-smi); None: unknown, the host's memory stands in.
    """

    short: str
    ort: str
    host: bool = False
    fp16: bool = False
    bf16: bool = False
    binding: str | None = None
    auto: bool = False
    memory: str | None = None


#: One row per provider, in the order names are listed to users.
TRAITS: tuple[ProviderTraits, ...] = (
    ProviderTraits("cpu", "CPUExecutionProvider", host=True),
    ProviderTraits("cuda", "CUDAExecutionProvider", fp16=True, binding="cuda", auto=True, memory="nvidia"),
    ProviderTraits("tensorrt", "TensorrtExecutionProvider", fp16=True, binding="cuda", memory="nvidia"),
    # DirectML runs on any Windows GPU; when it is an NVIDIA one, nvidia-smi answers for its memory.
    ProviderTraits("directml", "DmlExecutionProvider", fp16=True, binding="dml", auto=True, memory="nvidia"),
    ProviderTraits("coreml", "CoreMLExecutionProvider", auto=True),
    ProviderTraits("openvino", "OpenVINOExecutionProvider", host=True, bf16=True),
    # HIP memory is a "cuda" OrtDevice in onnxruntime's ROCm build (its allocator registers as GPU).
    ProviderTraits("rocm", "ROCMExecutionProvider", fp16=True, binding="cuda", auto=True, memory="rocm"),
    ProviderTraits("migraphx", "MIGraphXExecutionProvider", memory="rocm"),
)

#: Traits by onnxruntime name (the engine looks rows up here, so tests can swap a row).
TRAITS_BY_ORT: dict[str, ProviderTraits] = {t.ort: t for t in TRAITS}
PROVIDERS = {t.short: t.ort for t in TRAITS}
SHORT_NAMES = {v: k for k, v in PROVIDERS.items()}


def provider_traits(name: str) -> ProviderTraits:
    """The traits of a provider by short or onnxruntime name (an unknown one: a device without extras)."""
    full = PROVIDERS.get(name.lower(), name)
    row = TRAITS_BY_ORT.get(full)
    return row if row is not None else ProviderTraits(SHORT_NAMES.get(full, full), full)


def fp16_providers() -> tuple[str, ...]:
    """onnxruntime names of the providers that run float16 graphs."""
    return tuple(t.ort for t in TRAITS_BY_ORT.values() if t.fp16)


def names_with(trait: str) -> str:
    """Short names of the providers with a trait, for sentences (``"cuda, tensorrt, directml, rocm"``)."""
    return ", ".join(t.short for t in TRAITS_BY_ORT.values() if getattr(t, trait))


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
        wanted = [p for p in ort.get_available_providers() if provider_traits(p).auto]
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
    return _cached_memory(_gpu_memory_cache, device, _read_gpu_free_memory)


def _cached_memory(cache: dict, device: int, read) -> int | None:
    """``read(device)``, reused for :data:`GPU_MEMORY_TTL_S` seconds (asking a vendor tool costs ~0.1 s)."""
    import time

    now = time.monotonic()
    hit = cache.get(device)
    if hit is not None and now - hit[0] < GPU_MEMORY_TTL_S:
        return hit[1]
    value = read(device)
    cache[device] = (now, value)
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


def rocm_free_memory(device: int = 0) -> int | None:
    """Free memory of AMD GPU ``device`` in bytes (``rocm-smi``), or None if unknown; cached like
    :func:`gpu_free_memory`."""
    return _cached_memory(_rocm_memory_cache, device, _read_rocm_free_memory)


_rocm_memory_cache: dict[int, tuple[float, int | None]] = {}


def _read_rocm_free_memory(device: int) -> int | None:
    import shutil
    import subprocess

    smi = shutil.which("rocm-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--showmeminfo", "vram", "--json", "-d", str(device)],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        return parse_rocm_smi(out, device)
    except (OSError, subprocess.SubprocessError):
        return None


def parse_rocm_smi(text: str, device: int = 0) -> int | None:
    """Free bytes from ``rocm-smi --showmeminfo vram --json`` (total less used), or None when it does not say."""
    try:
        cards = json.loads(text)
        card = cards.get(f"card{device}") or next(iter(cards.values()))
        total = next(int(v) for k, v in card.items() if "Total Memory" in k)
        used = next(int(v) for k, v in card.items() if "Total Used Memory" in k)
    except (ValueError, TypeError, AttributeError, StopIteration):
        return None
    return max(total - used, 0)


def device_free_memory(provider: str, device: int = 0) -> int | None:
    """Free memory of the device a provider runs on, in bytes, as its trait row says to ask; None if unknown."""
    kind = provider_traits(provider).memory
    if kind == "nvidia":
        return gpu_free_memory(device)
    if kind == "rocm":
        return rocm_free_memory(device)
    return None


def clear_sessions() -> None:
    """Drop cached sessions (frees GPU memory)."""
    with _lock:
        _sessions.clear()


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
