"""napari reader and writer contributions: calibrated TIFF / OME-TIFF / ImageJ / zarr / folders."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_deepr import io
from napari_deepr._reader import get_reader
from napari_deepr._writer import write_image


def _stack(z=5, y=48, x=64, seed=0):
    return np.random.default_rng(seed).integers(0, 4000, (z, y, x)).astype(np.uint16)


def test_reader_imagej_stack_scale_includes_z(tmp_path):
    st = _stack()
    p = tmp_path / "stack.tif"
    tifffile.imwrite(p, st, imagej=True, resolution=(1 / 0.325, 1 / 0.325),
                     metadata={"spacing": 0.5, "unit": "um", "axes": "ZYX"})
    reader = get_reader(str(p))
    assert reader is not None
    [(data, kw, kind)] = reader(str(p))
    assert kind == "image"
    np.testing.assert_array_equal(np.asarray(data), st)
    np.testing.assert_allclose(kw["scale"], (0.5, 0.325, 0.325), rtol=1e-6)
    assert kw["axis_labels"] == ["z", "y", "x"]
    assert kw["units"] == ["µm", "µm", "µm"]
    assert kw["metadata"]["z_step_um"] == pytest.approx(0.5)


def test_reader_ome_tiff_and_folder_of_stacks(tmp_path):
    folder = tmp_path / "stacks"
    folder.mkdir()
    for i in range(2):
        io.write_image(folder / f"field{i}.ome.tif", _stack(seed=i), axes="ZYX", pixel_size_um=0.2, z_step_um=0.4)
    (folder / "notes.txt").write_text("not an image")
    reader = get_reader(str(folder))
    layers = reader(str(folder))
    assert [kw["name"] for _, kw, _ in layers] == ["field0", "field1"]
    for (data, kw, _), seed in zip(layers, range(2), strict=True):
        np.testing.assert_array_equal(np.asarray(data), _stack(seed=seed))
        np.testing.assert_allclose(kw["scale"], (0.4, 0.2, 0.2))


def test_reader_zarr_rgb_and_channels(tmp_path):
    z = tmp_path / "img.zarr"
    io.write_image(z, _stack(), axes="ZYX", pixel_size_um=0.3, z_step_um=1.0)
    [(data, kw, _)] = get_reader(str(z))(str(z))
    assert hasattr(data, "dask")  # lazy
    np.testing.assert_allclose(kw["scale"], (1.0, 0.3, 0.3))

    rgb = np.random.default_rng(1).integers(0, 255, (40, 50, 3)).astype(np.uint8)
    p = tmp_path / "bf.tif"
    io.write_image(p, rgb, axes="YXS", pixel_size_um=0.5)
    [(data, kw, _)] = get_reader(str(p))(str(p))
    assert kw["rgb"] and data.shape == rgb.shape
    np.testing.assert_allclose(kw["scale"], (0.5, 0.5))

    ch = _stack(z=2)
    p = tmp_path / "two_channels.ome.tif"
    io.write_image(p, ch, axes="CYX", pixel_size_um=0.25)
    [(data, kw, _)] = get_reader(str(p))(str(p))
    assert kw["channel_axis"] == 0 and kw["scale"] == [0.25, 0.25]


def test_reader_declines_what_it_cannot_read(tmp_path):
    (tmp_path / "a.png").write_bytes(b"\x89PNG")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert get_reader(str(tmp_path / "a.png")) is None
    assert get_reader(str(empty)) is None
    assert get_reader(str(tmp_path / "missing.tif")) is None


def test_writer_round_trip_keeps_calibration_and_metadata(tmp_path):
    out = np.random.default_rng(2).random((3, 32, 40)).astype(np.float32)
    meta = {"name": "x refocused", "scale": (0.5, 0.325, 0.325), "units": ("µm", "µm", "µm"),
            "axis_labels": ("z", "y", "x"), "rgb": False, "translate": (0, 0, 0),
            "metadata": {"model": "tiny", "provider": "cpu"}}
    [written] = write_image(str(tmp_path / "r.tif"), out, meta)
    img = io.read_image(written)
    np.testing.assert_array_equal(img.data, out)
    assert img.axes == "ZYX"
    assert img.pixel_size_um == pytest.approx(0.325) and img.z_step_um == pytest.approx(0.5)
    [(_, kw, _)] = get_reader(written)(written)
    np.testing.assert_allclose(kw["scale"], meta["scale"])
    assert kw["metadata"]["description"]["model"] == "tiny"

    dpm = np.linspace(-3, 3, 32 * 40, dtype=np.float32).reshape(32, 40)
    [w2] = write_image(str(tmp_path / "dpm.tiff"), dpm, {"scale": (0.325, 0.325), "units": ("µm", "µm")})
    back = io.read_image(w2)
    np.testing.assert_array_equal(back.data, dpm)
    assert back.pixel_size_um == pytest.approx(0.325)


def test_manifest_validates():
    npe2 = pytest.importorskip("npe2")
    pm = npe2.PluginManifest.from_distribution("napari-deepr")
    ids = {c.id for c in pm.contributions.commands}
    assert {"napari-deepr.get_reader", "napari-deepr.write_image", "napari-deepr.refocus_widget"} <= ids
