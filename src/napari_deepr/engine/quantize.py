"""An int8 variant of a generator for faster CPU refocus (static QDQ, onnxruntime's own tools).

Measured trap (feasibility study): dynamic int8 (ConvInteger) is slower than fp32 on CPU and MinMax
calibration loses ~0.035 SSIM; static QDQ with per-channel weights, percentile calibration on real
z-scored tiles, and the first and last convolutions kept in fp32 keeps quality. The variant is
written beside the model as ``generator.int8.onnx`` and used with ``precision="int8"``; whether it
is good enough is decided by measuring it (``quality_delta``), never assumed.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from .model import load_model

INT8_NAME = "generator.int8.onnx"


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


def quantize_generator(model="default", out_path=None, tiles=None, percentile: float = 99.99) -> Path:
    """Write a static-QDQ int8 generator next to ``model`` (or at ``out_path``).

    Parameters
    ----------
    model : str, Path or DeepRModel
    out_path : Path, optional
        Default ``<model folder>/generator.int8.onnx``.
    tiles : list of ndarray, optional
        Calibration inputs ``(1, C, H, W)``, z-scored; default :func:`calibration_tiles`.
    percentile : float
        Percentile calibration of activation ranges.
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

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        # Symbolic shape inference fails on the exporter's "32*h" dims; ONNX shape inference suffices.
        quant_pre_process(str(m.generator_path), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre), str(out_path.with_suffix(".partial")), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.Percentile,
            nodes_to_exclude=_boundary_convs(pre), extra_options={"CalibPercentile": percentile},
        )
    _copy_metadata(m.generator_path, out_path.with_suffix(".partial"))
    out_path.with_suffix(".partial").replace(out_path)
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


def quality_delta(model="default", tiles=None, n: int = 12, seed: int = 99) -> dict:
    """SSIM of fp32 and int8 outputs against the in-focus truth on fresh simulated pairs.

    Returns
    -------
    dict
        ``ssim_fp32``, ``ssim_int8`` and ``delta`` (int8 − fp32); the variant is acceptable when
        ``delta >= -0.01``.
    """
    from ..optics.simulate import random_training_pair
    from ..science.metrics import ssim
    from .refocus import refocus

    m = load_model(model)
    rng = np.random.default_rng(seed)
    s32, s8 = [], []
    for _ in range(n):
        x, y, _ = random_training_pair(rng, patch=512)
        s32.append(ssim(refocus(x, m), y))
        s8.append(ssim(refocus(x, m, precision="int8"), y))
    return {"ssim_fp32": float(np.mean(s32)), "ssim_int8": float(np.mean(s8)), "delta": float(np.mean(s8) - np.mean(s32)), "pairs": n}
