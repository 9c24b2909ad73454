#!/usr/bin/env python
"""Score model variants on the held-out fields near and away from focus (the near-focus weight choice).

    python scripts/fetch_heldout.py
    python scripts/near_focus_variants.py 512 MODEL_A MODEL_B ...

Per held-out field: the worst output − input SSIM over |z| <= 1 µm, the DPM mean at focus, and the
mean input/output SSIM over 2 <= |z| <= 5 µm (600 photons, no deconvolution baselines: a quick
version of scripts/evaluate_model.py). Writes /tmp/near_focus_variants_SIZE.json.
"""
import json
import sys
from pathlib import Path

import numpy as np

from napari_deepr.engine.dpm import structure_mask
from napari_deepr.engine.model import load_model
from napari_deepr.engine.refocus import refocus
from napari_deepr.evaluate import held_out_fields
from napari_deepr.optics.psf import OPTICS_20X_075
from napari_deepr.optics.simulate import defocus
from napari_deepr.optics.specimens import make_specimen
from napari_deepr.science.metrics import ssim

size = int(sys.argv[1])
models = sys.argv[2:]
opt = OPTICS_20X_075
hd = Path.home() / ".cache" / "napari-deepr" / "heldout"
fields = held_out_fields(size, opt.pixel_size_um, Path(__file__).resolve().parents[2] / "shared" / "data" / "real",
                         heldout_dir=hd if hd.is_dir() else None)
fields += [(f"mito#{i}", make_specimen("mitochondria", (size, size), opt.pixel_size_um, np.random.default_rng(7100 + i))) for i in range(2)]
zs = [-5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5]
res = {}
for mp in models:
    m = load_model(mp)
    rng = np.random.default_rng(0)
    r = {}
    for name, obj in fields:
        gt = defocus(obj, 0.0, opt, photons=600, noise=False, offset=0.0)
        sm = structure_mask(gt)
        for z in zs:
            img = defocus(obj, float(z), opt, photons=600, rng=rng)
            out, dpm = refocus(img, m, dpm=True)
            r[f"{name}|{z}"] = (ssim(img, gt), ssim(out, gt), float(dpm[sm].mean()))
    res[mp] = r
Path(f"/tmp/near_focus_variants_{size}.json").write_text(json.dumps(res))
names = [n for n, _ in fields]
for mp, r in res.items():
    print("==", mp)
    for n in names:
        nh = [r[f"{n}|{z}"][1] - r[f"{n}|{z}"][0] for z in (-1, 0, 1)]
        band = [r[f"{n}|{z}"] for z in zs if abs(z) >= 2]
        print(f"{n:32s} noharm worst {min(nh):+.3f}  dpm@0 {r[f'{n}|0'][2]:.2f}  2-5: in {np.mean([b[0] for b in band]):.3f} out {np.mean([b[1] for b in band]):.3f}")
    allband = [r[f"{n}|{z}"][1] for n in names[:6] for z in zs if abs(z) >= 2]
    print("mean out 2-5 (non-reserve)", round(float(np.mean(allband)), 4))
