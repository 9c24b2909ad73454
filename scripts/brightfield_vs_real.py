"""Compare the brightfield simulator with a real through-focus stack (sephace sets 1 and 2).

The sephace stacks (../shared/data/real/sephace_brightfield_set*_zstack.tif; unstained adherent
cells, Nikon 40× air, 0.2004 µm pixels, monochrome camera, halogen light) have six planes at
relative, non-uniform stage positions from two series ("init" ±25 µm and "fine" ±10 µm, each with
its own in-focus frame). The cells are mostly phase objects, so the specimen is taken as a complex
transmittance:

* amplitude: ``sqrt(I_0)`` of the fine series' in-focus plane (relative to its mean);
* phase: from the fine series' two defocused planes (nominal −10.3/+9.75 µm in set 1) by a
  Tikhonov-regularised inversion of the weak-object phase transfer function
  (:func:`napari_deepr.optics.brightfield.weak_object_transfer`, regularisation 1e-3 of the largest
  squared transfer); the lowest frequencies, which brightfield hardly transfers, stay unknown.

The full (non-linear) Abbe model then images that specimen at a grid of defocus values; for each
real plane the defocus with the highest normalised cross-correlation (best lateral shift within
±24 px, since the two series drift) on a 2 µm grid over ±40 µm is refined on a 0.25 µm grid. The condenser NA is
chosen from a few values (0.1-0.3) by the mean best correlation of the three planes *not* used for the phase
(the init series at about −25, −0.6, +25 µm). Sharpness is the normalised variance var/mean².

Assumed, not known: objective NA 0.75 (a 40× air Plan Fluor), wavelength 0.55 µm, no aberrations.

Usage::

    python scripts/brightfield_vs_real.py [--sets 1 2] [--crop 256] [--out docs/brightfield_vs_real]

Writes ``OUT.png`` (real vs simulated planes and sharpness curves) and ``OUT.json`` (numbers).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np

from napari_deepr.optics.brightfield import abbe_intensity, weak_object_transfer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
PX = 0.2004
NA = 0.75
LAM = 0.55


def load(set_no: int):
    import tifffile

    path = DATA / f"sephace_brightfield_set{set_no}_zstack.tif"
    if not path.exists():
        path = Path("/work/shared/data/real") / path.name
    with tifffile.TiffFile(path) as t:
        stack = t.asarray().astype(np.float64)
        labels = t.imagej_metadata["Labels"]
    zs = np.array([float(re.match(r"z=([+-]?[\d.]+)um", lab).group(1)) for lab in labels])
    series = ["init" if "_init_" in lab else "fine" for lab in labels]
    return stack, zs, series


def crop_box(stack: np.ndarray, side: int) -> tuple[slice, slice]:
    """The ``side``² window with the most in-focus structure (the cells), on a coarse grid."""
    ref = stack.std(axis=0)  # cells change through focus, empty glass does not
    best, at = -1.0, (0, 0)
    h, w = ref.shape
    for y in range(0, h - side + 1, 32):
        for x in range(0, w - side + 1, 32):
            v = float(ref[y : y + side, x : x + side].mean())
            if v > best:
                best, at = v, (y, x)
    return slice(at[0], at[0] + side), slice(at[1], at[1] + side)


def estimate_object(i0, i_minus, i_plus, z_minus, z_plus, condenser_na, alpha=1e-3):
    """Complex transmittance from the in-focus plane (amplitude) and two defocused planes (phase)."""
    shape = i0.shape
    kw = {"na": NA, "wavelength_um": LAM, "pixel_size_um": PX, "condenser_na": condenser_na, "source_step": 0.125}
    he_p, hp_p = weak_object_transfer(shape, z_plus, **kw)
    he_m, hp_m = weak_object_transfer(shape, z_minus, **kw)
    eps = (i0 - 1.0) / 2.0  # in-focus amplitude deviation (H_eps = 2 in the pass band)
    d = np.fft.fft2((i_plus - 1.0) - (i_minus - 1.0)) - (he_p - he_m) * np.fft.fft2(eps)
    dh = hp_p - hp_m
    reg = alpha * float(np.abs(dh).max()) ** 2
    phi = np.fft.ifft2(np.conj(dh) * d / (np.abs(dh) ** 2 + reg)).real
    return np.sqrt(np.clip(i0, 0.05, None)) * np.exp(1j * phi), phi


def norm_xcorr_best(sim: np.ndarray, real: np.ndarray, max_shift: int = 24, border: int = 16):
    """Highest normalised cross-correlation over integer shifts (circular, Hann-windowed) and the shift."""
    a = sim - sim.mean()
    b = real - real.mean()
    win = np.outer(np.hanning(a.shape[0]), np.hanning(a.shape[1]))
    a, b = a * win, b * win
    c = np.fft.ifft2(np.fft.fft2(b) * np.conj(np.fft.fft2(a))).real / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12)
    c = np.fft.fftshift(c)
    cy, cx = c.shape[0] // 2, c.shape[1] // 2
    win_c = c[cy - max_shift : cy + max_shift + 1, cx - max_shift : cx + max_shift + 1]
    k = np.unravel_index(int(np.argmax(win_c)), win_c.shape)
    return float(win_c[k]), (int(k[0] - max_shift), int(k[1] - max_shift))


def nv(img: np.ndarray) -> float:
    return float(img.var() / img.mean() ** 2)


def simulate(t, zs, condenser_na, step=0.125):
    return abbe_intensity(t, list(zs), na=NA, wavelength_um=LAM, pixel_size_um=PX, condenser_na=condenser_na,
                          source_step=step)


def analyse(set_no: int, side: int, condenser_nas, z_grid):
    stack, z_nom, series = load(set_no)
    ys, xs = crop_box(stack, side)
    rel = np.stack([p[ys, xs] / p.mean() for p in stack])  # each plane relative to its own mean
    fine = [i for i, s in enumerate(series) if s == "fine"]
    i_focus = min(fine, key=lambda i: abs(z_nom[i]))
    i_minus = min((i for i in fine if z_nom[i] < 0), key=lambda i: z_nom[i])
    i_plus = max((i for i in fine if z_nom[i] > 0), key=lambda i: z_nom[i])
    held = [i for i in range(len(z_nom)) if i not in (i_focus, i_minus, i_plus)]
    result = {"set": set_no, "crop": [ys.start, ys.stop, xs.start, xs.stop], "z_nominal_um": z_nom.tolist(),
              "series": series, "phase_from_planes": [i_minus, i_plus], "amplitude_from_plane": i_focus,
              "held_out_planes": held, "assumed": {"na": NA, "wavelength_um": LAM, "pixel_size_um": PX},
              "condenser": []}
    best = None
    for na_c in condenser_nas:
        t0 = time.time()
        t, phi = estimate_object(rel[i_focus], rel[i_minus], rel[i_plus], z_nom[i_minus], z_nom[i_plus], na_c)
        sims = simulate(t, z_grid, na_c)
        scores = np.array([[norm_xcorr_best(s, r)[0] for s in sims] for r in rel])  # (planes, z)
        held_score = float(np.mean([scores[i].max() for i in held]))
        result["condenser"].append({"condenser_na": na_c, "held_out_mean_best_ncc": held_score,
                                    "seconds": round(time.time() - t0, 1)})
        print(f"set {set_no} condenser NA {na_c}: held-out mean best NCC {held_score:.3f} ({time.time() - t0:.0f} s)",
              flush=True)
        if best is None or held_score > best[0]:
            best = (held_score, na_c, t, phi, sims, scores)
    _, na_c, t, phi, sims, scores = best
    # refine each plane's z on a 0.25 µm grid around its coarse optimum
    fitted, ncc, shifts, sim_planes = [], [], [], []
    for k, r in enumerate(rel):
        z0 = z_grid[int(np.argmax(scores[k]))]
        fine_z = np.arange(z0 - 2.0, z0 + 2.001, 0.25)
        fsims = simulate(t, fine_z, na_c)
        s = [norm_xcorr_best(p, r) for p in fsims]
        j = int(np.argmax([v[0] for v in s]))
        fitted.append(float(fine_z[j]))
        ncc.append(s[j][0])
        shifts.append(s[j][1])
        sim_planes.append(np.roll(fsims[j], s[j][1], axis=(0, 1)))
    curve_z = np.asarray(z_grid)
    result.update({
        "condenser_na": na_c,
        "z_fitted_um": fitted,
        "ncc_at_fit": ncc,
        "shift_px_at_fit": shifts,
        "nv_real": [nv(r) for r in rel],
        "nv_sim_at_fit": [nv(p) for p in sim_planes],
        "nv_sim_curve": {"z_um": curve_z.tolist(), "nv": [nv(p) for p in sims]},
        "ncc_curves": scores.tolist(),
        "phase_rad_range": [float(np.percentile(phi, 1)), float(np.percentile(phi, 99))],
    })
    return result, rel, np.stack(sim_planes), phi


def figure(results, panels, out_png: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_sets = len(results)
    fig = plt.figure(figsize=(15, 5.2 * n_sets))
    gs = fig.add_gridspec(3 * n_sets, 7, width_ratios=[1] * 6 + [1.5])
    for s, (res, (rel, sim, phi)) in enumerate(zip(results, panels, strict=True)):
        order = np.argsort(res["z_nominal_um"])
        for col, k in enumerate(order):
            for row, (img, lab) in enumerate(((rel[k], "real"), (sim[k], "simulated"))):
                ax = fig.add_subplot(gs[3 * s + row, col])
                lo, hi = np.percentile(rel[k], [0.5, 99.5])
                ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    tag = res["series"][k]
                    ax.set_title(f"set {res['set']} {tag}\nnominal {res['z_nominal_um'][k]:+.2f} µm", fontsize=9)
                else:
                    ax.set_title(f"sim z={res['z_fitted_um'][k]:+.2f} µm  NCC {res['ncc_at_fit'][k]:.2f}", fontsize=9)
                if col == 0:
                    ax.set_ylabel(lab)
        ax = fig.add_subplot(gs[3 * s : 3 * s + 2, 6])
        c = res["nv_sim_curve"]
        ax.plot(c["z_um"], c["nv"], "-", color="tab:blue", label=f"simulated (condenser NA {res['condenser_na']})")
        ax.plot(res["z_fitted_um"], res["nv_real"], "o", color="tab:red", label="real, at fitted z")
        ax.plot(res["z_nominal_um"], res["nv_real"], "x", color="tab:gray", label="real, at nominal z")
        ax.set_xlabel("defocus z (µm)")
        ax.set_ylabel("normalised variance var/mean²")
        ax.set_title(f"set {res['set']}: sharpness vs z", fontsize=9)
        ax.legend(fontsize=7)
        ax = fig.add_subplot(gs[3 * s + 2, 6])
        ax.imshow(phi, cmap="RdBu_r")
        ax.set_title("estimated phase (rad)", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        ax = fig.add_subplot(gs[3 * s + 2, :6])
        for k in order:
            ax.plot(c["z_um"], res["ncc_curves"][k], label=f"plane nominal {res['z_nominal_um'][k]:+.1f}")
        ax.set_xlabel("simulated z (µm)")
        ax.set_ylabel("NCC real vs sim")
        ax.legend(fontsize=7, ncol=6)
    fig.tight_layout()
    fig.savefig(out_png, dpi=80)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--condenser-na", type=float, nargs="+", default=[0.1, 0.15, 0.2, 0.3])
    ap.add_argument("--z-step", type=float, default=2.0, help="coarse defocus grid step (µm) over ±40 µm")
    ap.add_argument("--out", default="docs/brightfield_vs_real")
    args = ap.parse_args()
    z_grid = np.arange(-40.0, 40.01, args.z_step)
    results, panels = [], []
    for s in args.sets:
        res, rel, sim, phi = analyse(s, args.crop, args.condenser_na, z_grid)
        results.append(res)
        panels.append((rel, sim, phi))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure(results, panels, out.with_suffix(".png"))
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    for r in results:
        print(json.dumps({k: r[k] for k in ("set", "condenser_na", "z_nominal_um", "z_fitted_um", "ncc_at_fit",
                                            "nv_real", "nv_sim_at_fit")}))


if __name__ == "__main__":
    main()
