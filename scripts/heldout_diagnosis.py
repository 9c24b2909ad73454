"""Per-field look at the held-out evaluation: where the bundled model wins and where it fails.

    python scripts/heldout_diagnosis.py [--model default] [--figure docs/heldout_cells.png]

Prints, per held-out field (``napari_deepr.evaluate.held_out_fields``) and defocus, the SSIM of the
input, the model's output and Richardson-Lucy (100 iterations, true PSF) against the in-focus truth,
and the output's high-frequency energy (Laplacian variance) relative to the truth's; draws input /
output / truth / DPM of the first procedural field at +3 µm.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy import ndimage

from napari_deepr.demo import model_optics
from napari_deepr.engine.model import load_model
from napari_deepr.engine.refocus import refocus
from napari_deepr.evaluate import held_out_fields
from napari_deepr.optics.psf import defocus_psf
from napari_deepr.optics.simulate import defocus
from napari_deepr.science.deconvolve import richardson_lucy
from napari_deepr.science.metrics import ssim

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


def hf_energy(a: np.ndarray) -> float:
    a = (a - a.mean()) / a.std()
    return float(ndimage.laplace(a.astype(np.float64))[8:-8, 8:-8].var())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--figure")
    ap.add_argument("--z", type=float, nargs="+", default=[-4, -3, 3, 4])
    args = ap.parse_args()
    m = load_model(args.model)
    opt = model_optics(m)
    fields = held_out_fields(512, opt.pixel_size_um, REAL if REAL.is_dir() else None)
    rng = np.random.default_rng(0)
    print("field".ljust(30), " ".join(f"z={z:+.0f} in/ours/RL/hf".rjust(24) for z in args.z))
    for name, obj in fields:
        gt = defocus(obj, 0.0, opt, photons=600, noise=False, offset=0.0)
        row = []
        for z in args.z:
            img = defocus(obj, float(z), opt, photons=600, rng=rng)
            out = refocus(img, m)
            rl = richardson_lucy(np.clip(img.astype(np.float64) - 100, 0, None), defocus_psf(float(z), opt), iterations=100)
            row.append(f"{ssim(img, gt):.2f}/{ssim(out, gt):.2f}/{ssim(rl, gt):.2f}/{hf_energy(out) / hf_energy(gt):.2f}")
        print(name[:30].ljust(30), " ".join(r.rjust(24) for r in row), flush=True)
    if args.figure:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        name, obj = fields[0]
        gt = defocus(obj, 0.0, opt, photons=600, noise=False, offset=0.0)
        img = defocus(obj, 3.0, opt, photons=600, rng=np.random.default_rng(0))
        out, dpm = refocus(img, m, dpm=True) if m.has_dpm else (refocus(img, m), None)
        panels = [(img, "input, +3 µm"), (out, "refocused"), (gt, "in-focus truth")]
        if dpm is not None:
            panels.append((dpm, "DPM (µm)"))
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.6))
        for ax, (im, title) in zip(axes, panels, strict=True):
            crop = im[128:384, 128:384]
            h = ax.imshow(crop, cmap="magma" if title.startswith("DPM") else "gray")
            ax.set_title(f"{name}: {title}", fontsize=9)
            ax.axis("off")
            if title.startswith("DPM"):
                fig.colorbar(h, ax=ax, fraction=0.046)
        fig.tight_layout()
        fig.savefig(args.figure, dpi=80)
        print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()
