"""The Deep-R trainer: networks, losses, data sources, the JSON-lines CLI, stop/resume and ONNX export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")
pytest.importorskip("pytorch_msssim")

from napari_deepr.optics.simulate import simulate_stack
from napari_deepr.optics.specimens import make_specimen
from napari_deepr.stacks.pairs import build_pairs
from napari_deepr.train import losses as L
from napari_deepr.train.__main__ import main
from napari_deepr.train.data import DatasetError, SyntheticSource, d4, open_source
from napari_deepr.train.nets import (
    Discriminator,
    DPMDecoder,
    Generator,
    count_parameters,
)

Z = np.arange(-2.0, 2.01, 0.5)
TINY = ["--base", "4", "--d-base", "4", "--batch", "2", "--g-steps", "2", "--d-steps", "1", "--threads", "2",
        "--lr-g", "2e-3"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Pairs from three simulated 128x128 tissue z-stacks (±2 µm, 0.5 µm steps), 64-px patches."""
    root = tmp_path_factory.mktemp("train")
    stacks = []
    for seed in range(3):
        obj = make_specimen("tissue", (128, 128), 0.325, seed)
        st, _, _ = simulate_stack(obj, Z, rng=seed, photons=800)
        stacks.append(st)
    build_pairs(stacks, root / "pairs", z_step_um=0.5, range_um=2.0, patch=64, register=False,
                focus_method="nvar", optics={"na": 0.75, "wavelength_um": 0.55})
    return root / "pairs"


def _run(argv, capsys, on_event=None):
    """Run the trainer in-process with --json; return (exit code, parsed JSON events)."""
    argv = [*argv, "--json"]
    if on_event is None:
        rc = main(argv)
        lines = capsys.readouterr().out.splitlines()
    else:
        import napari_deepr.train.__main__ as cli

        events_seen = []

        def emit(ev):
            events_seen.append(ev)
            sys.stdout.write(json.dumps(ev) + "\n")
            on_event(ev)

        old = cli._emit
        cli._emit = emit
        try:
            rc = main(argv)
        finally:
            cli._emit = old
        lines = capsys.readouterr().out.splitlines()
    events = [json.loads(line) for line in lines]  # every stdout line is one JSON object
    # setup status lines and phase plans are checked in their own tests
    return rc, [e for e in events if e["event"] not in ("status", "plan")]


# ------------------------------------------------------------------------------------ networks
def test_generator_contract():
    g = Generator(base=16)
    assert 7.5e6 < count_parameters(g) < 8.5e6  # the CPU default (paper-sized base 32: ~31 M)
    small = Generator(base=4)
    x = torch.randn(2, 1, 64, 96)
    out, feats = small.forward_with_features(x)
    assert out.shape == x.shape
    assert [tuple(f.shape) for f in feats] == [(2, 4 * 2**i, 64 >> i, 96 >> i) for i in range(6)]
    # an untrained generator is the identity (zero-initialised output conv + global residual)
    assert torch.equal(out, x) and torch.equal(small(x), x)
    dec = DPMDecoder(small.chans, range_um=5.0)
    assert dec(*feats).shape == (2, 1, 64, 96)
    d = Discriminator(base=4)
    assert d(x).shape == (2,)


# ------------------------------------------------------------------------------------ losses
def test_berhu_matches_definition():
    target = torch.randn(3, 1, 32, 32)
    pred = target + torch.randn_like(target) * 0.3
    c = 0.1 * target.flatten(1).std(dim=1).view(-1, 1, 1, 1)
    d = (pred - target).abs()
    expected = torch.where(d <= c, d, (d**2 + c**2) / (2 * c)).mean()
    assert float(L.berhu(pred, target)) == pytest.approx(float(expected), rel=1e-6)
    assert float(L.berhu(target, target)) == 0.0


def test_msssim_scales_and_data_range():
    assert L.msssim_config(256) == (11, L.TF_MSSSIM_WEIGHTS)
    assert L.msssim_config(128) == (7, L.TF_MSSSIM_WEIGHTS)
    win, w = L.msssim_config(64)
    assert win == 7 and len(w) == 4 and sum(w) == pytest.approx(1.0)
    y = torch.randn(2, 1, 64, 64)
    x = y + 0.5 * torch.randn_like(y)
    v = L.ms_ssim(x, y)
    assert torch.allclose(L.ms_ssim(y, y), torch.ones(2))
    assert torch.all(v < 0.99) and torch.all(v > 0)
    # the data range is the target's own: a common rescaling leaves MS-SSIM unchanged
    assert torch.allclose(L.ms_ssim(x * 7.0, y * 7.0), v, atol=1e-5)
    # gradients stay finite even for an anti-correlated prediction (clamped terms)
    p = (-y).clone().requires_grad_(True)
    (1 - L.ms_ssim(p, y).mean()).backward()
    assert torch.isfinite(p.grad).all()


