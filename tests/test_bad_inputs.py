"""A hostile user's inputs: every one ends in one sentence, exit code 2, nothing written, input unchanged.

Each case builds its own bad file, folder, model or option in ``tmp_path``, runs the ``deepr`` command
in-process (or the Python API), and checks four things: the exit code (2), one ``deepr: error:`` line
on stderr with no traceback, no new or changed file anywhere under ``tmp_path`` (so no output and no
temporary file), and the input byte for byte as it was. Fault tests at the end kill real processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import tifffile
from onnx import TensorProto, helper, numpy_helper

from napari_deepr import io
from napari_deepr.cli import main
from napari_deepr.errors import DeepRError
from onnx_builders import make_model_folder

SRC = str(Path(__file__).resolve().parents[1] / "src")
ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0


# ------------------------------------------------------------------------------------ helpers
def _img(shape=(64, 64), seed=0, dtype=np.uint16):
    rng = np.random.default_rng(seed)
    return (rng.random(shape) * 3000 + 200).astype(dtype)


def _snapshot(root: Path) -> dict:
    """Every path under ``root`` with a content hash (files) or a marker (folders, links, FIFOs)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_file():
                try:
                    out[rel] = hashlib.sha1(p.read_bytes()).hexdigest()
                except OSError:
                    out[rel] = "unreadable"
            else:
                out[rel] = "dir" if p.is_dir() else "special"
    return out


def _check_refused(rc, err, before, root, *, sentence=None):
    assert rc == 2, f"exit {rc}: {err}"
    assert "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("deepr: error:")]
    assert len(lines) == 1, err
    body = lines[0][len("deepr: error:"):].strip()
    assert body and body[-1] in ".'\")", body  # a sentence, ended
    if sentence:
        assert sentence.lower() in body.lower(), body
    assert _snapshot(root) == before, "something was written, removed or changed"


def _cli_refused(argv, root, capsys, sentence=None):
    before = _snapshot(root)
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    _check_refused(rc, err, before, root, sentence=sentence)
    return err


# ---------------------------------------------------------------------- bad input files (refocus)
def _tif(d, shape=(64, 64), dtype=np.uint16, name="in.tif", **kw):
    p = d / name
    tifffile.imwrite(p, _img(shape, dtype=np.float64).astype(dtype) if dtype is not bool else np.ones(shape, bool), **kw)
    return p


def _truncated(d):
    p = _tif(d, (256, 256))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 3])
    return p


def _lzw_without_codec(d):
    p = d / "lzw.tif"
    tifffile.imwrite(p, _img((64, 64)), compression="zlib")
    with tifffile.TiffFile(p, mode="r+b") as tif:  # relabel the zlib data as LZW (code 5)
        tif.pages.first.tags["Compression"].overwrite(5)
    return p


def _fifo(d):
    p = d / "pipe.tif"
    os.mkfifo(p)
    return p


def _loop(d):
    a, b = d / "a.tif", d / "b.tif"
    a.symlink_to(b)
    b.symlink_to(a)
    return a


def _dangling(d):
    p = d / "gone.tif"
    p.symlink_to(d / "nothing_here.tif")
    return p


def _zarr(d, arr, name="in.zarr", **attrs):
    import zarr

    g = zarr.open_group(str(d / name), mode="w")
    g.create_array("0", shape=arr.shape, dtype=arr.dtype, chunks=arr.shape)[...] = arr
    g.attrs.update(attrs)
    return d / name


def _zarr_corrupt_chunk(d):
    p = io.write_image(d / "in.zarr", _img((64, 64)).astype(np.float32), axes="YX")
    chunks = [f for f in (p / "0").rglob("*") if f.is_file() and f.name not in (".zarray", "zarr.json", ".zattrs")]
    for f in chunks:
        f.write_bytes(b"\x00garbage" * 7)
    return p


def _zarr_bad_multiscales(kind):
    def make(d):
        arr = _img((64, 64))
        ms = {
            "no_datasets": [{"axes": ["y", "x"]}],
            "bad_path": [{"datasets": [{"path": "nope"}]}],
            "not_a_list": "multiscales",
            "axes_wrong_type": [{"datasets": [{"path": "0"}], "axes": [5, 6]}],
        }[kind]
        return _zarr(d, arr, multiscales=ms)

    return make


INPUT_FILES = {
    "missing": lambda d: d / "missing.tif",
    "empty_file": lambda d: (d / "e.tif").write_bytes(b"") or d / "e.tif",
    "random_bytes": lambda d: (d / "r.tif").write_bytes(os.urandom(4096)) or d / "r.tif",
    "text_as_tif": lambda d: (d / "t.tif").write_text("not an image\n") or d / "t.tif",
    "png_name": lambda d: (d / "x.png").write_bytes(b"\x89PNG\r\n") or d / "x.png",
    "txt_name": lambda d: (d / "x.txt").write_text("hello") or d / "x.txt",
    "truncated_tiff": _truncated,
    "lzw_without_imagecodecs": _lzw_without_codec,
    "fifo": _fifo,
    "symlink_loop": _loop,
    "dangling_symlink": _dangling,
    "empty_folder": lambda d: (d / "folder").mkdir() or d / "folder",
    "folder_of_text": lambda d: (d / "f").mkdir() or (d / "f" / "a.txt").write_text("x") or d / "f",
    "one_d_tiff": lambda d: _tif(d, (64,)),
    "too_small": lambda d: _tif(d, (8, 8)),
    "thin_strip": lambda d: _tif(d, (2, 512)),
    "nan_pixels": lambda d: (tifffile.imwrite(d / "n.tif", np.where(_img() > 1000, np.nan, 1.0).astype(np.float32)), d / "n.tif")[1],
    "inf_pixels": lambda d: (tifffile.imwrite(d / "i.tif", np.where(_img() > 3000, np.inf, 1.0).astype(np.float32)), d / "i.tif")[1],
    "complex_pixels": lambda d: (tifffile.imwrite(d / "c.tif", np.ones((64, 64), np.complex64)), d / "c.tif")[1],
    "zero_size_zarr": lambda d: _zarr(d, np.zeros((0, 64), np.float32)),
    "seven_d_zarr": lambda d: _zarr(d, np.ones((2, 1, 1, 1, 1, 40, 40), np.float32)),
    "duplicate_axes_zarr": lambda d: _zarr(d, np.ones((2, 2, 40, 40), np.float32), axes="ZZYX"),
    "axes_wrong_length_zarr": lambda d: _zarr(d, np.ones((2, 40, 40), np.float32), axes="YX"),
    "unknown_axis_letter_zarr": lambda d: _zarr(d, np.ones((2, 40, 40), np.float32), axes="QYX"),
    "empty_zarr_folder": lambda d: (d / "e.zarr").mkdir() or d / "e.zarr",
    "zarr_group_without_arrays": lambda d: (__import__("zarr").open_group(str(d / "g.zarr"), mode="w"), d / "g.zarr")[1],
    "zarr_corrupt_chunks": _zarr_corrupt_chunk,
    "zarr_nan": lambda d: _zarr(d, np.full((64, 64), np.nan, np.float32)),
    "zarr_ms_no_datasets": _zarr_bad_multiscales("no_datasets"),
    "zarr_ms_bad_path": _zarr_bad_multiscales("bad_path"),
    "zarr_ms_not_a_list": _zarr_bad_multiscales("not_a_list"),
    "zarr_ms_axes_wrong_type": _zarr_bad_multiscales("axes_wrong_type"),
    "zarr_json_garbage": lambda d: ((d / "j.zarr").mkdir(), (d / "j.zarr" / ".zarray").write_text("{nope"), d / "j.zarr")[2],
}


@pytest.mark.parametrize("case", sorted(INPUT_FILES))
def test_bad_input_file(case, tiny_model, tmp_path, capsys):
    src = INPUT_FILES[case](tmp_path)
    _cli_refused(["refocus", src, "-o", tmp_path / "out.tif", "--model", tiny_model, "-q"], tmp_path, capsys)


def test_unreadable_input(tiny_model, tmp_path, capsys):
    if ROOT_USER:
        pytest.skip("root reads every file")
    src = _tif(tmp_path)
    src.chmod(0)
    try:
        _cli_refused(["refocus", src, "-o", tmp_path / "out.tif", "--model", tiny_model], tmp_path, capsys, "permission")
    finally:
        src.chmod(0o644)


# ---------------------------------------------------------------------- options and output paths
def _no_dpm_model(root):
    return make_model_folder(root / "m", name="nodpm", dpm=False)


