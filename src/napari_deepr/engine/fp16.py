"""Float16 copies of a model's graphs for GPU execution providers.

GPUs run half-precision convolutions on tensor cores; CPUs (onnxruntime's CPU provider) do not, so
``precision="fp16"`` is refused when only the CPU is asked for (use ``bf16`` on CPUs that have it).
The copies keep float32 inputs and outputs (``keep_io_types``), so the engine's tiling,
normalization and blending are unchanged. They are made once with onnxruntime's own converter,
repaired where that converter's versions differ (:func:`_tidy`), checked (``onnx.checker`` and a
small run against the float32 graph) and cached beside the model, or in the user cache when the
model folder is read-only; a copy older than its source is remade.

Any failure here raises :class:`Fp16Error` (one sentence); the engine then runs the float32 graph
with one warning instead.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from .. import _safety
from ..errors import ModelError
from .contract import fp16_name
from .providers import fp16_providers

# Providers with half-precision kernels worth using (the fp16 column of providers.TRAITS).
FP16_PROVIDERS = fp16_providers()

#: The float16 copy may differ from float32 by this share of the output's spread on the random check
#: tile (measured on the bundled generator: 1.3 % at the worst pixel, onnxruntime 1.18-1.32); a
#: broken conversion or a float16 overflow is off by the spread itself or more.
CHECK_TOLERANCE = 0.05
#: Side of the random tile the copy is checked on (a multiple of 32: five down-samplings).
CHECK_SIZE = 128


class Fp16Error(ModelError):
    """A float16 copy that could not be made or did not pass its checks (the engine falls back to fp32)."""


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
    """Make the converter's output a valid graph: no repeated nodes, unique names, topological order.

    Measured with the bundled model: onnxruntime 1.18-1.32's converter appends its input casts
    after the nodes that read them, and 1.31's writes the same ``Cast`` of a shared value up to five
    times (same input, same output name), which ``onnx.checker`` (SSA form) and onnxruntime 1.31
    refuse. Identical nodes compute the same value, so all but the first are dropped; two different
    nodes writing one name cannot be repaired and raise :class:`Fp16Error`.
    """
    graph = model.graph
    kept, producer = [], {}
    for node in graph.node:
        key = node.SerializeToString(deterministic=True)
        clash = [producer[o] for o in node.output if o and o in producer]
        if clash:
            if all(c == key for c in clash):
                continue  # an exact repeat of a node already kept
            raise Fp16Error(f"The converted float16 graph writes '{node.output[0]}' from two different nodes.")
        for o in node.output:
            if o:
                producer[o] = key
        kept.append(node)
    seen: dict[str, int] = {}
    for node in kept:
        if node.name in seen:
            seen[node.name] += 1
            node.name = f"{node.name}_{seen[node.name]}"
        else:
            seen[node.name] = 0
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = kept, []
    while pending:
        rest = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise Fp16Error("The converted float16 graph has a cycle or an input no node produces.")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)
    return model


def convert(model):
    """A float16 copy of an ``onnx.ModelProto`` with float32 inputs and outputs, tidied and checked.

    Raises
    ------
    Fp16Error
        When onnxruntime's converter is missing or fails, or the result is not a valid graph.
    """
    import onnx

    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except Exception as exc:  # noqa: BLE001 - some onnxruntime builds ship without the transformers tools
        raise Fp16Error(f"This onnxruntime has no float16 converter ({_first_line(exc)}).") from exc
    try:
        half = _tidy(convert_float_to_float16(model, keep_io_types=True))
        onnx.checker.check_model(half)
    except Fp16Error:
        raise
    except Exception as exc:  # noqa: BLE001 - the converter and the checker raise many types
        raise Fp16Error(f"The float16 conversion failed ({_first_line(exc)}).") from exc
    return half


def check_against_fp32(fp32_path: Path, fp16_bytes: bytes, size: int = CHECK_SIZE, feeds_from: Path | None = None) -> float | None:
    """Largest difference between the two graphs on a random tile, as a share of the fp32 output's spread.

    Runs both on onnxruntime's CPU provider, which has float16 kernels in the versions this package
    allows; returns None when it cannot run the float16 graph (the GPU session is then the test).
    ``feeds_from`` is the float32 graph whose outputs feed this one (the generator, for a DPM
    decoder, whose multi-scale inputs a random tile cannot fake).

    Raises
    ------
    Fp16Error
        When the float16 output is not finite or differs by more than :data:`CHECK_TOLERANCE`.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4  # a failed comparison is reported by the return value, not on stderr
    so.intra_op_num_threads = 1
    s32 = ort.InferenceSession(str(fp32_path), so, providers=["CPUExecutionProvider"])
    try:
        s16 = ort.InferenceSession(fp16_bytes, so, providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - no CPU float16 kernel for some node: nothing to compare here
        return None
    try:
        feeds = _random_feeds(s32, size)
        if feeds_from is not None:  # the features the generator computes from a random tile
            gen = ort.InferenceSession(str(feeds_from), so, providers=["CPUExecutionProvider"])
            made = dict(zip([o.name for o in gen.get_outputs()], gen.run(None, _random_feeds(gen, size)), strict=True))
            feeds = {i.name: made[i.name] for i in s32.get_inputs()}
        names = [o.name for o in s32.get_outputs()]
        a = s32.run(names, feeds)
        b = s16.run(names, feeds)
    except Exception:  # noqa: BLE001 - a graph with a fixed input size other than ours: not comparable
        return None
    worst = 0.0
    for name, x, y in zip(names, a, b, strict=True):
        if not np.isfinite(y).all():
            raise Fp16Error(f"The float16 graph gives non-finite values for '{name}' where float32 does not.")
        spread = float(np.std(x)) or 1.0
        worst = max(worst, float(np.max(np.abs(np.asarray(y, np.float64) - x))) / spread)
    if worst > CHECK_TOLERANCE:
        raise Fp16Error(
            f"The float16 graph differs from float32 by {100 * worst:.1f} % of the output's spread "
            f"(more than {100 * CHECK_TOLERANCE:.0f} %)."
        )
    return worst


def _random_feeds(sess, size: int) -> dict:
    """Random inputs for ``sess``: one tile of ``size``² (batch 1) for every symbolic axis."""
    rng = np.random.default_rng(0)
    feeds = {}
    for inp in sess.get_inputs():
        # Batch and size axes left symbolic take 1 and ``size``; fixed ones keep their value.
        shape = [d if isinstance(d, int) and d > 0 else (1 if i == 0 else size) for i, d in enumerate(inp.shape)]
        feeds[inp.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def fp16_variant(path: str | Path, feeds_from: str | Path | None = None) -> Path:
    """Path of a float16 copy of the ONNX graph at ``path``, converting and checking it on first use.

    Parameters
    ----------
    path : str or Path
        A float32 ONNX file (``generator.onnx`` or ``dpm.onnx``).
    feeds_from : str or Path, optional
        The float32 generator whose outputs feed ``path`` (for a DPM decoder's check).

    Returns
    -------
    Path
        ``<stem>.fp16.onnx`` beside ``path`` when that folder is writable, else in :func:`cache_dir`.

    Raises
    ------
    Fp16Error
        When the copy cannot be made or fails its checks (see :func:`convert`, :func:`check_against_fp32`).
    """
    path = Path(path)
    beside = path.with_name(fp16_name(path.stem))
    if _fresh(beside, path):
        return beside
    digest = hashlib.sha1(path.read_bytes()).hexdigest()[:16]
    cached = cache_dir() / fp16_name(f"{path.stem}-{digest}")
    if _fresh(cached, path):
        return cached
    import onnx

    try:
        source = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001
        raise Fp16Error(f"{path.name} could not be read for the float16 conversion ({_first_line(exc)}).") from exc
    data = convert(source).SerializeToString()
    check_against_fp32(path, data, feeds_from=None if feeds_from is None else Path(feeds_from))
    for target in (beside, cached):
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            # A pid-named temporary (io's scheme), renamed when complete: a concurrent reader never sees
            # half a file, and one a killed run left is removed by the next conversion.
            with _safety.atomic_path(target) as tmp:
                tmp.write_bytes(data)
            return target
        except OSError:
            continue
    raise Fp16Error(f"Could not write a float16 copy of {path.name} beside it or in {cache_dir()}.")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__).rstrip(".")[:200]
