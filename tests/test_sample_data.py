"""napari sample data: deterministic, calibrated, and openable in a viewer."""

import numpy as np
import pytest

from napari_deepr._sample_data import sample_defocused, sample_tilted, sample_zstack

PX = 0.325


@pytest.mark.parametrize("factory", [sample_defocused, sample_tilted, sample_zstack])
def test_layer_data_tuples_are_calibrated_and_deterministic(factory):
    layers = factory()
    again = factory()
    for (data, attrs, kind), (data2, _, _) in zip(layers, again):
        assert kind == "image"
        assert data.shape[-2:] == (512, 512)
        assert tuple(attrs["scale"][-2:]) == (PX, PX)
        assert all(u == "µm" for u in attrs["units"])
        assert attrs["metadata"]["simulated"] is True
        np.testing.assert_array_equal(data, data2)


def test_tilt_and_stack_metadata():
    layers = {a["name"]: (d, a) for d, a, _ in sample_tilted()}
    dpm, attrs = layers["true defocus map (µm)"]
    assert float(dpm.max() - dpm.min()) == pytest.approx(4.35, abs=0.02)  # 1.5 deg over 512 px
    assert float(dpm.min()) > 0.0 and float(dpm.max()) < 5.0 and float(dpm.mean()) == pytest.approx(2.5, abs=0.01)
    assert attrs["contrast_limits"][0] == -attrs["contrast_limits"][1]
    stack, attrs = next((d, a) for d, a, _ in sample_zstack() if d.ndim == 3)
    assert stack.shape[0] == 25 and attrs["scale"] == (0.5, PX, PX)
    z = np.asarray(attrs["metadata"]["z_um"])
    assert z[attrs["metadata"]["in_focus_index"]] == 0.0


@pytest.mark.gui
@pytest.mark.parametrize("key", ["defocused", "tilted", "zstack"])
def test_samples_open_in_napari_with_scale(make_napari_viewer, key):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-deepr", key)
    assert len(viewer.layers) >= 2
    for layer in viewer.layers:
        assert tuple(layer.scale[-2:]) == pytest.approx((PX, PX))
        assert all(str(u) in ("micrometer", "µm") for u in layer.units)
    if key == "zstack":
        assert viewer.layers[-1].scale[0] == pytest.approx(0.5)
        assert viewer.dims.ndim == 3
