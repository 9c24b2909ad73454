"""The model card's quality report: Markdown tables and figures of an :func:`~napari_deepr.evaluate.evaluate_model` result."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .engine.model import load_model
from .engine.normalization import zscore
from .engine.refocus import refocus
from .evaluate import held_out_fields


def do_no_harm_table(result: dict) -> str:
    """Markdown: per field, output − input SSIM at z = −1, 0, +1 µm and the DPM's mean at focus."""
    s = result.get("summary") or {}
    delta = s.get("do_no_harm_delta_by_field")
    if not delta:
        return ""
    dpm0 = s.get("dpm_mean_in_focus_by_field", {})
    zs = list(next(iter(delta.values())))
    lines = [("Do no harm: output SSIM − input SSIM near focus (≥ −0.01 is the target) and the DPM's mean "
              "on the in-focus field's structure (≤ 0.6 µm is the target):"), "",
             "| field | " + " | ".join(f"Δ SSIM z={z} µm" for z in zs) + " | DPM mean at focus (µm) |",
             "|---|" + "---|" * (len(zs) + 1)]
    for n, d in delta.items():
        lines.append(f"| {n} | " + " | ".join(f"{d[z]:+.3f}" for z in zs) + f" | {dpm0.get(n, float('nan')):.2f} |")
    return "\n".join(lines)


