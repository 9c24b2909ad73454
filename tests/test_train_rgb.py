"""The trainer's channel count: RGB brightfield data (three-channel generator, per-channel z-score) and gray, card to load_model."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")
pytest.importorskip("pytorch_msssim")

from napari_deepr.train.__main__ import main  # noqa: E402
from napari_deepr.train.data import SyntheticSource, load_real_images  # noqa: E402

# cheap brightfield pairs: few condenser points, coarse condenser grid at every defocus
FAST_BF = {"generator": "random_brightfield_pair", "z_range_um": [-4, 4], "condenser_ratio_range": [0.3, 0.3],
           "max_walkoff_um": 10.0, "source_step": 0.5}
TINY = ["--base", "4", "--d-base", "4", "--batch", "2", "--g-steps", "1", "--d-steps", "1", "--threads", "2"]


def test_brightfield_source_gives_three_channels_zscored_per_channel():
    src = SyntheticSource(dict(FAST_BF, validation_pairs=3), 64, seed=0, workers=0)
    try:
        assert src.channels == 3
        x, y, z = src.sample(np.random.default_rng(0), 2)
        assert x.shape == y.shape == (2, 3, 64, 64) and z.shape == (2,) and np.all(np.abs(z) <= 4)
        np.testing.assert_allclose(x.mean(axis=(2, 3)), 0, atol=1e-4)
        np.testing.assert_allclose(x.std(axis=(2, 3)), 1, atol=1e-3)
        vx, _, vz = src.validation()
        assert vx.shape == (3, 3, 64, 64)
        np.testing.assert_allclose(vz, [-4, 0, 4], atol=1e-6)
        assert src.info["optics"]["wavelengths_um"] == [0.61, 0.54, 0.47]
        assert src.info["dpm_sign_meaningful"] is True  # the weak phase tells +z from -z
        assert src.info["provenance"]["simulator"].endswith("brightfield.random_brightfield_pair")
    finally:
        src.close()


def test_rgb_real_images_are_loaded_in_colour_and_gray_ones_skipped(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    rng = np.random.default_rng(0)
    tifffile.imwrite(tmp_path / "he.tif", rng.integers(0, 255, (40, 48, 3), dtype=np.uint8), photometric="rgb")
    tifffile.imwrite(tmp_path / "gray.tif", rng.integers(0, 255, (40, 48), dtype=np.uint8))
    rgb = load_real_images(tmp_path, rgb=True)
    assert len(rgb) == 1 and rgb[0].shape == (40, 48, 3)
    assert len(load_real_images(tmp_path)) == 2  # the gray path keeps both (RGB as inverted mean)


GRAY = {"z_range_um": [-3, 3], "specimen_kinds": ["tissue"]}


@pytest.mark.slow
@pytest.mark.parametrize("channels", [1, 3])
def test_tiny_model_of_each_channel_count_trains_exports_and_loads(tmp_path, capsys, channels):
    """The trainer takes the data's channel count through to the card, the ONNX graphs and load_model,
    and model.json is exactly what ModelCard writes (and what the ONNX metadata says)."""
    from napari_deepr.engine.contract import CARD_FILE, GENERATOR_FILE, META_PREFIX
    from napari_deepr.engine.model import ModelCard, load_model

    cfg = tmp_path / "data.json"
    cfg.write_text(json.dumps({"synthetic": dict(FAST_BF if channels == 3 else GRAY, validation_pairs=2)}))
    out = tmp_path / "m"
    rc = main([str(cfg), "-o", str(out), "--patch", "64", "--iterations", "2", "--dpm-iterations", "2",
               "--workers", "0", "--val-pairs", "2", "--dpm-target", "magnitude", "--from-scratch", "--json", *TINY])
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rc == 0, events[-1]
    # graphs traced at setup for this channel count are filled at the end, never traced twice
    assert next(e for e in events if e["event"] == "export")["traced"] is False
    written = json.loads((out / CARD_FILE).read_text())
    assert ModelCard.from_dict(written).to_dict() == written  # the card round-trips unchanged
    assert written["channels"] == channels and written["has_dpm"] is True and written["dpm_target"] == "magnitude"
    assert written["normalization"] == ("zscore_per_plane" if channels == 1 else "zscore_per_plane_per_channel")
    assert written["photometric"] == ("minisblack" if channels == 1 else "rgb")
    assert written["architecture"]["base"] == 4 and written["versions"]["torch"] == torch.__version__
    import onnx

    graph = onnx.load(str(out / GENERATOR_FILE), load_external_data=False)
    meta = {p.key[len(META_PREFIX):]: json.loads(p.value) for p in graph.metadata_props if p.key.startswith(META_PREFIX)}
    assert {k: meta[k] for k in written} == written  # the ONNX metadata carries the same card
    assert graph.graph.input[0].type.tensor_type.shape.dim[1].dim_value == channels
    model = load_model(out)
    assert model.card.channels == channels and model.has_dpm
    loaded = model.card.to_dict()  # model.json over the ONNX metadata, which adds the graph's role
    assert {k: loaded[k] for k in written} == written and set(loaded) - set(written) == {"role", "feature_names"}
    shape = (64, 96) if channels == 1 else (64, 96, 3)
    img = np.random.default_rng(1).integers(0, 255, shape, dtype=np.uint8)
    import napari_deepr

    res, dpm = napari_deepr.refocus(img, model=out, dpm=True)
    assert res.shape == img.shape and dpm.shape == (64, 96) and np.all(np.isfinite(dpm))
    assert (out / "previews").is_dir() and any((out / "previews").glob("*.png"))
    if channels == 3:
        from napari_deepr.engine.domain import model_modality

        assert written["modality"] == "brightfield" and written["defocus_range_um"] == [-4.0, 4.0]
        assert model_modality(model.card) == ("brightfield", "rgb")
        with pytest.raises(Exception, match="RGB|gray|channel"):
            napari_deepr.refocus(img[..., 0], model=out)  # a gray image through an RGB model is refused
