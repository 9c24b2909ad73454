"""An int8 variant of a generator for faster CPU refocus (static QDQ, onnxruntime's own tools).

Measured trap (feasibility study): dynamic int8 (ConvInteger) is slower than fp32 on CPU and MinMax
calibration loses ~0.035 SSIM; static QDQ with per-channel weights, percentile calibration on real
z-scored tiles, and the first and last convolutions kept in fp32 keeps quality. The variant is
written beside the model as ``generator.int8.onnx`` and used with ``precision="int8"``; whether it
is good enough is decided by measuring it (``quality_delta``), never assumed.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import numpy as np

from .. import _safety
from .contract import INT8_GENERATOR_FILE, quality_name
from .model import load_model

INT8_NAME = INT8_GENERATOR_FILE


def calibration_tiles(n: int = 24, size: int = 256, seed: int = 0, optics=None, z_range_um=(-5.0, 5.0)) -> list[np.ndarray]:
    """Z-scored defocused tiles from the physical simulator, shaped ``(1, 1, size, size)``."""
    from ..optics.simulate import random_training_pair

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x, _, _ = random_training_pair(rng, patch=size, optics=optics, z_range_um=z_range_um)
        x = (x - x.mean()) / (x.std() + 1e-6)
        out.append(x[None, None].astype(np.float32))
    return out


def _boundary_convs(path: Path) -> list[str]:
    """Names of the first and last Conv nodes (kept fp32: they touch the image's full dynamic range)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    convs = [n.name for n in m.graph.node if n.op_type == "Conv"]
    return convs[:1] + convs[-1:] if convs else []


def quantize_generator(model="default", out_path=None, tiles=None, percentile: float = 99.9) -> Path:
    """Write a static-QDQ int8 generator next to ``model`` (or at ``out_path``).

    Parameters
    ----------
    model : str, Path or DeepRModel
    out_path : Path, optional
        Default ``<model folder>/generator.int8.onnx``.
    tiles : list of ndarray, optional
        Calibration inputs ``(1, C, H, W)``, z-scored; default :func:`calibration_tiles`.
    percentile : float
        Percentile calibration of activation ranges. Activations here are heavy-tailed (bright beads
        in z-scored tiles): measured on the bundled model, 99.9 loses 0.015-0.019 SSIM, 99.99 0.067,
        MinMax 0.17 (wide ranges waste the 8 bits on rare outliers).
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    m = load_model(model)
    out_path = Path(out_path) if out_path else m.root / INT8_NAME
    tiles = tiles if tiles is not None else calibration_tiles()
    name = m.input_name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(tiles)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {name: x}

    # Everything temporary -- our scratch models and onnxruntime's own temporary folders -- lives in one
    # pid-named folder beside the output: removed on any exit Python sees, and by the next run after kill -9.
    # onnxruntime's calibrator prints progress to stdout; keep stdout for the command's JSON.
    with (_safety.temporary_beside(out_path, folder=True) as work, _safety.tempdir_inside(work),
          contextlib.redirect_stdout(sys.stderr)):
        pre, partial = work / "pre.onnx", work / INT8_NAME
        # Symbolic shape inference fails on the exporter's "32*h" dims; ONNX shape inference suffices.
        quant_pre_process(str(m.generator_path), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre), str(partial), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.Percentile,
            nodes_to_exclude=_boundary_convs(pre), extra_options={"CalibPercentile": percentile},
        )
        _copy_metadata(m.generator_path, partial)
        os.replace(partial, out_path)
    return out_path


def _copy_metadata(src: Path, dst: Path) -> None:
    import onnx

    a = onnx.load(str(src), load_external_data=False)
    b = onnx.load(str(dst))
    del b.metadata_props[:]
    for p in a.metadata_props:
        e = b.metadata_props.add()
        e.key, e.value = p.key, p.value
    e = b.metadata_props.add()
    e.key, e.value = "deepr.precision", '"int8"'
    onnx.save(b, str(dst))


def quality_delta(model="default", precision: str = "int8", n: int = 12, seed: int = 99, pairs=None, providers=None) -> dict:
    """SSIM of fp32 and reduced-precision outputs against the in-focus truth on fresh simulated pairs.

    Parameters
    ----------
    model : str, Path or DeepRModel
    precision : {"int8", "bf16", "fp16"}
        ``int8``: the model's ``generator.int8.onnx``; ``bf16``: the fp32 graphs run in bfloat16 through
        onnxruntime's OpenVINO provider; ``fp16``: half-precision graphs on a GPU provider.
    n, seed : int
        Number of 512² validation pairs and their seed (fixed, so runs compare).
    pairs : sequence of (input, truth, defocus_um), optional
        Pairs to use instead of simulating ``n`` (e.g. simulated elsewhere and carried to a GPU machine).
    providers : str, optional
        Execution provider for both runs (``cuda`` for fp16); default the engine's choice.

    Returns
    -------
    dict
        ``ssim_fp32``, ``ssim_<precision>``, ``delta`` (reduced − fp32; acceptable when ``>= -0.01``),
        ``worst_pair_delta`` and, for models with a DPM decoder, ``dpm_mae_fp32_um`` and
        ``dpm_mae_<precision>_um`` on structured pixels.
    """
    from ..science.metrics import ssim
    from .dpm import structure_mask
    from .refocus import refocus

    m = load_model(model)
    rng = np.random.default_rng(seed)
    if pairs is None:
        # psfmodels is needed only where pairs are simulated (not on a machine given pairs)
        from ..optics.simulate import random_training_pair

        pairs = (random_training_pair(rng, patch=512) for _ in range(n))
    scores: dict[str, list[float]] = {"fp32": [], precision: []}
    dpm_err: dict[str, list[float]] = {"fp32": [], precision: []}
    n = 0
    for x, y, z in pairs:
        n += 1
        mask = structure_mask(y)
        for prec in ("fp32", precision):
            res = refocus(x, m, precision=prec, dpm=m.has_dpm, providers=providers)
            out, dpm = res if m.has_dpm else (res, None)
            scores[prec].append(ssim(out, y))
            if dpm is not None:
                truth = abs(float(z)) if m.card.dpm_magnitude else float(z)
                dpm_err[prec].append(float(np.abs(dpm[mask] - truth).mean()) if mask.any() else float("nan"))
    a, b = np.array(scores["fp32"]), np.array(scores[precision])
    result = {
        "precision": precision, "pairs": n, "ssim_fp32": float(a.mean()), f"ssim_{precision}": float(b.mean()),
        "delta": float(b.mean() - a.mean()), "worst_pair_delta": float((b - a).min()),
    }
    if dpm_err["fp32"]:
        result["dpm_mae_fp32_um"] = float(np.nanmean(dpm_err["fp32"]))
        result[f"dpm_mae_{precision}_um"] = float(np.nanmean(dpm_err[precision]))
    result["acceptable"] = result["delta"] >= -0.01
    return result


def measured_quality(model, precision: str) -> dict | None:
    """The ``<precision>_quality.json`` measurement stored beside the model, if any."""
    import json

    p = load_model(model).root / quality_name(precision)
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def precision_choices(model) -> list[tuple[str, str, bool, str]]:
    """Reduced precisions for ``model`` on this machine: ``(precision, label, usable, why)``.

    The label carries the measured SSIM change when the model folder has one, so a user picks a
    faster precision knowing what it costs.
    """
    import onnxruntime as ort

    from .providers import cpu_has_bf16

    m = load_model(model)
    out = []

    def cost(prec):
        q = measured_quality(m, prec)
        return f", SSIM {q['delta']:+.3f}" if q and "delta" in q else ""

    has_ov = "OpenVINOExecutionProvider" in ort.get_available_providers()
    if has_ov and cpu_has_bf16():
        why = "bf16: bfloat16 on this CPU through OpenVINO (the model was trained under bf16 autocast)."
    elif has_ov:
        why = "bf16: this CPU has no native bfloat16, so it would not be faster."
    else:
        why = "bf16: needs onnxruntime-openvino instead of onnxruntime."
    out.append(("bf16", f"bf16 (OpenVINO{cost('bf16')})", has_ov and cpu_has_bf16(), why))
    has_int8 = (m.root / INT8_NAME).is_file()
    why = "int8: the model's quantized variant." if has_int8 else f"int8: no {INT8_NAME} (create it with 'deepr quantize')."
    out.append(("int8", f"int8 (quantized{cost('int8')})", has_int8, why))
    from .providers import provider_traits

    gpus = [p for p in ort.get_available_providers() if provider_traits(p).fp16]
    why = ("fp16: half precision on the GPU provider (converted once, cached)." if gpus
           else "fp16: needs a GPU provider (e.g. onnxruntime-gpu for CUDA).")
    out.append(("fp16", f"fp16 (GPU{cost('fp16')})", bool(gpus), why))
    return out
