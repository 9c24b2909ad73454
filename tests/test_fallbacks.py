"""Reduced precision and providers that fail fall back to the next choice with one warning.

Everything here runs on onnxruntime's CPU provider: its float16 kernels stand in for a GPU's (the
engine only refuses fp16 on the CPU for speed, so the tests let the CPU count as an fp16 provider),
and GPU providers are imitated by sessions that fail the way a real one does (not started, or an
error while running). Speed is never measured here.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from napari_deepr.engine import fp16 as fp16_mod
from napari_deepr.engine import providers as providers_mod
from napari_deepr.engine import runner as runner_mod
from napari_deepr.engine import settings as settings_mod
from napari_deepr.engine.model import load_model
from napari_deepr.engine.providers import clear_sessions, get_session
from napari_deepr.engine.refocus import RefocusJob
from napari_deepr.engine.settings import gpu_tile
from onnx_builders import make_dpm, make_generator

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def _ours(caught) -> list[str]:
    """The engine's own RuntimeWarnings (onnxruntime adds UserWarnings of its own)."""
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def _run(job):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = job.run()
    return out, _ours(caught)


def _job(image, model, **kw):
    """A RefocusJob and the engine warnings its construction gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        job = RefocusJob(image, model, pixel_size_um=0.325, **kw)
    return job, _ours(caught)


@pytest.fixture
def cpu_counts_as_fp16(monkeypatch):
    """Let onnxruntime's CPU provider (its float16 kernels) run fp16 graphs, as a GPU provider would."""
    from dataclasses import replace

    row = providers_mod.TRAITS_BY_ORT[CPU]
    monkeypatch.setitem(providers_mod.TRAITS_BY_ORT, CPU, replace(row, fp16=True))
    clear_sessions()
    yield
    clear_sessions()


@pytest.fixture
def image():
    rng = np.random.default_rng(3)
    return (rng.random((160, 200)) * 1000 + 100).astype(np.float32)