def test_structure_weight_matches_engine_mask():
    """The DPM loss weight (torch) and the scoring mask (numpy) apply one rule; flat background is out."""
    from napari_deepr.engine.dpm import structure_mask

    rng = np.random.default_rng(3)
    img = np.zeros((96, 96))
    img[30:50, 20:44] = rng.normal(size=(20, 24)) + 3.0  # a textured object on empty background
    img += 0.01 * rng.normal(size=img.shape)
    mask = structure_mask(img)
    w = L.structure_weight(torch.from_numpy(img)[None, None].float(), floor=0.1)[0, 0].numpy()
    assert mask[40, 30] and not mask[85, 85] and not mask[5, 90]
    assert np.mean((w > 0.5) == mask) > 0.99
    assert np.allclose(w[~mask & (w < 0.5)], 0.1) and np.allclose(w[w > 0.5], 1.0)
    err = torch.ones(1, 1, 96, 96)
    err[..., ~torch.from_numpy(mask)] = 5.0
    got = float(L.weighted_mean(err, torch.from_numpy(mask)[None, None].float()))
    assert got == pytest.approx(1.0)


def test_lsgan_losses():
    ones, zeros = torch.ones(4), torch.zeros(4)
    assert float(L.lsgan_d_loss(zeros, ones)) == 0.0  # perfect critic
    assert float(L.lsgan_g_loss(ones)) == 0.0  # fooled critic
    assert float(L.lsgan_d_loss(0.5 * ones, 0.5 * ones)) == pytest.approx(0.5)
    w = L.LossWeights(balance="auto")
    w.observe({"berhu": 0.5, "msssim": 0.1, "adv": 0.25})
    assert w.rebalance()
    assert w.msssim * 0.1 == pytest.approx(0.5) and w.adv * 0.25 == pytest.approx(0.5)


# ------------------------------------------------------------------------------------ data
def test_d4_group():
    a = np.arange(12.0).reshape(3, 4)
    outs = {d4(a, k).tobytes() + bytes(d4(a, k).shape) for k in range(8)}
    assert len(outs) == 8


def test_pairs_source(dataset):
    src = open_source(dataset, 64, seed=1)
    x, y, z = src.sample(np.random.default_rng(0), 4)
    assert x.shape == y.shape == (4, 1, 64, 64) and x.dtype == np.float32
    # per-image z-scoring: input and target each by their own statistics
    assert np.allclose(x.mean(axis=(1, 2, 3)), 0, atol=1e-4) and np.allclose(x.std(axis=(1, 2, 3)), 1, atol=1e-3)
    assert np.allclose(y.std(axis=(1, 2, 3)), 1, atol=1e-3)
    assert np.all(np.abs(z) <= 2.0)
    _, _, vz = src.validation()
    assert len(vz) > 0 and src.info["range_um"] == 2.0
    assert src.info["optics"]["na"] == 0.75


def test_synthetic_source(tmp_path):
    spec = {"z_range_um": [-3, 3], "specimen_kinds": ["tissue"], "validation_pairs": 5}
    src = SyntheticSource(spec, 64, seed=0, workers=1, buffer=16)
    try:
        x, _, z = src.sample(np.random.default_rng(0), 3)
        assert x.shape == (3, 1, 64, 64) and np.all(np.abs(z) <= 3.0)
        _, _, vz = src.validation()
        np.testing.assert_allclose(vz, np.linspace(-3, 3, 5), atol=0.051)  # spread evenly over z
        assert src.info["optics"]["pixel_size_um"] == 0.325
    finally:
        src.close()
    assert not src._procs



