"""Stack tools: registration of defocused planes, wavelet EDOF, in-focus selection."""

import numpy as np
import pytest

from napari_deepr.optics import (
    Optics,
    brightfield,
    make_specimen,
    simulate_stack,
    tilt_dpm,
)
from napari_deepr.optics.psf import defocus_psf
from napari_deepr.optics.simulate import Blurrer, _percentile_scale, camera
from napari_deepr.science import ssim
from napari_deepr.stacks import (
    FOCUS_METHODS,
    edof_wavelet,
    estimate_shift,
    register_stack,
    select_in_focus,
)

O20 = Optics()


@pytest.mark.parametrize("kind", ["mixed", "filaments", "tissue"])
def test_registration_recovers_subpixel_shift_of_a_defocused_plane(kind):
    obj = make_specimen(kind, 256, 0.325, 7)
    b = Blurrer(obj, 40)
    infocus = b.blur(defocus_psf(0.0, O20))
    scale = _percentile_scale(infocus, 1000.0)
    rng = np.random.default_rng(0)
    ref = camera(scale * infocus, rng=rng)
    true = np.array([0.37, -1.62])  # sample moved by (dy, dx)
    mov = camera(scale * b.blur(defocus_psf(2.0, O20), tuple(true)), rng=rng)
    shift = estimate_shift(ref, mov, upsample=50)
    assert np.abs(shift + true).max() < 0.1, shift  # the registering shift undoes the motion


def test_register_stack_undoes_drift():
    obj = make_specimen("mixed", 192, 0.325, 3)
    z = np.arange(-2.0, 2.01, 0.5)
    st, _gt, _, sh = simulate_stack(obj, z, O20, drift_px=0.4, rng=5, photons=1000.0,
                                   return_shifts=True)
    reg, shifts = register_stack(st, reference=4, upsample=50)
    assert reg.dtype == np.float32 and reg.shape == st.shape
    np.testing.assert_array_equal(shifts[4], 0.0)
    assert np.abs(shifts + sh).max() < 0.1
    assert np.median(np.abs(shifts + sh)) < 0.05


def test_edof_beats_every_plane_of_a_tilted_stack():
    obj = make_specimen("mixed", 256, 0.325, 9)
    tilt = tilt_dpm((256, 256), 0.325, 3.0)  # +-2.2 um across the field
    z = np.arange(-3.0, 3.01, 0.5)
    st, gt, _ = simulate_stack(obj, z, O20, dpm_offset=tilt, rng=1, photons=1000.0)
    fused = edof_wavelet(st)
    assert fused.shape == gt.shape and fused.dtype == np.float32
    best_plane = max(ssim(p, gt) for p in st)
    assert ssim(fused, gt) > best_plane + 0.02


@pytest.fixture(scope="module")
def flat_stack():
    obj = make_specimen("mixed", 192, 0.325, 4)
    z = np.arange(-4.0, 4.01, 0.5)
    st, _, _ = simulate_stack(obj, z, O20, rng=2)
    return z, st


@pytest.mark.parametrize("method", [m for m in FOCUS_METHODS if m != "min_contrast"])
def test_in_focus_selection_returns_true_plane(flat_stack, method):
    z, st = flat_stack
    assert z[select_in_focus(st, method=method)] == 0.0


def test_in_focus_selection_per_crop_follows_a_tilt():
    obj = make_specimen("tissue", 384, 0.325, 8)
    tilt = tilt_dpm((384, 384), 0.325, 1.5)  # rows span 3.3 um
    z = np.arange(-3.0, 3.01, 0.5)
    st, _, _ = simulate_stack(obj, z, O20, dpm_offset=tilt, rng=4)
    sel = select_in_focus(st, crop=128)
    assert sel.shape == (3, 3)
    for i in range(3):
        local = tilt[i * 128 : (i + 1) * 128].mean()
        expected = int(np.argmin(np.abs(z + local)))  # plane where stage z cancels the tilt
        assert np.all(np.abs(sel[i] - expected) <= 0), (i, sel[i], expected)


def test_brightfield_phase_stack_needs_min_contrast():
    # unstained cells (phase objects): least contrast at focus, so "sharpest" picks a wrong plane
    rng = np.random.default_rng(0)
    from scipy import ndimage

    phi = ndimage.gaussian_filter(rng.standard_normal((128, 128)), 2.0)
    phi *= 0.3 / phi.std()
    z = np.arange(-3.0, 3.01, 1.0)
    st = brightfield(np.zeros((128, 128)), z, O20, phase_rad=phi, rng=1, photons=5000.0)
    assert z[select_in_focus(st, method="min_contrast")] == 0.0
    assert z[select_in_focus(st, method="nvar")] != 0.0
