"""Optics: physical PSFs (psfmodels), defocus simulation, specimens, sample-set writer."""

import json

import numpy as np
import pytest

from napari_deepr.optics import (
    SPECIMEN_KINDS,
    Optics,
    brightfield,
    defocus,
    defocus_map,
    defocus_psf,
    make_specimen,
    psf_size,
    random_training_pair,
    simulate_stack,
    tilt_dpm,
    write_sample_set,
)
from napari_deepr.optics.psf import best_focus_offset, psf_fwhm_um

O20 = Optics()  # 20x/0.75 dry, 550 nm, 0.325 um pixels


def _rms_radius(p):
    c = p.shape[0] // 2
    yy, xx = np.mgrid[: p.shape[0], : p.shape[1]] - c
    return float(np.sqrt((p * (yy**2 + xx**2)).sum()))


@pytest.mark.parametrize("model", ["vectorial", "scalar"])
def test_in_focus_fwhm_matches_diffraction_limit(model):
    # at 20 nm sampling the pixel integration is negligible; Airy FWHM = 0.51 lambda / NA
    fine = O20.replace(pixel_size_um=0.02, model=model)
    fwhm = psf_fwhm_um(defocus_psf(0.0, fine, size=101), 0.02)
    expected = 0.51 * fine.wavelength_um / fine.na  # 0.374 um
    assert abs(fwhm - expected) / expected < 0.10, (fwhm, expected)


def test_psf_planes_sum_to_one_grow_with_defocus_and_fit_the_window():
    z = np.arange(0.0, 5.01, 1.0)
    p = defocus_psf(z, O20)
    assert p.shape[0] == len(z) and p.shape[1] == p.shape[2] == psf_size(5.0, O20)
    np.testing.assert_allclose(p.sum(axis=(1, 2)), 1.0, atol=1e-12)
    radii = [_rms_radius(q) for q in p]
    assert np.all(np.diff(radii) > 0), radii
    # the auto-sized window holds >= 98 % of the energy of a 3x larger window
    for zz in (0.0, 2.0, 5.0):
        s = psf_size(zz, O20)
        big = defocus_psf(zz, O20, size=3 * s)
        c, h = big.shape[0] // 2, s // 2
        assert big[c - h : c + h + 1, c - h : c + h + 1].sum() >= 0.98


def test_ideal_optics_symmetric_aberrated_asymmetric_and_z0_is_best_focus():
    ideal = defocus_psf([-2.0, 2.0], O20)
    assert np.abs(ideal[0] - ideal[1]).sum() < 1e-6
    aberr = O20.replace(sample_depth_um=5.0)  # emitters 5 um deep in water under a dry lens
    assert aberr.aberrated and best_focus_offset(aberr) != pytest.approx(5.0, abs=0.05)
    p = defocus_psf([-2.0, 2.0], aberr)
    assert np.abs(p[0] - p[1]).sum() > 0.05
    # z = 0 is the maximum of the on-axis intensity (best focus) for both
    for opt in (O20, aberr):
        q = defocus_psf([-0.2, 0.0, 0.2], opt)
        c = q.shape[1] // 2
        assert q[1, c, c] > q[0, c, c] and q[1, c, c] > q[2, c, c]


def test_defocus_exposure_energy_and_noise_statistics():
    obj = make_specimen("nuclei", 128, 0.325, 1)
    infocus = defocus(obj, 0.0, O20, photons=800.0, offset=100.0, noise=False)
    assert np.percentile(infocus - 100, 99.9) == pytest.approx(800.0, rel=1e-3)
    far = defocus(obj, 4.0, O20, photons=800.0, offset=100.0, noise=False)
    # a fixed exposure: defocus lowers peaks but conserves the mean signal (reflect borders)
    assert (far - 100).mean() == pytest.approx((infocus - 100).mean(), rel=0.03)
    assert far.max() < infocus.max()
    # flat field: Poisson + read noise -> variance = mean + read_noise^2
    flat = np.ones((256, 256), np.float32)
    img = defocus(flat, 1.0, O20, photons=400.0, read_noise=3.0, offset=100.0, rng=0)
    assert img.dtype == np.uint16
    sig = img.astype(float) - 100
    assert sig.mean() == pytest.approx(400.0, rel=0.01)
    assert sig.var() == pytest.approx(400.0 + 9.0, rel=0.05)