def test_synthetic_source_surface_maps_follow_the_augmentation(monkeypatch):
    """A tilted/curved pair's defocus map gets the same flip/rotation as its images; flat pairs broadcast."""
    from napari_deepr.train import synthetic

    spec = {"z_range_um": [-3, 3], "specimen_kinds": ["tissue"], "validation_pairs": 2}
    src = SyntheticSource(spec, 32, seed=0, workers=0)
    ramp = np.add.outer(np.arange(32.0), 0.1 * np.arange(32.0)).astype(np.float32) / 40.0  # no D4 symmetry
    draws = iter(range(10**6))

    def fake(kwargs, real, rng):
        # The input image is the map itself, so after augmentation they must still coincide.
        return (ramp.copy(), ramp.copy(), ramp.copy()) if next(draws) % 2 == 0 else (ramp.copy(), ramp.copy(), 1.5)

    monkeypatch.setattr(synthetic, "_generate", fake)
    x, _, z = src.sample(np.random.default_rng(3), 8)
    assert z.shape == (8, 1, 32, 32) and z.dtype == np.float32
    maps = [i for i in range(8) if np.ptp(z[i]) > 0]
    flats = [i for i in range(8) if np.ptp(z[i]) == 0]
    assert maps and flats and all(np.all(z[i] == 1.5) for i in flats)
    for i in maps:
        zs = (z[i] - z[i].mean()) / z[i].std()
        np.testing.assert_allclose(x[i], zs, atol=1e-4)
    # several of the 8 transforms occurred, so the check above is not the identity every time
    assert len({z[i].tobytes() for i in maps}) > 1
    # A batch of flat pairs keeps the plain [n] shape.
    monkeypatch.setattr(synthetic, "_generate", lambda kwargs, real, rng: (ramp.copy(), ramp.copy(), 0.5))
    _, _, z = src.sample(np.random.default_rng(0), 3)
    assert z.shape == (3,)
    src.close()

def test_bad_datasets_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"something": 1}')
    with pytest.raises(DatasetError):
        open_source(tmp_path / "missing", 64)
    with pytest.raises(DatasetError, match="index.json"):
        open_source(tmp_path / "empty", 64)
    with pytest.raises(DatasetError, match="synthetic"):
        open_source(bad_json, 64)
    rc, events = _run([str(tmp_path / "empty"), "-o", str(tmp_path / "m")], capsys)
    assert rc == 2 and [e["event"] for e in events] == ["error"]
    assert events[-1]["message"].endswith(".") and "\n" not in events[-1]["message"]


