"""Float16 copies of a model's graphs for GPU execution providers.

GPUs run half-precision convolutions on tensor cores; CPUs (onnxruntime's CPU provider) do not, so
``precision="fp16"`` is refused there (use ``bf16`` on CPUs that have it). The copies keep float32
inputs and outputs (``keep_io_types``), so the engine's tiling, normalization and blending are
unchanged. They are made once with onnxruntime's own converter and cached beside the model, or in the
user cache when the model folder is read-only; a copy older than its source is remade.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

# Providers with half-precision kernels worth using.
FP16_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider", "ROCMExecutionProvider", "DmlExecutionProvider")


def cache_dir() -> Path:
    """``$DEEPR_CACHE`` or ``$XDG_CACHE_HOME/napari-deepr`` (``~/.cache/napari-deepr``)."""
    env = os.environ.get("DEEPR_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "napari-deepr"


def _fresh(target: Path, source: Path) -> bool:
    return target.is_file() and target.stat().st_mtime_ns >= source.stat().st_mtime_ns


def _tidy(model):
    """Make the converter's output a valid graph: unique node names, nodes in topological order.

    Measured: onnxruntime's converter appends its input casts after the nodes that read them (1.24)
    or reuses cast names (1.31), and onnxruntime 1.31 then refuses to load the file.
    """
    graph = model.graph
    seen: dict[str, int] = {}
    for node in graph.node:
        if node.name in seen:
            seen[node.name] += 1
            node.name = f"{node.name}_{seen[node.name]}"
        else:
            seen[node.name] = 0
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ValueError("The float16 graph has a cycle or an input no node produces.")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)
    return model


def fp16_variant(path: str | Path) -> Path:
    """Path of a float16 copy of the ONNX graph at ``path``, converting it on first use.

    Parameters
    ----------
    path : str or Path
        A float32 ONNX file (``generator.onnx`` or ``dpm.onnx``).

    Returns
    -------
    Path
        ``<stem>.fp16.onnx`` beside ``path`` when that folder is writable, else in :func:`cache_dir`.
    """
    path = Path(path)
    beside = path.with_name(f"{path.stem}.fp16.onnx")
    if _fresh(beside, path):
        return beside
    digest = hashlib.sha1(path.read_bytes()).hexdigest()[:16]
    cached = cache_dir() / f"{path.stem}-{digest}.fp16.onnx"
    if _fresh(cached, path):
        return cached
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = _tidy(convert_float_to_float16(onnx.load(str(path)), keep_io_types=True))
    onnx.checker.check_model(model)
    for target in (beside, cached):
        tmp = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=target.parent)
            os.close(fd)
            onnx.save(model, tmp)
            os.replace(tmp, target)  # atomic: a concurrent reader never sees half a file
            return target
        except OSError:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
            continue
    raise OSError(f"Could not write a float16 copy of {path.name} beside it or in {cache_dir()}.")
