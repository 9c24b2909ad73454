"""Measure how informative the trust map is, on held-out simulated fields (rerun to regenerate).

Per-pixel: Spearman ρ between the refocused image's absolute error (z-scored against the true
in-focus image) and the map's doubt (1 − trust), pooled over held-out fluorescence fields at
1–5 µm defocus. Per image: ROC AUC of the untrusted share (pixels with trust < 0.5) separating
in-domain fluorescence fields from out-of-domain ones: brightfield RGB (forced through the
fluorescence model), pixel size 3× off with resampling off, and defocus at 2× (and 4×) the trained
range. The held-out specimen families are those the bundled model never trained on ("cells",
"mitochondria"); seeds differ from every training seed.

Usage::

    python scripts/trust_eval.py [--model default] [--size 256] [--passes 8] [--out docs/trust_eval.json]

Writes the JSON and ``docs/trust_roc.png`` beside it.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.stats import mannwhitneyu, spearmanr

from napari_deepr.engine.model import load_model
from napari_deepr.engine.refocus import RefocusJob
from napari_deepr.engine.trust import SPREAD_SIGMA_PX, TRUSTED
from napari_deepr.optics.psf import Optics
from napari_deepr.optics.simulate import brightfield, defocus
from napari_deepr.optics.specimens import make_specimen

HELD_OUT = ("cells", "mitochondria")
EVAL_SEEDS = (9101, 9102)
#: The tuning set: the procedural families the bundled model trained on (its train_config.json), with
#: seeds unlike the evaluation's. The trust map's constants are chosen on these (scripts/trust_tune.py).
TUNE_FAMILIES = ("beads", "filaments", "nuclei", "tissue", "mixed", "cytoplasm", "texture")
TUNE_SEEDS = (7101, 7102)
CROP = 10  # edge pixels left out (reflection padding at the border)
PARTS = ("spread", "beyond", "doubt")  # the trust map's parts (engine.trust.trust_map), per-image means


def zscore(a):
    a = np.asarray(a, dtype=np.float64)
    return (a - a.mean()) / (a.std() + 1e-12)


def run(image, model, passes, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        job = RefocusJob(image, model, trust=passes, **kw)
        out, trust = job.run()
    return out, trust, job


def summary(trust):
    t = trust[CROP:-CROP, CROP:-CROP]
    return {"untrusted_share": float(np.mean(t < TRUSTED)), "mean_doubt": float(np.mean(1 - t))}


def auc(pos, neg):
    """ROC AUC that a positive (out-of-domain) image scores above a negative one (ties count half)."""
    u = mannwhitneyu(pos, neg, alternative="greater").statistic
    return float(u / (len(pos) * len(neg)))


def roc(pos, neg):
    s = np.r_[pos, neg]
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    thr = np.r_[np.inf, np.sort(np.unique(s))[::-1]]
    tpr = [float(np.mean(s[y == 1] >= t)) for t in thr]
    fpr = [float(np.mean(s[y == 0] >= t)) for t in thr]
    return fpr, tpr



def in_domain_fields(kinds, seeds, n, optics):
    """In domain: fluorescence fields within the trained range, with their true in-focus planes (z-scored).

    Yields ``(kind, seed, z, x, truth)``; the sign of the defocus alternates with the seed's parity.
    """
    px = optics.pixel_size_um
    for kind in kinds:
        for seed in seeds:
            obj = make_specimen(kind, (n, n), px, np.random.default_rng(seed))
            truth = zscore(defocus(obj, 0.0, optics, photons=1500, noise=False))
            for z in (1.0, 2.0, 3.0, 4.0, 5.0):
                sign = 1 if seed % 2 else -1
                x = defocus(obj, sign * z, optics, photons=800, rng=np.random.default_rng(seed + int(10 * z)))
                yield kind, seed, sign * z, x.astype(np.float32), truth


def out_of_domain_fields(kinds, seeds, n, card):
    """Out-of-domain images: yields ``(group, label, image, refocus keyword arguments)``."""
    px = card.pixel_size_um
    optics = Optics(na=card.na, wavelength_um=card.wavelength_um, pixel_size_um=px, immersion_index=card.immersion_index or 1.0)
    hi = max(abs(v) for v in card.defocus_range_um)
    # 1: brightfield RGB (H&E-like stain), forced through the fluorescence model.
    stain = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])  # OD per channel of hematoxylin, eosin
    for seed in seeds:
        rng = np.random.default_rng(seed)
        nuc = make_specimen("nuclei", (n, n), px, rng)
        tis = make_specimen("tissue", (n, n), px, rng)
        nuc, tis = nuc / (np.percentile(nuc, 99.5) + 1e-9), tis / (np.percentile(tis, 99.5) + 1e-9)
        for z in (0.0, 2.0, 4.0):
            rgb = np.stack([
                brightfield(0.8 * (stain[0, ch] * nuc + stain[1, ch] * tis), z, optics, rng=np.random.default_rng(seed + ch))
                for ch in range(3)
            ], axis=-1)
            rgb8 = np.clip(rgb.astype(np.float64) / np.percentile(rgb, 99.9) * 240, 0, 255).astype(np.uint8)
            yield ("brightfield", f"H&E-like RGB s{seed} z={z:+g}", rgb8,
                   {"pixel_size_um": px, "axes": "YXS", "force_modality": True})
    # 2: pixel size 3x finer than the model's, resampling off.
    fine = Optics(na=card.na, wavelength_um=card.wavelength_um, pixel_size_um=px / 3, immersion_index=card.immersion_index or 1.0)
    for kind in kinds:
        for seed in seeds:
            obj = make_specimen(kind, (n, n), px / 3, np.random.default_rng(seed + 7))
            for z in (1.0, 3.0, 5.0):
                x = defocus(obj, z, fine, photons=800, rng=np.random.default_rng(seed + 3))
                yield ("pixel 3x off", f"{kind} s{seed} z={z:+g} ({px / 3:.3f} µm)", x.astype(np.float32),
                       {"pixel_size_um": px / 3, "resample": False})
    # 3 (and a harder look, 4x): defocus beyond the trained range.
    for factor in (2, 4):
        for kind in kinds:
            for seed in seeds:
                obj = make_specimen(kind, (n, n), px, np.random.default_rng(seed + 11))
                for sign in (1, -1):
                    z = sign * factor * hi
                    x = defocus(obj, z, optics, photons=800, rng=np.random.default_rng(seed + 5))
                    yield f"defocus {factor}x range", f"{kind} s{seed} z={z:+g}", x.astype(np.float32), {"pixel_size_um": px}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--passes", type=int, default=8)
    ap.add_argument("--families", nargs="+", default=list(HELD_OUT),
                    help="specimen families of the in-domain, pixel-size and beyond-range fields (default: held out)")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(EVAL_SEEDS))
    ap.add_argument("--tune", action="store_true",
                    help="the tuning set instead: the families the model trained on, other seeds (docs/trust_eval_tune.json)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.tune:
        args.families, args.seeds = list(TUNE_FAMILIES), list(TUNE_SEEDS)
    if args.out is None:
        args.out = "docs/trust_eval_tune.json" if args.tune else "docs/trust_eval.json"
    t0 = time.perf_counter()
    model = load_model(args.model)
    card = model.card
    px = card.pixel_size_um
    optics = Optics(na=card.na, wavelength_um=card.wavelength_um, pixel_size_um=px, immersion_index=card.immersion_index or 1.0)
    n = args.size
    images = []  # (group, label, summary)
    errs, doubts = [], []
    keys, comps = [], {"spread (σ 1 px)": [], "reference: |output| (σ 2 px)": []}  # diagnostics, same pixels

    def add(group, label, trust, job):
        s = summary(trust)
        for k in PARTS:
            v = (job.trust_parts or {}).get(k)
            s[f"mean_part_{k}"] = float(np.mean(v[CROP:-CROP, CROP:-CROP])) if v is not None else None
        # Without the engine's declared verdicts (forced modality, pixel size off): what the pixels alone say.
        s["content_untrusted_share"] = summary(job.trust_parts["content_trust"])["untrusted_share"]
        images.append(dict(group=group, label=label, **s))
        print(f"{group:>14} {label:<34} untrusted {100 * s['untrusted_share']:5.1f}%  doubt {s['mean_doubt']:.3f}", flush=True)

    for kind, seed, z, x, truth in in_domain_fields(args.families, args.seeds, n, optics):
        out, trust, job = run(x, model, args.passes, pixel_size_um=px)
        c = slice(CROP, -CROP)
        errs.append(np.abs(zscore(out) - truth)[c, c][::2, ::2].ravel())
        doubts.append((1 - trust)[c, c][::2, ::2].ravel())
        keys.append((kind, abs(z)))
        comps["spread (σ 1 px)"].append(gaussian_filter(job.trust_parts["spread"], SPREAD_SIGMA_PX)[c, c][::2, ::2].ravel())
        comps["reference: |output| (σ 2 px)"].append(gaussian_filter(np.abs(zscore(out)), 2.0)[c, c][::2, ::2].ravel())
        add("in-domain", f"{kind} s{seed} z={z:+g}", trust, job)
    for group, label, image, kw in out_of_domain_fields(args.families, args.seeds, n, card):
        _, trust, job = run(image, model, args.passes, **kw)
        add(group, label, trust, job)

    e, d = np.concatenate(errs), np.concatenate(doubts)
    rho = float(spearmanr(e, d).statistic)
    groups = sorted({im["group"] for im in images} - {"in-domain"})
    def rho_of(pick, maps=doubts):
        sel = [i for i, k in enumerate(keys) if pick(k)]
        return float(spearmanr(np.concatenate([errs[i] for i in sel]), np.concatenate([maps[i] for i in sel])).statistic)

    res = {
        "model": card.name, "model_version": card.version, "passes": args.passes, "field_px": n,
        "families": list(args.families), "seeds": list(args.seeds),
        "trusted_threshold": TRUSTED, "crop_px": CROP,
        "spearman_abs_error_vs_doubt": rho, "spearman_pixels": int(e.size),
        # Diagnostics of the same pixels: by |defocus|, by family, single signals and a reference map that
        # uses no model information (how bright the output is).
        "spearman_by_abs_z": {f"{z:g}": rho_of(lambda k, z=z: k[1] == z) for z in sorted({k[1] for k in keys})},
        "spearman_by_family": {f: rho_of(lambda k, f=f: k[0] == f) for f in sorted({k[0] for k in keys})},
        "spearman_components": {name: rho_of(lambda k: True, maps) for name, maps in comps.items()},
        "auc": {}, "auc_mean_doubt": {}, "auc_components": {}, "images": images,
    }
    neg = [im for im in images if im["group"] == "in-domain"]
    pos_sets = {g: [im for im in images if im["group"] == g] for g in groups}
    pos_sets["all out-of-domain (2x range, brightfield, pixel 3x)"] = [
        im for im in images if im["group"] in ("brightfield", "pixel 3x off", "defocus 2x range")]
    curves = {}
    for g, pos in pos_sets.items():
        res["auc"][g] = auc([p["untrusted_share"] for p in pos], [q["untrusted_share"] for q in neg])
        res["auc_mean_doubt"][g] = auc([p["mean_doubt"] for p in pos], [q["mean_doubt"] for q in neg])
        res["auc_components"][g] = {
            k: auc([p[f"mean_part_{k}"] for p in pos], [q[f"mean_part_{k}"] for q in neg]) for k in PARTS}
        res["auc_content_only"] = res.get("auc_content_only", {})
        res["auc_content_only"][g] = auc([p["content_untrusted_share"] for p in pos], [q["content_untrusted_share"] for q in neg])
        curves[g] = roc([p["untrusted_share"] for p in pos], [q["untrusted_share"] for q in neg])
    res["seconds"] = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: res[k] for k in ("spearman_abs_error_vs_doubt", "spearman_by_abs_z", "spearman_by_family",
                                          "spearman_components", "auc", "auc_mean_doubt", "auc_content_only",
                                          "auc_components")}, indent=1, ensure_ascii=False))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 5))
    for g, (fpr, tpr) in curves.items():
        ax.plot(fpr, tpr, drawstyle="steps-post", lw=2 if g.startswith("all") else 1.2,
                label=f"{g}: AUC {res['auc'][g]:.2f}")
    ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
    ax.set_xlabel("in-domain fields flagged (false positive rate)")
    ax.set_ylabel("out-of-domain fields flagged (true positive rate)")
    ax.set_title(f"Trust map, per-image untrusted share ({card.name}, {args.passes} passes)\n"
                 f"pixel Spearman ρ(|error|, doubt) = {rho:.2f} at 1–5 µm", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out.with_name("trust_roc.png"), dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