# ------------------------------------------------------------------------------------ training
@pytest.mark.slow
def test_train_export_refocus(dataset, tmp_path, capsys):
    """A tiny model trains on pairs from simulated stacks, improves, exports, and the engine runs it."""
    out = tmp_path / "model"
    rc, events = _run([str(dataset), "-o", str(out), "--iterations", "40", "--val-every", "20",
                       "--dpm-iterations", "60", "--lr-dpm", "3e-3", "--dpm-target", "magnitude", "--val-pairs", "12",
                       "--name", "tiny", *TINY],
                      capsys)
    assert rc == 0, events[-1]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done"
    assert {"progress", "validation", "checkpoint", "export"} <= set(kinds)
    prog = [e for e in events if e["event"] == "progress" and e["phase"] == "gan"]
    assert [e["iteration"] for e in prog] == list(range(1, 41))
    assert {"berhu", "msssim", "adv", "d", "total"} <= set(prog[0]["losses"])
    # eta_s is for the whole run (generator, DPM decoder and export): above 0 to the end, and it shrinks
    # while the step rate holds (it follows the measured rate, so a machine that slows down lengthens it).
    assert prog[0]["it_s"] > 0 and all(0 < e["eta_s"] < 1e4 for e in prog)
    if prog[-1]["it_s"] >= 0.8 * prog[0]["it_s"]:
        assert prog[-1]["eta_s"] < prog[0]["eta_s"]
    val = [e for e in events if e["event"] == "validation" and e["phase"] == "gan"]
    # the generator starts as the identity, so validation BerHu starts at the input's; it must fall
    first, last = val[0]["metrics"], val[-1]["metrics"]
    assert last["berhu"] < 0.95 * last["berhu_input"]
    assert Path(val[0]["preview"]).is_file()
    per_z = last["per_z"]
    assert [r["z_um"] for r in per_z] == sorted(r["z_um"] for r in per_z)
    dpm_val = [e for e in events if e["event"] == "validation" and e["phase"] == "dpm"]
    # symmetric simulated optics: the decoder learns |z|, starting from 0 µm everywhere
    abs_z = np.concatenate([[abs(r["z_um"])] * r["n"] for r in per_z])
    dpm_prog = [e for e in events if e["event"] == "progress" and e["phase"] == "dpm"]
    assert dpm_prog[0]["losses"]["mae_um"] > 0.5
    assert dpm_val and dpm_val[-1]["metrics"]["dpm_mae_um"] < 0.75 * abs_z.mean()
    exp = next(e for e in events if e["event"] == "export")
    assert exp["max_abs_error"]["generator"] < 1e-4 and exp["max_abs_error"]["dpm"] < 1e-4
    # the graphs traced at setup (from the untrained networks) took the trained weights: no second trace
    assert exp["traced"] is False
    assert first["berhu_input"] == pytest.approx(last["berhu_input"])

    # the model folder follows docs/ARCHITECTURE.md and loads in the engine
    card = json.loads((out / "model.json").read_text())
    assert card["name"] == "tiny" and card["defocus_range_um"] == [-2.0, 2.0]
    assert card["normalization"] == "zscore_per_plane" and card["tile_multiple"] == 32
    assert card["na"] == 0.75 and card["pixel_size_um"] is None  # arrays carry no pixel size
    assert card["quality"]["per_z"] and "torch" in card["versions"]
    assert card["dpm_target"] == "magnitude" and card["dpm_sign_meaningful"] is False
    import onnx
    import onnxruntime as ort

    m = onnx.load(str(out / "generator.onnx"))
    meta = {p.key: p.value for p in m.metadata_props}
    assert json.loads(meta["deepr.defocus_range_um"]) == [-2.0, 2.0]
    gen = ort.InferenceSession(str(out / "generator.onnx"), providers=["CPUExecutionProvider"])
    dpm = ort.InferenceSession(str(out / "dpm.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in gen.get_outputs()] == ["output"] + [f"feat{i}" for i in range(6)]
    assert [i.name for i in dpm.get_inputs()] == [f"feat{i}" for i in range(6)]

    from napari_deepr.engine.model import load_model

    model = load_model(out)
    assert model.has_dpm and model.feature_names == tuple(f"feat{i}" for i in range(6))
    # ORT on a new image matches the trained torch generator (best checkpoint)
    best = torch.load(out / "best.pt", weights_only=True)
    g = Generator(base=4, max_channels=64)
    g.load_state_dict(best["generator"])
    x = np.random.default_rng(5).standard_normal((1, 1, 96, 128)).astype(np.float32)
    ort_out = gen.run(["output"], {"input": x})[0]
    with torch.no_grad():
        ref = g(torch.from_numpy(x)).numpy()
    assert np.abs(ort_out - ref).max() < 1e-4


@pytest.mark.slow
def test_stop_file_and_resume(dataset, tmp_path, capsys):
    out = tmp_path / "model"
    args = [str(dataset), "-o", str(out), "--iterations", "6", "--val-every", "100", "--dpm-iterations", "2",
            "--val-pairs", "4", "--no-export", *TINY]

    def stop_at_3(ev):
        if ev["event"] == "progress" and ev["phase"] == "gan" and ev["iteration"] == 3:
            (out / "STOP").write_text("")

    rc, events = _run(args, capsys, on_event=stop_at_3)
    assert rc == 0 and events[-1]["event"] == "stopped" and events[-1]["iteration"] == 3
    assert (out / "checkpoint.pt").is_file() and not (out / "STOP").exists()
    ck = torch.load(out / "checkpoint.pt", weights_only=True)  # plain tensors and values only
    assert ck["iteration"] == 3 and ck["phase"] == "gan" and "opt_g" in ck and "rng" in ck

    rc, events = _run([*args, "--resume"], capsys)
    assert rc == 0
    start = events[0]
    assert start["event"] == "start" and start["resumed"] and start["iteration"] == 3
    gan_its = [e["iteration"] for e in events if e["event"] == "progress" and e["phase"] == "gan"]
    assert gan_its == [4, 5, 6]
    assert events[-1]["event"] == "done" and events[-1]["iterations"] == 6

    # --resume on a finished run says so and does nothing more ...
    rc, events = _run([*args, "--resume"], capsys)
    assert rc == 0 and [e["event"] for e in events] == ["done"] and events[0]["already_finished"]
    assert "already finished" in events[0]["message"] and "--iterations" in events[0]["message"]
    # ... and trains on when given a larger budget
    rc, events = _run([*args[:3], "--iterations", "8", *args[5:], "--resume"], capsys)
    assert rc == 0 and any("trains on" in n for n in events[0]["notes"])
    assert [e["iteration"] for e in events if e["event"] == "progress" and e["phase"] == "gan"] == [7, 8]
    assert events[-1]["event"] == "done" and events[-1]["iterations"] == 8

    # a finished run can train a fresh DPM decoder on its generator
    rc, events = _run([*args, "--redo-dpm", "--dpm-iterations", "3"], capsys)
    assert rc == 0 and events[0]["phase"] == "dpm" and events[0]["iteration"] == 8
    dpm_its = [e["iteration"] for e in events if e["event"] == "progress"]
    assert dpm_its == [1, 2, 3] and events[-1]["dpm_iterations"] == 3



@pytest.mark.slow
def test_dpm_decoder_trains_on_tilted_and_curved_samples(tmp_path, capsys):
    """Synthetic surfaces give per-pixel DPM targets; the DPM phase trains on them and exports."""
    spec = {"synthetic": {"z_range_um": [-2, 2], "specimen_kinds": ["tissue"], "validation_pairs": 4,
                          "surface_fraction": 1.0, "surface_span_um": [1.0, 2.0]}}
    cfg = tmp_path / "surfaces.json"
    cfg.write_text(json.dumps(spec))
    rc, events = _run([str(cfg), "-o", str(tmp_path / "m"), "--patch", "64", "--iterations", "2",
                       "--dpm-iterations", "4", "--workers", "0", "--no-gan", *TINY], capsys)
    assert rc == 0 and events[-1]["event"] == "done"
    dpm = [e for e in events if e["event"] == "progress" and e["phase"] == "dpm"]
    assert [e["iteration"] for e in dpm] == [1, 2, 3, 4]
    assert all(np.isfinite(e["losses"]["mae_um"]) and e["losses"]["mae_um"] < 4.0 for e in dpm)
    card = json.loads((tmp_path / "m" / "model.json").read_text())
    assert card["provenance"]["options"]["surface_fraction"] == 1.0  # the card says how it was trained
    assert (tmp_path / "m" / "dpm.onnx").is_file()
    assert card["config"]["dpm_loss"] == "l2"


def test_dpm_loss_l1_is_the_mean_absolute_error(tmp_path, capsys):
    """--dpm-loss l1: each step's loss is the structure-weighted |error| in units of the range, the
    same quantity as the reported MAE in µm divided by the range (2 µm here); the card records it."""
    spec = {"synthetic": {"z_range_um": [-2, 2], "specimen_kinds": ["tissue"], "validation_pairs": 4}}
    cfg = tmp_path / "flat.json"
    cfg.write_text(json.dumps(spec))
    rc, events = _run([str(cfg), "-o", str(tmp_path / "m"), "--patch", "64", "--iterations", "1",
                       "--dpm-iterations", "3", "--dpm-loss", "l1", "--workers", "0", "--no-gan", *TINY], capsys)
    assert rc == 0 and events[-1]["event"] == "done"
    dpm = [e for e in events if e["event"] == "progress" and e["phase"] == "dpm"]
    assert len(dpm) == 3 and all("l1" in e["losses"] for e in dpm)
    for e in dpm:
        assert e["losses"]["l1"] * 2.0 == pytest.approx(e["losses"]["mae_um"], rel=1e-5)
    card = json.loads((tmp_path / "m" / "model.json").read_text())
    assert card["config"]["dpm_loss"] == "l1"

@pytest.mark.slow
def test_fine_tune_from_an_exported_model(dataset, tmp_path, capsys):
    """--init-from starts from a shipped model folder (ONNX weights, no checkpoint) with its width."""
    from napari_deepr.train.loop import init_architecture, load_init_weights

    first = tmp_path / "first"
    rc, _ = _run([str(dataset), "-o", str(first), "--iterations", "8", "--val-every", "100", "--dpm-iterations", "4",
                  "--lr-dpm", "3e-3", "--val-pairs", "4", *TINY], capsys)
    assert rc == 0
    gen, dec = load_init_weights(first)
    best = torch.load(first / "best.pt", weights_only=True)["generator"]
    assert gen.keys() == best.keys() and all(torch.equal(gen[k], best[k]) for k in gen)
    assert dec is not None and "range_um" in dec
    assert init_architecture(gen) == (4, 64)  # max-channels defaults to the bundled model's 64

    second = tmp_path / "second"
    args = [str(dataset), "-o", str(second), "--iterations", "0", "--val-every", "100", "--dpm-iterations", "1",
            "--lr-dpm", "1e-9", "--val-pairs", "4", "--init-from", str(first), *TINY, "--base", "8"]
    rc, events = _run(args, capsys)
    assert rc == 0, events[-1]
    assert any(e["event"] == "init" for e in events)
    # width comes from the model it starts from (base 4), not from --base 8
    start = next(e for e in events if e["event"] == "start")
    assert start["parameters"]["generator"] == count_parameters(Generator(base=4, max_channels=64))
    # no generator updates: the exported generator is the one it started from
    again, _ = load_init_weights(second)
    assert all(torch.allclose(again[k], gen[k]) for k in gen)

    rc, events = _run([str(dataset), "-o", str(tmp_path / "x"), "--init-from", str(tmp_path / "nowhere"), *TINY], capsys)
    assert rc != 0 and "no generator.onnx or checkpoint" in events[-1]["message"]


@pytest.mark.slow
def test_cli_sigterm_writes_checkpoint(dataset, tmp_path):
    """The real command: JSON lines on stdout, SIGTERM stops cleanly with a resumable checkpoint."""
    out = tmp_path / "model"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "napari_deepr.train", str(dataset), "-o", str(out), "--iterations", "100000",
         "--val-every", "1000", "--val-pairs", "4", "--json", *TINY],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )
    events = []
    try:
        for line in proc.stdout:
            events.append(json.loads(line))
            if events[-1]["event"] == "progress" and events[-1]["iteration"] == 2:
                proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0
    assert events[0]["event"] == "status"  # a setup line before PyTorch is even imported
    assert [e for e in events if e["event"] != "status"][0]["event"] == "start" and events[-1]["event"] == "stopped"
    ck = torch.load(out / "checkpoint.pt", weights_only=True)  # plain tensors and values only
    assert ck["iteration"] == events[-1]["iteration"] >= 2


