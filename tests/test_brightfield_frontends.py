"""RGB brightfield in the front ends without a trained model: model choice, dtype kept, demo case."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_deepr import io
from napari_deepr.cli import main
from napari_deepr.engine.domain import model_for_image
from napari_deepr.engine.model import load_model
from onnx_builders import make_model_folder


@pytest.fixture
def bf_models(tmp_path, monkeypatch):
    """A fake RGB brightfield model and a fake gray fluorescence one on the model search path."""
    root = tmp_path / "models"
    bf = make_model_folder(root, "fake-bf", channels=3, modality="brightfield", photometric="rgb")
    fl = make_model_folder(root, "fake-fluo", channels=1, modality="widefield fluorescence")
    monkeypatch.setenv("DEEPR_MODELS_PATH", str(root))
    return load_model(bf), load_model(fl)


def test_model_for_image_matches_photometry(bf_models):
    bf, fl = bf_models
    assert model_for_image("rgb", [fl, bf]) is bf
    assert model_for_image("minisblack", [bf, fl]) is fl
    assert model_for_image("rgb", [fl], default_name="fake-fluo") is fl  # none fits: the default
    assert model_for_image("rgb", [fl]) is None
    other = make_model_folder(bf.root.parent, "fake-fluo-2", channels=1, modality="fluorescence")
    assert model_for_image("minisblack", [load_model(other), fl], default_name="fake-fluo") is fl  # default first


def test_cli_rgb_uint8_through_a_three_channel_model_keeps_uint8(bf_models, tmp_path):
    bf, _ = bf_models
    src = tmp_path / "he.tif"
    rgb = np.random.default_rng(0).integers(0, 256, (96, 64, 3), dtype=np.uint8)
    tifffile.imwrite(src, rgb, photometric="rgb")
    assert main(["refocus", str(src), "-o", str(tmp_path / "out.tif"), "--model", str(bf.root), "-q"]) == 0
    out = io.read_image(tmp_path / "out.tif")
    assert out.data.dtype == np.uint8 and out.data.shape == rgb.shape
    # the fake generator is near the identity, so the clipped uint8 output stays close to the input
    assert np.abs(out.data.astype(int) - rgb).mean() < 40


def test_demo_brightfield_case_runs_only_with_a_brightfield_model(bf_models, tmp_path, capsys, monkeypatch):
    from napari_deepr import demo

    assert demo.find_brightfield_model() is bf_models[0]
    res = demo.run_brightfield_demo(tmp_path / "bf", bf_models[0], size=96)
    out = io.read_image(res["refocused"])
    assert out.data.dtype == np.uint8 and out.data.shape == (96, 96, 3)
    assert "ssim" in res and (tmp_path / "bf" / "he_comparison.png").is_file()
    # without a brightfield model the demo says so in one sentence (the fluorescence case is stubbed)
    monkeypatch.setenv("DEEPR_MODELS_PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: {"comparison": "stub"})
    assert demo.find_brightfield_model() is None
    assert main(["demo", "-o", str(tmp_path / "q")]) == 0
    text = capsys.readouterr().out
    assert demo.NO_BRIGHTFIELD_MODEL in text


def test_brightfield_sample_is_defocused_rgb_with_an_rgb_truth():
    from napari_deepr.demo import brightfield_sample

    img, truth, _ = brightfield_sample(size=96, z_um=6.0, photons=1e8)
    assert img.dtype == np.uint8 and img.shape == truth.shape == (96, 96, 3)
    grad = lambda a: float(np.abs(np.diff(a.astype(np.float64), axis=1)).mean())  # noqa: E731
    assert grad(truth) > 1.5 * grad(img)  # the input is blurred
    np.testing.assert_allclose(img.mean(axis=(0, 1)), truth.mean(axis=(0, 1)), rtol=0.03)  # energy kept


@pytest.mark.gui
def test_refocus_widget_picks_the_model_that_fits_the_layer(bf_models, make_napari_viewer):
    pytest.importorskip("napari")
    from napari_deepr._widgets.refocus import RefocusWidget

    bf, fl = bf_models
    viewer = make_napari_viewer()
    rgb = viewer.add_image(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8), rgb=True, name="he")
    w = RefocusWidget(viewer)
    assert w.selected_layer() is rgb and w.model_combo.currentData() == str(bf.root)
    gray = viewer.add_image(np.random.default_rng(1).random((64, 64)).astype(np.float32), name="nuclei")
    viewer.layers.selection.active = gray
    assert w.selected_layer() is gray
    assert load_model(w.model_combo.currentData()).card.channels == 1  # the default / a fluorescence model
    # once the user picks a model, changing the layer no longer switches it
    w.model_combo.setCurrentIndex(w.model_combo.findData(str(bf.root)))
    viewer.layers.selection.active = rgb
    viewer.layers.selection.active = gray
    assert w.model_combo.currentData() == str(bf.root)
