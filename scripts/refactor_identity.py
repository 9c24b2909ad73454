#!/usr/bin/env python
"""Prove a refactor of the trainer, the simulator and the data code byte-identical.

Dumps what those modules produce for fixed seeds -- simulated training pairs (fluorescence, surfaces,
thick samples, real images, brightfield), z-stacks, a pairs dataset, the trainer's z-scored batches
and validation sets, the science metrics, and the losses and validation numbers of a tiny training
run -- into one ``.npz``; ``compare`` then says which entries differ between two dumps. Only public
APIs that exist before and after issue 21 are used, so the same script runs on both trees::

    PYTHONPATH=/work/base/src python scripts/refactor_identity.py dump /tmp/before.npz
    PYTHONPATH=src            python scripts/refactor_identity.py dump /tmp/after.npz
    python scripts/refactor_identity.py compare /tmp/before.npz /tmp/after.npz

Arrays are compared byte for byte, the training log (JSON) exactly, once wall-clock fields (times,
rates, dates, paths) are dropped. Against the tree before issue 21 the one expected difference is
``model_json/halo: only after (16)``: the trainer's card is now a ``ModelCard``, which writes every
field, including the halo the engine already assumed for a card without one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"
if not REAL.is_dir():
    REAL = Path("/work/shared/data/real")

# Keys whose values depend on the clock, the machine or the folder, not on the computation.
VOLATILE = {"elapsed_s", "it_s", "pairs_s", "eta_s", "run_s", "wall_s", "fraction", "deadline_s", "used_s",
            "reserve_s", "budget_s", "budget_ratio", "date", "path", "preview", "model_dir", "dataset",
            "out", "seconds", "threads", "max_abs_error", "size_mb", "generator", "dpm", "model_json",
            "opset", "traced", "versions", "message", "checkpoint", "elapsed", "lr_g"}


def _strip(v):
    if isinstance(v, dict):
        return {k: _strip(x) for k, x in v.items() if k not in VOLATILE}
    if isinstance(v, list):
        return [_strip(x) for x in v]
    return v


def _train_log(dataset: Path, out: Path, extra: list[str]) -> list[dict]:
    """Events of a tiny from-scratch run (one thread, no workers), wall-clock fields dropped."""
    import contextlib
    import io

    from napari_deepr.train.__main__ import main

    buf = io.StringIO()
    argv = [str(dataset), "-o", str(out), "--from-scratch", "--base", "4", "--d-base", "4", "--batch", "2",
            "--g-steps", "2", "--d-steps", "1", "--threads", "1", "--workers", "0", "--val-pairs", "4",
            "--val-every", "2", "--seed", "3", "--no-bf16", "--json", *extra]
    with contextlib.redirect_stdout(buf):
        rc = main(argv)
    events = [json.loads(line) for line in buf.getvalue().splitlines()]
    if rc != 0:
        raise SystemExit(f"training failed: {events[-1]}")
    keep = ("progress", "validation", "init", "export", "done")
    return [_strip(e) for e in events if e["event"] in keep]


def dump(path: str) -> None:
    import tifffile

    from napari_deepr.optics import psf
    from napari_deepr.optics.brightfield import random_brightfield_pair
    from napari_deepr.optics.simulate import (
        brightfield,
        defocus,
        defocus_map,
        random_training_pair,
        simulate_stack,
        tilt_dpm,
    )
    from napari_deepr.optics.specimens import make_specimen
    from napari_deepr.science import metrics
    from napari_deepr.stacks.pairs import build_pairs
    from napari_deepr.train.data import SyntheticSource, open_source

    arrays: dict[str, np.ndarray] = {}

    def put(name, *parts):
        for i, a in enumerate(parts):
            arrays[f"{name}/{i}"] = np.asarray(a)

    real = [np.asarray(tifffile.imread(REAL / n), np.float32) for n in
            ("bian_bpae_nuclei_2d.tif", "sephace_dapi_set1_2d.tif")]
    for seed in range(4):
        put(f"pair/default/{seed}", *random_training_pair(seed, patch=64))
    put("pair/surface", *random_training_pair(11, patch=64, surface_fraction=1.0))
    put("pair/thick", *random_training_pair(12, patch=64, thick_fraction=1.0))
    put("pair/near_smooth", *random_training_pair(13, patch=64, near_focus_fraction=1.0, smooth_fraction=1.0))
    put("pair/real", *random_training_pair(14, patch=64, real_images=real, real_fraction=1.0,
                                           real_scale_range=(1.0, 2.0)))
    put("pair/40x", *random_training_pair(15, patch=64, optics=psf.OPTICS_40X_095, z_range_um=(-3.0, 3.0)))
    fast_bf = {"z_range_um": (-4, 4), "condenser_ratio_range": (0.3, 0.3), "max_walkoff_um": 10.0, "source_step": 0.5}
    for seed in range(2):
        put(f"bf_pair/{seed}", *random_brightfield_pair(seed, patch=64, **fast_bf))
    obj = make_specimen("tissue", (96, 96), 0.325, 5)
    put("stack", *simulate_stack(obj, np.arange(-2.0, 2.01, 0.5), rng=5, photons=800, drift_px=0.2))
    put("defocus", defocus(obj, 1.5, rng=6))
    put("defocus_map", defocus_map(obj, tilt_dpm((96, 96), 0.325, 1.5), rng=7))
    put("brightfield", brightfield(obj, 2.0, rng=8))

    scores = {}
    a, b = arrays["pair/default/0/0"], arrays["pair/default/0/1"]
    scores["ssim"] = metrics.ssim(a, b)
    scores["rmse"] = metrics.rmse(a, b)
    put("metrics_zscore", metrics.zscore(a))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        stacks = [simulate_stack(make_specimen("tissue", (128, 128), 0.325, s), np.arange(-2.0, 2.01, 0.5),
                                 rng=s, photons=800)[0] for s in range(3)]
        build_pairs(stacks, tmp / "pairs", z_step_um=0.5, range_um=2.0, patch=64, register=False,
                    focus_method="nvar", optics={"na": 0.75, "wavelength_um": 0.55})
        index = json.loads((tmp / "pairs" / "index.json").read_text())
        index.pop("created", None)
        scores["pairs_index"] = index
        for f in sorted((tmp / "pairs" / "patches").iterdir()):
            arrays[f"pairs_patch/{f.name}"] = tifffile.imread(f)
        src = open_source(tmp / "pairs", 32, seed=1, val_pairs=6)
        put("pairs_batch", *src.sample(np.random.default_rng(2), 4))
        put("pairs_val", *src.validation())
        src.close()
        syn = SyntheticSource({"z_range_um": [-2, 2], "validation_pairs": 3}, 64, seed=4, workers=0)
        put("synthetic_batch", *syn.sample(np.random.default_rng(3), 3))
        put("synthetic_val", *syn.validation())
        syn.close()
        cfg = tmp / "syn.json"
        cfg.write_text(json.dumps({"synthetic": {"z_range_um": [-2, 2], "validation_pairs": 4}}))
        os.environ.setdefault("DEEPR_CHECKPOINT_EVERY_S", "1e9")
        scores["train_pairs"] = _train_log(tmp / "pairs", tmp / "m1", ["--patch", "32", "--iterations", "4",
                                                                        "--dpm-iterations", "3", "--no-export"])
        scores["train_synthetic"] = _train_log(cfg, tmp / "m2", ["--patch", "64", "--iterations", "2",
                                                                  "--dpm-iterations", "2"])
        card = json.loads((tmp / "m2" / "model.json").read_text())
        scores["model_json"] = _strip(card)
    np.savez(path, **arrays, __json__=np.frombuffer(json.dumps(scores, sort_keys=True, default=float).encode(), np.uint8))
    print(f"wrote {len(arrays)} arrays and the training logs to {path}")


def _differences(x, y, path: str) -> list[str]:
    """Where two JSON values differ: ``path: before -> after`` for each differing leaf or missing key."""
    if isinstance(x, dict) and isinstance(y, dict):
        out = []
        for k in sorted(set(x) | set(y)):
            if k not in x or k not in y:
                out.append(f"{path}/{k}: {'only before' if k in x else 'only after'} ({json.dumps(x.get(k, y.get(k)))[:80]})")
            else:
                out += _differences(x[k], y[k], f"{path}/{k}")
        return out
    if isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
        return [d for i, (u, v) in enumerate(zip(x, y)) for d in _differences(u, v, f"{path}[{i}]")]
    return [] if x == y else [f"{path}: {json.dumps(x)[:80]} -> {json.dumps(y)[:80]}"]


def compare(a_path: str, b_path: str) -> int:
    a, b = np.load(a_path), np.load(b_path)
    bad = []
    for k in sorted(set(a.files) | set(b.files)):
        if k == "__json__":
            continue
        if k not in a.files or k not in b.files:
            bad.append(f"{k}: only in {'the first' if k in a.files else 'the second'} dump")
        elif a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or a[k].tobytes() != b[k].tobytes():
            diff = np.max(np.abs(a[k].astype(float) - b[k].astype(float))) if a[k].shape == b[k].shape else "shape"
            bad.append(f"{k}: differs (max |diff| {diff})")
    ja, jb = json.loads(a["__json__"].tobytes()), json.loads(b["__json__"].tobytes())
    for k in sorted(set(ja) | set(jb)):
        if ja.get(k) != jb.get(k):
            bad.append(f"{k}: differs at " + "; ".join(_differences(ja.get(k), jb.get(k), k)))
    n = len(a.files) - 1
    if bad:
        print("\n".join(bad))
        print(f"{len(bad)} of {n + len(ja)} entries differ")
        return 1
    print(f"identical: {n} arrays byte for byte, and {len(ja)} logs/scores ({', '.join(sorted(ja))})")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump")
    d.add_argument("out")
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    args = p.parse_args(argv)
    if args.cmd == "dump":
        dump(args.out)
        return 0
    return compare(args.a, args.b)


if __name__ == "__main__":
    sys.exit(main())
