"""Out-of-core and dask.distributed refocus: identical to the in-memory engine, calibration kept."""

from __future__ import annotations

import numpy as np
import pytest

import napari_deepr
from napari_deepr import io
from napari_deepr.cli import main
from napari_deepr.engine.distributed import refocus_file, refocus_lazy


def _img(shape, seed=0):
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    return (gaussian_filter(rng.random(shape), 2) * 3000 + 200).astype(np.uint16)


def test_out_of_core_file_to_file_matches_in_memory(tiny_model, tmp_path, capsys):
    a = _img((300, 260))
    src = io.write_image(tmp_path / "big.tif", a, axes="YX", pixel_size_um=0.325)
    ref, ref_dpm = napari_deepr.refocus(a, tiny_model, dpm=True, tile=64, overlap=32)
    rc = main(["refocus", str(src), "-o", str(tmp_path / "out.tif"), "--dpm", str(tmp_path / "dpm.zarr"),
               "--model", str(tiny_model), "--tile", "64", "--overlap", "32", "--out-of-core", "-q"])
    assert rc == 0
    out = io.read_image(tmp_path / "out.tif")
    assert out.pixel_size_um == pytest.approx(0.325)
    assert np.array_equal(np.asarray(out.data), ref)
    dpm = io.read_image(tmp_path / "dpm.zarr")
    assert dpm.pixel_size_um == pytest.approx(0.325) and np.array_equal(np.asarray(dpm.data), ref_dpm)
    assert not list(tmp_path.glob(".*partial*"))


def test_local_cluster_is_bit_identical(tiny_model, tmp_path):
    distributed = pytest.importorskip("distributed")
    a = _img((2, 230, 200), seed=4)
    src = io.write_image(tmp_path / "stack.tif", a, axes="ZYX", pixel_size_um=0.5, z_step_um=1.0)
    local = refocus_lazy(a, tiny_model, axes="ZYX", dpm=True, tile=64, overlap=32)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with distributed.Client(cluster) as client:
            scattered = refocus_lazy(a, tiny_model, axes="ZYX", dpm=True, tile=64, overlap=32, scheduler=client, rows_per_strip=1)
            # 0.5 µm pixels on the tiny model's card sampling: a scheduler does not resample (yet), so this
            # bit-identity check runs at the input's sampling.
            info = refocus_file(io.read_image(src), tmp_path / "out.zarr", model=tiny_model, tile=64, overlap=32, resample=False,
                                scheduler=cluster.scheduler_address, rows_per_strip=2)
    assert np.array_equal(scattered.output, local.output) and np.array_equal(scattered.dpm, local.dpm)
    out = io.read_image(tmp_path / "out.zarr")
    assert out.axes == "ZYX" and out.z_step_um == 1.0
    assert np.array_equal(np.asarray(out.data), local.output)
    assert info["scheduler"].startswith("tcp://")


# -- streaming chosen by default for large inputs ---------------------------------------------------
def test_should_stream_follows_free_memory_and_file_size():
    from napari_deepr.engine.settings import STREAM_FILE_BYTES, should_stream

    gib = 2**30
    slide = (8192, 8192)  # 256 MiB of float32 results
    assert not should_stream(slide, free=16 * gib)  # an array in memory whose results fit: memory
    assert should_stream(slide, free=gib // 2)  # results over a quarter of free memory: disk
    assert should_stream(slide, 1, input_bytes=128 * 2**20, free=2 * gib)  # DPM and the input count too
    assert should_stream(slide, from_file=True, free=64 * gib)  # a whole slide from a file: disk
    small = (2048, 2048)
    assert STREAM_FILE_BYTES > 4 * 2048 * 2048 and not should_stream(small, from_file=True, free=64 * gib)


def test_cli_streams_a_large_file_by_itself_and_in_memory_forces_memory(tiny_model, tmp_path, monkeypatch, capsys):
    import json

    from napari_deepr.engine import settings as engine

    a = _img((300, 260), seed=2)
    src = io.write_image(tmp_path / "in.tif", a, axes="YX", pixel_size_um=0.325)
    ref = napari_deepr.refocus(a, tiny_model, tile=64, overlap=32)
    monkeypatch.setattr(engine, "STREAM_FILE_BYTES", 1000)  # this small file counts as a whole slide
    args = ["--model", str(tiny_model), "--tile", "64", "--overlap", "32", "-q"]
    assert main(["refocus", str(src), "-o", str(tmp_path / "s.tif"), *args]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["streamed"].startswith("chosen") and "peak_rss_mb" in info
    assert np.array_equal(np.asarray(io.read_image(tmp_path / "s.tif").data), ref)
    assert main(["refocus", str(src), "-o", str(tmp_path / "m.tif"), "--in-memory", *args]) == 0
    assert "streamed" not in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert np.array_equal(np.asarray(io.read_image(tmp_path / "m.tif").data), ref)
    assert main(["refocus", str(src), "-o", str(tmp_path / "x.tif"), "--in-memory", "--out-of-core", *args]) == 2
    assert "choose one" in capsys.readouterr().err


def test_api_keeps_results_too_large_for_memory_on_disk(tiny_model, monkeypatch):
    from napari_deepr.engine import settings
    from napari_deepr.engine.refocus import RefocusJob

    a = _img((300, 260), seed=3)
    ref = napari_deepr.refocus(a, tiny_model, tile=64, overlap=32, pixel_size_um=0.325)
    monkeypatch.setattr(settings, "available_memory", lambda: 4 * a.size)  # the results would take it all
    job = RefocusJob(a, tiny_model, tile=64, overlap=32, pixel_size_um=0.325)
    assert job.streaming and isinstance(job.output, np.memmap) and job.arena is False
    assert np.array_equal(job.run(), ref)
    out = napari_deepr.refocus(a, tiny_model, tile=64, overlap=32, pixel_size_um=0.325, stream=False)
    assert not isinstance(out, np.memmap) and np.array_equal(out, ref)


def test_the_streaming_tile_fits_its_memory_budget():
    from pathlib import Path

    from napari_deepr.engine.model import load_model
    from napari_deepr.engine.settings import BYTES_PER_TILE_PIXEL, STREAM_TILE_BUDGET, auto_tile

    card = load_model(Path(__file__).resolve().parents[1] / "models" / "deepr-fluo-20x").card
    tile = auto_tile(card, memory=64 * 2**30, budget_bytes=STREAM_TILE_BUDGET)
    assert tile * tile * BYTES_PER_TILE_PIXEL <= STREAM_TILE_BUDGET < (tile + 32) ** 2 * BYTES_PER_TILE_PIXEL
    assert tile == 1312 and auto_tile(card, memory=64 * 2**30) == card.tile  # without a budget: unchanged