# ------------------------------------------------------------------------------ fine-tuning and budgets
@pytest.mark.slow
def test_fine_tune_keeps_parent_dpm_target_and_beats_parent(dataset, tmp_path, capsys):
    """A fine-tune of a tiny model keeps its parent's DPM target and improves validation SSIM over it."""
    parent = tmp_path / "parent"
    rc, events = _run([str(dataset), "-o", str(parent), "--iterations", "3", "--val-every", "100",
                       "--dpm-iterations", "20", "--lr-dpm", "3e-3", "--dpm-target", "magnitude", "--val-pairs", "12",
                       "--from-scratch", *TINY], capsys)
    assert rc == 0
    assert json.loads((parent / "model.json").read_text())["dpm_target"] == "magnitude"
    # these pairs record z_sign_meaningful=True: a run from scratch with --dpm-target auto would learn the sign
    assert json.loads((dataset / "index.json").read_text())["z_sign_meaningful"] is True

    child = tmp_path / "child"
    rc, events = _run([str(dataset), "-o", str(child), "--init-from", str(parent), "--iterations", "30",
                       "--val-every", "10", "--dpm-iterations", "10", "--val-pairs", "12", *TINY, "--lr-g", "2e-3"],
                      capsys)
    assert rc == 0, events[-1]
    start = next(e for e in events if e["event"] == "start")
    assert start["parent"]["name"] == "parent" and not start["parent"]["auto"]
    assert start["config"]["dpm_target"] == "magnitude" and start["config"]["gan"] is False
    assert start["config"]["lr_schedule"] == "cosine"
    card = json.loads((child / "model.json").read_text())
    assert card["dpm_target"] == "magnitude" and card["dpm_sign_meaningful"] is False
    assert card["provenance"]["parent"]["name"] == "parent"
    # scored against the parent on the same validation pairs; the export says which is better
    parent_val = next(e for e in events if e["event"] == "validation" and e["phase"] == "parent")
    comp = card["quality"]["parent_comparison"]
    assert comp["parent_ssim_output"] == pytest.approx(parent_val["metrics"]["ssim_output"])
    assert comp["n"] == parent_val["metrics"]["n"] > 0
    assert comp["ssim_output"] > comp["parent_ssim_output"] + 0.002 and comp["better"]  # measured +0.004
    assert "better than its parent" in comp["verdict"]
    exp = next(e for e in events if e["event"] == "export")
    assert exp["comparison"]["verdict"] == comp["verdict"] and exp["traced"] is False  # parent graphs were reused