OPTIONS = {
    # name: (extra argv, output name, expected words)
    "tile_0": (["--tile", "0"], "out.tif", "--tile"),
    "tile_negative": (["--tile", "-32"], "out.tif", "--tile"),
    "tile_text": (["--tile", "big"], "out.tif", "not a number"),
    "tile_not_multiple": (["--tile", "48"], "out.tif", "multiple"),
    "overlap_negative": (["--overlap", "-1"], "out.tif", "--overlap"),
    "overlap_too_big": (["--tile", "64", "--overlap", "60"], "out.tif", "overlap"),
    "batch_0": (["--batch", "0"], "out.tif", "--batch"),
    "threads_minus_2": (["--threads", "-2"], "out.tif", "--threads"),
    "threads_0": (["--threads", "0"], "out.tif", "--threads"),
    "threads_float": (["--threads", "1.5"], "out.tif", "not a number"),
    "precision_bogus": (["--precision", "fp8"], "out.tif", "precision"),
    "precision_int8_missing": (["--precision", "int8"], "out.tif", "int8"),
    "axes_bad_letters": (["--axes", "QQ"], "out.tif", "axes"),
    "axes_too_many": (["--axes", "ZYX"], "out.tif", "axes"),
    "axes_repeated": (["--axes", "YY"], "out.tif", "axes"),
    "axes_no_x": (["--axes", "ZY"], "out.tif", "axes"),
    "unknown_option": (["--frobnicate"], "out.tif", "unrecognized"),
    "out_png": ([], "out.png", "must end in"),
    "out_no_suffix": ([], "out", "must end in"),
    "out_jpeg": ([], "out.jpg", "must end in"),
    "dpm_png": (["--dpm", "{d}/dpm.png"], "out.tif", "must end in"),
    "dpm_same_as_output": (["--dpm", "{d}/out.tif"], "out.tif", "same"),
    "dpm_is_input": (["--dpm", "{d}/in.tif"], "out.tif", "input"),
    "dpm_missing_folder": (["--dpm", "{d}/nope/dpm.tif"], "out.tif", "does not exist"),
    "out_missing_folder": ([], "nope/out.tif", "does not exist"),
    "out_is_input": ([], "in.tif", "is the input"),
    "out_parent_is_file": ([], "in.tif/out.tif", "inside the input"),
    "out_parent_is_other_file": ([], "notes.txt/out.tif", "is a file"),
    "model_missing": (["--model", "no-such-model"], "out.tif", "no model"),
    "model_empty_name": (["--model", ""], "out.tif", "model"),
    "model_text_file": (["--model", "{d}/notes.txt"], "out.tif", None),
    "model_garbage_onnx": (["--model", "{d}/garbage.onnx"], "out.tif", "onnx"),
    "model_empty_folder": (["--model", "{d}/emptymodel"], "out.tif", "generator.onnx"),
    "dpm_without_decoder": (["--model", "{d}/m/nodpm", "--dpm", "{d}/dpm.tif"], "out.tif", "dpm"),
    "provider_unknown": (["--provider", "warpdrive"], "out.tif", None),
    "missing_output_option": (None, None, "required"),
}


@pytest.mark.parametrize("case", sorted(OPTIONS))
def test_bad_option_or_output(case, tiny_model, tmp_path, capsys):
    extra, out, words = OPTIONS[case]
    src = io.write_image(tmp_path / "in.tif", _img(), axes="YX", pixel_size_um=0.325)
    (tmp_path / "notes.txt").write_text("my notes")
    (tmp_path / "garbage.onnx").write_bytes(b"\x08\x01garbage")
    (tmp_path / "emptymodel").mkdir()
    _no_dpm_model(tmp_path)
    if extra is None:
        argv = ["refocus", src, "--model", tiny_model]
    else:
        argv = ["refocus", src, "-o", tmp_path / out, "--model", tiny_model, "-q",
                *[a.format(d=tmp_path) for a in extra]]
        if "--model" in extra:
            argv = [a for i, a in enumerate(argv) if i not in (4, 5)]  # the case's own --model wins
    _cli_refused(argv, tmp_path, capsys, words)


# ---------------------------------------------------------------------- nothing a user owns is deleted
def _user_folder(d):
    f = d / "precious.zarr"
    f.mkdir()
    (f / "thesis.docx").write_bytes(b"years of work")
    return f


OWNED = {
    "user_folder_named_zarr": lambda d, src: _user_folder(d),
    "user_tiff_without_tag": lambda d, src: (tifffile.imwrite(d / "mine.tif", _img()), d / "mine.tif")[1],
    "user_text_named_tif": lambda d, src: ((d / "notes.tif").write_text("x"), d / "notes.tif")[1],
    "folder_named_tif": lambda d, src: ((d / "dir.tif").mkdir(), d / "dir.tif")[1],
    "zarr_holding_the_input": lambda d, src: src.parent,
    "inside_the_input_store": lambda d, src: src.parent / "0" / "out.tif",
}


@pytest.mark.parametrize("case", sorted(OWNED))
def test_users_files_are_never_replaced(case, tiny_model, tmp_path, capsys):
    if case in ("zarr_holding_the_input", "inside_the_input_store"):
        src = io.write_image(tmp_path / "data.zarr", _img(), axes="YX")
        if case == "zarr_holding_the_input":  # the input is a TIFF inside a zarr-named folder
            src = io.write_image(tmp_path / "data.zarr" / "in.tif", _img(), axes="YX")
    else:
        src = io.write_image(tmp_path / "in.tif", _img(), axes="YX")
    out = OWNED[case](tmp_path, src)
    _cli_refused(["refocus", src, "-o", out, "--model", tiny_model, "-q"], tmp_path, capsys)


def test_overwrite_replaces_a_user_folder_only_when_asked(tiny_model, tmp_path, capsys):
    src = io.write_image(tmp_path / "in.tif", _img(), axes="YX")
    f = _user_folder(tmp_path)
    assert main(["refocus", str(src), "-o", str(f), "--model", str(tiny_model), "-q", "--overwrite"]) == 0
    assert io.read_image(f).data.shape == (64, 64) and io.is_tool_output(f)
    # our own previous output is replaced without asking
    assert main(["refocus", str(src), "-o", str(f), "--model", str(tiny_model), "-q"]) == 0
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


# ---------------------------------------------------------------------- model cards
BAD_CARDS = {
    "pixel_size_negative": {"pixel_size_um": -0.325},
    "pixel_size_zero": {"pixel_size_um": 0},
    "pixel_size_text": {"pixel_size_um": "0.3 um"},
    "pixel_size_list": {"pixel_size_um": [0.325]},
    "pixel_size_nan": {"pixel_size_um": float("nan")},
    "pixel_size_bool": {"pixel_size_um": True},
    "na_negative": {"na": -0.75},
    "na_text": {"na": "high"},
    "wavelength_zero": {"wavelength_um": 0},
    "range_one_value_list": {"defocus_range_um": [5]},
    "range_three_values": {"defocus_range_um": [-5, 0, 5]},
    "range_reversed": {"defocus_range_um": [5, -5]},
    "range_text": {"defocus_range_um": "±5"},
    "range_text_items": {"defocus_range_um": ["a", "b"]},
    "range_empty": {"defocus_range_um": []},
    "channels_zero": {"channels": 0},
    "channels_text": {"channels": "1"},
    "channels_fraction": {"channels": 1.5},
    "tile_zero": {"tile": 0},
    "tile_not_multiple": {"tile": 100},
    "tile_text": {"tile": "big"},
    "tile_multiple_zero": {"tile_multiple": 0},
    "overlap_negative": {"overlap": -5},
    "halo_text": {"halo": "x"},
    "halo_huge": {"halo": 100000},  # once reported as "not enough memory" after minutes of reflected tiles
    "halo_over_half_the_tile": {"halo": 65},  # the tiny card's tile is 128
    "halo_over_the_cap": {"halo": 1500, "tile": 4096},
    "min_size_zero": {"min_size": 0},
    "name_number": {"name": 5},
    "name_empty": {"name": ""},
    "version_list": {"version": [1, 0]},
    "provenance_text": {"provenance": "mine"},
    "quality_list": {"quality": [1, 2]},
    "sign_meaningful_text": {"dpm_sign_meaningful": "yes"},
    "extra_list": {"extra": [1]},
}


def _bad_card_model(root: Path, case: str) -> Path:
    folder = make_model_folder(root / "models", name=f"bad_{case}")
    card = json.loads((folder / "model.json").read_text())
    card.update(BAD_CARDS[case])
    (folder / "model.json").write_text(json.dumps(card))
    return folder


@pytest.mark.parametrize("case", sorted(BAD_CARDS))
def test_bad_model_card(case, tmp_path, capsys):
    folder = _bad_card_model(tmp_path, case)
    src = io.write_image(tmp_path / "in.tif", _img(), axes="YX")
    err = _cli_refused(["refocus", src, "-o", tmp_path / "out.tif", "--model", folder], tmp_path, capsys)
    assert "model.json" in err or "card" in err


