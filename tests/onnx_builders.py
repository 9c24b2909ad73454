"""Tiny ONNX Deep-R look-alikes built with onnx.helper (no torch), for engine and front-end tests.

The generator is fully convolutional with a known receptive field (a 3×3 kernel: radius 1 px), so
tiled and untiled runs must agree; its ``feat0`` output feeds the DPM decoder, as in real models.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SHARPEN = np.array([[0, -0.25, 0], [-0.25, 2.0, -0.25], [0, -0.25, 0]], np.float32)
BLUR = np.full((3, 3), 1 / 9, np.float32)
DPM_GAIN, DPM_BIAS = 2.0, 0.5


def _conv_weights(kernel: np.ndarray, channels: int) -> np.ndarray:
    w = np.zeros((channels, channels, *kernel.shape), np.float32)
    for c in range(channels):
        w[c, c] = kernel
    return w


def make_generator(path: Path, channels: int = 1, meta: dict | None = None, with_features: bool = True) -> Path:
    """Write a generator: ``output = sharpen(input)``, ``feat0 = blur(input)``."""
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", channels, "H", "W"])
    out = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", channels, "H", "W"])
    nodes = [helper.make_node("Conv", ["input", "w_sharp"], ["output"], pads=[1, 1, 1, 1])]
    inits = [numpy_helper.from_array(_conv_weights(SHARPEN, channels), "w_sharp")]
    outputs = [out]
    if with_features:
        nodes.append(helper.make_node("Conv", ["input", "w_blur"], ["feat0"], pads=[1, 1, 1, 1]))
        inits.append(numpy_helper.from_array(_conv_weights(BLUR, channels), "w_blur"))
        outputs.append(helper.make_tensor_value_info("feat0", TensorProto.FLOAT, ["N", channels, "H", "W"]))
    graph = helper.make_graph(nodes, "tiny_generator", [inp], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for k, v in (meta or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = f"deepr.{k}", json.dumps(v)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def make_dpm(path: Path, channels: int = 1) -> Path:
    """Write a DPM decoder: ``dpm = DPM_GAIN * mean_c(feat0) + DPM_BIAS`` (µm)."""
    inp = helper.make_tensor_value_info("feat0", TensorProto.FLOAT, ["N", channels, "H", "W"])
    out = helper.make_tensor_value_info("dpm", TensorProto.FLOAT, ["N", 1, "H", "W"])
    w = np.full((1, channels, 1, 1), DPM_GAIN / channels, np.float32)
    b = np.array([DPM_BIAS], np.float32)
    node = helper.make_node("Conv", ["feat0", "w", "b"], ["dpm"])
    graph = helper.make_graph([node], "tiny_dpm", [inp], [out], [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def make_model_folder(root: Path, name: str = "tiny", channels: int = 1, dpm: bool = True, **card) -> Path:
    """A complete model folder with a card; card fields may be overridden."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    info = {
        "name": name,
        "version": "0.0.1",
        "modality": "test",
        "channels": channels,
        "pixel_size_um": 0.325,
        "na": 0.75,
        "wavelength_um": 0.55,
        "defocus_range_um": [-5, 5],
        "tile_multiple": 32,
        "tile": 128,
        "overlap": 32,
    }
    info.update(card)
    make_generator(folder / "generator.onnx", channels, meta=info)
    if dpm:
        make_dpm(folder / "dpm.onnx", channels)
    (folder / "model.json").write_text(json.dumps(info, indent=1))
    return folder


def reference_output(plane: np.ndarray) -> np.ndarray:
    """What the tiny generator computes on a whole plane, done independently with scipy.

    Same intensity convention as the engine: z-score, network, back to the plane's mean/std; the
    border context is mirror reflection (the engine's halo), so edges match too.
    """
    from scipy.ndimage import correlate

    x = plane.astype(np.float64)
    mu, sd = x.mean(), x.std()
    z = (x - mu) / sd
    y = correlate(z, SHARPEN.astype(np.float64), mode="mirror")
    return y * sd + mu
