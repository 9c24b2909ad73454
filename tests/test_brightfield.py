"""Brightfield simulation: Abbe summation per colour channel, stains, RGB training pairs.

Numbers are checked against physics computed independently: Parseval (clear glass), the coherent
weak-phase transfer function, Beer-Lambert colours, scikit-image's colour deconvolution, and a
four-times finer condenser grid.
"""

import numpy as np
import pytest
from scipy import ndimage

from napari_deepr.optics import Optics, random_brightfield_pair, stained_section
from napari_deepr.optics.brightfield import (
    H_AND_E,
    abbe_intensity,
    condenser_points,
    procedural_he,
    real_stain_amounts,
    rgb_to_stains,
    stains_to_rgb,
)

O20 = Optics()  # 20x/0.75 dry, 0.325 µm pixels
KW = {"na": 0.75, "pixel_size_um": 0.325, "immersion_index": 1.0}


def _nv(img):
    return float(img.var() / img.mean() ** 2)


def test_clear_glass_conserves_energy_at_every_defocus_and_colour():
    glass = np.zeros((3, 48, 48))
    out = stained_section(glass, [-8.0, 0.0, 5.0], O20, condenser_na=0.5)
    assert out.shape == (3, 3, 48, 48)
    np.testing.assert_allclose(out, 1.0, atol=1e-9)
    # A uniform stain layer transmits exactly its Beer-Lambert colour, in and out of focus.
    eosin = np.zeros((3, 48, 48))
    eosin[1] = 0.5
    out = stained_section(eosin, [0.0, 6.0], O20, condenser_na=0.5)
    expected = 10.0 ** (-0.5 * H_AND_E[1])
    np.testing.assert_allclose(out.mean(axis=(-2, -1)), np.broadcast_to(expected, (2, 3)), rtol=1e-9)


def test_coherent_weak_phase_grating_matches_the_transfer_function():
    # t = exp(i φ0 cos 2πfx), axial illumination: I = 1 - 2 φ0 sin(2π z (n/λ - √((n/λ)² - f²))) cos 2πfx
    # to first order in φ0 (the project's sign: z > 0 focal plane beyond the specimen).
    n_px, period = 64, 16
    x = np.arange(n_px) * 0.325
    f = 1.0 / (period * 0.325)
    phi0, lam = 0.02, 0.55
    t = np.exp(1j * phi0 * np.cos(2 * np.pi * f * x))[None, :].repeat(8, 0)
    for z in (-3.0, 1.0, 2.5):
        img = abbe_intensity(t, z, wavelength_um=lam, condenser_na=0.0, pad=0, **KW)
        amp = 2 * np.mean((img[0] - img[0].mean()) * np.cos(2 * np.pi * f * x))
        expected = -2 * phi0 * np.sin(2 * np.pi * z * (1 / lam - np.sqrt(1 / lam**2 - f**2)))
        assert amp == pytest.approx(expected, rel=0.02, abs=1e-4)


def test_absorber_is_sharpest_at_focus():
    rng = np.random.default_rng(1)
    a = np.clip(ndimage.gaussian_filter(rng.random((96, 96)), 1.0) - 0.5, 0, None) * 6
    amounts = np.stack([a, np.zeros_like(a), np.zeros_like(a)])
    zs = [-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0]
    stack = stained_section(amounts, zs, O20, condenser_na=0.5)
    for c in range(3):
        nv = [_nv(p[c]) for p in stack]
        assert int(np.argmax(nv)) == zs.index(0.0)


def test_dense_cell_is_bright_below_focus_and_dark_above_and_invisible_at_focus():
    yy, xx = np.mgrid[:96, :96] - 48
    opd = 0.05 * np.exp(-(yy**2 + xx**2) / (2 * 6.0**2))  # a cell denser than its medium: weak lens
    amounts = np.zeros((3, 96, 96))
    stack = stained_section(amounts, [-3.0, 0.0, 3.0], O20, phase_opd_um=opd, condenser_na=0.4)
    centre = stack[:, :, 48, 48]
    assert np.all(centre[0] > 1.02) and np.all(centre[2] < 0.98)  # contrast reverses with the sign of z
    assert np.all(np.abs(centre[1] - 1) < 0.2 * np.abs(centre[0] - 1))  # almost no contrast at focus


