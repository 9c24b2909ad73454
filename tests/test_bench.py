"""`deepr bench` produces consistent numbers (no timing assertions: speed lives in benchmarks)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_deepr.bench import format_table, onnx_flops_per_pixel, run_bench


def test_flop_count_of_tiny_model(tiny_model):
    # One 3x3 conv (1->1 channel) for the output and one for feat0: 2 * 2 * 9 FLOPs per pixel.
    assert onnx_flops_per_pixel(tiny_model / "generator.onnx", size=64) == pytest.approx(36.0)


def test_bench_reports_engine_and_raw(tiny_model):
    res = run_bench(tiny_model, sizes=[128], repeats=1, threads=1, torch_eager=True, baselines=False)
    row = res["sizes"]["128"]
    assert row["engine_mp_s"] > 0 and row["raw_untiled_mp_s"] > 0
    assert row["engine_s_per_mm2"] == pytest.approx(res["mp_per_mm2"] / row["engine_mp_s"])
    assert np.isclose(row["engine_vs_raw"], row["raw_untiled_s"] / row["engine_s"])
    # The tiny test model was not exported by the trainer, so PyTorch eager says why it is absent.
    assert "torch_eager_s" in row or "torch_eager_unavailable" in res
    assert "engine/raw" in format_table(res)
    # The fastest network-only rate of this run, and the engine's share of it, in the table too.
    nets = {k: row[f"{k}_mp_s"] for k in ("raw_untiled", "torch_eager") if f"{k}_mp_s" in row}
    assert row["network_best"]["mp_s"] == max(nets.values())
    assert row["engine_vs_best_network"] == pytest.approx(row["engine_mp_s"] / max(nets.values()))
    assert "fastest network-only" in format_table(res)


def test_bench_reduced_precisions_timed_or_explained(tiny_model):
    import onnxruntime as ort

    res = run_bench(tiny_model, sizes=[64], repeats=1, threads=1, torch_eager=False, baselines=False,
                    variants=("bf16", "int8"))
    row = res["sizes"]["64"]
    # the tiny model has no int8 variant: said, not silently dropped
    assert "engine_int8_s" not in row and "deepr quantize" in res["variants_unavailable"]["int8"]
    if "OpenVINOExecutionProvider" in ort.get_available_providers():
        assert row["engine_bf16_mp_s"] > 0 and "engine_bf16" in format_table(res)
    else:
        assert "onnxruntime-openvino" in res["variants_unavailable"]["bf16"]


def test_bench_skips_an_untiled_call_that_would_not_fit(tiny_model, monkeypatch):
    import napari_deepr.bench as bench

    monkeypatch.setattr(bench, "available_memory", lambda: 1 << 20)  # 1 MiB free
    res = run_bench(tiny_model, sizes=[128], repeats=1, threads=1, torch_eager=False, baselines=False)
    row = res["sizes"]["128"]
    assert "raw_untiled_s" not in row and "engine_vs_raw" not in row
    assert "GiB" in row["raw_untiled_skipped"] and row["engine_mp_s"] > 0
    assert "raw call skipped" in format_table(res)
