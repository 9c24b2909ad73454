"""Training pairs from z-stacks: local in-focus selection, field split, refusals, on-disk format."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from napari_deepr.optics.simulate import simulate_stack, tilt_dpm
from napari_deepr.optics.specimens import make_specimen
from napari_deepr.stacks.pairs import PairsError, build_pairs, load_pairs

Z = np.arange(-3.0, 3.01, 0.5)  # 13 planes, 0.5 µm apart
PX = 0.325


def _stack(seed: int, shape=(128, 128), offset: np.ndarray | None = None) -> np.ndarray:
    obj = make_specimen("tissue", shape, PX, seed)
    st, _, _ = simulate_stack(obj, Z, dpm_offset=offset, rng=seed)
    return st


def test_tilted_stack_picks_local_focus(tmp_path):
    """Along a tilt the in-focus plane of each crop follows the local height of the sample."""
    shape = (256, 64)
    # 4.5 µm of height change from the top to the bottom row: crops 64 px apart differ by ~1.1 µm.
    angle = float(np.degrees(np.arctan(4.5 / (shape[0] * PX))))
    offset = tilt_dpm(shape, PX, angle)
    st = _stack(1, shape, offset)
    summary = build_pairs([st], tmp_path / "ds", z_step_um=0.5, range_um=2.0, patch=64)
    ds = load_pairs(tmp_path / "ds")
    assert summary["crops"] == 4
    got, expected = [], []
    for crop in ds.crops:
        centre = offset[crop["y"] + 32, crop["x"] + 32]
        # In focus where the stage defocus cancels the local height: Z + height = 0.
        expected.append(int(np.argmin(np.abs(Z + centre))))
        got.append(crop["infocus_plane"])
    assert np.all(np.abs(np.array(got) - np.array(expected)) <= 1), (got, expected)
    # The focus moves monotonically down the tilt, spanning several planes.
    assert got[0] - got[-1] >= 4
    # Every stored pair's defocus is measured from its crop's own in-focus plane.
    for crop in ds.crops:
        assert crop["z_um"][crop["target"]] == 0.0
        assert np.allclose(np.diff(crop["z_um"]), 0.5)
        assert max(abs(z) for z in crop["z_um"]) <= 2.0 + 1e-9


def test_pairs_format_roundtrip(tmp_path):
    st = _stack(2)
    summary = build_pairs([st], tmp_path / "ds", z_step_um=0.5, range_um=1.0, patch=64, register=False,
                          infocus_index=6)
    ds = load_pairs(tmp_path / "ds")
    index = json.loads((tmp_path / "ds" / "index.json").read_text())
    assert index["format"] == "napari-deepr-pairs" and index["version"] == 1
    assert index["focus_method"] == "manual"
    # 4 crops x 5 planes (-1 .. +1 µm around plane 6)
    assert summary["crops"] == 4 and summary["pairs"] == 20 == len(ds)
    assert summary["pairs_per_z"] == {"-1.00": 4, "-0.50": 4, "0.00": 4, "0.50": 4, "1.00": 4}
    for pid in range(len(ds)):
        x, y, z = ds.pair(pid)
        crop = ds.crops[ds.pairs[pid]["crop"]]
        sl = np.s_[crop["y"]:crop["y"] + 64, crop["x"]:crop["x"] + 64]
        plane = crop["planes"][ds.pairs[pid]["plane"]]
        np.testing.assert_array_equal(x, st[plane][sl].astype(np.float32))
        np.testing.assert_array_equal(y, st[6][sl].astype(np.float32))
        assert z == pytest.approx((plane - 6) * 0.5)
    # patch files are plain float32 ZYX TIFFs
    arr = tifffile.imread(tmp_path / "ds" / ds.crops[0]["file"])
    assert arr.dtype == np.float32 and arr.shape == (5, 64, 64)


def test_field_split_never_leaks(tmp_path):
    stacks = [_stack(s, (64, 128)) for s in range(7)]
    summary = build_pairs(stacks, tmp_path / "ds", z_step_um=0.5, range_um=1.0, patch=64, split=0.7, seed=3,
                          register=False, focus_method="nvar")
    ds = load_pairs(tmp_path / "ds")
    train, val = ds.fields("train"), ds.fields("val")
    assert train and val and not (train & val)
    assert len(val) == round(7 * 0.3) == summary["val_fields"]
    for p in ds.pairs:
        crop = ds.crops[p["crop"]]
        assert p["split"] == crop["split"] == ds.index["fields"][crop["field"]]["split"]
    # the split depends on the seed only
    build_pairs(stacks, tmp_path / "ds2", z_step_um=0.5, range_um=1.0, patch=64, split=0.7, seed=3,
                register=False, focus_method="nvar")
    assert load_pairs(tmp_path / "ds2").fields("val") == val


def test_reads_calibrated_tiff_and_folder(tmp_path):
    folder = tmp_path / "stacks"
    folder.mkdir()
    for s in range(2):
        tifffile.imwrite(folder / f"s{s}.tif", _stack(s, (64, 64)), imagej=True,
                         resolution=(1 / PX, 1 / PX), metadata={"spacing": 0.5, "unit": "um", "axes": "ZYX"})
    summary = build_pairs([folder], tmp_path / "ds", range_um=1.5, patch=64)
    ds = load_pairs(tmp_path / "ds")
    assert summary["fields"] == 2 and summary["train_fields"] == 1 and summary["val_fields"] == 1
    assert ds.index["z_step_um"] == pytest.approx(0.5)
    assert ds.index["optics"]["pixel_size_um"] == pytest.approx(PX, rel=1e-3)


def test_refusals(tmp_path):
    st = _stack(0, (64, 64))
    with pytest.raises(PairsError, match="only one plane"):
        build_pairs([st[:1]], tmp_path / "a", z_step_um=0.5, patch=64)
    with pytest.raises(PairsError, match="z-step"):
        build_pairs([st], tmp_path / "b", patch=64)
    with pytest.raises(PairsError, match="wider than"):
        build_pairs([st], tmp_path / "c", z_step_um=0.5, range_um=3.5, patch=64)
    with pytest.raises(PairsError, match="smaller than one"):
        build_pairs([st], tmp_path / "d", z_step_um=0.5, range_um=1.0, patch=96)
    with pytest.raises(PairsError, match="not a pairs dataset"):
        load_pairs(tmp_path)
    # nothing half-written is left behind
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_register_stack_stops_at_once_when_cancelled():
    """A cancel during registration (the longest step of building pairs) stops before the next plane."""
    from napari_deepr.errors import Cancelled
    from napari_deepr.stacks.register import register_stack

    stack = np.random.default_rng(0).normal(size=(6, 64, 64)).astype(np.float32)
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Cancelled):
        register_stack(stack, cancel=cancel)
    assert len(calls) == 3


def test_in_focus_choice_stops_at_once_when_cancelled():
    """The paper's in-focus choice (all-in-focus fusion, then SSIM per patch) takes seconds on a large
    stack: a cancel is honoured inside the fusion and before every patch, and progress rises per patch."""
    from napari_deepr.errors import Cancelled
    from napari_deepr.stacks.edof import edof_wavelet
    from napari_deepr.stacks.infocus import select_in_focus

    stack = np.random.default_rng(0).normal(size=(6, 64, 64))
    calls = []
    with pytest.raises(Cancelled):
        edof_wavelet(stack, cancel=lambda: calls.append(1) or len(calls) > 2)
    assert len(calls) == 3  # stopped before the third plane's transform

    seen = []
    edof = edof_wavelet(stack)
    with pytest.raises(Cancelled):
        select_in_focus(stack, crop=16, edof=edof, progress=seen.append, cancel=lambda: len(seen) >= 5)
    assert seen == [k / 16 for k in range(1, 6)]  # 5 of 16 patches, then stopped
    full = []
    out = select_in_focus(stack, crop=16, edof=edof, progress=full.append)
    assert full[-1] == 1.0 and len(full) == 16
    np.testing.assert_array_equal(out, select_in_focus(stack, crop=16, edof=edof))


def test_edof_fused_plane_by_plane_equals_the_stacked_fusion():
    """The fusion keeps one band of one plane in memory at a time (a cancel point per plane); it must
    pick exactly what the stacked (Z, 3, h, w) maximum-activity rule picks, ties to the first plane."""
    import pywt
    from scipy import ndimage

    from napari_deepr.stacks.edof import edof_wavelet

    rng = np.random.default_rng(1)
    stack = rng.integers(0, 4, size=(5, 70, 90)).astype(np.float64)  # small integers: many ties
    wav, lev = pywt.Wavelet("db4"), 2
    coeffs = [pywt.wavedec2(p, wav, mode="symmetric", level=lev) for p in stack]
    fused = [np.mean([c[0] for c in coeffs], axis=0)]
    for j in range(1, lev + 1):
        bands = np.stack([np.stack(c[j]) for c in coeffs])
        choice = ndimage.median_filter(np.argmax(np.abs(bands).sum(axis=1), axis=0), size=3, mode="nearest")
        fused.append(tuple(np.take_along_axis(bands, choice[None, None], axis=0)[0]))
    expected = pywt.waverec2(fused, wav, mode="symmetric")[:70, :90].astype(np.float32)
    np.testing.assert_array_equal(edof_wavelet(stack, level=lev), expected)


def test_focus_per_field_takes_one_plane_for_the_whole_field(tmp_path):
    """--focus-per field: every crop of a tilted field gets the one plane the whole-field rule picks,
    the plane where the field's mean height is in focus; per crop they follow the tilt."""
    shape = (256, 64)
    angle = float(np.degrees(np.arctan(4.5 / (shape[0] * PX))))
    offset = tilt_dpm(shape, PX, angle)
    st = _stack(1, shape, offset)
    build_pairs([st], tmp_path / "crop", z_step_um=0.5, range_um=2.0, patch=64)
    build_pairs([st], tmp_path / "field", z_step_um=0.5, range_um=2.0, patch=64, focus_per="field")
    per_crop = [c["infocus_plane"] for c in load_pairs(tmp_path / "crop").crops]
    ds = load_pairs(tmp_path / "field")
    per_field = {c["infocus_plane"] for c in ds.crops}
    assert len(set(per_crop)) >= 3 and len(per_field) == 1
    mid = int(np.argmin(np.abs(Z + offset.mean())))
    assert abs(per_field.pop() - mid) <= 1
    assert ds.index["focus_per"] == "field"
    with pytest.raises(PairsError, match="focus_per"):
        build_pairs([st], tmp_path / "bad", z_step_um=0.5, range_um=2.0, patch=64, focus_per="tile")


