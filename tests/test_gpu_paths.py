"""GPU code paths that can be checked without a GPU: the fp16 graphs, IO binding, bench on a provider.

The fp16 graphs are run here on onnxruntime's CPU provider (it executes float16 graphs, slowly) to
check the conversion against fp32; speed on CUDA is measured by ``benchmarks/cuda_check.py`` on a
lent GPU, never in tests.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from napari_deepr.bench import run_bench
from napari_deepr.engine.fp16 import fp16_variant
from napari_deepr.engine.model import load_model
from napari_deepr.engine.refocus import RefocusJob
from napari_deepr.errors import InputError
from napari_deepr.optics.simulate import random_training_pair

BUNDLED = Path(__file__).resolve().parents[1] / "models" / "deepr-fluo-20x"


def test_fp16_graph_is_valid_and_matches_fp32(bundled_copy):
    m = load_model(bundled_copy)
    x, _, _ = random_training_pair(np.random.default_rng(5), patch=256)
    x = ((x - x.mean()) / x.std()).astype(np.float32)[None, None]
    for src in (m.generator_path, m.dpm_path):
        p = fp16_variant(src)
        assert p == src.with_name(src.stem + ".fp16.onnx")
        onnx.checker.check_model(onnx.load(str(p)))  # topologically sorted, unique names
        types = {i.data_type for i in onnx.load(str(p)).graph.initializer}
        assert onnx.TensorProto.FLOAT16 in types
    s32 = ort.InferenceSession(str(m.generator_path), providers=["CPUExecutionProvider"])
    s16 = ort.InferenceSession(str(fp16_variant(m.generator_path)), providers=["CPUExecutionProvider"])
    y32 = s32.run([m.output_name], {m.input_name: x})[0]
    y16 = s16.run([m.output_name], {m.input_name: x})[0]
    assert y16.dtype == np.float32  # float32 in and out, float16 inside
    # Half precision keeps ~3 significant digits: the output differs from fp32 by < 1 % of its spread.
    assert np.abs(y16 - y32).max() < 0.01 * y32.std()
    assert np.abs(y16 - y32).max() > 0  # it really ran in half precision


def test_fp16_variant_is_cached_and_remade_when_the_model_changes(bundled_copy):
    src = load_model(bundled_copy).generator_path
    p = fp16_variant(src)
    mtime = p.stat().st_mtime_ns
    assert fp16_variant(src).stat().st_mtime_ns == mtime  # reused, not rewritten
    os.utime(src, ns=(mtime + 10**9, mtime + 10**9))
    assert fp16_variant(src).stat().st_mtime_ns > mtime


def test_fp16_variant_goes_to_the_cache_when_it_cannot_be_written_beside_the_model(bundled_copy, tmp_path, monkeypatch):
    folder = tmp_path / "model"
    shutil.copytree(bundled_copy, folder, ignore=shutil.ignore_patterns("*.fp16.onnx"))
    (folder / "generator.fp16.onnx").mkdir()  # unwritable as a file, also for root (chmod is not)
    monkeypatch.setenv("DEEPR_CACHE", str(tmp_path / "cache"))
    p = fp16_variant(folder / "generator.onnx")
    assert p.parent == tmp_path / "cache" and p.is_file()
    assert fp16_variant(folder / "generator.onnx") == p  # found there next time


def test_fp16_is_refused_on_the_cpu_in_one_sentence(bundled_copy):
    with pytest.raises(InputError, match="fp16 runs on GPU providers"):
        RefocusJob(np.ones((256, 256), np.float32), bundled_copy, precision="fp16", providers="cpu")


def test_io_binding_gives_the_same_image_and_dpm(tiny_model):
    rng = np.random.default_rng(2)
    img = rng.random((150, 170)).astype(np.float32) * 50
    a, da = RefocusJob(img, tiny_model, dpm=True, tile=64, overlap=16).run()
    job = RefocusJob(img, tiny_model, dpm=True, tile=64, overlap=16, io_binding=True)
    assert job.io_binding and not RefocusJob(img, tiny_model).io_binding  # off by default on CPU
    b, db = job.run()
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(da, db)


def test_bench_gpu_variants_explained_without_a_gpu(tiny_model):
    res = run_bench(tiny_model, sizes=[64], repeats=1, threads=1, torch_eager=False, baselines=False,
                    variants=("fp16", "dpm_no_iobinding", "dpm", "nonsense"))
    why = res["variants_unavailable"]
    assert "GPU provider" in why["fp16"] and "GPU provider" in why["dpm_no_iobinding"]
    assert "unknown variant" in why["nonsense"]
    assert res["sizes"]["64"]["engine_dpm_mp_s"] > 0


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="a CUDA build is installed")
def test_bench_on_a_gpu_provider_that_is_absent_says_so(tiny_model):
    with pytest.warns(RuntimeWarning, match="not available"), pytest.raises(InputError, match="did not start"):
        run_bench(tiny_model, sizes=[64], repeats=1, torch_eager=False, baselines=False, provider="cuda")


@pytest.mark.parametrize("batch", [1, 3])
def test_pipelined_run_equals_the_sequential_one(tiny_model, batch):
    """The GPU pipeline (network in a worker thread, next batch prepared meanwhile), forced on the CPU."""
    rng = np.random.default_rng(3)
    img = (rng.random((2, 230, 250)) * 900).astype(np.uint16)  # two planes, several tile rows and columns
    a, da = RefocusJob(img, tiny_model, dpm=True, tile=64, overlap=16, batch=batch, axes="ZYX").run()
    job = RefocusJob(img, tiny_model, dpm=True, tile=64, overlap=16, batch=batch, axes="ZYX", pipeline=True, io_binding=True)
    assert job.pipeline and not RefocusJob(img, tiny_model, axes="ZYX").pipeline  # off by default on CPU
    b, db = job.run()
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(da, db)


def test_pipelined_run_cancels_cleanly(tiny_model):
    import threading

    from napari_deepr.errors import Cancelled

    img = np.random.default_rng(4).random((300, 300)).astype(np.float32)
    stop = threading.Event()
    job = RefocusJob(img, tiny_model, tile=64, overlap=16, pipeline=True)
    with pytest.raises(Cancelled):
        for ev in job.steps(stop):
            if ev.done >= 3:
                stop.set()
    assert 3 <= job.done < job.total
    assert not [t for t in threading.enumerate() if t.name.startswith("deepr-net")]  # worker ended


def test_tile_and_batch_follow_the_memory_of_the_device(monkeypatch):
    from napari_deepr.engine import providers
    from napari_deepr.engine.settings import BYTES_PER_TILE_PIXEL, auto_batch, auto_tile

    card = load_model(BUNDLED).card  # 2048-px tiles
    tile_bytes = 2048 * 2048 * BYTES_PER_TILE_PIXEL  # ~2.3 GiB of activations per 2048² tile
    assert auto_batch(2048, 80 * 2**30) == 4  # a large GPU: the cap
    assert auto_batch(2048, 4 * tile_bytes * 2) == 2
    assert auto_batch(2048, 2**30) == 1  # never below one
    big = auto_tile(card, memory=1 << 40)
    assert big == card.tile and auto_tile(card, memory=2**30) < big
    assert auto_tile(card, memory=2**30) % card.tile_multiple == 0
    # No NVIDIA tools: unknown, and the engine falls back to host memory.
    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.setattr(providers, "_gpu_memory_cache", {})
    assert providers.gpu_free_memory() is None or isinstance(providers.gpu_free_memory(), int)
    # readings are reused for a while (asking nvidia-smi costs more than a tile)
    calls = []
    monkeypatch.setattr(providers, "_gpu_memory_cache", {})
    monkeypatch.setattr(providers, "_read_gpu_free_memory", lambda device: calls.append(device) or 8 * 2**30)
    assert providers.gpu_free_memory() == providers.gpu_free_memory() == 8 * 2**30 and calls == [0]


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="a CUDA build is installed")
def test_a_gpu_request_that_falls_back_gets_cpu_settings(tiny_model):
    with pytest.warns(RuntimeWarning, match="falling back to CPU"):
        job = RefocusJob(np.ones((100, 100), np.float32), tiny_model, providers="cuda")
    assert job.provider == "cpu" and not job.io_binding and not job.pipeline


def test_no_stray_temporary_file_when_writing_beside_the_model_fails(bundled_copy, tmp_path, monkeypatch):
    folder = tmp_path / "m2"
    shutil.copytree(bundled_copy, folder, ignore=shutil.ignore_patterns("*.fp16.onnx"))
    (folder / "dpm.fp16.onnx").mkdir()
    monkeypatch.setenv("DEEPR_CACHE", str(tmp_path / "cache2"))
    fp16_variant(folder / "dpm.onnx")
    assert sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix == ".onnx") == ["dpm.onnx", "generator.onnx"]