def do_no_harm_figure(result: dict, path, model="default", real_dir=None, heldout_dir=None, size: int = 512,
                      photons: float = 600.0):
    """The worst held-out field at focus: input | output | truth (fresh noise, same object)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .optics.simulate import defocus
    from .optics.specimens import make_specimen
    from .science.metrics import ssim

    name = (result.get("summary") or {}).get("do_no_harm_worst_field_at_focus")
    if name is None:
        return None
    m = load_model(model)
    from .demo import model_optics

    optics = model_optics(m)
    fields = dict(held_out_fields(size, optics.pixel_size_um, Path(real_dir) if real_dir else None,
                                  heldout_dir=Path(heldout_dir) if heldout_dir else None))
    if name not in fields:  # a reserve field
        kind, i = name.split("#")[0], int(name.split("#")[1].split()[0])
        fields[name] = make_specimen(kind, (size, size), optics.pixel_size_um, np.random.default_rng(7100 + i))
    obj = fields[name]
    gt = defocus(obj, 0.0, optics, photons=photons, noise=False, offset=0.0)
    img = defocus(obj, 0.0, optics, photons=photons, rng=np.random.default_rng(1))
    out = refocus(img, m)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.6))
    lo, hi = np.percentile(gt, [0.5, 99.8])
    c = slice(0, min(size, 256))
    for ax, im, title in ((axes[0], img - 100.0, f"input (SSIM {ssim(img, gt):.3f})"),
                          (axes[1], out, f"output (SSIM {ssim(out, gt):.3f})"), (axes[2], gt, "truth (in focus, noiseless)")):
        if im is not gt:  # shown in the truth's units: its z-scores mapped to the truth's mean and spread
            im = zscore(im, dtype=np.float64) * gt.std() + gt.mean()
        ax.imshow(im[c, c], cmap="gray", vmin=lo, vmax=hi)
        ax.set_title(title)
        ax.axis("off")
    fig.suptitle(f"{result.get('model', '')}: worst held-out field at focus ({name}), z = 0 µm, {photons:g} photons")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def quality_figure(result: dict, path, model="default", real_dir=None, size: int = 512, z_show=(-5, -3, 3, 5)):
    """Panels at several z (input / output / truth / RL), SSIM-vs-z and FWHM-vs-z, tilt profile."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .optics.psf import Optics, defocus_psf
    from .optics.simulate import defocus
    from .science.deconvolve import richardson_lucy

    optics = Optics.from_dict(result["optics"])
    m = load_model(model)
    name, obj = held_out_fields(size, optics.pixel_size_um, Path(real_dir) if real_dir else None)[0]
    gt = defocus(obj, 0.0, optics, photons=result["photons"], noise=False, offset=0.0)
    t = result.get("tilt") or {}
    shapes = [k for k in ("through_focus", "cylinder") if t.get(f"{k}_profile_um")]
    extra_rows = 1 if shapes else 0
    fig = plt.figure(figsize=(16, 4 * len(z_show) / 1.6 + 4.5 * (1 + extra_rows)))
    gs = fig.add_gridspec(len(z_show) + 1 + extra_rows, 4)
    rng = np.random.default_rng(3)

    def show(ax, im, title):
        a = zscore(np.asarray(im)[10:-10, 10:-10], dtype=np.float64)
        ax.imshow(a[:256, :256], cmap="magma", vmin=-1.5, vmax=np.percentile(a, 99.7))
        ax.set_title(title, fontsize=9)
        ax.axis("off")

    for i, z in enumerate(z_show):
        img = defocus(obj, float(z), optics, photons=result["photons"], rng=rng)
        out = refocus(img, m)
        rl = richardson_lucy(np.clip(img.astype(np.float64) - 100, 0, None), defocus_psf(float(z), optics), iterations=100)
        show(fig.add_subplot(gs[i, 0]), img, f"input z={z:+d} µm")
        show(fig.add_subplot(gs[i, 1]), out, "Deep-R output")
        show(fig.add_subplot(gs[i, 2]), gt, "ground truth")
        show(fig.add_subplot(gs[i, 3]), rl, "RL-100, true PSF")
    rows = result["per_z"]
    z = [r["z_um"] for r in rows]
    last = len(z_show)  # the row of curves
    ax = fig.add_subplot(gs[last, 0])
    for key, lab in (("ssim_input", "input"), ("ssim_output", "Deep-R"), ("ssim_rl", "RL-100"), ("ssim_landweber", "Landweber-100")):
        ax.plot(z, [r[key] for r in rows], "o-", ms=3, label=lab)
    ax.set_xlabel("defocus z (µm)")
    ax.set_ylabel("SSIM")
    ax.legend(fontsize=7)
    ax.set_title("held-out fields", fontsize=9)
    ax = fig.add_subplot(gs[last, 1])
    if "fwhm_input_um" in rows[0]:
        ax.errorbar(z, [r["fwhm_input_um"] for r in rows], [r["fwhm_input_std_um"] for r in rows], fmt="o-", ms=3, label="input")
        ax.errorbar(z, [r["fwhm_output_um"] for r in rows], [r["fwhm_output_std_um"] for r in rows], fmt="o-", ms=3, label="Deep-R")
        ax.set_ylabel("bead lateral FWHM (µm)")
        ax.legend(fontsize=7)
    ax.set_xlabel("defocus z (µm)")
    ax = fig.add_subplot(gs[last, 2])
    if rows and "dpm_mae" in rows[0]:
        ax.plot(z, [r["dpm_mae"] for r in rows], "o-", ms=3, label="|DPM − z| mean (structure)")
        if "dpm_mae_all" in rows[0]:
            ax.plot(z, [r["dpm_mae_all"] for r in rows], ".:", ms=3, label="|DPM − z| mean (all pixels)")
        ax.plot(z, [r["dpm_bias"] for r in rows], "s--", ms=3, label="DPM − z mean (bias)")
        ax.axhline(0.4, color="gray", lw=0.8)
        ax.set_xlabel("defocus z (µm)")
        ax.set_ylabel("µm")
        ax.legend(fontsize=7)
    ax = fig.add_subplot(gs[last, 3])
    if t:
        y = np.arange(len(t["row_profile_um"])) * optics.pixel_size_um
        ax.plot(y, t["row_profile_um"], label="DPM row mean")
        ax.plot(y, t["true_profile_um"], "k--", label="true (1.5°)")
        ax.set_title(f"tilted field: fitted {t['fitted_deg']:.2f}°", fontsize=9)
        ax.set_xlabel("y (µm)")
        ax.set_ylabel("defocus (µm)")
        ax.legend(fontsize=7)
    held = (t.get("held_out_specimens") or ["cells"])[0]
    for col, key in enumerate(shapes):
        ax = fig.add_subplot(gs[last + 1, col])
        y = np.arange(len(t[f"{key}_profile_um"])) * optics.pixel_size_um
        ax.plot(y, t[f"{key}_profile_um"], label="DPM row mean")
        if key == "through_focus":
            ax.plot(y, t["through_focus_true_profile_um"], "k--", label="true |defocus| (1.5°)")
            fits = t["through_focus_fitted_deg_by_specimen"].get(held, [float("nan")])
            title = f"1.5° tilt centred on focus ({held}): fitted through the fold {fits[0]:.2f}°"
        else:
            ax.plot(y, t["cylinder_true_profile_um"], "k--", label=f"true (cylinder, R {t['cylinder']['true_radius_mm']:.1f} mm)")
            fit = t["cylinder"]["fitted_by_specimen"].get(held, {})
            title = f"curved field ({held}): {fit.get('shape', '?')}, R {fit.get('radius_mm', float('nan')):.2f} mm"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("y (µm)")
        ax.set_ylabel("defocus (µm)")
        ax.legend(fontsize=7)
    fig.suptitle(f"{result['model']} on held-out {name} (and {len(result['fields']) - 1} more fields in the curves)")
    fig.tight_layout(rect=(0, 0, 1, 0.98))  # keep the suptitle clear of the first row's titles
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)