def test_one_field_dataset_is_split_by_region(tmp_path):
    """One field: a validation band, then a gap of at least the receptive field, then training crops."""
    from napari_deepr.stacks.pairs import RECEPTIVE_FIELD_RADIUS_PX, load_pairs, region_split

    rng = np.random.default_rng(0)
    stack = rng.random((5, 384, 384)).astype(np.float32)
    summary = build_pairs([stack], tmp_path / "one", z_step_um=0.5, range_um=1.0, patch=64, register=False,
                          focus_method="nvar")
    assert summary["fields"] == 1 and summary["val_pairs"] > 0 and summary["train_pairs"] > 0
    pairs = load_pairs(tmp_path / "one")
    crops = {c["id"]: c for c in pairs.crops}
    train_x = [crops[pairs.pairs[i]["crop"]]["x"] for i in pairs.pair_ids("train")]
    val_x = [crops[pairs.pairs[i]["crop"]]["x"] for i in pairs.pair_ids("val")]
    gap = min(val_x) - (max(train_x) + 64)
    assert gap >= RECEPTIVE_FIELD_RADIUS_PX  # never split by patch: whole bands, far apart
    assert pairs.index["validation"]["kind"] == "region" and pairs.index["validation"]["gap_px"] == gap
    src = open_source(tmp_path / "one", 64, val_pairs=1000)
    assert src.info["validation"]["kind"] == "region" and "region" in src.info["validation"]["description"]
    assert not set(src.train_ids) & set(src.val_ids)

    # a one-field dataset written before region splits (all crops "train") is split the same way on load
    index = json.loads((tmp_path / "one" / "index.json").read_text())
    index.pop("validation")
    for rec in index["crops"] + index["pairs"]:
        rec["split"] = "train"
    (tmp_path / "one" / "index.json").write_text(json.dumps(index))
    old = open_source(tmp_path / "one", 64, val_pairs=1000)
    assert sorted(old.val_ids) == sorted(src.val_ids) and sorted(old.train_ids) == sorted(src.train_ids)

    # a field too small for the full gap keeps what fits and says so
    labels, rec, warns = region_split((2, 4), 64, 0.85)
    assert list(labels[0]) == ["train", "gap", "gap", "val"] and rec["gap_px"] == 128
    assert warns and "too small" in warns[0]