def test_pixel_size_out_resamples_the_stacks_first(tmp_path):
    """--pixel-size-out: a 0.26 µm stack comes out at 0.325 µm; a Gaussian bead's width scales by 0.8."""
    from napari_deepr.io import ImageData

    yy, xx = np.mgrid[:256, :256].astype(float)
    sigma = 6.0
    plane = 100 + 1000 * np.exp(-((yy - 128.0) ** 2 + (xx - 128.0) ** 2) / (2 * sigma ** 2))
    st = np.stack([plane * (1 + 0.01 * k) for k in range(9)]).astype(np.float32)
    img = ImageData(st, "ZYX", 0.26, 0.5, {}, "bead")
    summary = build_pairs([img], tmp_path / "ds", range_um=1.0, patch=64, register=False,
                          pixel_size_out_um=0.325, infocus_index=4)
    ds = load_pairs(tmp_path / "ds")
    assert ds.index["optics"]["pixel_size_um"] == pytest.approx(0.325)
    rec = ds.index["fields"][0]
    assert rec["resampled_from_um"] == pytest.approx(0.26) and rec["shape"][1:] == [205, 205]
    assert summary["crops"] == 9  # 205 px hold 3 × 3 crops of 64 px
    # Re-assemble the centre crop (64-128 px) and measure the bead's width by its second moment.
    centre = next(c for c in ds.crops if c["y"] == 64 and c["x"] == 64)
    a = tifffile.imread(tmp_path / "ds" / centre["file"])[centre["target"]].astype(float) - 100 * 1.04
    a = np.clip(a, 0, None)
    gy, gx = np.mgrid[:64, :64].astype(float)
    cy, cx = (a * gy).sum() / a.sum(), (a * gx).sum() / a.sum()
    width = np.sqrt((a * ((gy - cy) ** 2 + (gx - cx) ** 2)).sum() / a.sum() / 2)
    assert width == pytest.approx(sigma * 0.26 / 0.325, rel=0.03)
    # An uncalibrated stack cannot be resampled until its pixel size is given.
    with pytest.raises(PairsError, match="does not record its pixel size"):
        build_pairs([st], tmp_path / "u", z_step_um=0.5, range_um=1.0, patch=64, pixel_size_out_um=0.325)
    build_pairs([st], tmp_path / "u", z_step_um=0.5, range_um=1.0, patch=64, pixel_size_out_um=0.325,
                pixel_size_um=0.26, register=False, infocus_index=4)
    assert load_pairs(tmp_path / "u").index["fields"][0]["shape"][1:] == [205, 205]
    with pytest.raises(PairsError, match="positive"):
        build_pairs([st], tmp_path / "v", z_step_um=0.5, range_um=1.0, patch=64, pixel_size_out_um=-1)
    with pytest.raises(PairsError, match=r"\(41×41 px after resampling to 1\.625 µm\) is smaller than one 64-px patch"):
        build_pairs([img], tmp_path / "w", range_um=1.0, patch=64, pixel_size_out_um=1.625)


