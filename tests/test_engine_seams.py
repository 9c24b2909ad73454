"""The engine's seams: one settings object, one layout rule, the provider-traits table, the tile band,
results finished by the engine, and imports that point down the layers."""

from __future__ import annotations

import ast
import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import napari_deepr
from napari_deepr import io
from napari_deepr.engine import providers
from napari_deepr.engine import runner as runner_mod
from napari_deepr.engine.model import load_model
from napari_deepr.engine.refocus import RefocusJob
from napari_deepr.engine.results import (
    FILE_FIELDS,
    LAYER_FIELDS,
    STREAM_FIELDS,
    run_metadata,
    zarr_result,
)
from napari_deepr.engine.settings import RefocusSettings, gpu_tile
from napari_deepr.engine.tiling import Band, axis_weights, plan_axis
from napari_deepr.errors import ArgumentTypeError, InputError, SettingsError
from napari_deepr.layout import guess_axes, image_layout, result_shapes, store_chunks
from onnx_builders import reference_output

SRC = Path(__file__).resolve().parents[1] / "src" / "napari_deepr"
ROCM = "ROCMExecutionProvider"
CPU = "CPUExecutionProvider"


def _img(shape, seed=0):
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    return (gaussian_filter(rng.random(shape), 2) * 3000 + 200).astype(np.float32)


# -- settings ---------------------------------------------------------------------------------------
def test_settings_are_frozen_checked_once_and_the_keywords_map_onto_them(tiny_model):
    s = RefocusSettings(tile=64, overlap=32, providers=["cpu"], dpm=True)
    assert s.providers == ("cpu",)  # lists become tuples: the object is hashable and cannot change
    assert hash(s) == hash(RefocusSettings(tile=64, overlap=32, providers=("cpu",), dpm=True))
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.tile = 128
    img = _img((150, 170))
    by_object = napari_deepr.refocus(img, tiny_model, s, pixel_size_um=0.325)
    by_keywords = napari_deepr.refocus(img, tiny_model, tile=64, overlap=32, providers="cpu", dpm=True,
                                       pixel_size_um=0.325)
    assert all(np.array_equal(a, b) for a, b in zip(by_object, by_keywords, strict=True))
    np.testing.assert_allclose(by_object[0], reference_output(img), atol=1e-4 * np.ptp(img))
    # keywords change a given object; a RefocusJob keeps both and what they resolved to
    job = RefocusJob(img, tiny_model, s, dpm=False, pixel_size_um=0.325)
    assert job.settings == s.replace(dpm=False, pixel_size_um=0.325) and not job.want_dpm
    assert (job.resolved.tile, job.resolved.overlap, job.resolved.batch, job.resolved.halo) == (64, 32, 1, 16)
    assert not job.resolved.io_binding and not job.resolved.pipeline  # the CPU keeps activations on the host


@pytest.mark.parametrize("options, error, words", [
    ({"tiles": 64}, ArgumentTypeError, "Unknown refocus setting 'tiles'"),
    ({"tile": "64"}, ArgumentTypeError, "whole number"),
    ({"batch": 0}, SettingsError, "at least 1"),
    ({"precision": "fp4"}, InputError, "Unknown precision"),
    ({"precision": "bf16", "providers": "cuda"}, InputError, "bf16 runs on the CPU"),
    ({"pixel_size_um": 4000}, InputError, "not a light microscope"),
    ({"trust": 9}, InputError, "1 to 8 passes"),
])
def test_settings_refuse_in_one_sentence_before_any_model_is_read(options, error, words):
    with pytest.raises(error, match=words) as info:
        RefocusSettings().replace(**options)
    assert "\n" not in str(info.value)
    with pytest.raises(error, match=words):  # the API refuses the same way, even with a model that does not exist
        napari_deepr.refocus(np.ones((64, 64), np.float32), "no-such-model", **options)


def test_bench_variants_name_only_real_settings():
    from napari_deepr.bench import VARIANTS

    fields = {f.name for f in dataclasses.fields(RefocusSettings)}
    assert all(set(changes) <= fields for changes, _ in VARIANTS.values())


# -- one layout rule --------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, dtype, rgb, axes", [
    ((64, 80), "f4", None, "YX"),
    ((5, 64, 80), "f4", None, "ZYX"),  # a bare 3-D array is a stack everywhere (io once read it as CYX)
    ((64, 80, 3), "u1", None, "YXS"),
    ((64, 80, 3), "f4", None, "ZYX"),  # float Y×X×3 is not guessed as colours...
    ((64, 80, 3), "f4", True, "YXS"),  # ...unless the caller knows (a napari RGB layer)
    ((2, 64, 80, 3), "f4", None, "ZYXS"),
    ((2, 5, 64, 80), "u2", None, "TZYX"),
    ((2, 3, 5, 64, 80), "u2", None, "TZCYX"),
])
def test_one_rule_guesses_axes(shape, dtype, rgb, axes):
    assert guess_axes(shape, dtype=np.dtype(dtype), rgb=rgb) == axes