@pytest.mark.parametrize("halo, tile, allowed", [(100000, 128, 64), (65, 128, 64), (1500, 4096, 1024)])
def test_huge_halo_is_refused_when_the_card_is_read(halo, tile, allowed, tmp_path):
    """The card field is named with its range, by load_model, before any image is read."""
    import napari_deepr as nd
    from napari_deepr.errors import ModelError

    folder = make_model_folder(tmp_path, name="halo", halo=halo, tile=tile)
    with pytest.raises(ModelError) as info:
        nd.load_model(folder)
    text = str(info.value)
    assert "'halo'" in text and f"from 0 to {allowed}" in text and str(halo) in text and "\n" not in text
    # the largest allowed halo loads
    card = json.loads((folder / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps(dict(card, halo=allowed)))
    assert nd.load_model(folder).card.halo == allowed


def _big_halo_model(root: Path) -> Path:
    # Valid (1024 px = the cap, half the 2048-px tile), but a 64² image then runs as one 2112² tile.
    return make_model_folder(root / "models", name="bighalo", tile=2048, overlap=32, halo=1024)


def test_large_valid_halo_past_free_memory_names_the_halo(tmp_path, capsys, monkeypatch):
    from napari_deepr.engine import settings as r

    folder = _big_halo_model(tmp_path)
    src = io.write_image(tmp_path / "in.tif", _img(), axes="YX", pixel_size_um=0.325)
    monkeypatch.setattr(r, "available_memory", lambda: 1 << 30)  # 2112² × 600 B ≈ 2.7 GB does not fit in 1 GiB
    err = _cli_refused(["refocus", src, "-o", tmp_path / "out.tif", "--model", folder, "-q"], tmp_path, capsys,
                       sentence="halo of 1024 px")
    assert "2112×2112" in err and "model.json" in err and "not enough memory" not in err
    import napari_deepr as nd
    from napari_deepr.errors import ModelError

    with pytest.raises(ModelError, match="halo of 1024 px"):
        nd.refocus(_img().astype(np.float32), folder)
    # With the memory it needs, the same model runs: the refusal is about memory, not the card.
    monkeypatch.setattr(r, "available_memory", lambda: 64 << 30)
    assert nd.refocus(_img().astype(np.float32), folder).shape == (64, 64)


def test_a_tile_too_large_even_without_its_halo_is_not_blamed_on_the_halo(tmp_path, monkeypatch):
    """The halo grows a 64² image's tile to 96², but the 64² tile alone would not fit either: the halo
    is not the cause, so the halo check stays silent (and this tiny network runs anyway)."""
    import napari_deepr as nd
    from napari_deepr.engine import settings as r

    folder = make_model_folder(tmp_path / "models", name="h", tile=128, overlap=32, halo=16)
    monkeypatch.setattr(r, "available_memory", lambda: 1 << 20)  # below 64² × 600 B
    assert nd.refocus(_img().astype(np.float32), folder).shape == (64, 64)


@pytest.mark.parametrize("content", ["[1, 2]", "{broken", '"a string"', ""])
def test_model_json_not_an_object(content, tmp_path, capsys):
    folder = make_model_folder(tmp_path / "models", name="broken")
    (folder / "model.json").write_text(content)
    src = io.write_image(tmp_path / "in.tif", _img(), axes="YX")
    _cli_refused(["refocus", src, "-o", tmp_path / "out.tif", "--model", folder], tmp_path, capsys)


@pytest.mark.parametrize("case", ["range_one_value_list", "tile_text", "pixel_size_text"])
def test_one_broken_model_does_not_break_listing_or_lookup(case, tmp_path, capsys, monkeypatch):
    _bad_card_model(tmp_path, case)
    make_model_folder(tmp_path / "models", name="good")
    (tmp_path / "models" / "junk").mkdir()
    (tmp_path / "models" / "junk" / "generator.onnx").write_bytes(b"not onnx")
    monkeypatch.setenv("DEEPR_MODELS_PATH", str(tmp_path / "models"))
    assert main(["models", "--json"]) == 0
    captured = capsys.readouterr()
    names = [m["name"] for m in json.loads(captured.out)]
    assert "good" in names and f"bad_{case}" not in names
    assert "Traceback" not in captured.err and "warning" in captured.err
    src = io.write_image(tmp_path / "in.tif", _img(), axes="YX")
    assert main(["refocus", str(src), "-o", str(tmp_path / "out.tif"), "--model", "good", "-q"]) == 0


# ---------------------------------------------------------------------- models that load but fail when run
def _graph_model(folder: Path, nodes, inits, out_shape=("N", 1, "H", "W"), in_shape=("N", 1, "H", "W"), dpm=False):
    folder.mkdir(parents=True)
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, list(in_shape))
    out = helper.make_tensor_value_info("output", TensorProto.FLOAT, list(out_shape))
    outs = [out]
    if dpm:
        nodes = nodes + [helper.make_node("Identity", ["input"], ["feat0"])]
        outs.append(helper.make_tensor_value_info("feat0", TensorProto.FLOAT, list(in_shape)))
    g = helper.make_graph(nodes, "g", [inp], outs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(folder / "generator.onnx"))
    card = {"name": folder.name, "channels": 1, "tile": 64, "overlap": 16, "tile_multiple": 32, "min_size": 32,
            "pixel_size_um": 0.325}
    (folder / "model.json").write_text(json.dumps(card))
    return folder


def _nan_dpm_model(folder: Path):
    make_model_folder(folder.parent, name=folder.name, tile=64, overlap=16)
    inp = helper.make_tensor_value_info("feat0", TensorProto.FLOAT, ["N", 1, "H", "W"])
    out = helper.make_tensor_value_info("dpm", TensorProto.FLOAT, ["N", 1, "H", "W"])
    zero = numpy_helper.from_array(np.zeros(1, np.float32), "zero")
    nodes = [helper.make_node("Mul", ["feat0", "zero"], ["z"]), helper.make_node("Div", ["z", "zero"], ["dpm"])]
    m = helper.make_model(helper.make_graph(nodes, "d", [inp], [out], [zero]), opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(folder / "dpm.onnx"))
    return folder


_ZERO = numpy_helper.from_array(np.zeros(1, np.float32), "zero")
RUNTIME_MODELS = {
    "fixed_input_shape": lambda f: _graph_model(f, [helper.make_node("Identity", ["input"], ["output"])], [],
                                                in_shape=(1, 1, 40, 40), out_shape=(1, 1, 40, 40)),
    "nan_output": lambda f: _graph_model(f, [helper.make_node("Mul", ["input", "zero"], ["z"]),
                                             helper.make_node("Div", ["z", "zero"], ["output"])], [_ZERO]),
    "inf_output": lambda f: _graph_model(f, [helper.make_node("Div", ["input", "zero"], ["output"])], [_ZERO]),
    "half_size_output": lambda f: _graph_model(
        f, [helper.make_node("MaxPool", ["input"], ["output"], kernel_shape=[2, 2], strides=[2, 2])], []),
    "two_channel_output": lambda f: _graph_model(f, [helper.make_node("Concat", ["input", "input"], ["output"], axis=1)], [],
                                                 out_shape=("N", 2, "H", "W")),
    "nan_dpm": _nan_dpm_model,
}


@pytest.mark.parametrize("case", sorted(RUNTIME_MODELS))
def test_model_that_fails_when_run(case, tmp_path, capsys):
    folder = RUNTIME_MODELS[case](tmp_path / "models" / case)
    src = io.write_image(tmp_path / "in.tif", _img((96, 96)), axes="YX")
    argv = ["refocus", src, "-o", tmp_path / "out.tif", "--model", folder, "-q"]
    if case == "nan_dpm":
        argv += ["--dpm", tmp_path / "dpm.tif"]
    err = _cli_refused(argv, tmp_path, capsys)
    if "nan" in case or "inf" in case:
        assert f"model {folder.name} " in err.lower()  # the model is named
        assert "NaN or infinite" in err


# ---------------------------------------------------------------------- pairs
def _stack(d, name="z.tif", planes=9, size=64, dz=0.5, dtype=np.uint16, nan=False):
    a = _img((planes, size, size)).astype(np.float32 if nan else dtype)
    if nan:
        a[2, 5, 5] = np.nan
    return io.write_image(d / name, a, axes="ZYX", pixel_size_um=0.325, z_step_um=dz)


def _previous_dataset_holding_input(d):
    """A folder that is a pairs dataset (index.json) where the user also keeps a stack."""
    out = d / "olds"
    out.mkdir()
    (out / "index.json").write_text(json.dumps({"format": "napari-deepr-pairs"}))
    return _stack(out), out