def per_field_table(result: dict, lo: float = 2.0, hi: float = 5.0) -> str:
    """Markdown: each held-out field's SSIM (input, output, RL, Landweber) and DPM MAE, mean over lo ≤ |z| ≤ hi."""
    rows = [r for r in result["per_z"] if lo <= abs(r["z_um"]) <= hi and "fields" in r]
    if not rows:
        return ""
    lines = [f"Per field, mean over {lo:g} ≤ |z| ≤ {hi:g} µm (gain: output − input SSIM over 3 ≤ |z| ≤ {hi:g} µm):", "",
             "| field | SSIM in | SSIM out | SSIM RL | SSIM LW | gain |z| ≥ 3 | DPM MAE (µm) |", "|---|---|---|---|---|---|---|"]
    for name in rows[0]["fields"]:
        def mean(key, name=name, lo3=lo):
            vals = [r["fields"][name].get(key, float("nan")) for r in rows if abs(r["z_um"]) >= lo3]
            return float(np.mean(vals))

        gain = mean("ssim_output", lo3=3) - mean("ssim_input", lo3=3)
        lines.append(f"| {name} | {mean('ssim_input'):.3f} | **{mean('ssim_output'):.3f}** | {mean('ssim_rl'):.3f} | "
                     f"{mean('ssim_landweber'):.3f} | {gain:+.3f} | {mean('dpm_mae'):.2f} |")
    return "\n".join(lines)


def markdown_table(result: dict) -> str:
    """The per-z quality table as Markdown for MODEL_CARD.md and the README."""
    head = ("| z (µm) | SSIM in | SSIM out | SSIM RL | SSIM LW | RMSE in | RMSE out | RMSE RL | RMSE LW | "
            "FWHM in (µm) | FWHM out (µm) | DPM MAE (µm) | DPM MAE all px (µm) |")
    lines = [head, "|" + "---|" * 13]
    for r in result["per_z"]:
        lines.append(
            f"| {r['z_um']:+.0f} | {r['ssim_input']:.3f} | **{r['ssim_output']:.3f}** | {r['ssim_rl']:.3f} | {r['ssim_landweber']:.3f} | "
            f"{r['rmse_input']:.3f} | {r['rmse_output']:.3f} | {r['rmse_rl']:.3f} | {r['rmse_landweber']:.3f} | "
            f"{r.get('fwhm_input_um', float('nan')):.2f} | {r.get('fwhm_output_um', float('nan')):.2f} | "
            f"{r.get('dpm_mae', float('nan')):.2f} | {r.get('dpm_mae_all', float('nan')):.2f} |"
        )
    return "\n".join(lines)