def test_io_the_reader_and_the_writer_follow_the_rule(tmp_path):
    import zarr

    from napari_deepr._reader import image_to_layer_data
    from napari_deepr._writer import write_image as napari_write

    stack = _img((4, 64, 80))
    z = zarr.open_array(str(tmp_path / "bare.zarr"), mode="w", shape=stack.shape, dtype="f4")
    z[:] = stack
    img = io.read_image(tmp_path / "bare.zarr")
    assert img.axes == "ZYX" and img.axes == guess_axes(stack.shape, dtype=stack.dtype)
    data, kwargs, _ = image_to_layer_data(img)
    assert "channel_axis" not in kwargs and kwargs["axis_labels"] == ["z", "y", "x"]  # one layer with a z slider
    [written] = napari_write(str(tmp_path / "back.tif"), data, dict(kwargs, rgb=False))
    back = io.read_image(written)
    assert back.axes == "ZYX" and np.array_equal(np.asarray(back.data), stack)
    io.write_image(tmp_path / "noaxes.zarr", stack)  # io's writer guesses the same way
    assert io.read_image(tmp_path / "noaxes.zarr").axes == "ZYX"


def test_layout_names_the_maps_and_every_store_is_chunked_alike(tmp_path):
    lay = image_layout((2, 300, 2500, 3), "ZYXS", channels=1)
    assert lay.rgb_axis == 3 and lay.map_axes == "ZYX" and lay.map_shape == (2, 300, 2500)
    assert lay.planes == [(z, s) for z in range(2) for s in range(3)]
    joint = image_layout((4, 3, 64, 80), "ZCYX", channels=3)
    assert joint.channel_axis == 1 and joint.map_axes == "ZYX" and result_shapes((4, 3, 64, 80), "ZCYX", 3)[1] == (4, 64, 80)
    assert store_chunks(lay.shape, lay.axes) == (1, 300, 1024, 3)
    arr = zarr_result(tmp_path / "r.zarr", lay.shape, lay.axes)
    assert arr.chunks == store_chunks(lay.shape, lay.axes)
    io.write_image(tmp_path / "w.zarr", np.zeros(lay.shape, np.float32), axes=lay.axes)
    import zarr

    assert zarr.open_group(str(tmp_path / "w.zarr"), mode="r")["0"].chunks == arr.chunks


# -- the provider-traits table: ROCm is one row -----------------------------------------------------
def _rocm_here(monkeypatch):
    """An onnxruntime that offers ROCm: its sessions are CPU sessions that report ROCm."""
    real = ort.get_available_providers
    monkeypatch.setattr(ort, "get_available_providers", lambda: [ROCM, *real()])
    get_session = providers.get_session

    def fake_get_session(path, provs, threads=None, arena=None, provider_options=None, fallback=True):
        if provs[0] != ROCM:
            return get_session(path, provs, threads, arena, provider_options, fallback)
        return get_session(path, [CPU], threads, arena)[0], "rocm"

    monkeypatch.setattr(runner_mod, "get_session", fake_get_session)


def test_rocm_is_resolved_from_its_trait_row(tiny_model, monkeypatch):
    row = providers.provider_traits("rocm")
    assert row.ort == ROCM and row.fp16 and row.auto and not row.host and row.memory == "rocm"
    _rocm_here(monkeypatch)
    assert providers.resolve_providers(None) == [ROCM, CPU]  # "auto" picks it
    assert providers.resolve_providers("rocm") == [ROCM, CPU]
    from napari_deepr.engine.quantize import precision_choices

    assert {p: usable for p, _, usable, _ in precision_choices(tiny_model)}["fp16"] is True
    # The tile comes from the AMD GPU's own memory, asked the way the row says.
    monkeypatch.setattr(providers, "rocm_free_memory", lambda device=0: 80 * 2**30)
    monkeypatch.setattr(providers, "gpu_free_memory", lambda device=0: pytest.fail("asked NVIDIA for an AMD GPU"))
    img = np.ones((3000, 600), np.float32)
    job = RefocusJob(img, tiny_model, providers="rocm", pixel_size_um=0.325)
    assert job.provider == "rocm" and job.pipeline and job.io_binding
    assert job.tile == gpu_tile(load_model(tiny_model).card, (3000, 600), 80 * 2**30)


def test_rocm_free_memory_is_read_from_rocm_smi():
    out = json.dumps({"card0": {"VRAM Total Memory (B)": "68702699520", "VRAM Total Used Memory (B)": "702699520"}})
    assert providers.parse_rocm_smi(out) == 68_000_000_000
    assert providers.parse_rocm_smi("not json") is None
    assert providers.parse_rocm_smi(json.dumps({"card0": {"GPU use (%)": "3"}})) is None