PAIRS = {
    "missing_stack": lambda d: (["{d}/none.tif"], "ds", []),
    "two_d_image": lambda d: ([io.write_image(d / "flat.tif", _img(), axes="YX")], "ds", []),
    "one_plane": lambda d: ([_stack(d, planes=1)], "ds", []),
    "nan_stack": lambda d: ([_stack(d, nan=True)], "ds", []),
    "no_z_step": lambda d: ([(tifffile.imwrite(d / "nz.tif", _img((5, 64, 64))), d / "nz.tif")[1]], "ds", []),
    "z_step_negative": lambda d: ([_stack(d)], "ds", ["--z-step", "-0.5"]),
    "z_step_zero": lambda d: ([_stack(d)], "ds", ["--z-step", "0"]),
    "range_zero": lambda d: ([_stack(d)], "ds", ["--range", "0"]),
    "range_wider_than_stack": lambda d: ([_stack(d)], "ds", ["--range", "100"]),
    "patch_48": lambda d: ([_stack(d)], "ds", ["--patch", "48"]),
    "patch_0": lambda d: ([_stack(d)], "ds", ["--patch", "0"]),
    "patch_bigger_than_stack": lambda d: ([_stack(d)], "ds", ["--patch", "128", "--range", "1"]),
    "infocus_index_outside": lambda d: ([_stack(d)], "ds", ["--infocus-index", "99", "--range", "1"]),
    "infocus_index_negative": lambda d: ([_stack(d)], "ds", ["--infocus-index", "-1"]),
    "split_zero": lambda d: ([_stack(d)], "ds", ["--split", "0"]),
    "split_two": lambda d: ([_stack(d)], "ds", ["--split", "2"]),
    "focus_method_bogus": lambda d: ([_stack(d)], "ds", ["--focus-method", "guess"]),
    "output_is_the_input": lambda d: ([_stack(d)], "z.tif", []),
    "output_is_a_file": lambda d: ([_stack(d)], "notes.txt", []),
    "output_is_a_users_folder": lambda d: ([_stack(d)], "mine", []),
    "output_holds_the_input": lambda d: ([_stack(d / "olds2")], "olds2", []),
    "output_is_dataset_holding_input": lambda d: ([_previous_dataset_holding_input(d)[0]], "olds", []),
    "fifo_stack": lambda d: ([_fifo(d)], "ds", []),
}