def test_blur_grows_with_wavelength_at_fixed_na():
    # Knife edge (OD 1) in focus: the 10-90 % edge width scales with λ/NA; R/B ≈ 0.61/0.47 = 1.30.
    n = 256
    edge = np.zeros((8, n))
    edge[:, n // 2:] = 1.0
    widths = []
    for lam in (0.61, 0.54, 0.47):
        row = abbe_intensity(10 ** (-edge / 2), 0.0, wavelength_um=lam, condenser_na=0.5, **KW)[4]
        seg = row[n // 2 - 30 : n // 2 + 30]
        seg = (seg - seg.min()) / (seg.max() - seg.min())
        fine = np.interp(np.linspace(0, 59, 5901), np.arange(60), seg[::-1])  # rising
        widths.append((np.argmax(fine >= 0.9) - np.argmax(fine >= 0.1)) / 100 * 0.325)
    assert widths[0] > widths[1] > widths[2]
    assert widths[0] / widths[2] == pytest.approx(0.61 / 0.47, rel=0.12)


def test_condenser_cells_remove_most_of_the_coarse_grid_error():
    rng = np.random.default_rng(0)
    a = np.clip(ndimage.gaussian_filter(rng.random((96, 96)), 1.0) - 0.5, 0, None) * 6
    t = 10 ** (-a / 2)
    kw = dict(wavelength_um=0.55, condenser_na=0.5, **KW)
    ref = abbe_intensity(t, 6.0, source_step=1 / 16, **kw)
    err = lambda img: float(np.sqrt(((img - ref) ** 2).mean()) / ref.std())  # noqa: E731
    points = err(abbe_intensity(t, 6.0, source_step=0.25, cell_average=False, **kw))
    cells = err(abbe_intensity(t, 6.0, source_step=0.25, **kw))
    assert cells < 0.5 * points
    assert err(abbe_intensity(t, 6.0, source_step=0.125, **kw)) < 0.15
    assert len(condenser_points(0.75, 0.55, 0.0, 0.25)) == 1
    with pytest.raises(ValueError, match="darkfield"):
        abbe_intensity(t, 0.0, wavelength_um=0.55, condenser_na=0.9, **KW)


def test_colour_deconvolution_matches_scikit_image():
    skc = pytest.importorskip("skimage.color")
    rng = np.random.default_rng(3)
    amounts = rng.uniform(0.05, 0.8, (32, 32, 3))
    rgb = stains_to_rgb(amounts, 255.0)
    back = rgb_to_stains(rgb, 255.0)
    np.testing.assert_allclose(back, amounts, atol=1e-9)
    # scikit-image: natural log divided by ln(1e6), so decadic optical density = 6 × rgb2hed.
    hed = skc.rgb2hed(rgb / 255.0)
    np.testing.assert_allclose(6 * hed, amounts, rtol=1e-6, atol=1e-6)


def test_real_images_give_positive_hematoxylin_in_nuclei():
    tifffile = pytest.importorskip("tifffile")
    from pathlib import Path

    p = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real" / "skin_he_rgb_2d.tif"
    if not p.exists():
        p = Path("/work/shared/data/real/skin_he_rgb_2d.tif")
    if not p.exists():
        pytest.skip("real H&E image not available")
    rgb = tifffile.imread(p)
    am = real_stain_amounts(rgb)
    assert am.shape == (3,) + rgb.shape[:2]
    # the darkest-blue pixels (nuclei) carry much more hematoxylin than eosin-pink stroma
    blue = rgb[..., 2].astype(float) - rgb[..., 0]
    nuclei = blue > np.percentile(blue, 98)
    assert am[0][nuclei].mean() > 2 * am[0][~nuclei].mean()


def test_random_brightfield_pair_contract_and_reproducibility():
    x, y, z = random_brightfield_pair(5, patch=64, z_range_um=(-10.0, 10.0), condenser_ratio_range=(0.4, 0.4))
    assert x.shape == y.shape == (3, 64, 64) and x.dtype == y.dtype == np.float32
    assert -10.0 <= z <= 10.0
    assert np.all(x == np.rint(x)) and x.min() >= 0 and x.max() <= 255  # 8-bit camera
    np.testing.assert_allclose(x.mean(axis=(1, 2)), y.mean(axis=(1, 2)), rtol=0.05)  # energy kept
    x2, y2, z2 = random_brightfield_pair(5, patch=64, z_range_um=(-10.0, 10.0), condenser_ratio_range=(0.4, 0.4))
    assert z2 == z and np.array_equal(x, x2) and np.array_equal(y, y2)
    # pinned defocus, real RGB image used: the in-focus target is sharper than the input
    rgb = (stains_to_rgb(np.moveaxis(procedural_he(160, 0.325, 0), 0, -1), 240.0)).astype(np.uint8)
    x, y, z = random_brightfield_pair(1, patch=64, z_range_um=(6.0, 6.0), real_images=[rgb], real_fraction=1.0,
                                      condenser_ratio_range=(0.4, 0.4), photons_range=(1e7, 1e7), quantize=False)
    assert z == 6.0
    grad = lambda a: float(np.mean(np.abs(np.diff(a, axis=-1))))  # noqa: E731
    assert grad(y) > 1.5 * grad(x)


def test_weak_object_transfer_predicts_the_abbe_image_of_a_weak_object():
    from napari_deepr.optics.brightfield import weak_object_transfer

    rng = np.random.default_rng(7)
    eps = ndimage.gaussian_filter(rng.standard_normal((64, 64)), 1.5, mode="wrap")
    phi = ndimage.gaussian_filter(rng.standard_normal((64, 64)), 1.5, mode="wrap")
    eps *= 0.005 / eps.std()
    phi *= 0.005 / phi.std()
    kw = {"na": 0.75, "wavelength_um": 0.55, "pixel_size_um": 0.325, "condenser_na": 0.45, "source_step": 0.25}
    for z in (-4.0, 0.0, 3.0):
        img = abbe_intensity(1 + eps + 1j * phi, z, pad=0, cell_average=False, **kw)
        h_e, h_p = weak_object_transfer((64, 64), z, **kw)
        lin = 1 + np.fft.ifft2(h_e * np.fft.fft2(eps) + h_p * np.fft.fft2(phi)).real
        assert np.sqrt(((img - lin) ** 2).mean()) < 0.03 * (img - 1).std()
    h_e, h_p = weak_object_transfer((64, 64), 0.0, **kw)
    assert np.abs(h_p).max() < 1e-12 and h_e[0, 1].real == pytest.approx(2.0)