def test_defocus_map_is_exact_at_sampled_depths_and_tilt_geometry():
    obj = make_specimen("mixed", 128, 0.325, 2)
    dpm = np.zeros((128, 128), np.float32)
    dpm[:, 64:] = 2.0
    img = defocus_map(obj, dpm, O20, n_depths=2, noise=False)
    a = defocus(obj, 0.0, O20, noise=False)
    b = defocus(obj, 2.0, O20, noise=False)
    np.testing.assert_allclose(img[:, :64], a[:, :64], rtol=1e-5)
    np.testing.assert_allclose(img[:, 64:], b[:, 64:], rtol=1e-5)
    # paper: 1.5 degrees over 512 px at 0.325 um -> 4.356 um
    t = tilt_dpm((512, 512), 0.325, 1.5)
    assert float(t[-1, 0] - t[0, 0]) == pytest.approx(np.tan(np.radians(1.5)) * 511 * 0.325, rel=1e-5)
    assert float(t[-1, 0] - t[0, 0]) == pytest.approx(4.35, abs=0.02)
    assert np.allclose(t[:, 0], t[:, -1])  # direction 90 deg: constant along each row


def test_simulate_stack_ground_truth_drift_and_dpm():
    obj = make_specimen("beads", 96, 0.325, 3)
    z = [-1.0, 0.0, 1.0]
    st, gt, dpm, sh = simulate_stack(obj, z, O20, drift_px=0.5, rng=1, noise=False,
                                     return_shifts=True)
    assert st.shape == (3, 96, 96) and gt.shape == (96, 96) and dpm.shape == (3, 96, 96)
    np.testing.assert_array_equal(sh[1], 0.0)  # the z = 0 plane anchors the drift
    np.testing.assert_allclose(st[1], gt, rtol=1e-5)  # GT = expected in-focus exposure
    np.testing.assert_allclose(dpm[:, 0, 0], z)
    noisy, _, _ = simulate_stack(obj, z, O20, rng=1)
    assert noisy.dtype == np.uint16


def test_random_training_pair_fast_path_contract():
    rng = np.random.default_rng(0)
    real = [np.random.default_rng(1).random((100, 140))]
    for _ in range(4):
        x, y, z = random_training_pair(rng, patch=64, real_images=real, real_fraction=0.5)
        assert x.shape == y.shape == (64, 64) and x.dtype == y.dtype == np.float32
        assert -5.0 <= z <= 5.0 and abs(z * 10 - round(z * 10)) < 1e-6
        assert np.all(np.isfinite(x)) and y.min() >= 0
    a = random_training_pair(7, patch=64)
    b = random_training_pair(7, patch=64)
    np.testing.assert_array_equal(a[0], b[0])
    # in-focus target is sharper than a far-defocused input
    x, y, z = random_training_pair(3, patch=128, z_range_um=(4.0, 5.0), specimen_kinds=("beads",))
    assert y.std() > 0 and z >= 4.0


def test_brightfield_phase_object_reverses_contrast_absorber_sharpest_in_focus():
    rng = np.random.default_rng(0)
    from scipy import ndimage

    phi = ndimage.gaussian_filter(rng.standard_normal((96, 96)), 2.0)
    phi *= 0.2 / phi.std()  # weak phase object (unstained cells)
    stack = brightfield(np.zeros((96, 96)), [-2.0, 0.0, 2.0], O20, phase_rad=phi, noise=False)
    corr = [np.corrcoef(p.ravel(), phi.ravel())[0, 1] for p in stack]
    assert corr[0] * corr[2] < 0 and abs(corr[0]) > 0.5 and abs(corr[2]) > 0.5
    assert stack[1].std() < 0.5 * min(stack[0].std(), stack[2].std())  # least contrast at focus
    absorber = np.clip(ndimage.gaussian_filter(rng.random((96, 96)), 1.0) - 0.5, 0, None) * 4
    bf = brightfield(absorber, [0.0, 3.0], O20, noise=False)
    assert bf[0].std() > bf[1].std()
    assert float(brightfield(np.zeros((32, 32)), 0.0, O20, noise=False).mean()) == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("kind", SPECIMEN_KINDS)
def test_specimens(kind):
    a = make_specimen(kind, (64, 80), 0.325, 5)
    assert a.shape == (64, 80) and a.dtype == np.float32 and a.min() >= 0 and a.max() > 0
    np.testing.assert_array_equal(a, make_specimen(kind, (64, 80), 0.325, 5))
    with pytest.raises(ValueError):
        make_specimen("unicorns", 64, 0.325, 0)