@pytest.mark.parametrize("case", sorted(PAIRS))
def test_bad_pairs(case, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("notes")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("keep")
    (tmp_path / "olds2").mkdir()
    stacks, out, extra = PAIRS[case](tmp_path)
    stacks = [str(s).format(d=tmp_path) for s in stacks]
    _cli_refused(["pairs", *stacks, "-o", tmp_path / out, "-q", *extra], tmp_path, capsys)


def test_pairs_replaces_its_own_dataset(tmp_path, capsys):
    st = _stack(tmp_path, planes=5)
    args = ["pairs", str(st), "-o", str(tmp_path / "ds"), "--range", "1", "--patch", "32", "--focus-method", "nvar", "-q"]
    assert main(args) == 0 and main(args) == 0
    assert (tmp_path / "ds" / "index.json").is_file() and st.is_file()


# ---------------------------------------------------------------------- a disk without room for the outputs
def _disk_with(monkeypatch, free: int) -> list:
    """Every filesystem reports ``free`` bytes free (no real full disk needed); returns the folders asked about."""
    import collections
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    asked = []

    def fake(path):
        asked.append(Path(path))
        return usage(1 << 40, (1 << 40) - free, free)

    monkeypatch.setattr(shutil, "disk_usage", fake)
    return asked


def _never_compute(monkeypatch):
    """Refusals come before any computing: the network and the pairs' registration must not run."""
    from napari_deepr.engine.runner import Runner
    from napari_deepr.stacks import register

    def boom(*a, **k):
        raise AssertionError("computing started before the free-space check")

    monkeypatch.setattr(Runner, "run", boom)
    monkeypatch.setattr(register, "register_stack", boom)


NO_SPACE = {
    # name: (argv, words the sentence must hold)
    "refocus_tiff": (["refocus", "{src}", "-o", "{d}/out.tif"], "out.tif"),
    "refocus_zarr": (["refocus", "{src}", "-o", "{d}/out.zarr"], "out.zarr"),
    "refocus_out_of_core": (["refocus", "{src}", "-o", "{d}/out.tif", "--out-of-core"], "out.tif"),
    "refocus_dpm_and_trust": (["refocus", "{src}", "-o", "{d}/out.tif", "--dpm", "{d}/dpm.tif", "--trust", "{d}/trust.zarr"],
                              "out.tif, dpm.tif and trust.zarr"),
    "refocus_replacing_own_output": (["refocus", "{src}", "-o", "{d}/old.tif"], "old.tif"),
    "pairs": (["pairs", "{stack}", "-o", "{d}/ds", "--range", "1", "--patch", "32"], "ds"),
}


@pytest.mark.parametrize("case", sorted(NO_SPACE))
def test_no_room_for_the_outputs_is_refused_before_computing(case, tiny_model, tmp_path, capsys, monkeypatch):
    src = io.write_image(tmp_path / "in.tif", _img(), axes="YX", pixel_size_um=0.325)
    io.write_image(tmp_path / "old.tif", _img(), axes="YX")  # a previous output: its space is not counted as free
    stack = _stack(tmp_path, planes=5)
    argv, words = NO_SPACE[case]
    argv = [a.format(d=tmp_path, src=src, stack=stack) for a in argv]
    if argv[0] == "refocus":
        argv += ["--model", str(tiny_model), "-q"]
    _disk_with(monkeypatch, 100_000)
    _never_compute(monkeypatch)
    err = _cli_refused(argv, tmp_path, capsys, sentence=words)
    assert "needs about" in err and "only 100.0 kB is free on the disk holding " + str(tmp_path) in err


def test_outputs_on_one_disk_are_added_up(tiny_model, tmp_path, capsys, monkeypatch):
    from napari_deepr import _safety

    src = io.write_image(tmp_path / "in.tif", _img(), axes="YX", pixel_size_um=0.325)
    needs = [n for _, n in _safety.refocus_needs(tmp_path / "out.tif", (64, 64), "YX", 1, np.uint16, dpm=tmp_path / "dpm.tif")]
    argv = ["refocus", src, "-o", tmp_path / "out.tif", "--dpm", tmp_path / "dpm.tif", "--model", tiny_model, "-q"]
    _disk_with(monkeypatch, sum(needs) - 1)  # either output alone fits, both together do not
    _cli_refused(argv, tmp_path, capsys, sentence="out.tif and dpm.tif")
    asked = _disk_with(monkeypatch, sum(needs))  # just enough: the run goes ahead
    assert main([str(a) for a in argv]) == 0
    assert (tmp_path / "out.tif").is_file() and (tmp_path / "dpm.tif").is_file()
    assert asked and all(p == tmp_path for p in asked)  # the output's own filesystem was asked


def _disk_fills_up(monkeypatch, module, name):
    """``module.name`` (a writer) writes a little, then fails as a full disk does."""
    import errno

    real = getattr(module, name)

    def full(path, *a, **k):
        Path(path).write_bytes(b"the first bytes")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(module, name, full)
    return real


@pytest.mark.parametrize("what", ["refocus_tiff", "refocus_zarr", "pairs"])
def test_a_disk_that_fills_up_during_the_write_replaces_nothing(what, tiny_model, tmp_path, capsys, monkeypatch):
    """Another program filled the disk after the check: one sentence, the previous output kept, no temporary."""
    from napari_deepr.stacks import pairs

    src = io.write_image(tmp_path / "in.tif", _img(), axes="YX", pixel_size_um=0.325)
    stack = _stack(tmp_path, planes=5)
    if what == "pairs":
        assert main(["pairs", str(stack), "-o", str(tmp_path / "ds"), "--range", "1", "--patch", "32", "-q"]) == 0
        _disk_fills_up(monkeypatch, pairs, "_write_tiff")
        argv = ["pairs", stack, "-o", tmp_path / "ds", "--range", "1", "--patch", "32", "-q"]
    else:
        out = tmp_path / ("old.tif" if what == "refocus_tiff" else "old.zarr")
        assert main(["refocus", str(src), "-o", str(out), "--model", str(tiny_model), "-q"]) == 0  # a previous output
        if what == "refocus_tiff":
            _disk_fills_up(monkeypatch, io, "_write_tiff")
        else:
            _disk_fills_up(monkeypatch, io, "_write_zarr")
        argv = ["refocus", src, "-o", out, "--model", tiny_model, "-q"]
    capsys.readouterr()
    _cli_refused(argv, tmp_path, capsys, sentence="the disk is full")


def test_a_disk_that_fills_up_during_build_pairs_is_one_sentence_in_python(tmp_path, monkeypatch):
    from napari_deepr.errors import OutputError
    from napari_deepr.stacks import pairs

    stack = _stack(tmp_path, planes=5)
    _disk_fills_up(monkeypatch, pairs, "_write_tiff")
    before = _snapshot(tmp_path)
    with pytest.raises(OutputError, match=r"^ds could not be written \(the disk is full\); nothing was replaced\.$"):
        pairs.build_pairs([stack], tmp_path / "ds", range_um=1, patch=32, focus_method="nvar")
    assert _snapshot(tmp_path) == before


def test_an_unknown_free_space_refuses_nothing(tiny_model, tmp_path, monkeypatch):
    import shutil

    def unknown(path):
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(shutil, "disk_usage", unknown)
    src = io.write_image(tmp_path / "in.tif", _img(), axes="YX", pixel_size_um=0.325)
    assert main(["refocus", str(src), "-o", str(tmp_path / "out.tif"), "--model", str(tiny_model), "-q"]) == 0


def _allocated(path: Path) -> int:
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return sum(max(f.stat().st_size, f.stat().st_blocks * 512) for f in files)


@pytest.mark.parametrize("suffix", [".tif", ".zarr"])
@pytest.mark.parametrize("streamed", [False, True])
def test_the_space_estimate_bounds_what_is_written(suffix, streamed, tiny_model, tmp_path):
    from napari_deepr import _safety

    shape = (2, 300, 260)
    src = io.write_image(tmp_path / "in.tif", _img(shape), axes="ZYX", pixel_size_um=0.325)
    outs = {k: tmp_path / f"{k}{suffix}" for k in ("out", "dpm", "trust")}
    argv = ["refocus", str(src), "-o", str(outs["out"]), "--dpm", str(outs["dpm"]), "--trust", str(outs["trust"]),
            "--model", str(tiny_model), "-q", "--trust-passes", "1"]
    assert main(argv + (["--out-of-core"] if streamed else ["--in-memory"])) == 0
    needs = dict(_safety.refocus_needs(outs["out"], shape, "ZYX", 1, np.uint16, dpm=outs["dpm"], trust=outs["trust"]))
    for key, path in outs.items():
        actual = _allocated(path)
        # an upper bound (uncompressed zarr, whole TIFF tiles), never wildly above: 1 MiB of headroom per output
        # plus the rounding of 300×260 to whole 256-px TIFF tiles
        assert actual <= needs[path] <= 2 * 512 * 512 * 4 + actual + (2 << 20), (key, actual, needs[path])


def test_the_pairs_estimate_bounds_the_dataset(tmp_path):
    from napari_deepr import _safety
    from napari_deepr.stacks.pairs import _load_fields, build_pairs

    stacks = [_stack(tmp_path, name=f"z{i}.tif", planes=9, size=96) for i in range(2)]
    build_pairs(stacks, tmp_path / "ds", range_um=1.5, patch=32, focus_method="nvar", register=False)
    bound = _safety.pairs_bytes(_load_fields(stacks, None), 32, 1.5)
    actual = _allocated(tmp_path / "ds")
    assert actual <= bound <= 2 * actual + (1 << 20), (actual, bound)


NO_SPACE_API = {
    "write_image_tiff": lambda d, m: io.write_image(d / "o.tif", _img().astype(np.float32)),
    "write_image_zarr": lambda d, m: io.write_image(d / "o.zarr", _img().astype(np.float32)),
    "refocus_file": lambda d, m: __import__("napari_deepr.engine.distributed", fromlist=["x"]).refocus_file(
        io.read_image(d / "in.tif"), d / "o.tif", model=m, dpm_path=d / "dpm.zarr"),
    "build_pairs": lambda d, m: __import__("napari_deepr.stacks.pairs", fromlist=["x"]).build_pairs(
        [d / "z.tif"], d / "ds", range_um=1, patch=32, focus_method="nvar"),
}


@pytest.mark.parametrize("case", sorted(NO_SPACE_API))
def test_api_refuses_outputs_without_room(case, tiny_model, tmp_path, monkeypatch):
    from napari_deepr.errors import NoSpaceError, OutputError

    io.write_image(tmp_path / "in.tif", _img(), axes="YX", pixel_size_um=0.325)
    _stack(tmp_path, planes=5)
    before = _snapshot(tmp_path)
    _disk_with(monkeypatch, 50_000)
    _never_compute(monkeypatch)
    with pytest.raises(NoSpaceError) as info:
        NO_SPACE_API[case](tmp_path, str(tiny_model))
    assert isinstance(info.value, (OutputError, OSError, DeepRError))
    text = str(info.value)
    assert "needs about" in text and "50.0 kB is free" in text and "\n" not in text and text.endswith(".")
    assert _snapshot(tmp_path) == before


# ---------------------------------------------------------------------- simulate, bench, demo, quantize, models
OTHER = {
    "simulate_size_0": (["simulate", "-o", "{d}/sim", "--size", "0"], "--size"),
    "simulate_size_8": (["simulate", "-o", "{d}/sim", "--size", "8"], "size"),
    "simulate_na_0": (["simulate", "-o", "{d}/sim", "--na", "0"], "--na"),
    "simulate_na_5": (["simulate", "-o", "{d}/sim", "--na", "5"], "na"),
    "simulate_wavelength_negative": (["simulate", "-o", "{d}/sim", "--wavelength", "-0.5"], "--wavelength"),
    "simulate_pixel_size_0": (["simulate", "-o", "{d}/sim", "--pixel-size", "0"], "--pixel-size"),
    "simulate_z_nan": (["simulate", "-o", "{d}/sim", "--z", "nan"], "--z"),
    "simulate_tilt_inf": (["simulate", "-o", "{d}/sim", "--tilt", "inf"], "--tilt"),
    "simulate_specimen_bogus": (["simulate", "-o", "{d}/sim", "--specimen", "unicorns"], "specimen"),
    "simulate_output_is_file": (["simulate", "-o", "{d}/notes.txt"], "is a file"),
    "simulate_missing_output": (["simulate"], "required"),
    "bench_sizes_0": (["bench", "--sizes", "0"], "--sizes"),
    "bench_sizes_negative": (["bench", "--sizes", "-512"], "--sizes"),
    "bench_repeats_0": (["bench", "--repeats", "0"], "--repeats"),
    "bench_threads_minus_2": (["bench", "--threads", "-2"], "--threads"),
    "bench_tile_0": (["bench", "--tile", "0"], "--tile"),
    "bench_json_missing_folder": (["bench", "--sizes", "64", "--json", "{d}/nope/b.json", "--model", "{m}"], "does not exist"),
    "bench_model_missing": (["bench", "--sizes", "64", "--model", "no-such-model"], "no model"),
    "demo_output_is_file": (["demo", "-o", "{d}/notes.txt"], "is a file"),
    "demo_model_missing": (["demo", "-o", "{d}/q", "--model", "no-such-model"], "no model"),
    "quantize_model_missing": (["quantize", "no-such-model"], "no model"),
    "quantize_calibration_0": (["quantize", "{m}", "--calibration-tiles", "0"], "--calibration-tiles"),
    "quantize_json_missing_folder": (["quantize", "{m}", "--json", "{d}/nope/q.json"], "does not exist"),
    "no_command": ([], "required"),
    "unknown_command": (["frobnicate"], "invalid choice"),
    "train_missing_output": (["train", "{d}/ds"], "required"),
    "train_output_is_file": (["train", "{d}/notes.txt", "-o", "{d}/notes.txt"], "is a file"),
    "train_dataset_missing": (["train", "{d}/none", "-o", "{d}/model"], "does not exist"),
}


@pytest.mark.parametrize("case", sorted(OTHER))
def test_bad_other_commands(case, tiny_model, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("notes")
    argv, words = OTHER[case]
    _cli_refused([a.format(d=tmp_path, m=tiny_model) for a in argv], tmp_path, capsys, words)


@pytest.mark.parametrize("name", ["tilted_comparison.png", "tilted_input.tif", "brightfield/he_comparison.png"])
def test_demo_keeps_a_users_files_in_its_folder(name, tiny_model, tmp_path, capsys, monkeypatch):
    """The demo's figures were written over any file of the same name; now refused before any computing."""
    from napari_deepr import demo
    from napari_deepr.engine.runner import Runner

    monkeypatch.setattr(Runner, "run", lambda *a: (_ for _ in ()).throw(AssertionError("computed")))
    (tmp_path / "q" / name).parent.mkdir(parents=True)
    (tmp_path / "q" / name).write_bytes(b"\x89PNG my own figure")
    if name.startswith("brightfield/"):  # the brightfield case (run with an RGB model) checks its own folder
        monkeypatch.setattr(demo, "brightfield_sample", lambda **k: (_ for _ in ()).throw(AssertionError("computed")))
        before = _snapshot(tmp_path)
        with pytest.raises(DeepRError, match="did not write"):
            demo.run_brightfield_demo(tmp_path / "q" / "brightfield", tiny_model)
        assert _snapshot(tmp_path) == before
        return
    _cli_refused(["demo", "-o", tmp_path / "q", "--model", tiny_model], tmp_path, capsys, sentence="did not write")


def test_figures_napari_deepr_wrote_are_its_own(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from napari_deepr import _safety

    fig = plt.figure()
    _safety.save_figure(fig, tmp_path / "tilted_comparison.png")
    plt.close(fig)
    _safety.check_own_outputs(tmp_path, ["tilted_comparison.png"])  # ours: may be replaced
    fig = plt.figure()
    fig.savefig(tmp_path / "mine.png")  # a matplotlib PNG of the user's
    plt.close(fig)
    with pytest.raises(DeepRError, match="did not write"):
        _safety.check_own_outputs(tmp_path, ["mine.png"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.png", "tilted_comparison.png"]


@pytest.mark.parametrize("kind", ["file", "list", "missing"])
def test_models_path_entries_that_are_not_folders(kind, tmp_path, capsys, monkeypatch):
    entry = tmp_path / "entry"
    if kind == "file":
        entry.write_text("x")
    elif kind == "list":
        entry = os.pathsep.join([str(tmp_path / "a"), str(tmp_path / "b")])
    monkeypatch.setenv("DEEPR_MODELS_PATH", str(entry))
    assert main(["models"]) == 0
    assert "Traceback" not in capsys.readouterr().err


# ---------------------------------------------------------------------- the Python API
def _api_cases(m, nodpm):
    import napari_deepr as nd

    img = _img().astype(np.float32)
    return {
        "image_none": lambda d: nd.refocus(None, m),
        "image_path_string": lambda d: nd.refocus("in.tif", m),
        "image_dict": lambda d: nd.refocus({"a": 1}, m),
        "image_ragged_list": lambda d: nd.refocus([[1, 2], [3]], m),
        "image_1d": lambda d: nd.refocus(np.ones(64), m),
        "image_0d": lambda d: nd.refocus(np.float32(3), m),
        "image_empty": lambda d: nd.refocus(np.ones((0, 64)), m),
        "image_complex": lambda d: nd.refocus(np.ones((64, 64), complex), m),
        "image_strings": lambda d: nd.refocus(np.full((64, 64), "a"), m),
        "image_7d": lambda d: nd.refocus(np.ones((1, 1, 1, 1, 1, 40, 40), np.float32), m),
        "image_nan": lambda d: nd.refocus(np.where(img > 1000, np.nan, img), m),
        "image_inf": lambda d: nd.refocus(np.where(img > 1000, -np.inf, img), m),
        "image_too_small": lambda d: nd.refocus(np.ones((8, 8), np.float32), m),
        "tile_string": lambda d: nd.refocus(img, m, tile="64"),
        "tile_zero": lambda d: nd.refocus(img, m, tile=0),
        "tile_bool": lambda d: nd.refocus(img, m, tile=True),
        "tile_float": lambda d: nd.refocus(img, m, tile=64.0),
        "overlap_negative": lambda d: nd.refocus(img, m, overlap=-1),
        "batch_zero": lambda d: nd.refocus(img, m, batch=0),
        "providers_int": lambda d: nd.refocus(img, m, providers=3),
        "axes_int": lambda d: nd.refocus(img, m, axes=5),
        "axes_wrong": lambda d: nd.refocus(img, m, axes="ZYX"),
        "dpm_without_decoder": lambda d: nd.refocus(img, nodpm, dpm=True),
        "model_int": lambda d: nd.refocus(img, 5),
        "model_empty": lambda d: nd.refocus(img, ""),
        "model_missing": lambda d: nd.load_model("no-such-model"),
        "load_model_none": lambda d: nd.load_model(None),
        "read_image_none": lambda d: io.read_image(None),
        "read_image_missing": lambda d: io.read_image(d / "none.tif"),
        "read_image_fifo": lambda d: io.read_image(_fifo(d)),
        "read_image_loop": lambda d: io.read_image(_loop(d)),
        "read_stack_of_2d": lambda d: io.read_stack(io.write_image(d / "f.tif", _img(), axes="YX")),
        "write_image_png": lambda d: io.write_image(d / "o.png", img),
        "write_image_user_folder": lambda d: io.write_image(_user_folder(d), img),
        "write_image_axes_mismatch": lambda d: io.write_image(d / "o.tif", img, axes="ZYX"),
        "write_image_axes_repeated": lambda d: io.write_image(d / "o.tif", img, axes="YY"),
        "write_image_missing_folder": lambda d: io.write_image(d / "nope" / "o.tif", img),
        "check_output_holds_input": lambda d: io.check_output_path(d, d / "in.tif"),
        "build_pairs_patch_text": lambda d: __import__("napari_deepr.stacks.pairs", fromlist=["x"]).build_pairs(
            [np.ones((5, 64, 64))], d / "ds", z_step_um=0.5, patch="64"),
        "build_pairs_range_negative": lambda d: __import__("napari_deepr.stacks.pairs", fromlist=["x"]).build_pairs(
            [np.ones((5, 64, 64))], d / "ds", z_step_um=0.5, range_um=-1),
        "build_pairs_z_step_text": lambda d: __import__("napari_deepr.stacks.pairs", fromlist=["x"]).build_pairs(
            [np.ones((5, 64, 64))], d / "ds", z_step_um="half", patch=32),
    }


API = sorted(_api_cases(None, None))


@pytest.mark.parametrize("case", API)
def test_api_refuses_in_one_sentence(case, tiny_model, tmp_path):
    nodpm = _no_dpm_model(tmp_path / "x")
    fn = _api_cases(str(tiny_model), str(nodpm))[case]
    before = _snapshot(tmp_path)
    with pytest.raises(DeepRError) as info:
        fn(tmp_path)
    exc = info.value
    assert isinstance(exc, (ValueError, TypeError, OSError))
    text = str(exc)
    assert text and "\n" not in text and text.rstrip()[-1] in ".)'\"", text
    after = _snapshot(tmp_path)
    new = {k for k in after if k not in before}
    assert not {k for k in new if "partial" in k}
    assert all(before[k] == after.get(k) for k in before if not k.startswith(("x", "precious")))


def test_wrong_types_are_type_errors(tiny_model):
    import napari_deepr as nd

    with pytest.raises(TypeError):
        nd.refocus(np.ones((64, 64), np.float32), tiny_model, tile="64")
    with pytest.raises(TypeError):
        nd.load_model(3.5)


# ---------------------------------------------------------------------- silent wrong output, calibration
def test_float32_near_max_gives_finite_output(tiny_model):
    import napari_deepr as nd

    rng = np.random.default_rng(1)
    a = (rng.random((64, 64)) * 3.0e38).astype(np.float32)
    out = nd.refocus(a, tiny_model)
    assert np.isfinite(out).all() and out.dtype == np.float64  # normalized in float64, returned as float64
    b = a.astype(np.float64) / 1e30  # the same image scaled into float32's comfortable range
    np.testing.assert_allclose(out / 1e30, nd.refocus(b.astype(np.float32), tiny_model), rtol=1e-3, atol=1e-3 * np.ptp(b))


@pytest.mark.parametrize("bad", ["text", [0.3, 0.3], -0.325, 0, "nan"])
def test_bad_calibration_in_description_is_unknown(bad, tmp_path, tiny_model, capsys):
    p = tmp_path / "cal.tif"
    desc = json.dumps({"pixel_size_um": bad, "z_step_um": bad})
    tifffile.imwrite(p, _img(), description=desc, metadata=None)
    img = io.read_image(p)
    assert img.pixel_size_um is None and img.z_step_um is None
    assert "calibration_ignored" in img.metadata
    assert main(["refocus", str(p), "-o", str(tmp_path / "o.tif"), "--model", str(tiny_model), "-q"]) == 0


# ---------------------------------------------------------------------- checkpoints are never unpickled
class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


@pytest.mark.parametrize("how", ["resume", "init_from"])
def test_crafted_pickle_is_refused_and_never_runs(how, tmp_path):
    torch = pytest.importorskip("torch")
    from napari_deepr.train.data import DatasetError
    from napari_deepr.train.loop import load_checkpoint, load_init_weights

    marker = tmp_path / "pwned.txt"
    evil = tmp_path / ("model" if how == "resume" else "x") / ("checkpoint.pt" if how == "resume" else "init.pt")
    evil.parent.mkdir()
    torch.save({"generator": {}, "config": _Evil(str(marker))}, evil)
    # sanity: the file really runs code when unpickled freely
    with open(evil, "rb"):
        pass
    with pytest.raises(DatasetError, match="refused"):
        load_checkpoint(evil) if how == "resume" else load_init_weights(evil)
    assert not marker.exists()
    # and through the trainer's command line: one JSON error line, exit 2, no code run
    from napari_deepr.train.__main__ import main as train_main

    spec = tmp_path / "syn.json"
    spec.write_text(json.dumps({"synthetic": {}}))
    argv = [str(spec), "-o", str(tmp_path / "model"), "--iterations", "1"]
    argv += ["--resume"] if how == "resume" else ["--init-from", str(evil)]
    assert train_main(argv) == 2
    assert not marker.exists()


def test_the_crafted_pickle_is_real(tmp_path):
    """The test above would catch a regression: unpickling the same file freely does run its code."""
    marker = tmp_path / "pwned.txt"
    data = pickle.dumps(_Evil(str(marker)))
    pickle.loads(data)  # noqa: S301 - on purpose, with our own bytes
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, b"PK\x03\x04truncated zip"])
def test_corrupt_checkpoint_one_sentence(content, tmp_path):
    pytest.importorskip("torch")
    from napari_deepr.train.data import DatasetError
    from napari_deepr.train.loop import load_checkpoint

    p = tmp_path / "c.pt"
    p.write_bytes(content)
    with pytest.raises(DatasetError) as info:
        load_checkpoint(p)
    assert "\n" not in str(info.value)


TRAIN_ARGS = {
    "iterations_negative": ["--iterations", "-1"],
    "batch_zero": ["--batch", "0"],
    "patch_48": ["--patch", "48"],
    "lr_zero": ["--lr-g", "0"],
    "minutes_zero": ["--minutes", "0"],
    "val_every_zero": ["--val-every", "0"],
    "threads_negative": ["--threads", "-2"],
    "base_zero": ["--base", "0"],
    "base_zero_json": ["--json", "--base", "0"],
    "minutes_zero_json": ["--json", "--minutes", "0"],
    "resume_without_checkpoint": ["--resume"],
    "init_from_missing": ["--init-from", "{d}/none.pt"],
    "unknown_option": ["--frobnicate"],
    "iterations_text": ["--iterations", "many"],
}


@pytest.mark.parametrize("case", sorted(TRAIN_ARGS))
def test_bad_train_arguments(case, tmp_path, capfd):
    pytest.importorskip("torch")
    from napari_deepr.train.__main__ import main as train_main

    spec = tmp_path / "syn.json"
    spec.write_text(json.dumps({"synthetic": {}}))
    before = _snapshot(tmp_path)
    try:
        rc = train_main([str(spec), "-o", str(tmp_path / "model"), *[a.format(d=tmp_path) for a in TRAIN_ARGS[case]]])
    except SystemExit as exc:  # argparse's exit after the JSON error line
        rc = exc.code
    out, err = capfd.readouterr()
    assert rc == 2
    assert "Traceback" not in err
    # One sentence: a JSON error line with --json (the widget's protocol), else one "error:" line on stderr.
    errors = [json.loads(line) for line in out.splitlines() if line.startswith("{") and '"error"' in line]
    if errors:
        assert errors[-1]["event"] == "error" and "\n" not in errors[-1]["message"]
    else:
        assert len([line for line in err.splitlines() if "error:" in line]) == 1, err
    after = _snapshot(tmp_path)
    assert all(before[k] == after.get(k) for k in before)
    assert not any("checkpoint" in k for k in after)


# ---------------------------------------------------------------------- faults: killed processes, races
def _py(code: str, *args, **kw):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


_SLOW_WRITE = """
import sys, time, numpy as np
from napari_deepr import io
real = io._write_tiff
def slow(tmp, *a):
    real(tmp, *a)
    print("WRITING", flush=True)
    time.sleep(60)
io._write_tiff = slow
from napari_deepr.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _wait_for(proc, word, timeout=60):
    t0 = time.time()
    while time.time() - t0 < timeout:
        line = proc.stdout.readline()
        if word in line:
            return
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read())
    raise AssertionError(f"{word} never came")


def test_kill_9_during_write_then_rerun_cleans_up(tiny_model, tmp_path):
    src = io.write_image(tmp_path / "in.tif", _img(), axes="YX")
    out = tmp_path / "out.tif"
    proc = _py(_SLOW_WRITE, "refocus", src, "-o", out, "--model", tiny_model, "-q")
    _wait_for(proc, "WRITING")
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tif.")]
    assert left and not out.exists()  # kill -9 cannot be caught: a temporary is left behind
    rerun = subprocess.run([sys.executable, "-m", "napari_deepr.cli", "refocus", str(src), "-o", str(out), "--model",
                            str(tiny_model), "-q"], env=dict(os.environ, PYTHONPATH=SRC), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "interrupted earlier run" in rerun.stderr
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]
    assert io.read_image(out).data.shape == (64, 64)


def _terminate(proc) -> tuple[int, str]:
    """SIGTERM to a running ``deepr``; its exit code and what it printed on stderr."""
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(30)
    return rc, proc.stderr.read()


def test_sigterm_during_write_removes_the_temporary(tiny_model, tmp_path):
    src = io.write_image(tmp_path / "in.tif", _img(), axes="YX")
    before = _snapshot(tmp_path)
    proc = _py(_SLOW_WRITE, "refocus", src, "-o", tmp_path / "out.tif", "--model", tiny_model, "-q")
    _wait_for(proc, "WRITING")
    rc, err = _terminate(proc)
    assert rc == 130 and "Traceback" not in err, err
    assert _snapshot(tmp_path) == before


def test_sigterm_during_simulate_write_removes_the_temporary(tmp_path):
    proc = _py(_SLOW_WRITE, "simulate", "-o", tmp_path / "sim", "--size", "64", "--z", "1")
    _wait_for(proc, "WRITING")
    rc, err = _terminate(proc)
    assert rc == 130 and "Traceback" not in err, err
    assert [p for p in tmp_path.rglob("*") if not p.is_dir()] == []


_SLOW_COMPUTE = """
import sys, time
from napari_deepr.engine import runner as r
real = r.Runner.run
def slow(self, x):
    print("COMPUTING", flush=True)
    time.sleep(60)
    return real(self, x)
r.Runner.run = slow
from napari_deepr.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_during_compute_writes_nothing(tiny_model, tmp_path):
    src = io.write_image(tmp_path / "in.tif", _img(), axes="YX")
    before = _snapshot(tmp_path)
    proc = _py(_SLOW_COMPUTE, "refocus", src, "-o", tmp_path / "out.tif", "--model", tiny_model, "-q")
    _wait_for(proc, "COMPUTING")
    rc, err = _terminate(proc)
    assert rc == 130 and "Traceback" not in err and "cancelled" in err, err
    assert _snapshot(tmp_path) == before


_SLOW_PAIRS = """
import sys, time
from napari_deepr.stacks import pairs
real = pairs._write_tiff
def slow(path, block):
    real(path, block)
    print("WRITING", flush=True)
    time.sleep(60)
pairs._write_tiff = slow
from napari_deepr.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_during_pairs_leaves_the_previous_dataset_and_no_temporary(tmp_path):
    stack = _stack(tmp_path, planes=5)
    args = ["pairs", str(stack), "-o", str(tmp_path / "ds"), "--range", "1", "--patch", "32", "--focus-method", "nvar", "-q"]
    assert main(args) == 0  # a previous dataset: kept as it was
    before = _snapshot(tmp_path)
    proc = _py(_SLOW_PAIRS, *args)
    _wait_for(proc, "WRITING")
    rc, err = _terminate(proc)
    assert rc == 130 and "Traceback" not in err, err
    assert _snapshot(tmp_path) == before


def test_kill_9_during_compute_writes_nothing(tiny_model, tmp_path):
    src = io.write_image(tmp_path / "in.tif", _img(), axes="YX")
    before = _snapshot(tmp_path)
    proc = _py(_SLOW_COMPUTE, "refocus", src, "-o", tmp_path / "out.zarr", "--model", tiny_model, "-q")
    _wait_for(proc, "COMPUTING")
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert _snapshot(tmp_path) == before  # outputs are written only after the compute


_WRITER = """
import sys, numpy as np
from napari_deepr import io
for i in range(6):
    io.write_image(sys.argv[1], np.full((3, 64, 64), float(sys.argv[2]), np.float32), axes="ZYX")
"""


def test_two_writers_to_one_zarr_output(tmp_path):
    out = tmp_path / "out.zarr"
    procs = [_py(_WRITER, out, v) for v in (1, 2)]
    for p in procs:
        p.wait(120)
        assert p.returncode == 0, p.stderr.read()
    back = np.asarray(io.read_image(out).data)
    assert back.shape == (3, 64, 64) and np.unique(back).size == 1 and back.flat[0] in (1.0, 2.0)
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_stale_partial_of_a_dead_process_is_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".out.zarr.{pid}-deadbeef.partial"
    stale.mkdir()
    (stale / "junk").write_text("x")
    live = tmp_path / f".out.zarr.{os.getppid()}-cafef00d.partial"  # a live process's temporary is kept
    live.mkdir()
    io.write_image(tmp_path / "out.zarr", np.ones((32, 32), np.float32), axes="YX")
    assert not stale.exists() and live.exists()


# Calibration of `deepr quantize` stops here (inside onnxruntime's quantize_static, whose own temporary
# folder then exists) until the test kills the process.
_SLOW_QUANTIZE = """
import sys, time
from napari_deepr.engine import quantize as q
real = q.calibration_tiles
def tiles(n, **kw):
    first = real(1, size=64)[0]
    yield first
    print("CALIBRATING", file=sys.__stdout__, flush=True)  # quantize sends stdout to stderr
    time.sleep(60)
q.calibration_tiles = tiles
from napari_deepr.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _quantize_env(tmp_path):
    systmp = tmp_path / "systmp"  # the process's TMPDIR: nothing may be left there either
    systmp.mkdir()
    return dict(os.environ, PYTHONPATH=SRC, PYTHONUNBUFFERED="1", TMPDIR=str(systmp)), systmp


def _temp_leftovers(folder: Path) -> list[str]:
    # onnxruntime writes a fixed-name ".ses" file into TMPDIR when imported (not a per-run temporary).
    return sorted(p.name for p in folder.iterdir() if p.name != ".ses")


def test_kill_9_during_quantize_then_rerun_cleans_up(tmp_path):
    model = make_model_folder(tmp_path / "models", name="q")
    env, systmp = _quantize_env(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_QUANTIZE, "quantize", str(model)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(proc, "CALIBRATING")
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    left = [p for p in model.iterdir() if p.name.startswith(".generator.int8.onnx.")]
    # kill -9 cannot be caught: one pid-named folder is left beside the output, holding every temporary,
    # onnxruntime's own included; nothing went to the system's temporary folder.
    assert len(left) == 1 and left[0].name.startswith(f".generator.int8.onnx.{proc.pid}-") and left[0].is_dir()
    assert any(p.name.startswith("ort.quant.") for p in left[0].iterdir())
    assert _temp_leftovers(systmp) == [] and not (model / "generator.int8.onnx").exists()
    rerun = subprocess.run([sys.executable, "-m", "napari_deepr.cli", "quantize", str(model), "--calibration-tiles", "2"],
                           env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(p.name for p in model.iterdir()) == ["dpm.onnx", "generator.int8.onnx", "generator.onnx", "model.json"]
    assert _temp_leftovers(systmp) == []
    assert json.loads(rerun.stdout)["path"] == str(model / "generator.int8.onnx")


def test_sigterm_during_quantize_leaves_nothing(tmp_path):
    model = make_model_folder(tmp_path / "models", name="q")
    env, systmp = _quantize_env(tmp_path)
    before = _snapshot(model)
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_QUANTIZE, "quantize", str(model)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(proc, "CALIBRATING")
    rc, err = _terminate(proc)
    assert rc == 130 and "Traceback" not in err and "cancelled" in err, err
    assert _snapshot(model) == before
    assert _temp_leftovers(systmp) == []


_SLOW_CHECKPOINT = """
import sys, time, torch
from pathlib import Path
from napari_deepr.train import loop
def slow_save(obj, f, *a, **k):
    Path(f).write_bytes(b"half a checkpoint")
    print("SAVING", flush=True)
    time.sleep(60)
loop.torch.save = slow_save
loop._atomic_save({"iteration": 1}, Path(sys.argv[1]))
"""


def test_kill_9_during_a_checkpoint_then_the_next_save_cleans_up(tmp_path):
    torch = pytest.importorskip("torch")
    from napari_deepr.train.loop import _atomic_save, load_checkpoint

    ck = tmp_path / "model" / "checkpoint.pt"
    ck.parent.mkdir()
    proc = _py(_SLOW_CHECKPOINT, ck)
    _wait_for(proc, "SAVING")
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    left = [p.name for p in ck.parent.iterdir()]
    assert len(left) == 1 and left[0].startswith(f".checkpoint.pt.{proc.pid}-") and left[0].endswith(".partial")
    _atomic_save({"iteration": 2, "w": torch.ones(2)}, ck)  # the trainer's next checkpoint
    assert [p.name for p in ck.parent.iterdir()] == ["checkpoint.pt"]
    assert load_checkpoint(ck)["iteration"] == 2


def _dead_pid() -> int:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(dead.stdout)


def test_stale_fp16_temporary_is_removed_by_the_next_conversion(tmp_path):
    from napari_deepr.engine import fp16

    model = make_model_folder(tmp_path, name="f")
    stale = model / f".generator.fp16.onnx.{_dead_pid()}-deadbeef.partial"
    stale.write_bytes(b"half a graph")
    out = fp16.fp16_variant(model / "generator.onnx")
    assert out == model / "generator.fp16.onnx" and onnx.load(str(out)).graph.node
    assert sorted(p.name for p in model.iterdir()) == ["dpm.onnx", "generator.fp16.onnx", "generator.onnx", "model.json"]


def test_stale_export_temporaries_are_removed_by_the_next_export(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    from napari_deepr.train.export import export_model
    from napari_deepr.train.nets import Generator

    out = tmp_path / "model"
    out.mkdir()
    pid = _dead_pid()
    stale = [out / f".{n}.{pid}-0badf00d.partial" for n in ("generator.onnx", "model.json")]
    for p in stale:
        p.write_bytes(b"left by a killed export")
    torch.manual_seed(0)
    export_model(Generator(base=2, max_channels=4), None, out, {"name": "t"}, check_shapes=((1, 64, 64),))
    assert sorted(p.name for p in out.iterdir()) == ["generator.onnx", "model.json"]


def test_sigterm_to_deepr_train_leaves_a_checkpoint(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    pytest.importorskip("pytorch_msssim")
    from napari_deepr.optics.simulate import simulate_stack
    from napari_deepr.optics.specimens import make_specimen
    from napari_deepr.stacks.pairs import build_pairs

    z = np.arange(-1.0, 1.01, 0.5)
    stacks = [simulate_stack(make_specimen("tissue", (64, 64), 0.325, s), z, rng=s, photons=800)[0] for s in range(2)]
    build_pairs(stacks, tmp_path / "pairs", z_step_um=0.5, range_um=1.0, patch=32, register=False, focus_method="nvar")
    env = dict(os.environ, PYTHONPATH=SRC, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "napari_deepr.cli", "train", str(tmp_path / "pairs"), "-o", str(tmp_path / "model"),
         "--iterations", "100000", "--val-every", "100000", "--val-pairs", "2", "--base", "4", "--d-base", "4",
         "--batch", "1", "--g-steps", "1", "--d-steps", "1", "--threads", "1", "--no-export", "--from-scratch",
         "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    events = []
    try:
        for line in proc.stdout:
            events.append(json.loads(line))
            if events[-1]["event"] == "progress" and events[-1]["iteration"] >= 1:
                proc.send_signal(signal.SIGTERM)  # to deepr, not to the trainer child
                break
        rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    events += [json.loads(x) for x in rest.splitlines() if x.startswith("{")]
    assert proc.returncode == 0, err
    assert events[-1]["event"] == "stopped"
    torch = pytest.importorskip("torch")
    ck = torch.load(tmp_path / "model" / "checkpoint.pt", weights_only=True)
    assert ck["iteration"] >= 1


def test_channel_last_tiff_without_axes_is_explained_and_runs_with_its_axes(tmp_path, capsys):
    """A Y×X×2 array saved without axes reads as 256 planes of 256×2 pixels: the refusal names the
    likely reading, and with --axes YXC the two channels are refocused and written as CYX."""
    p = tmp_path / "yx2.tif"
    tifffile.imwrite(p, (_img((96, 96, 2), dtype=np.float64) * 1000).astype(np.uint16))
    err = _cli_refused(["refocus", p, "-o", tmp_path / "out.tif"], tmp_path, capsys, sentence="--axes")
    assert "96×2 pixels" in err and "2 channels of a 96×96 image" in err
    assert main(["refocus", str(p), "-o", str(tmp_path / "out.tif"), "--axes", "YXC", "--quiet"]) == 0
    from napari_deepr.io import read_image

    out = read_image(tmp_path / "out.tif")
    assert out.axes == "CYX" and out.data.shape == (2, 96, 96)


def test_train_never_writes_over_a_model_it_did_not_train(tmp_path, tiny_model, capsys):
    """A model folder without a training checkpoint (a bundled or downloaded model, a user's copy) is
    refused before anything is trained, and its files stay as they were; an earlier run's folder is not."""
    pytest.importorskip("torch")
    import shutil

    from napari_deepr.train.__main__ import main as train_main

    theirs = tmp_path / "their_model"
    shutil.copytree(tiny_model, theirs)
    before = {p.name: p.read_bytes() for p in theirs.iterdir() if p.is_file()}
    data = tmp_path / "data.json"
    data.write_text(json.dumps({"synthetic": {"z_range_um": [-2, 2], "specimen_kinds": ["tissue"]}}))
    rc = train_main([str(data), "-o", str(theirs), "--json", "--iterations", "1", "--from-scratch"])
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert rc == 2 and events[-1]["event"] == "error" and events[-1]["kind"] == "OutputError"
    assert "already holds a model that no training run wrote there" in events[-1]["message"]
    assert {p.name: p.read_bytes() for p in theirs.iterdir() if p.is_file()} == before
    # The folder of an earlier training run (it keeps its checkpoint) passes this check.
    from napari_deepr.train.__main__ import _refuse_a_foreign_model

    (theirs / "checkpoint.pt").write_bytes(b"")
    _refuse_a_foreign_model(theirs)


def test_scratch_folders_of_killed_runs_are_removed_by_the_next_one(tmp_path, monkeypatch, tiny_model):
    """Very large resampled planes use memmaps in ``deepr-work-<pid>-…`` folders of the system temp folder;
    a run killed with -9 leaves one behind, and the next run that needs scratch removes it (live ones stay)."""
    import tempfile

    import napari_deepr as nd
    from napari_deepr.engine import passes

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    stale = tmp_path / f"{passes.SCRATCH_PREFIX}{_dead_pid()}-abc"
    live = tmp_path / f"{passes.SCRATCH_PREFIX}{os.getpid()}-keep"
    for d in (stale, live):
        d.mkdir()
        (d / "0.npy").write_bytes(b"x" * 16)
    monkeypatch.setattr(passes, "available_memory", lambda: 8)  # every work array goes to disk
    out = nd.refocus(_img().astype(np.float32), tiny_model, pixel_size_um=0.2)  # resampled: plane by plane
    assert out.shape == (64, 64) and np.isfinite(out).all()
    assert not stale.exists() and live.exists()
    # What is left belongs to this (live) process: the kept folder and this run's own scratch.
    left = [p for p in tmp_path.iterdir() if p.name.startswith(passes.SCRATCH_PREFIX)]
    assert live in left and all(p.name.startswith(f"{passes.SCRATCH_PREFIX}{os.getpid()}-") for p in left)
