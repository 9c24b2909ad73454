"""Know when not to trust a result: pixel size known or unknown, resampling, modality, trust map.

Numbers are checked independently: bead widths against the in-focus image simulated from a physical
PSF at the same sampling, resampling against scikit-image's ``resize``, calibration against what
the files were written with.
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

import napari_deepr
from napari_deepr import io
from napari_deepr.cli import main
from napari_deepr.engine.domain import resample_plane, resolve_sampling
from napari_deepr.engine.model import load_model
from napari_deepr.errors import InputError
from napari_deepr.optics.psf import Optics
from napari_deepr.optics.simulate import defocus
from napari_deepr.science.metrics import fit_gaussian_fwhm

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# -- calibration ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({}, None),  # plain TIFF, no resolution
        ({"imagej": True}, None),  # ImageJ default: 1/1, no unit
        ({"imagej": True, "resolution": (1, 1), "metadata": {"unit": "pixel"}}, None),
        ({"resolution": (1, 1)}, None),  # 1 pixel per inch: a writer's default, not 25 400 µm
        ({"resolution": (1, 1), "resolutionunit": "CENTIMETER"}, None),
        ({"imagej": True, "resolution": (5, 5), "metadata": {"unit": "micron"}}, 0.2),
        ({"imagej": True, "resolution": (1, 1), "metadata": {"unit": "micron"}}, 1.0),  # explicit µm stays
        ({"resolution": (1e4 / 0.5, 1e4 / 0.5), "resolutionunit": "CENTIMETER"}, 0.5),
    ],
)
def test_uncalibrated_files_read_as_unknown(tmp_path, kwargs, expected):
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, np.zeros((64, 64), np.uint16), **kwargs)
    img = io.read_image(path)
    if expected is None:
        assert img.pixel_size_um is None and not img.pixel_size_known
    else:
        assert img.pixel_size_um == pytest.approx(expected)


def test_uncalibrated_zarr_is_unknown(tmp_path):
    io.write_image(tmp_path / "a.zarr", np.zeros((64, 64), np.float32))
    io.write_image(tmp_path / "b.zarr", np.zeros((64, 64), np.float32), pixel_size_um=0.2)
    assert io.read_image(tmp_path / "a.zarr").pixel_size_um is None
    assert io.read_image(tmp_path / "b.zarr").pixel_size_um == pytest.approx(0.2)


def test_reader_says_once_that_the_pixel_size_is_unknown(tmp_path):
    from napari_deepr._reader import read_layers

    for i in range(2):
        tifffile.imwrite(tmp_path / f"u{i}.tif", np.zeros((64, 64), np.uint16))
    with pytest.warns(UserWarning, match="pixel size is unknown") as rec:
        layers = read_layers([str(tmp_path / "u0.tif"), str(tmp_path / "u1.tif")])
    assert len([w for w in rec if "pixel size is unknown" in str(w.message)]) == 1
    assert all(ld[1]["metadata"]["pixel_size_known"] is False for ld in layers)
    assert all(u == "pixel" for ld in layers for u in ld[1]["units"])


# -- sampling verdicts ---------------------------------------------------------------------------
def test_sampling_verdicts():
    card = load_model("default").card  # 0.325 µm
    assert resolve_sampling(card, None).image_um is None
    assert not resolve_sampling(card, 0.33).resample  # within 5 %
    assert resolve_sampling(card, 0.1).resample
    v = resolve_sampling(card, 0.1, resample=False)
    assert not v.resample and v.level == "warning" and "resampling is off" in v.message
    for bad in (0, -1, float("nan"), 1e6):
        with pytest.raises(InputError):
            resolve_sampling(card, None, override=bad)
    with pytest.raises(InputError, match="outside the 0.25–2.5× range"):
        resolve_sampling(card, 0.05)  # 6.5× finer


def test_resample_plane_matches_scikit_image_and_bands():
    from skimage.transform import resize

    rng = np.random.default_rng(0)
    a = rng.random((1, 300, 280)).astype(np.float32)
    for shape in ((97, 91), (600, 560)):
        ours = resample_plane(a, shape, band=37)
        ref = resize(a[0], shape, order=1, anti_aliasing=True, mode="reflect")
        assert np.abs(ours[0] - ref)[3:-3, 3:-3].max() < 1e-5
        assert np.array_equal(ours, resample_plane(a, shape, band=10_000))


# -- the reason resampling exists: beads at 0.1 µm pixels -----------------------------------------
def _bead_field(px: float, n: int, spacing_um: float = 8.0):
    """Isolated point beads on a grid (one per pixel centre), their in-focus and 3 µm images.

    8 µm apart, so that the 3 µm defocus rings (radius ≈ 2 µm at NA 0.75) of neighbours do not
    overlap: an FWHM needs an isolated bead.
    """
    optics = Optics(na=0.75, wavelength_um=0.55, pixel_size_um=px, sample_index=1.45, sample_depth_um=5.0)
    obj = np.zeros((n, n))
    step = int(round(spacing_um / px))
    centres = [(y, x) for y in range(step, n - step // 2, step) for x in range(step, n - step // 2, step)]
    for y, x in centres:
        obj[y, x] = 1.0
    infocus = defocus(obj, 0.0, optics, photons=3000, noise=False)
    blurred = defocus(obj, 3.0, optics, photons=3000, rng=1).astype(np.float32)
    return centres, infocus, blurred


def _fwhms(img, centres, half):
    return np.array([fit_gaussian_fwhm(img[y - half:y + half + 1, x - half:x + half + 1]) for y, x in centres])


def test_resampling_keeps_bead_fwhm_at_0p1_um_pixels():
    """3 µm-defocused beads at 0.1 µm pixels, refocused by a model made for 0.325 µm pixels.

    The reference is the in-focus image *at the sampling the model works at*: the in-focus plane taken
    through the same round trip (down to 0.325 µm with the engine's anti-aliasing, back up to 0.1 µm).
    Nothing that works at 0.325 µm can keep the 0.1 µm in-focus width: 0.325 µm pixels are coarser than
    Nyquist for NA 0.75 (λ / 4NA ≈ 0.18 µm), so the in-focus plane itself comes back ~1.4× wider; the
    assertion below says so independently of the network.
    """
    px, n = 0.1, 480
    centres, infocus, blurred = _bead_field(px, n)
    half = int(round(1.2 / px))
    at_input = _fwhms(infocus, centres, half)
    assert 3.5 < np.median(at_input) < 4.5  # ≈ 0.37 µm: the diffraction limit at 0.1 µm sampling
    card = load_model("default").card
    m = int(round(n * px / card.pixel_size_um))
    round_trip = resample_plane(resample_plane(infocus[None].astype(np.float32), (m, m)), (n, n))[0]
    ref = _fwhms(round_trip, centres, half)
    assert np.median(ref / at_input) > 1.25  # why the reference is the in-focus plane at the model's sampling

    with_rs = _fwhms(napari_deepr.refocus(blurred, pixel_size_um=px), centres, half)
    without = _fwhms(napari_deepr.refocus(blurred, pixel_size_um=px, resample=False), centres, half)
    err_rs = np.abs(with_rs / ref - 1)
    assert np.all(err_rs < 0.2), err_rs  # every bead within 20 % of in focus
    # Unresampled, the model sees a bead blur 3.25× too wide for 3 µm and leaves ~3× the in-focus width.
    err_no = np.abs(without / ref - 1)
    assert np.mean(err_no > 0.2) > 0.9, err_no


def test_resampling_works_tiled_on_stacks():
    px = 0.2
    rng = np.random.default_rng(3)
    from napari_deepr.optics.specimens import make_specimen

    optics = Optics(pixel_size_um=px)
    planes = [defocus(make_specimen("cells", (300, 300), px, rng), z, optics, rng=4).astype(np.float32) for z in (2.0, -3.0)]
    stack = np.stack(planes)
    whole, dpm = napari_deepr.refocus(stack, axes="ZYX", pixel_size_um=px, dpm=True)
    assert whole.shape == stack.shape and dpm.shape == stack.shape
    one = napari_deepr.refocus(planes[1], pixel_size_um=px)
    np.testing.assert_allclose(whole[1], one, atol=1e-4)
    tiled = napari_deepr.refocus(stack, axes="ZYX", pixel_size_um=px, tile=128, overlap=32)
    # Resampling adds no seams of its own: tiled-vs-whole differences stay those of the network's tiling
    # at the model's sampling (the same planes, resampled by hand and refocused without resampling).
    h = int(round(300 * px / 0.325))
    by_hand = np.stack([resample_plane(p[None], (h, h))[0] for p in planes])
    seam_model = np.abs(napari_deepr.refocus(by_hand, axes="ZYX", pixel_size_um=0.325, tile=128, overlap=32)
                        - napari_deepr.refocus(by_hand, axes="ZYX", pixel_size_um=0.325)).mean()
    assert np.abs(tiled - whole).mean() <= 1.5 * seam_model + 1e-3 * whole.std()


# -- modality ------------------------------------------------------------------------------------
def test_rgb_through_fluorescence_model_is_refused_unless_forced():
    rgb = (np.random.default_rng(0).random((96, 96, 3)) * 255).astype(np.uint8)
    with pytest.raises(InputError, match="RGB"):
        napari_deepr.refocus(rgb)
    out, dpm = napari_deepr.refocus(rgb, force_modality=True, dpm=True)
    assert out.shape == rgb.shape and dpm.shape == rgb.shape[:2]  # one DPM, not three


def _cli(*args):
    return main(["refocus", *map(str, args), "-q"])


def test_cli_refuses_modality_and_bad_pixel_sizes_writing_nothing(tmp_path, capsys):
    rgb = tmp_path / "rgb.tif"
    tifffile.imwrite(rgb, (np.random.default_rng(0).random((96, 96, 3)) * 255).astype(np.uint8), photometric="rgb")
    gray = tmp_path / "gray.tif"
    tifffile.imwrite(gray, (np.random.default_rng(1).random((96, 96)) * 1000).astype(np.uint16))
    cases = [
        (rgb, [], "trained on widefield fluorescence"),
        (gray, ["--pixel-size", "0"], "positive"),
        (gray, ["--pixel-size", "-0.3"], "positive"),
        (gray, ["--pixel-size", "4000"], "not a light microscope"),
        (gray, ["--pixel-size", "0.02"], "outside the"),
        (gray, ["--trust-passes", "9", "--trust", tmp_path / "t.tif"], "1 to 8 passes"),
    ]
    for src, extra, words in cases:
        before = sorted(p.name for p in tmp_path.iterdir())
        assert _cli(src, "-o", tmp_path / "o.tif", "--dpm", tmp_path / "d.tif", *extra) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and err.count("\n") == 0 and err.startswith("deepr: error:")
        assert sorted(p.name for p in tmp_path.iterdir()) == before
    # Forced: runs, RGB comes back in the input's dtype and range, one DPM.
    assert _cli(rgb, "-o", tmp_path / "o.tif", "--dpm", tmp_path / "d.tif", "--force-modality") == 0
    out, dpm = io.read_image(tmp_path / "o.tif"), io.read_image(tmp_path / "d.tif")
    assert out.data.dtype == np.uint8 and out.data.shape == (96, 96, 3) and dpm.data.shape == (96, 96)
    assert "Forced" in capsys.readouterr().err


def test_cli_pixel_size_notes_before_the_run_and_output_calibration(tmp_path, capsys):
    gray = tmp_path / "gray.tif"
    tifffile.imwrite(gray, (np.random.default_rng(1).random((96, 96)) * 1000).astype(np.uint16))
    assert _cli(gray, "-o", tmp_path / "o.tif") == 0
    assert "pixel size is unknown" in capsys.readouterr().err
    assert io.read_image(tmp_path / "o.tif").pixel_size_um is None  # unknown stays unknown, never 1 µm
    assert _cli(gray, "-o", tmp_path / "o2.tif", "--pixel-size", "0.2") == 0
    assert "resampled" in capsys.readouterr().err
    assert io.read_image(tmp_path / "o2.tif").pixel_size_um == pytest.approx(0.2)
    assert _cli(gray, "-o", tmp_path / "o3.tif", "--pixel-size", "0.2", "--no-resample") == 0
    assert "deepr: warning:" in capsys.readouterr().err


# -- trust map -----------------------------------------------------------------------------------
def test_trust_map_api_and_cli(tmp_path, capsys):
    from napari_deepr.optics.specimens import make_specimen

    x = defocus(make_specimen("cells", (128, 128), 0.325, 5), 2.0, rng=6).astype(np.float32)
    out, dpm, trust = napari_deepr.refocus(x, dpm=True, trust=2, pixel_size_um=0.325)
    plain = napari_deepr.refocus(x, pixel_size_um=0.325)
    np.testing.assert_array_equal(out, plain)  # the trust map never changes the output
    assert trust.shape == x.shape and trust.dtype == np.float32 and trust.min() >= 0 and trust.max() <= 1
    with pytest.raises(InputError, match="1 to 8"):
        napari_deepr.refocus(x, trust=12)
    src = tmp_path / "x.tif"
    tifffile.imwrite(src, x)
    assert _cli(src, "-o", tmp_path / "o.tif", "--trust", tmp_path / "t.tif", "--trust-passes", "2",
                "--pixel-size", "0.325") == 0
    assert "trustworthy" in capsys.readouterr().err
    np.testing.assert_allclose(io.read_image(tmp_path / "t.tif").data, trust, atol=1e-5)
    # An uncalibrated file: the pixel size is assumed, so the stricter map (as the API without one).
    assert _cli(src, "-o", tmp_path / "o2.tif", "--trust", tmp_path / "t2.tif", "--trust-passes", "2") == 0
    assert "the pixel size is unknown, so the map also asks" in capsys.readouterr().err
    _, _, assumed = napari_deepr.refocus(x, dpm=True, trust=2)
    np.testing.assert_allclose(io.read_image(tmp_path / "t2.tif").data, assumed, atol=1e-5)
    assert not np.allclose(assumed, trust, atol=1e-3)


def test_card_can_forbid_the_trust_map(tiny_model, tmp_path):
    import json
    import shutil

    d = tmp_path / "m"
    shutil.copytree(tiny_model, d)
    card = json.loads((d / "model.json").read_text())
    card["trust_map"] = False
    (d / "model.json").write_text(json.dumps(card))
    with pytest.raises(InputError, match="forbids a trust map"):
        napari_deepr.refocus(np.zeros((64, 64), np.float32), d, trust=True)


def test_dpm_on_a_field_smaller_than_the_training_patches_is_noted(tmp_path, capsys):
    """The bundled decoder was trained on 256-px fields and reads small fields low
    (docs/MODEL_QUALITY.md): a smaller image with a DPM gets a note before the run; others do not."""
    from napari_deepr.engine.refocus import RefocusJob

    card = load_model("default").card
    assert card.config["patch"] == 256
    rng = np.random.default_rng(0)
    small = RefocusJob(rng.random((192, 300)).astype(np.float32), "default", dpm=True, pixel_size_um=0.325)
    assert any("192×300 pixels, smaller than the 256-pixel fields" in n for n in small.notes)
    for image, dpm in ((rng.random((256, 256)), True), (rng.random((192, 300)), False)):
        job = RefocusJob(image.astype(np.float32), "default", dpm=dpm, pixel_size_um=0.325)
        assert not any("256-pixel fields" in n for n in job.notes)
    # measured after resampling: 400 px at 0.1625 µm are 200 px at the model's 0.325 µm
    fine = RefocusJob(rng.random((400, 400)).astype(np.float32), "default", dpm=True, pixel_size_um=0.1625)
    assert any("200×200 pixels at the model's sampling" in n for n in fine.notes)
    # the command says it before the run, once, and only with --dpm
    tifffile.imwrite(tmp_path / "s.tif", (rng.random((192, 300)) * 1000).astype(np.uint16))
    assert main(["refocus", str(tmp_path / "s.tif"), "-o", str(tmp_path / "o.tif"), "--dpm", str(tmp_path / "d.tif"),
                 "--pixel-size", "0.325"]) == 0
    err = capsys.readouterr().err
    assert err.count("deepr: note: The image is 192×300 pixels, smaller than the 256-pixel fields") == 1
    assert main(["refocus", str(tmp_path / "s.tif"), "-o", str(tmp_path / "o2.tif"), "--pixel-size", "0.325"]) == 0
    assert "256-pixel fields" not in capsys.readouterr().err
