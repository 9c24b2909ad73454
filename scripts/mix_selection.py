#!/usr/bin/env python
"""Score model variants on a selection set kept apart from the held-out protocol (issue 17, v2.1).

Training specimen families at fresh seeds, the two real in-focus *training* images and two fresh bead
fields: no held-out field of ``scripts/evaluate_model.py`` is used, so a variant (a weight mix's
alpha) chosen here is still judged independently there.

    python scripts/mix_selection.py v2=models/deepr-fluo-20x g0.8=/tmp/g0.8 --json selection.json

Per variant: worst output − input SSIM at |z| ≤ 1 µm over the fields, mean output SSIM over
2 ≤ |z| ≤ 5 µm, DPM MAE on structure (±5 µm), and bead FWHM / in-focus FWHM for |z| ≤ 4 µm (mean of
the two bead fields; worst z).
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np

from napari_deepr.demo import model_optics
from napari_deepr.engine.dpm import structure_mask
from napari_deepr.engine.model import load_model
from napari_deepr.engine.refocus import refocus
from napari_deepr.evaluate import real_field
from napari_deepr.optics.simulate import defocus
from napari_deepr.optics.specimens import make_specimen
from napari_deepr.science.metrics import bead_fwhm, ssim

SIZE = 384
REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
#: Real in-focus images the bundled model trained on (train_config.json), never held out.
TRAINING_REAL = ("bian_bpae_nuclei_2d.tif", "sephace_dapi_set1_2d.tif")
FAMILIES = ("nuclei", "tissue", "mixed", "filaments", "texture")
BEAD_SEEDS = (9501, 9502)


def selection_fields(px: float, real_dir: Path) -> list[tuple[str, np.ndarray]]:
    """Two fields of each training family at seeds 9100+ and the real training images."""
    fields = [(f"{k}#{i}", make_specimen(k, (SIZE, SIZE), px, np.random.default_rng(9100 + 10 * i + j)))
              for j, k in enumerate(FAMILIES) for i in range(2)]
    return fields + [(n.split(".")[0], real_field(real_dir / n, SIZE)) for n in TRAINING_REAL if (real_dir / n).exists()]


def score(model_dir, real_dir: Path = REAL) -> dict:
    """Selection-set numbers of one model folder (see the module docstring)."""
    m = load_model(model_dir)
    optics = model_optics(m)
    px = optics.pixel_size_um
    rng = np.random.default_rng(123)
    noharm, ssim25, mae = {}, [], []
    for name, obj in selection_fields(px, real_dir):
        gt = defocus(obj, 0.0, optics, photons=600, noise=False, offset=0.0)
        sm = structure_mask(gt)[10:-10, 10:-10]
        for z in range(-5, 6):
            img = defocus(obj, float(z), optics, photons=600, rng=rng)
            out, dpm = refocus(img, m, dpm=True)
            if abs(z) <= 1:
                noharm[name] = min(ssim(out, gt) - ssim(img, gt), noharm.get(name, np.inf))
            else:
                ssim25.append(ssim(out, gt))
            mae.append(float(np.mean(np.abs(np.asarray(dpm)[10:-10, 10:-10][sm] - abs(z)))))
    zs = list(range(-4, 5))
    ratios = []
    for seed in BEAD_SEEDS:
        beads = make_specimen("beads", (SIZE, SIZE), px, np.random.default_rng(seed))
        stack = np.stack([defocus(beads, float(z), optics, photons=1800, rng=rng) for z in zs])
        fw, _, _ = bead_fwhm(refocus(stack, m, axes="ZYX").astype(np.float64), px)
        ratios.append(np.asarray(fw) / fw[zs.index(0)])
    bead = np.mean(ratios, axis=0)
    return {"noharm_worst": float(min(noharm.values())), "noharm_by_field": noharm,
            "ssim_output_2to5": float(np.mean(ssim25)), "dpm_mae": float(np.mean(mae)),
            "bead_fwhm_ratio_worst_le4": float(bead.max()),
            "bead_fwhm_ratio_by_z": dict(zip((f"{z:+d}" for z in zs), (round(float(b), 3) for b in bead), strict=True))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("variants", nargs="+", help="NAME=MODEL_DIR")
    p.add_argument("--real-dir", default=str(REAL))
    p.add_argument("--json", help="write all numbers here")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")  # uncalibrated arrays: the model's sampling is meant
    res = {}
    for v in args.variants:
        name, path = v.split("=", 1)
        res[name] = score(path, Path(args.real_dir))
        print(name, json.dumps({k: round(x, 4) for k, x in res[name].items() if isinstance(x, float)}), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