def test_write_sample_set_calibrated(tmp_path):
    from napari_deepr.io import read_image

    files = write_sample_set(tmp_path, size=64, z_um=(-2, 0, 2), seed=1)
    assert all(f.exists() for f in files)
    side = json.loads((tmp_path / "samples.json").read_text())
    names = {f["file"] for f in side["files"]}
    assert {"ground_truth.tif", "defocus_+2.0um.tif", "zstack.tif", "tilted_1.5deg_dpm.tif"} <= names
    stack = read_image(tmp_path / "zstack.tif")
    assert stack.data.shape == (9, 64, 64)
    assert stack.pixel_size_um == pytest.approx(0.325) and stack.z_step_um == pytest.approx(0.5)


def test_texture_family_spans_speckle_to_smooth():
    # the point of the family is a wide range of spectra: the share of energy at the finest scales
    # (above a quarter of the sampling frequency) must vary by an order of magnitude between draws
    fine = []
    for seed in range(12):
        a = make_specimen("texture", 128, 0.325, seed).astype(float)
        p = np.abs(np.fft.fft2(a - a.mean())) ** 2
        f = np.hypot(*np.meshgrid(np.fft.fftfreq(128), np.fft.fftfreq(128), indexing="ij"))
        fine.append(p[f > 0.25].sum() / p.sum())
    assert max(fine) > 10 * min(fine)


def test_random_surface_dpm_span_mean_smoothness_and_variety():
    from napari_deepr.optics import random_surface_dpm

    maps = [random_surface_dpm((160, 200), 2.5, seed) for seed in range(6)]
    for m in maps:
        assert m.shape == (160, 200) and m.dtype == np.float32
        assert np.ptp(m) == pytest.approx(2.5, rel=1e-5) and abs(float(m.mean())) < 1e-5
        # Smooth: no pixel step anywhere near the span (a plane over 200 px steps 2.5/200 per px).
        assert max(np.abs(np.diff(m, axis=0)).max(), np.abs(np.diff(m, axis=1)).max()) < 0.1
    # Tilts, bowls and waves: the maps are not one shape rescaled.
    corr = np.corrcoef([m.ravel() for m in maps])
    assert np.abs(corr[np.triu_indices(6, 1)]).min() < 0.9
    assert not random_surface_dpm((32, 32), 0.0, 1).any()


def test_random_training_pair_surfaces_map_the_defocus_of_every_pixel():
    kw = {"patch": 128, "specimen_kinds": ("tissue",), "photons_range": (3000.0, 3000.0),
          "read_noise_range": (1.0, 1.0)}
    x, y, z = random_training_pair(5, z_range_um=(0.0, 4.5), surface_fraction=1.0, surface_span_um=(4.0, 4.5), **kw)
    assert z.shape == (128, 128) and z.dtype == np.float32
    assert z.min() >= 0.0 and z.max() <= 4.5 and np.ptp(z) > 1.0
    # Independent physics check: where the map says the sample is nearer focus, the image keeps
    # more of the in-focus image's fine detail.
    def hf(a):
        a = a - np.mean(a)
        return np.abs(np.diff(a, axis=0))[:, :-1] + np.abs(np.diff(a, axis=1))[:-1, :]

    near = z[:-1, :-1] < np.percentile(z, 25)
    far = z[:-1, :-1] > np.percentile(z, 75)
    ratio = hf(x) / (hf(y).mean() + 1e-9)
    assert ratio[near].mean() > 1.5 * ratio[far].mean()
    # A pinned range (how validation sets are drawn) gives the same pair whatever the option.
    a = random_training_pair(11, z_range_um=(2.0, 2.0), surface_fraction=0.0, **kw)
    b = random_training_pair(11, z_range_um=(2.0, 2.0), surface_fraction=0.7, **kw)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[2] == b[2] == 2.0


def test_surface_depths_stay_on_the_grid_inside_the_range(monkeypatch):
    """PSF banks hold planes only inside the trained range, on the z grid: surfaces must not ask for more."""
    import napari_deepr.optics.simulate as sim
    import napari_deepr.optics.training_pairs as tp

    seen = []
    blend = tp._blend

    def spy(b, dpm, depths, optics):
        seen.append((np.asarray(depths).copy(), np.asarray(dpm).copy()))
        return blend(b, dpm, depths, optics)

    monkeypatch.setattr(tp, "_blend", spy)
    for lo, hi in ((0.0, 4.5), (-4.9, 4.9), (0.3, 4.7)):
        for seed in range(4):
            sim.random_training_pair(seed, patch=64, z_range_um=(lo, hi), surface_fraction=1.0,
                                     surface_span_um=(3.0, 12.0), specimen_kinds=("beads",))
            depths, dpm = seen[-1]
            assert depths.min() >= lo - 1e-9 and depths.max() <= hi + 1e-9
            np.testing.assert_allclose(depths / 0.2, np.round(depths / 0.2), atol=1e-6)
            assert depths.min() <= dpm.min() + 1e-6 and depths.max() >= dpm.max() - 1e-6
            # centred on its mid-range, a surface is not clipped into plateaus at the range ends
            assert np.mean((dpm == dpm.min()) | (dpm == dpm.max())) < 0.01
    with pytest.raises(ValueError, match="surface_span_um"):
        random_training_pair(0, patch=64, surface_fraction=0.5, surface_span_um=2.0)