def test_receptive_field_constant_matches_the_network():
    """stacks.pairs cannot import torch, so its receptive-field radius is checked against the generator here."""
    from napari_deepr.stacks.pairs import RECEPTIVE_FIELD_RADIUS_PX

    torch.manual_seed(0)
    g = Generator(base=2, max_channels=4)
    torch.nn.init.normal_(g.decoder.out.weight)
    for p in g.parameters():
        p.data.abs_()  # all-positive weights: no cancellation hides a dependency
    x = torch.zeros(1, 1, 640, 640, requires_grad=True)
    g(x)[0, 0, 320, 320].backward()
    support = (x.grad[0, 0].abs() > 0).nonzero()
    radius = int(max(320 - support.min(), support.max() - 320))
    assert radius == RECEPTIVE_FIELD_RADIUS_PX


@pytest.mark.slow
def test_minutes_budget_holds_for_the_whole_run(dataset, tmp_path):
    """--minutes 1: the run's own final report puts its whole wall time, export included, within 5 %."""
    import time

    out = tmp_path / "model"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "napari_deepr.train", str(dataset), "-o", str(out), "--minutes", "1",
         "--val-pairs", "8", "--json", *TINY],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )
    events, first_line_s = [], None
    try:
        for line in proc.stdout:
            if first_line_s is None:
                first_line_s = time.monotonic() - t0
            events.append(json.loads(line))
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    wall = time.monotonic() - t0
    assert rc == 0, events[-1]
    assert first_line_s < 10 and events[0]["event"] == "status"
    done = events[-1]
    assert done["event"] == "done" and done["budget_s"] == 60
    assert abs(done["run_s"] - 60) <= 3, done  # within 5 % of the budget, export included
    assert wall - done["run_s"] < 3  # the report's clock starts with the process
    kinds = [e["event"] for e in events]
    assert kinds.index("export") < kinds.index("done") and done["iterations"] > 0 and done["dpm_iterations"] > 0
    plans = [e for e in events if e["event"] == "plan"]
    assert [p["phase"] for p in plans] == ["gan", "dpm"] and plans[0]["deadline_s"] < plans[1]["deadline_s"] <= 60


def test_console_speaks_sentences(capsys):
    """Without --json the trainer talks to a person: sentences, warnings, the run's end, no JSON."""
    import io

    from napari_deepr.train.console import Console

    buf = io.StringIO()
    c = Console(buf, bar=False)
    c({"event": "status", "message": "opening the dataset", "elapsed_s": 0.4})
    c({"event": "start", "budget_s": 480.0, "parent": {"name": "deepr-fluo-20x", "auto": True},
       "parameters": {"generator": 674033}, "patch": 256, "config": {"batch": 5, "lr_g": 1e-4, "lr_schedule": "cosine"},
       "precision": "bf16 autocast", "threads": 2, "device": "cpu", "validation_pairs": 48,
       "validation": {"description": "held-out fields of view: 1 of 4"}, "notes": [],
       "warnings": ["The dataset spans ±6 µm, wider than deepr-fluo-20x's ±5 µm."]})
    c({"event": "progress", "phase": "gan", "iteration": 1, "losses": {"total": 1.0, "berhu": 0.1, "msssim": 0.2},
       "it_s": 0.5, "eta_s": 470, "run_s": 10})
    c({"event": "done", "iterations": 90, "dpm_iterations": 300, "run_s": 478.0, "budget_s": 480.0, "model_dir": "m"})
    text = buf.getvalue()
    assert "fine-tuning deepr-fluo-20x (chosen because its card matches the dataset)" in text
    assert "warning: The dataset spans ±6 µm" in text and "run ETA 7:50" in text
    assert "whole run 7:58 of a 8:00 budget (99.6 %)" in text and "{" not in text


