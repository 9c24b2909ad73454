"""Science: focus measures and Brent search, deconvolution baselines, metrics, bead FWHM."""

import numpy as np
import pytest
from scipy import ndimage
from skimage.metrics import structural_similarity

from napari_deepr.optics import (
    Optics,
    defocus,
    defocus_psf,
    make_specimen,
    simulate_stack,
)
from napari_deepr.science import (
    FOCUS_MEASURES,
    bead_fwhm,
    best_plane,
    brent_focus_search,
    crop_edges,
    fit_gaussian_fwhm,
    landweber,
    normalized_variance,
    richardson_lucy,
    rmse,
    row_sharpness,
    ssim,
    std_focus,
    vollath4,
    vollath5,
)

O20 = Optics()


@pytest.fixture(scope="module")
def field():
    obj = make_specimen("mixed", 192, 0.325, 11)
    return obj


def test_focus_measures_match_their_definitions():
    a = np.arange(12, dtype=float).reshape(3, 4) ** 1.5 + 1
    h, w = a.shape
    v4 = sum(a[y, x] * a[y, x + 1] for y in range(h) for x in range(w - 1)) - sum(
        a[y, x] * a[y, x + 2] for y in range(h) for x in range(w - 2)
    )
    v5 = sum(a[y, x] * a[y, x + 1] for y in range(h) for x in range(w - 1)) - (w - 1) * h * a.mean() ** 2
    assert vollath4(a) == pytest.approx(v4)
    assert vollath5(a) == pytest.approx(v5)
    assert std_focus(a) == pytest.approx(np.std(a) / np.mean(a))
    assert normalized_variance(a) == pytest.approx(((a - a.mean()) ** 2).sum() / (a.size * a.mean()))


def test_every_measure_peaks_at_the_true_plane(field):
    z = np.arange(-4.0, 4.01, 0.5)
    stack, _, _ = simulate_stack(field, z, O20, rng=0, photons=500.0)
    for name in FOCUS_MEASURES:
        assert z[best_plane(stack, name)] == 0.0, name


@pytest.mark.parametrize("measure", ["vollath4", "vollath5", "std", "nvar"])
def test_brent_search_finds_focus_within_tolerance(field, measure):
    # noiseless renders: Brent must land within its 0.1 um tolerance of the true focus (z = 0)
    def render(zz):
        return defocus(field, zz, O20, noise=False)

    z_best, n = brent_focus_search(render, (-3.5, 6.5), measure, xatol=0.1)
    assert abs(z_best) <= 0.1, (measure, z_best)
    assert 4 <= n <= 20  # the paper-like count of acquisitions (~8)
    # with shot noise the search still converges near focus
    rng = np.random.default_rng(1)
    z_noisy, _ = brent_focus_search(lambda zz: defocus(field, zz, O20, rng=rng), (-3.5, 6.5), measure)
    assert abs(z_noisy) <= 0.25


def test_richardson_lucy_and_landweber_raise_ssim_at_2um(field):
    gt = defocus(field, 0.0, O20, noise=False)
    img = defocus(field, 2.0, O20, photons=500.0, rng=3).astype(float)
    psf = defocus_psf(2.0, O20)
    base = ssim(img, gt)
    rl = richardson_lucy(img, psf, 100, background=100.0)
    lw = landweber(img, psf, 100, 0.1, background=100.0)
    assert ssim(rl, gt) > base + 0.05, (base, ssim(rl, gt))
    assert ssim(lw, gt) > base + 0.03, (base, ssim(lw, gt))
    assert rmse(rl, gt) < rmse(img, gt) and rmse(lw, gt) < rmse(img, gt)


def test_landweber_matches_closed_form_filter():
    rng = np.random.default_rng(0)
    img = rng.random((40, 40))
    psf = defocus_psf(1.0, O20, size=9)
    out = landweber(img, psf, iterations=5, step=0.1)
    # DL2 iteration has the closed form X_n = H* Y / |H|^2 (1 - (1 - g|H|^2)^(n+1)); check on the
    # same reflect-padded domain
    from scipy import fft as sfft

    shp = (sfft.next_fast_len(48, real=True), sfft.next_fast_len(48, real=True))
    pad = np.pad(img, ((4, shp[0] - 44), (4, shp[1] - 44)), mode="reflect")
    k = np.zeros(shp)
    k[:9, :9] = psf
    H = sfft.rfft2(np.roll(k, (-4, -4), axis=(0, 1)))
    g = 0.1 * np.abs(H) ** 2
    filt = np.where(g > 1e-15, (1 - (1 - g) ** 6) / np.where(g > 1e-15, np.abs(H) ** 2, 1), 0.6)
    ref = sfft.irfft2(np.conj(H) * sfft.rfft2(pad) * filt, s=shp)[4:44, 4:44]
    np.testing.assert_allclose(out, ref, atol=1e-9)