def test_cli_pairs_resamples_and_takes_one_plane_per_field(tmp_path, capsys):
    """`deepr pairs --pixel-size-out 0.4 --focus-per field` on an uncalibrated TIFF given `--pixel-size`;
    without the pixel size the resampling is refused in one sentence, exit 2, nothing written."""
    from napari_deepr.cli import main

    st = _stack(2)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, st.astype(np.float32))
    assert main(["pairs", str(path), "-o", str(tmp_path / "no"), "--z-step", "0.5", "--range", "2", "--patch", "32",
                 "--pixel-size-out", "0.4", "-q"]) == 2
    assert "does not record its pixel size" in capsys.readouterr().err and not (tmp_path / "no").exists()
    assert main(["pairs", str(path), "-o", str(tmp_path / "ds"), "--z-step", "0.5", "--range", "2", "--patch", "32",
                 "--pixel-size", str(PX), "--pixel-size-out", "0.4", "--focus-per", "field", "-q"]) == 0
    ds = load_pairs(tmp_path / "ds")
    assert ds.index["focus_per"] == "field" and len({c["infocus_plane"] for c in ds.crops}) == 1
    assert ds.index["optics"]["pixel_size_um"] == pytest.approx(0.4)
    assert ds.index["fields"][0]["shape"][1:] == [104, 104] and ds.index["fields"][0]["resampled_from_um"] == PX