def test_parent_is_scored_at_the_sampling_the_engine_runs_it():
    """A parent with another pixel size is scored on validation pairs resampled to its sampling and back
    (as the engine runs it): geometry checked with an identity network on a smooth field, and a detail
    finer than the parent's pixels is gone, as it is for the engine."""
    from napari_deepr.train.parent import scale_ratio
    from napari_deepr.train.validation import ValidationMixin

    assert scale_ratio({"pixel_size_um": 0.325}, {"optics": {"pixel_size_um": 0.26}}) == pytest.approx(0.8)
    assert scale_ratio({"pixel_size_um": 0.325}, {"optics": {"pixel_size_um": 0.33}}) is None  # within 5 %
    assert scale_ratio({"pixel_size_um": 0.325}, {"optics": {}}) is None

    class Identity(torch.nn.Module):
        def forward_with_features(self, x):
            assert x.shape[-1] % 32 == 0 and x.shape[-2] % 32 == 0  # padded to the network's multiple
            return x, (x,)

    class Probe(ValidationMixin):
        device = torch.device("cpu")
        cl = torch.contiguous_format
        G = Identity()

        def Dec(self, x):
            return x

        def _autocast(self):
            return torch.autocast("cpu", enabled=False)

        def _to(self, a):
            return torch.from_numpy(a)

    yy, xx = np.mgrid[:64, :64].astype(np.float32)
    smooth = np.sin(yy / 9.0) + np.cos(xx / 7.0)
    fine = np.where((yy + xx) % 2 == 0, 1.0, -1.0).astype(np.float32)  # the Nyquist checkerboard
    x = torch.from_numpy(np.stack([smooth, fine])[:, None])
    out, dpm = Probe()._run_at_scale(x, 0.5, True)
    assert out.shape == x.shape and torch.equal(out, dpm)
    inner = (slice(None), 0, slice(4, -4), slice(4, -4))
    assert float((out[0] - x[0])[inner[1:]].abs().max()) < 0.05  # the smooth field comes back in place
    assert float(out[1][inner[1:]].abs().max()) < 0.05  # the finest detail does not survive 2× coarser pixels
    same, _ = Probe()._run_at_scale(x, None, False)
    assert torch.equal(same, x)


def test_verdict_scores_a_parent_of_another_pixel_size_resampled(dataset, tmp_path, capsys):
    """End to end: the dataset at 0.26 µm, the parent at 0.325 µm: the parent is scored as the engine
    would run it (resampled by 0.8×), which changes its score, and the verdict says so."""
    import shutil

    data = tmp_path / "pairs26"
    shutil.copytree(dataset, data)
    index = json.loads((data / "index.json").read_text())
    index["optics"]["pixel_size_um"] = 0.26
    (data / "index.json").write_text(json.dumps(index))
    parent = tmp_path / "parent"
    rc, _ = _run([str(dataset), "-o", str(parent), "--iterations", "2", "--val-every", "100", "--dpm-iterations", "0",
                  "--val-pairs", "6", "--from-scratch", *TINY], capsys)
    assert rc == 0
    card = json.loads((parent / "model.json").read_text())
    card["pixel_size_um"] = 0.325
    (parent / "model.json").write_text(json.dumps(card))
    child = tmp_path / "child"
    rc, events = _run([str(data), "-o", str(child), "--init-from", str(parent), "--iterations", "1",
                       "--val-every", "100", "--dpm-iterations", "0", "--val-pairs", "6", *TINY], capsys)
    assert rc == 0, events[-1]
    comp = json.loads((child / "model.json").read_text())["quality"]["parent_comparison"]
    assert comp["parent_resampled_ratio"] == pytest.approx(0.8)
    assert "resampled by 0.8× to its pixel size and back" in comp["verdict"]
    # the same weights scored without resampling (the child before its one update is the parent) differ
    parent_val = next(e for e in events if e["event"] == "validation" and e["phase"] == "parent")
    rc, events = _run([str(dataset), "-o", str(tmp_path / "plain"), "--init-from", str(parent), "--iterations", "1",
                       "--val-every", "100", "--dpm-iterations", "0", "--val-pairs", "6", *TINY], capsys)
    plain_val = next(e for e in events if e["event"] == "validation" and e["phase"] == "parent")
    assert abs(plain_val["metrics"]["ssim_output"] - parent_val["metrics"]["ssim_output"]) > 1e-3
