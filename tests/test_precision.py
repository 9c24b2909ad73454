"""Reduced precisions: int8 (static QDQ variant) and bf16 (OpenVINO provider), measured against fp32."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import napari_deepr
from napari_deepr.engine.providers import cpu_has_bf16
from napari_deepr.engine.quantize import (
    calibration_tiles,
    precision_choices,
    quality_delta,
    quantize_generator,
)
from napari_deepr.errors import InputError
from napari_deepr.optics.simulate import random_training_pair
from napari_deepr.science.metrics import ssim

BUNDLED = Path(__file__).resolve().parents[1] / "models" / "deepr-fluo-20x"
HAS_OPENVINO = "OpenVINOExecutionProvider" in ort.get_available_providers()


@pytest.fixture(scope="module")
def pair():
    x, y, z = random_training_pair(np.random.default_rng(4), patch=256)
    return x, y, z


def test_bf16_refusals(tiny_model, monkeypatch):
    with pytest.raises(InputError, match="bf16 runs on the CPU"):
        napari_deepr.refocus(np.ones((64, 64)), tiny_model, precision="bf16", providers="cuda")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(InputError, match="onnxruntime-openvino"):
        napari_deepr.refocus(np.ones((64, 64)), tiny_model, precision="bf16")
    choices = {p: (usable, why) for p, _, usable, why in precision_choices(tiny_model)}
    assert choices["bf16"][0] is False and "onnxruntime-openvino" in choices["bf16"][1]
    assert choices["int8"][0] is False and "deepr quantize" in choices["int8"][1]
    assert choices["fp16"][0] is False and "GPU provider" in choices["fp16"][1]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert {p: u for p, _, u, _ in precision_choices(tiny_model)}["fp16"] is True


def test_int8_variant_is_quantized_close_and_quiet(bundled_copy, pair, capsys):
    path = quantize_generator(bundled_copy, tiles=calibration_tiles(n=4, size=128))
    assert capsys.readouterr().out == ""  # the calibrator's chatter must not pollute a command's JSON
    g = onnx.load(str(path))
    assert sum(n.op_type == "QuantizeLinear" for n in g.graph.node) > 10
    assert {p.key: p.value for p in g.metadata_props}["deepr.precision"] == '"int8"'
    x, y, _ = pair
    out32 = napari_deepr.refocus(x, bundled_copy)
    out8 = napari_deepr.refocus(x, bundled_copy, precision="int8")
    assert not np.allclose(out8, out32)  # the variant really ran
    # 4 tiny calibration tiles: looser than the shipped 64, still far better than the input
    assert ssim(out8, y) > ssim(out32, y) - 0.08
    assert ssim(out8, y) > ssim(x, y)
    assert {p: u for p, _, u, _ in precision_choices(bundled_copy)}["int8"] is True


@pytest.mark.skipif(not HAS_OPENVINO, reason="onnxruntime-openvino is not installed")
def test_bf16_keeps_quality(bundled_copy, pair):
    x, y, z = pair
    job = napari_deepr.engine.refocus.RefocusJob(x, bundled_copy, precision="bf16", dpm=True)
    out16, dpm16 = job.run()
    assert job.provider == "openvino"
    out32, dpm32 = napari_deepr.refocus(x, bundled_copy, dpm=True)
    assert abs(ssim(out16, y) - ssim(out32, y)) < 0.01
    assert np.abs(dpm16 - dpm32).mean() < 0.1  # µm
    if cpu_has_bf16():
        assert not np.array_equal(out16, out32)  # bf16 really ran, not a silent fp32


@pytest.mark.slow
def test_quality_delta_reports_both_precisions(bundled_copy):
    prec = "bf16" if HAS_OPENVINO else "int8"
    if prec == "int8" and not (bundled_copy / "generator.int8.onnx").is_file():
        quantize_generator(bundled_copy, tiles=calibration_tiles(n=4, size=128))
    q = quality_delta(bundled_copy, precision=prec, n=2)
    assert q["pairs"] == 2 and q["precision"] == prec
    assert q["delta"] == pytest.approx(q[f"ssim_{prec}"] - q["ssim_fp32"])
    assert 0.5 < q["ssim_fp32"] <= 1 and 0 <= q["dpm_mae_fp32_um"] < 2.5
    json.dumps(q)