# -- the float16 conversion ------------------------------------------------------------------------
def _graph_with_repeated_cast(same: bool = True):
    """The shape of onnxruntime 1.31's converter output: one Cast of a shared value written twice."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    nodes = [
        helper.make_node("Relu", ["c"], ["y"], name="relu"),  # reads the cast before it is written
        helper.make_node("Cast", ["x"], ["c"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Cast", ["x"], ["c"], name="cast", to=TensorProto.FLOAT if same else TensorProto.DOUBLE),
    ]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])


def test_repeated_identical_nodes_are_dropped_and_the_graph_sorted():
    model = fp16_mod._tidy(_graph_with_repeated_cast(same=True))
    assert [n.op_type for n in model.graph.node] == ["Cast", "Relu"]
    onnx.checker.check_model(model)  # SSA form and topological order


def test_two_different_writers_of_one_name_are_refused_in_one_sentence():
    with pytest.raises(fp16_mod.Fp16Error, match="two different nodes"):
        fp16_mod._tidy(_graph_with_repeated_cast(same=False))


def test_bundled_model_converts_and_passes_its_check(bundled_copy):
    m = load_model(bundled_copy)
    gen = fp16_mod.fp16_variant(m.generator_path)
    dpm = fp16_mod.fp16_variant(m.dpm_path, feeds_from=m.generator_path)
    onnx.checker.check_model(onnx.load(str(gen)))
    # Measured on onnxruntime 1.18, 1.31 and 1.32: 1.3 % (generator) and 0.8 % (DPM) of the spread.
    assert 0 < fp16_mod.check_against_fp32(m.generator_path, gen.read_bytes()) < fp16_mod.CHECK_TOLERANCE
    assert 0 < fp16_mod.check_against_fp32(m.dpm_path, dpm.read_bytes(), feeds_from=m.generator_path) < fp16_mod.CHECK_TOLERANCE


# -- fp16 graph failures -> fp32, one warning --------------------------------------------------------
def _overflowing_model(folder):
    """A generator that is exact in float32 but overflows float16 (×1e5, then ×1e-5)."""
    folder.mkdir()
    base = make_generator(folder / "plain.onnx")
    g = onnx.load(str(base))
    out = g.graph.node[0].output[0]
    g.graph.node[0].output[0] = "sharp"
    g.graph.initializer.extend([numpy_helper.from_array(np.array(1e5, np.float32), "big"),
                                numpy_helper.from_array(np.array(1e-5, np.float32), "small")])
    g.graph.node.extend([helper.make_node("Mul", ["sharp", "big"], ["scaled"]),
                         helper.make_node("Mul", ["scaled", "small"], [out])])
    onnx.checker.check_model(g)
    onnx.save(g, str(folder / "generator.onnx"))
    os.unlink(base)
    make_dpm(folder / "dpm.onnx")
    (folder / "model.json").write_text('{"name": "overflow", "version": "0", "modality": "test", "channels": 1, '
                                       '"pixel_size_um": 0.325, "tile_multiple": 32, "tile": 128, "overlap": 32}')
    return folder


def test_fp16_on_the_cpu_kernels_runs_and_stays_close(tiny_model, image, cpu_counts_as_fp16):
    ref = RefocusJob(image, tiny_model, pixel_size_um=0.325, providers="cpu").run()
    job, warned = _job(image, tiny_model, precision="fp16", providers="cpu")
    assert job.precision == "fp16" and job.provider == "cpu" and warned == []
    out, ran = _run(job)
    assert ran == [] and job.generator_path.name.endswith(".fp16.onnx")
    # The tiny model's weights are exact in float16 (onnxruntime may even fold the casts away), so
    # only closeness is asserted; the bundled model's half-precision difference is checked above.
    assert np.abs(out - ref).max() < 2e-3 * ref.std()


def test_a_broken_fp16_file_falls_back_to_fp32_with_one_warning(tiny_model, image, cpu_counts_as_fp16, tmp_path):
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(tiny_model, folder, ignore=shutil.ignore_patterns("*.fp16.onnx"))
    (folder / "generator.fp16.onnx").write_bytes(b"not an onnx file")  # newer than its source: used as is
    ref = RefocusJob(image, folder, pixel_size_um=0.325, providers="cpu").run()
    job, warned = _job(image, folder, precision="fp16", providers="cpu", dpm=True)
    assert len(warned) == 1 and "fp16 on cpu could not start" in warned[0] and "in fp32" in warned[0]
    assert job.precision == "fp32" and job.provider == "cpu"
    (out, dpm), ran = _run(job)
    assert ran == [] and np.array_equal(out, ref)
    assert job.warnings == warned  # kept for front ends, and marked as already said
    assert job.announced == set(warned)


def test_a_failing_conversion_falls_back_with_one_warning(tiny_model, image, cpu_counts_as_fp16, monkeypatch, tmp_path):
    import shutil

    folder = tmp_path / "noconv"
    shutil.copytree(tiny_model, folder, ignore=shutil.ignore_patterns("*.fp16.onnx"))

    def refuse(model):
        raise fp16_mod.Fp16Error("The float16 conversion failed (imitated).")

    monkeypatch.setattr(fp16_mod, "convert", refuse)
    job, warned = _job(image, folder, precision="fp16", providers="cpu")
    assert len(warned) == 1 and "imitated" in warned[0] and job.precision == "fp32"


def test_an_fp16_graph_that_overflows_is_caught_when_converted(tmp_path, image, cpu_counts_as_fp16):
    folder = _overflowing_model(tmp_path / "ovf")
    job, warned = _job(image, folder, precision="fp16", providers="cpu")
    assert len(warned) == 1 and "non-finite" in warned[0] and job.precision == "fp32"
    assert np.isfinite(job.run()).all()


def test_an_fp16_graph_that_overflows_while_running_falls_back_once(tmp_path, image, cpu_counts_as_fp16):
    folder = _overflowing_model(tmp_path / "ovf2")
    half = fp16_mod.convert(onnx.load(str(folder / "generator.onnx")))
    onnx.save(half, str(folder / "generator.fp16.onnx"))  # skips the conversion-time check
    ref = RefocusJob(image, folder, pixel_size_um=0.325, providers="cpu").run()
    job, warned = _job(image, folder, precision="fp16", providers="cpu")
    assert warned == [] and job.precision == "fp16"
    out, ran = _run(job)
    assert len(ran) == 1 and "NaN or infinite" in ran[0] and "in fp32" in ran[0]
    assert job.precision == "fp32" and np.array_equal(out, ref)


def test_the_public_api_warns_once_per_fallback(tiny_model, image, cpu_counts_as_fp16, tmp_path):
    import shutil

    import napari_deepr

    folder = tmp_path / "api"
    shutil.copytree(tiny_model, folder, ignore=shutil.ignore_patterns("*.fp16.onnx"))
    (folder / "generator.fp16.onnx").write_bytes(b"broken")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        napari_deepr.refocus(image, folder, precision="fp16", providers="cpu", pixel_size_um=0.325)
    assert len(_ours(caught)) == 1


# -- provider failures -> next provider, one warning ------------------------------------------------
def _fake_gpu(monkeypatch, fail: str):
    """Make 'cuda' look installed; its sessions fail to start (``fail='start'``) or while running."""
    real = ort.get_available_providers
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, *real()])

    class Failing:
        def __init__(self, sess):
            self._s = sess

        def __getattr__(self, name):
            return getattr(self._s, name)

        def run(self, *a, **k):
            raise RuntimeError("CUDA error: an illegal memory access was encountered (imitated)")

        def io_binding(self):
            raise RuntimeError("CUDA error: an illegal memory access was encountered (imitated)")

    def fake_get_session(path, providers, threads=None, arena=None, provider_options=None, fallback=True):
        if providers[0] != CUDA:
            return get_session(path, providers, threads, arena, provider_options, fallback)
        if fail == "start":
            return get_session(path, providers, threads, arena, provider_options, fallback)  # onnxruntime drops it
        sess, _ = get_session(path, [CPU], threads, arena)
        return Failing(sess), "cuda"

    monkeypatch.setattr(runner_mod, "get_session", fake_get_session)
    clear_sessions()


def test_a_gpu_provider_that_does_not_start_falls_back_with_one_warning(tiny_model, image, monkeypatch):
    _fake_gpu(monkeypatch, "start")
    job, warned = _job(image, tiny_model, providers="cuda")
    assert len(warned) == 1 and "cuda did not start" in warned[0] and "falling back to CPU" in warned[0]
    assert job.provider == "cpu" and not job.io_binding and not job.pipeline


@pytest.mark.parametrize("pipeline", [False, True])
def test_a_gpu_provider_that_fails_while_running_falls_back_with_one_warning(tiny_model, image, monkeypatch, pipeline):
    ref = RefocusJob(image, tiny_model, pixel_size_um=0.325, providers="cpu", dpm=True).run()
    _fake_gpu(monkeypatch, "run")
    job, warned = _job(image, tiny_model, providers="cuda", dpm=True, tile=128, pipeline=pipeline)
    assert warned == [] and job.provider == "cuda" and job.io_binding
    (out, dpm), ran = _run(job)
    assert len(ran) == 1 and "cuda failed while running" in ran[0] and "illegal memory access" in ran[0]
    assert job.provider == "cpu" and not job.io_binding
    np.testing.assert_array_equal(out, ref[0])
    np.testing.assert_array_equal(dpm, ref[1])


def test_fp16_asked_of_an_absent_gpu_runs_fp32_on_the_cpu_with_one_warning(tiny_model, image):
    if CUDA in ort.get_available_providers():
        pytest.skip("a CUDA build is installed")
    job, warned = _job(image, tiny_model, precision="fp16", providers="cuda")
    assert len(warned) == 1 and "not available" in warned[0] and "fp16 needs a GPU provider" in warned[0]
    assert job.precision == "fp32" and job.provider == "cpu"


# -- the GPU tile, from the device's memory and the image (memory query mocked) ---------------------
def test_gpu_tile_follows_free_memory_and_image_size():
    card = _card()  # 2048-px tiles, 16-px halo
    big = 139 * 2**30  # an H200
    assert gpu_tile(card, (8192, 8192), big) == settings_mod.GPU_MAX_TILE  # capped where CUDA still works
    assert gpu_tile(card, (8192, 8192), 16 * 2**30) == 2656  # a 16 GB card: a quarter of it
    assert gpu_tile(card, (8192, 8192), 16 * 2**30, batch=4) < gpu_tile(card, (8192, 8192), 16 * 2**30)
    assert gpu_tile(card, (1000, 700), big) == 1056  # one tile of the image's own (padded) size
    assert gpu_tile(card, (8192, 8192), 2**20) == 4 * card.tile_multiple  # never below four multiples
    assert gpu_tile(card, (8192, 8192), None) == card.tile  # unknown memory: the card's choice
    for mem in (3 * 2**30, 7 * 2**30, 40 * 2**30):
        assert gpu_tile(card, (5000, 3000), mem) % card.tile_multiple == 0


def _card():
    from pathlib import Path

    return load_model(Path(__file__).resolve().parents[1] / "models" / "deepr-fluo-20x").card


def test_the_engine_takes_the_gpu_tile_only_on_a_gpu(tiny_model, monkeypatch):
    from napari_deepr.engine import providers

    image = np.ones((3000, 600), np.float32)
    card = load_model(tiny_model).card
    cpu_job = RefocusJob(image, tiny_model, pixel_size_um=0.325, providers="cpu")
    assert cpu_job.tile == card.tile  # CPU behaviour unchanged: the card's tile
    _fake_gpu(monkeypatch, "run")
    monkeypatch.setattr(providers, "gpu_free_memory", lambda device=0: 80 * 2**30)
    monkeypatch.setattr(providers, "_read_gpu_free_memory", lambda device: pytest.fail("the mock is bypassed"))
    gpu_job = RefocusJob(image, tiny_model, pixel_size_um=0.325, providers="cuda")
    assert gpu_job.provider == "cuda"
    assert gpu_job.tile == gpu_tile(card, (3000, 600), 80 * 2**30) == 3040
    assert gpu_job.plan_y.n == 1 and gpu_job.plan_x.n == 1  # one call for the whole image
