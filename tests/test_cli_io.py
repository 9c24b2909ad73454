"""`deepr` command and io: calibration survives, outputs are atomic, bad input is one sentence."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from napari_deepr import io
from napari_deepr.cli import main
from onnx_builders import reference_output


def _img(shape, seed=0):
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    return (gaussian_filter(rng.random(shape), (0,) * (len(shape) - 2) + (2, 2)) * 3000 + 200).astype(np.uint16)


def test_write_read_roundtrip_keeps_calibration(tmp_path):
    a = _img((4, 64, 80))
    for name in ("s.tif", "s.ome.tif", "s.zarr"):
        p = io.write_image(tmp_path / name, a, axes="ZYX", pixel_size_um=0.325, z_step_um=0.5, metadata={"k": 1})
        back = io.read_image(p)
        assert back.axes == "ZYX" and np.array_equal(np.asarray(back.data), a), name
        assert back.pixel_size_um == pytest.approx(0.325) and back.z_step_um == pytest.approx(0.5), name
        assert back.scale == pytest.approx((0.5, 0.325, 0.325))
    assert not list(tmp_path.glob(".*partial"))


def test_imagej_hyperstack_calibration_is_read(tmp_path):
    a = _img((5, 48, 48))
    tifffile.imwrite(tmp_path / "ij.tif", a, imagej=True, resolution=(1 / 0.2, 1 / 0.2), metadata={"spacing": 0.3, "unit": "micron", "axes": "ZYX"})
    st = io.read_stack(tmp_path / "ij.tif")
    assert st.data.shape == (5, 48, 48) and st.pixel_size_um == pytest.approx(0.2) and st.z_step_um == pytest.approx(0.3)


def test_cli_refocus_tiff_keeps_pixel_size_and_writes_dpm(tiny_model, tmp_path, capsys):
    a = _img((96, 128))
    io.write_image(tmp_path / "in.tif", a, axes="YX", pixel_size_um=0.325)
    rc = main(["refocus", str(tmp_path / "in.tif"), "-o", str(tmp_path / "out.tif"), "--model", str(tiny_model), "--dpm", str(tmp_path / "dpm.tif"), "-q"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["provider"] == "cpu" and "dpm_fit" in summary
    out = io.read_image(tmp_path / "out.tif")
    assert out.pixel_size_um == pytest.approx(0.325) and out.data.dtype == np.float32
    np.testing.assert_allclose(out.data, reference_output(a), atol=1e-4 * np.ptp(out.data))
    dpm = io.read_image(tmp_path / "dpm.tif")
    assert dpm.data.shape == a.shape and dpm.pixel_size_um == pytest.approx(0.325)
    from napari_deepr.engine.dpm import fit_surface

    surface = fit_surface(dpm.data, 0.325, image=out.data)
    assert summary["dpm_surface"]["sag_um"] == pytest.approx(surface.sag_um, rel=1e-4)
    assert summary["dpm_surface"]["shape"] == surface.shape
    from napari_deepr.engine.dpm import dpm_geometry, focus_line

    g = dpm_geometry(dpm.data, 0.325, image=out.data)  # the tiny model's DPM is signed
    line = focus_line(g.plane, dpm.data.shape, 0.325) if g.reading != "curved" else None
    assert summary.get("focus_line_px") == (line.tolist() if line is not None else None)


def test_cli_refocus_zarr_stack(tiny_model, tmp_path):
    a = _img((3, 64, 96))
    io.write_image(tmp_path / "in.zarr", a, axes="ZYX", pixel_size_um=0.5, z_step_um=1.0)
    assert main(["refocus", str(tmp_path / "in.zarr"), "-o", str(tmp_path / "out.zarr"), "--model", str(tiny_model), "-q"]) == 0
    out = io.read_image(tmp_path / "out.zarr")
    assert out.axes == "ZYX" and out.data.shape == a.shape and out.z_step_um == 1.0 and out.pixel_size_um == 0.5


def test_cli_bad_inputs_one_sentence_and_nothing_lost(tiny_model, tmp_path, capsys):
    a = _img((64, 64))
    src = io.write_image(tmp_path / "in.tif", a, axes="YX")
    before = src.read_bytes()
    assert main(["refocus", str(src), "-o", str(src), "--model", str(tiny_model)]) == 2
    assert "is the input" in capsys.readouterr().err
    assert src.read_bytes() == before
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["refocus", str(tmp_path / "notes.txt"), "-o", str(tmp_path / "o.tif"), "--model", str(tiny_model)]) == 2
    assert "not a TIFF" in capsys.readouterr().err
    (tmp_path / "fake.tif").write_bytes(b"not really a tiff")
    assert main(["refocus", str(tmp_path / "fake.tif"), "-o", str(tmp_path / "o.tif"), "--model", str(tiny_model)]) == 2
    assert "not a readable TIFF" in capsys.readouterr().err
    assert main(["refocus", str(src), "-o", str(tmp_path / "o.tif"), "--model", str(tiny_model), "--tile", "100"]) == 2
    assert "multiple of 32" in capsys.readouterr().err
    assert main(["refocus", str(src), "-o", str(tmp_path / "o.tif"), "--model", str(tiny_model), "--provider", "quantum"]) == 2
    assert "Unknown execution provider" in capsys.readouterr().err
    assert not (tmp_path / "o.tif").exists() and not list(tmp_path.glob(".*partial"))


def test_cli_models_lists_search_path(tiny_model, monkeypatch, capsys):
    monkeypatch.setenv("DEEPR_MODELS_PATH", str(tiny_model.parent))
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "tiny" in out and "0.325 µm/px" in out and "defocus -5…+5 µm" in out
