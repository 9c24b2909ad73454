"""PSF banks: planes computed by psfmodels, stored in an .npz and served without psfmodels."""

import sys

import numpy as np
import pytest

from napari_deepr.optics import psf
from napari_deepr.optics.psf import (
    OPTICS_20X_075,
    defocus_psf,
    psf_size,
    write_psf_bank,
)
from napari_deepr.optics.simulate import random_training_pair

Z_BANK = (-3.0, 0.0, 1.5)


def _clear():
    psf._psf_stack_cached.cache_clear()
    psf._load_bank.cache_clear()


@pytest.fixture(autouse=True)
def clean_caches(monkeypatch):
    monkeypatch.delenv("DEEPR_PSF_BANK", raising=False)
    _clear()
    yield
    _clear()


def _no_psfmodels(monkeypatch):
    # a None entry in sys.modules makes `import psfmodels` raise ImportError
    monkeypatch.setitem(sys.modules, "psfmodels", None)
    with pytest.raises(ImportError):
        import psfmodels  # noqa: F401


@pytest.fixture
def bank(tmp_path):
    optics = [OPTICS_20X_075.replace(wavelength_um=0.5), OPTICS_20X_075.replace(wavelength_um=0.6)]
    path = tmp_path / "bank.npz"
    n = write_psf_bank(path, optics, list(Z_BANK))
    assert n == len(optics) * len(Z_BANK)
    assert path.is_file()
    ref = {(o, z): defocus_psf(z, o) for o in optics for z in Z_BANK}  # psfmodels, cached
    _clear()
    return path, ref


def test_bank_round_trip(bank, monkeypatch):
    path, ref = bank
    monkeypatch.setenv("DEEPR_PSF_BANK", str(path))
    for (opt, z), expected in ref.items():
        got = defocus_psf(z, opt)
        assert got.dtype == np.float64
        assert got.shape == (psf_size(abs(z), opt),) * 2
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-9)
        assert got.sum() == pytest.approx(1.0, abs=1e-12)
        # unaberrated optics: centro-symmetric planes, peak at the centre in focus
        np.testing.assert_allclose(got, got[::-1, ::-1], rtol=1e-6, atol=1e-12)
        if z == 0.0:
            c = got.shape[0] // 2
            assert got[c, c] == got.max()
    # the two wavelengths are really different planes (keys do not collide)
    a, b = (ref[(o, 0.0)] for o in {o for o, _ in ref})
    assert not np.allclose(a, b, rtol=1e-3)
    # served from the bank: loaded once, one entry per stored plane
    assert psf._load_bank.cache_info().currsize == 1
    assert len(psf._load_bank(str(path))) == len(ref)


def test_bank_without_psfmodels(bank, monkeypatch):
    path, ref = bank
    _no_psfmodels(monkeypatch)
    monkeypatch.setenv("DEEPR_PSF_BANK", str(path))
    for (opt, z), expected in ref.items():
        np.testing.assert_allclose(defocus_psf(z, opt), expected, rtol=1e-5, atol=1e-9)
    # a z that was not banked needs psfmodels
    opt = next(iter(ref))[0]
    with pytest.raises(ImportError, match="DEEPR_PSF_BANK"):
        defocus_psf(2.2, opt)
    # same z as a banked plane but another window size: not banked either
    with pytest.raises(ImportError, match="DEEPR_PSF_BANK"):
        defocus_psf(0.0, opt, size=psf_size(3.0, opt))
    # and without the bank nothing can be computed
    monkeypatch.delenv("DEEPR_PSF_BANK")
    _clear()
    with pytest.raises(ImportError, match="psfmodels"):
        defocus_psf(0.0, opt)


def test_negative_zero_hits_bank(bank, monkeypatch):
    # -0.0 == 0.0 (and hashes alike in the lru_cache) so it must find the banked plane 0.0
    path, ref = bank
    _no_psfmodels(monkeypatch)
    monkeypatch.setenv("DEEPR_PSF_BANK", str(path))
    opt = next(iter(ref))[0]
    np.testing.assert_allclose(defocus_psf(-0.0, opt), ref[(opt, 0.0)], rtol=1e-5, atol=1e-9)


def test_simulator_uses_bank(tmp_path, monkeypatch):
    kw = {
        "patch": 32,
        "optics": OPTICS_20X_075,
        "z_range_um": (-1.0, 1.0),
        "wavelength_range_um": (0.5, 0.5),
        "specimen_kinds": ("beads",),
        "z_quantum_um": 0.5,
    }
    # seeds whose 32 px crop holds beads (seed 6's crop is empty: see the next test)
    seeds = (2, 4, 5, 8)
    with_pm = [random_training_pair(s, **kw) for s in seeds]
    assert {z for *_, z in with_pm} == {-0.5, 0.0, 0.5, 1.0}
    path = tmp_path / "sim_bank.npz"
    zs = [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert write_psf_bank(path, [OPTICS_20X_075.replace(wavelength_um=0.5)], zs) == len(zs)
    _clear()
    _no_psfmodels(monkeypatch)
    monkeypatch.setenv("DEEPR_PSF_BANK", str(path))
    for s, (noisy_ref, infocus_ref, z_ref) in zip(seeds, with_pm):
        noisy, infocus, z = random_training_pair(s, **kw)
        assert z == z_ref
        for img in (noisy, infocus):
            assert img.dtype == np.float32 and img.shape == (32, 32)
            assert np.all(np.isfinite(img))
        assert infocus.max() > 2 * np.median(infocus)  # beads were drawn, not a flat fallback
        # the bank stores float32 planes, so the images agree to float32 precision, not bit-wise
        for got, ref in ((infocus, infocus_ref), (noisy, noisy_ref)):
            np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_empty_crop_is_flat_not_amplified_round_off():
    # seed 6 draws a 32 px crop with no bead in it: its in-focus image is FFT round-off (~1e-17),
    # which the photon scaling once blew up into values of +-3000 photons
    noisy, infocus, _ = random_training_pair(
        6, patch=32, optics=OPTICS_20X_075, z_range_um=(-1.0, 1.0), wavelength_range_um=(0.5, 0.5),
        specimen_kinds=("beads",), z_quantum_um=0.5, photons_range=(500.0, 500.0),
        background_fraction=(0.0, 0.0),
    )
    assert np.ptp(infocus) == 0
    assert np.abs(noisy).max() < 100  # read noise and a little out-of-patch light, not 1e3+


def test_bank_key_ignores_how_numbers_are_typed():
    a = OPTICS_20X_075.replace(immersion_index=1)
    b = OPTICS_20X_075.replace(immersion_index=np.float32(1.0))
    assert psf._bank_key(a, 15, 0.0) == psf._bank_key(OPTICS_20X_075, 15, 0.0) == psf._bank_key(b, 15, 0.0)