def test_near_focus_fraction_draws_near_focus_and_leaves_defaults_alone():
    from napari_deepr.optics.simulate import random_training_pair

    near = [random_training_pair(i, patch=32, near_focus_fraction=1.0, specimen_kinds=("beads",))[2] for i in range(25)]
    assert all(abs(z) <= 1.0 + 1e-9 for z in near)
    # an option left at 0 draws nothing: the same seed gives the same pair as before the option existed
    a = random_training_pair(3, patch=32, specimen_kinds=("nuclei",))
    b = random_training_pair(3, patch=32, specimen_kinds=("nuclei",), near_focus_fraction=0.0, smooth_fraction=0.0,
                             thick_fraction=0.0)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    # a pinned range (validation) ignores the near-focus band
    assert random_training_pair(1, patch=32, z_range_um=(4.0, 4.0), near_focus_fraction=1.0)[2] == 4.0


def test_smooth_objects_keep_a_smooth_in_focus_target():
    from scipy import ndimage

    from napari_deepr.optics.simulate import random_training_pair

    def sharpness(img):  # high-frequency energy relative to the signal's variance
        return float(ndimage.laplace(img.astype(np.float64)).var() / img.var())

    sharp = [sharpness(random_training_pair(i, patch=96, specimen_kinds=("nuclei",))[1]) for i in range(4)]
    soft = [sharpness(random_training_pair(i, patch=96, specimen_kinds=("nuclei",), smooth_fraction=1.0,
                                           smooth_sigma_um=(0.5, 0.8))[1]) for i in range(4)]
    # a Gaussian of sigma >= 1.5 px removes most of the Laplacian energy the in-focus PSF passes
    assert np.mean(soft) < 0.5 * np.mean(sharp)


def test_thick_sample_offsets_stay_inside_the_range_and_add_haze_to_the_target():
    from napari_deepr.optics.simulate import _thick_offset, random_training_pair

    rng = np.random.default_rng(0)
    for z in np.round(np.arange(-5, 5.01, 0.1), 6):
        d = _thick_offset(float(z), -5.0, 5.0, (2.0, 5.0), 0.1, rng)
        assert d is not None and 2.0 - 1e-9 <= abs(d) <= 5.0 + 1e-9
        assert -5 - 1e-9 <= d <= 5 + 1e-9 and -5 - 1e-9 <= z + d <= 5 + 1e-9
        assert abs(d * 10 - round(d * 10)) < 1e-6  # on the 0.1 µm grid a PSF bank holds
    assert _thick_offset(0.0, -1.0, 1.0, (2.0, 5.0), 0.1, rng) is None  # no room: no second layer
    # a second layer of equal signal, blurred at 2-5 µm, adds to the target's mean but little to its peaks
    def floor(thick):
        vals = []
        for i in range(6):
            t = random_training_pair(i, patch=96, specimen_kinds=("beads",), background_fraction=(0.0, 0.0),
                                     thick_fraction=thick, thick_weight=(1.0, 1.0))[1]
            vals.append(t.mean() / np.percentile(t, 99.9))
        return np.array(vals)

    assert np.all(floor(1.0) > 1.2 * floor(0.0))


def test_real_images_are_used_at_several_scales():
    from napari_deepr.optics.simulate import _real_crop

    img = np.zeros((200, 200))
    img[90:110, 90:110] = 1.0  # a 20 px square
    big = _real_crop(img, 200, np.random.default_rng(0), scale=2.0)
    small = _real_crop(img, 100, np.random.default_rng(0), scale=0.5)
    assert 1400 < (big > 0.5 * big.max()).sum() < 1800  # 40 px square: 1600 px
    assert 70 < (small > 0.5 * small.max()).sum() < 130  # 10 px square: 100 px