def test_ssim_rmse_on_normalized_images():
    rng = np.random.default_rng(0)
    a = ndimage.gaussian_filter(rng.random((80, 80)), 2)
    assert ssim(3 * a + 7, a) == pytest.approx(1.0) and rmse(3 * a + 7, a) == pytest.approx(0.0, abs=1e-12)
    b = a + 0.01 * rng.standard_normal(a.shape)
    za = (crop_edges(a) - crop_edges(a).mean()) / crop_edges(a).std()
    zb = (crop_edges(b) - crop_edges(b).mean()) / crop_edges(b).std()
    ref = structural_similarity(zb, za, data_range=za.max() - za.min(), gaussian_weights=True,
                                sigma=1.5, use_sample_covariance=False)
    assert ssim(b, a) == pytest.approx(ref)
    assert rmse(b, a) == pytest.approx(np.sqrt(np.mean((za - zb) ** 2)))


def test_row_sharpness_is_no_intercept_least_squares(field):
    gt = defocus(field, 0.0, O20, noise=False)
    beta, se = row_sharpness(gt, gt)
    np.testing.assert_allclose(beta, 1.0)
    np.testing.assert_allclose(se, 0.0, atol=1e-12)
    blurred = defocus(field, 2.0, O20, noise=False)
    beta, se = row_sharpness(blurred, gt)
    assert np.nanmean(beta) < 0.8 and np.all(se[np.isfinite(se)] >= 0)
    # independent check of one row with numpy's least squares
    from skimage.filters import sobel

    def z(x):  # written out: the check must not use the z-score under test
        return (x - x.mean()) / x.std()

    s, r = sobel(z(blurred))[50], sobel(z(gt))[50]
    coef, res, *_ = np.linalg.lstsq(r[:, None], s, rcond=None)
    assert beta[50] == pytest.approx(coef[0])
    assert se[50] == pytest.approx(np.sqrt(res[0] / (len(s) - 1)) / np.linalg.norm(r))


def test_gaussian_fit_recovers_known_width_within_5_percent():
    yy, xx = np.mgrid[:30, :30]
    sigma = 2.3
    spot = 500 * np.exp(-((yy - 14.6) ** 2 + (xx - 15.3) ** 2) / (2 * sigma**2)) + 100
    noisy = np.random.default_rng(0).poisson(spot).astype(float)
    fwhm = fit_gaussian_fwhm(noisy)
    assert fwhm == pytest.approx(2.3548 * sigma, rel=0.05)


def test_bead_fwhm_on_simulated_beads_equals_psf_width():
    obj = make_specimen("beads", 160, 0.325, 4)
    z = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
    st, _, _ = simulate_stack(obj, z, O20, rng=2, photons=2000.0)
    mean, _std, n = bead_fwhm(st, 0.325, crop_px=30)
    assert n >= 3
    # point emitters: their image is the PSF; compare with the same fit on the PSF itself
    psf_fwhm = fit_gaussian_fwhm(defocus_psf(0.0, O20, size=31)) * 0.325
    assert mean[2] == pytest.approx(psf_fwhm, rel=0.1)
    assert mean[2] == np.nanmin(mean) and mean[0] > mean[2] and mean[4] > mean[2]


def test_bead_fwhm_on_real_bead_stacks(real_data_dir):
    tifffile = pytest.importorskip("tifffile")
    # confocal beads, 0.022 um pixels, 0.125 um steps, in focus at index 24 (SOURCES.md)
    st = tifffile.imread(real_data_dir / "bian_beads_confocal_zstack.tif")
    mean, _, n = bead_fwhm(st, 0.022, crop_px=40)
    assert n >= 3
    assert 20 <= int(np.nanargmin(mean)) <= 28
    assert 0.15 < mean[24] < 0.25
    # lattice light-sheet bead PSF, 0.1011 um pixels, in focus at index 30
    st = tifffile.imread(real_data_dir / "pycudadecon_lls_bead_psf.tif")
    mean, _std, n = bead_fwhm(st, 0.1011, crop_px=30)
    assert n == 1
    assert 27 <= int(np.nanargmin(mean)) <= 33
    assert 0.25 < mean[30] < 0.35 and mean[20] > 1.5 * mean[30] and mean[40] > 1.5 * mean[30]