def test_every_provider_name_comes_from_the_table():
    assert list(providers.PROVIDERS) == [t.short for t in providers.TRAITS]
    from napari_deepr.engine.fp16 import FP16_PROVIDERS

    assert set(FP16_PROVIDERS) == {t.ort for t in providers.TRAITS if t.fp16}
    assert providers.provider_traits("VitisAIExecutionProvider").binding is None  # unknown: no extras assumed


# -- the band ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("length, tile, overlap", [(300, 128, 32), (200, 64, 40), (100, 128, 32)])
def test_the_band_blends_each_row_once_with_weights_that_sum_to_one(length, tile, overlap):
    py = plan_axis(length, tile, overlap, 32, 16)
    px = plan_axis(length + 17, tile, overlap, 32, 16)
    band = Band(py, px, 1, with_dpm=True)
    rng = np.random.default_rng(0)
    truth = rng.random((py.length, px.length)).astype(np.float32)
    seen = np.zeros((py.length,), int)
    image = np.zeros_like(truth)
    dpm = np.zeros_like(truth)

    def take(rows_list):
        for rows in rows_list:
            a, b = rows.y0 + rows.r0, rows.y0 + rows.r1
            seen[a:b] += 1
            image[a:b] = rows.image(0, rows.r1 - rows.r0)[0]
            dpm[a:b] = rows.dpm()

    for ky, y0 in enumerate(py.starts):
        # Every tile sees the same truth (the reflected image): the blend of identical views is the truth.
        ys = np.clip(np.arange(y0, y0 + py.tile), 0, py.length - 1)
        tiles = [(kx, x0) for kx, x0 in enumerate(px.starts)]
        out = np.stack([truth[np.ix_(ys, np.clip(np.arange(x0, x0 + px.tile), 0, px.length - 1))][None]
                        for _, x0 in tiles])
        take(band.add(ky, tiles, out, 2 * out))
    take(band.close())
    assert (seen == 1).all()  # every row handed out exactly once, in one piece of some tile row
    np.testing.assert_allclose(image, truth, atol=1e-5)
    np.testing.assert_allclose(dpm, 2 * truth, atol=1e-5)


def test_the_band_keeps_a_weight_sum_only_where_the_ramps_do_not_sum_to_one():
    from napari_deepr.engine.tiling import partition_of_unity

    wide = plan_axis(1000, 256, 64, 32, 16)
    assert partition_of_unity(wide, [axis_weights(wide, k) for k in range(wide.n)])
    assert Band(wide, wide, 1, with_dpm=False).unity
    one = plan_axis(100, 128, 32, 32, 16)
    assert Band(one, one, 1, with_dpm=False).single  # one tile of weight one: its output is the blend


# -- results and layering ---------------------------------------------------------------------------
def test_run_metadata_is_one_builder_with_a_field_list_per_kind_of_output(tiny_model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        job = RefocusJob(_img((96, 96)), tiny_model, tile=64, overlap=32)
    meta = run_metadata(job, FILE_FIELDS, source="/data/in.tif")
    assert list(meta) == list(FILE_FIELDS) and meta["source"] == "/data/in.tif" and meta["tile"] == 64
    assert meta["model"] == "tiny" and meta["pixel_size_source"] == "unknown" and meta["resampled_to_um"] is None
    stream = run_metadata(job, STREAM_FIELDS, source="s", scheduler=None)
    assert list(stream) == ["model", "provider", "tile", "overlap", "source", "scheduler"]
    layer = run_metadata(job, LAYER_FIELDS)
    assert layer["model_path"] == str(load_model(tiny_model).root) and layer["provider"] == "cpu"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


def test_imports_point_down_the_layers():
    assert not any("bench" in n for n in _imports(SRC / "engine" / "distributed.py"))
    assert not any(n.split(".")[0] == "torch" for n in _imports(SRC / "bench.py"))
    # engine/contract.py holds only names and imports nothing, so every layer may share it.
    assert not [n for n in _imports(SRC / "engine" / "contract.py") if n != "__future__"]
    for mod in ("layout.py", "io.py", "_files.py", "_readers.py"):  # the bottom layer reaches no engine
        assert not any("engine" in n and not n.endswith("contract") for n in _imports(SRC / mod)), mod
    for path in (SRC / "engine").glob("*.py"):
        assert not any("train" in n.split(".") for n in _imports(path)), path.name


def test_the_cluster_path_uses_only_public_job_members():
    tree = ast.parse((SRC / "engine" / "distributed.py").read_text())
    private = {node.attr for node in ast.walk(tree)
               if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "job"
               and node.attr.startswith("_")}
    assert private == set()
    assigned = [t for node in ast.walk(tree) if isinstance(node, ast.Assign) for t in node.targets
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "job"]
    assert assigned == []  # job.total and job.done belong to the job (use_strips, apply_writes)
