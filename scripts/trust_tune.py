"""Tune the trust map on the TUNING set (families the model trained on), never on the held-out one.

Three steps::

    python scripts/trust_tune.py cache  [--seeds 7101 7102] [--size 256] [--cache DIR]
    python scripts/trust_tune.py report [--seeds 7101 7102] [--cache DIR] [--out docs/trust_tune.json]
    python scripts/trust_tune.py maps   [--cache DIR] [--out docs/trust_maps_tune.png] [--labels ...]
    python scripts/trust_tune.py hybrid [--seeds 7101 7102] [--cache DIR] [--out docs/trust_tune_hybrid.json]
    python scripts/trust_tune.py excess [--seeds 7101 7102] [--cache DIR] [--out docs/trust_tune_excess.json]
    python scripts/trust_tune.py separability [--cache DIR] [--real-cache DIR] [--out docs/trust_separability.json]

``cache`` runs the engine (``RefocusJob``, 8 D4 passes) on the fields of ``scripts/trust_eval.py`` built
from the families the bundled model trained on (``TUNE_FAMILIES``) with seeds unlike the evaluation's
(plus one set trust_eval lacks: pixels 2x the model's read as the model's), and keeps what the trust
map is made from: per plane the z-scored input, every pass's output, the DPM, the cap and, for
in-domain fields, the true in-focus plane (about 0.5 GB in /tmp for two seeds; ~10 min on 2 cores).
``report`` recomputes trust maps from that cache with the engine's own functions
(:mod:`napari_deepr.engine.trust`; the cache keeps the engine's map to check against) and with the
recipe before tuning and single-choice variants, and prints the per-pixel Spearman ρ(|error|, doubt)
pooled, per |defocus|, per family and per component, the per-image AUCs of the untrusted share
(protocol of ``trust_eval.py``) and the spread-to-error gain. ``maps`` draws a few fields' error beside
the doubt before and now. Whatever is chosen from this is then measured once on the held-out fields
by ``trust_eval.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trust_eval import (  # noqa: E402
    CROP,
    TUNE_FAMILIES,
    TUNE_SEEDS,
    auc,
    in_domain_fields,
    out_of_domain_fields,
    zscore,
)

from napari_deepr.engine import trust as T  # noqa: E402
from napari_deepr.engine.model import load_model  # noqa: E402
from napari_deepr.engine.refocus import RefocusJob  # noqa: E402
from napari_deepr.optics.psf import Optics  # noqa: E402
from napari_deepr.optics.simulate import defocus  # noqa: E402
from napari_deepr.optics.specimens import make_specimen  # noqa: E402

OOD_SETS = ("brightfield", "pixel 3x off", "defocus 2x range")


# -- cache -----------------------------------------------------------------------------------------
def capture_run(image, model, passes, **kw):
    """Run the engine with a trust map and keep the raw materials of every plane (an RGB image has three).

    Returns the output, the trust map and ``planes``: per plane, the z-scored input ``xz`` and output
    ``yz``, the passes' outputs in the same z-units ``passes_z`` (identity pass first), the DPM (or
    None), the cap and the trust map the engine made of it (``engine_trust``).
    """
    planes, cur = [], []
    # The engine z-scores each plane (each colour of an RGB image) with its own mean and std.
    src = np.moveaxis(image, -1, 0) if kw.get("axes") == "YXS" else np.asarray(image)[None]
    stats = [(float(np.mean(c, dtype=np.float64)), float(np.std(c, dtype=np.float64))) for c in src]
    orig = T.inverse, T.trust_map

    def inverse(a, k, flip):
        y = orig[0](a, k, flip)
        m, sd = stats[len(planes)]
        cur.append(((np.asarray(y, np.float64) - m) / sd).mean(axis=0))
        return y

    def trust_map(x, spread, dpm, card, cap=1.0, y=None, **kw):
        t, parts = orig[1](x, spread, dpm, card, cap=cap, y=y, **kw)
        pz = np.stack(cur).astype(np.float32)
        planes.append({"xz": np.array(x, np.float32), "yz": pz[0], "passes_z": pz,
                       "dpm": None if dpm is None else np.array(dpm, np.float32), "cap": float(cap), "engine_trust": t})
        cur.clear()
        return t, parts

    T.inverse, T.trust_map = inverse, trust_map
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            job = RefocusJob(image, model, trust=passes, **kw)
            out, trust = job.run()
    finally:
        T.inverse, T.trust_map = orig
    return out, trust, planes


def undeclared_coarse_fields(kinds, seeds, n, card):
    """A failure no declared verdict catches (like a real uncalibrated file read at the model's sampling):
    pixels 2x the model's, read as the model's, 0-2 um from focus. Not in the pooled AUC; reported on its own."""
    px = card.pixel_size_um
    coarse = Optics(na=card.na, wavelength_um=card.wavelength_um, pixel_size_um=2 * px, immersion_index=card.immersion_index or 1.0)
    for kind in kinds:
        for seed in seeds:
            obj = make_specimen(kind, (n, n), 2 * px, np.random.default_rng(seed + 13))
            for z in (0.0, 1.0, 2.0):
                x = defocus(obj, z, coarse, photons=800, rng=np.random.default_rng(seed + 17))
                yield ("pixel 2x coarse, undeclared", f"{kind} s{seed} z={z:+g} ({2 * px:.2f} µm read as {px:g})",
                       x.astype(np.float32), {"pixel_size_um": px})


def cache(args):
    model = load_model(args.model)
    card = model.card
    px = card.pixel_size_um
    optics = Optics(na=card.na, wavelength_um=card.wavelength_um, pixel_size_um=px, immersion_index=card.immersion_index or 1.0)
    d = Path(args.cache)
    d.mkdir(parents=True, exist_ok=True)
    fields = [("in-domain", f"{k} s{s} z={z:+g}", x, {"pixel_size_um": px}, {"truth": t, "kind": k, "z": z, "seed": s})
              for k, s, z, x, t in in_domain_fields(args.families, args.seeds, args.size, optics)]
    fields += [(g, lab, im, kw, {}) for g, lab, im, kw in out_of_domain_fields(args.families, args.seeds, args.size, card)]
    fields += [(g, lab, im, kw, {}) for g, lab, im, kw in undeclared_coarse_fields(args.families, args.seeds, args.size, card)]
    index = [{"file": f"{i:04d}.npz", "group": g, "label": lab, **{k: v for k, v in ex.items() if k != "truth"}}
             for i, (g, lab, _, _, ex) in enumerate(fields)]
    (d / "index.json").write_text(json.dumps({"model": card.name, "version": card.version, "size": args.size,
                                             "fields": index}, indent=1))
    for i, (group, label, image, kw, extra) in enumerate(fields):
        f = d / f"{i:04d}.npz"
        if f.exists():
            continue
        out, trust, planes = capture_run(image, model, args.passes, **kw)
        arrays = {"out": np.asarray(out, np.float32), "trust": np.asarray(trust, np.float32),
                  "truth": extra.get("truth", np.zeros(0)), "cap": planes[0]["cap"]}
        for j, pl in enumerate(planes):
            arrays.update({f"p{j}_{k}": (v if v is not None else np.zeros(0)) for k, v in pl.items()})
        np.savez(f, **arrays)
        print(f"{i + 1}/{len(fields)} {group:>16} {label}", flush=True)
    return 0


# -- trust maps from the cache -----------------------------------------------------------------------
def load(d: Path):
    meta = json.loads((d / "index.json").read_text())
    for rec in meta["fields"]:
        if not (d / rec["file"]).exists():
            continue
        with np.load(d / rec["file"]) as z:
            yield rec, {k: z[k] for k in z.files}


def planes_of(f):
    """The cached planes of a field: dicts of xz, yz, passes_z, dpm (None), engine_trust."""
    n = 1 + max(int(k.split("_")[0][1:]) for k in f if k.startswith("p") and "_" in k)
    out = []
    for j in range(n):
        pl = {k.split("_", 1)[1]: v for k, v in f.items() if k.startswith(f"p{j}_")}
        pl["dpm"] = pl["dpm"] if pl["dpm"].size else None
        out.append(pl)
    return out


def signals(fields, card):
    """Per field: (record, cap, output, truth or None, planes with the signals the maps are made from)."""
    out = []
    for rec, f in fields:
        planes = []
        for pl in planes_of(f):
            pz = pl["passes_z"]
            planes.append({"xz": pl["xz"], "yz": pl["yz"], "dpm": pl["dpm"],
                           "spread": pz.std(axis=0, ddof=1) if len(pz) > 1 else None,
                           "beyond": T.beyond_range(pl["xz"], pl["dpm"], card),
                           "residual": T.range_residual(pl["xz"], pl["yz"], card)})
        out.append((rec, float(f["cap"]), f["out"], f["truth"] if f["truth"].size else None, planes))
    return out


def _local_std(a, s=T.SIGMA_PX):
    return np.sqrt(np.maximum(gaussian_filter(a * a, s) - gaussian_filter(a, s) ** 2, 0.0))


def v1_trust(pl, card):
    """The map before this tuning (set on the v1 model): exp(−(spread_σ4² + residual²)/0.35²) · (1 − beyond)."""
    d2 = pl["residual"] ** 2 + gaussian_filter(pl["spread"], 4.0) ** 2
    return np.exp(-d2 / 0.35**2) * (1 - pl["beyond"])


def variant(gain=T.SPREAD_GAIN, sigma=T.SPREAD_SIGMA_PX, scale=T.DEFAULT_SCALE, residual_w=0.0, beyond="signal"):
    """The map's recipe with one choice changed (the rows of the variants table)."""
    def trust(pl, card):
        sp = gaussian_filter(pl["spread"], sigma) if sigma else pl["spread"]
        d2 = (gain * sp) ** 2 + (residual_w * pl["residual"]) ** 2
        if beyond == "signal":
            d2 = d2 + (pl["beyond"] * T.signal_above_background(pl["xz"])) ** 2
        elif beyond == "output contrast":
            d2 = d2 + (pl["beyond"] * _local_std(pl["yz"])) ** 2
        t = 1 / (1 + d2 / scale**2)
        return t * (1 - pl["beyond"]) if beyond == "factor" else t
    return trust


TRUST_METHODS = {
    "before: v1 recipe (spread σ4 ⊕ residual, Gaussian, scale 0.35, × (1 − beyond))": v1_trust,
    "now: trust.py (3.3·spread σ1 ⊕ beyond·signal, scale 0.25)":
        variant(),  # the retuned map (trust.RECIPE "spread" without the residual's ceiling)
    "variant: spread σ 0 px": variant(sigma=0.0),
    "variant: spread σ 2 px": variant(sigma=2.0),
    "variant: spread σ 4 px": variant(sigma=4.0),
    "variant: ⊕ 0.1·residual": variant(residual_w=0.1),
    "variant: ⊕ 0.3·residual": variant(residual_w=0.3),
    "variant: ⊕ 1.0·residual": variant(residual_w=1.0),
    "variant: × (1 − beyond) instead of beyond·signal": variant(beyond="factor"),
    "variant: beyond · output contrast instead of input signal": variant(beyond="output contrast"),
    "variant: no range test": variant(beyond="none"),
    "variant: scale 0.15": variant(scale=0.15),
    "variant: scale 0.35": variant(scale=0.35),
}

#: Single signals as doubt maps (ρ only), and references that use no model information.
COMPONENTS = {
    "spread (σ 1 px)": lambda pl: gaussian_filter(pl["spread"], T.SPREAD_SIGMA_PX),
    "residual": lambda pl: pl["residual"],
    "beyond": lambda pl: pl["beyond"],
    "beyond · signal above background": lambda pl: pl["beyond"] * T.signal_above_background(pl["xz"]),
    "reference: |output| (σ 2 px)": lambda pl: gaussian_filter(np.abs(pl["yz"]), 2.0),
    "reference: local std of the output (σ 4 px)": lambda pl: _local_std(pl["yz"]),
    "reference: |output − input| (σ 2 px)": lambda pl: gaussian_filter(np.abs(pl["yz"] - pl["xz"]), 2.0),
}


# -- the residual back, as a ceiling (issue 16, after the real DSB 2018 image read at the wrong scale) --------
#: Weights tried for the residual ceiling; the rule (fixed before any held-out or real image was looked at
#: with it): per form, the largest weight whose tuning-set ρ is at most 0.03 below the map without it.
HYBRID_WEIGHTS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0)
#: Forms (σ of the residual's extra smoothing, px): per pixel (0) or regional (16, the scale of a cell).
#: Between the two, the one whose chosen weight separates the tuning families' own undeclared-wrong-scale
#: fields ("pixel 2x coarse, undeclared") better (AUC), the per-pixel form on a tie within 0.01.
HYBRID_FORMS = {"per pixel": 0.0, "regional (σ 16 px)": 16.0}
HYBRID_RHO_DROP = 0.03


def hybrid(w, sigma=0.0):
    """doubt = max(doubt of the spread-and-range map, w · residual), i.e. trust ≤ 1/(1 + (w·residual/scale)²)."""
    def residual(pl):
        key = f"residual_s{sigma:g}"
        if key not in pl:
            pl[key] = gaussian_filter(pl["residual"], sigma) if sigma else pl["residual"]
        return pl[key]
    return excess_trust(w, residual)


def _weight_sweep(sig, card, base, form, weights, trust_at):
    """Score ``trust_at(w)`` for each weight; the chosen one is the largest whose rho stays within
    :data:`HYBRID_RHO_DROP` of the map without the term. Returns ``(rows, chosen_w)``."""
    rows, chosen = {}, 0.0
    for w in weights:
        rows[f"{w:g}"] = r = evaluate(sig, card, trust=trust_at(w))
        print(_line(f"{form}: w = {w:g}", r) + f" | 2x coarse undeclared {r['auc'].get('pixel 2x coarse, undeclared', float('nan')):.2f}",
              flush=True)
        if r["rho"] >= base["rho"] - HYBRID_RHO_DROP:
            chosen = w
    return rows, chosen


def hybrid_sweep(args):
    card = load_model(args.model).card
    sig = signals(load(Path(args.cache)), card)
    base = evaluate(sig, card, trust=hybrid(0.0))
    print(_line("w = 0 (the spread-and-range map)", base), flush=True)
    res = {"cache": args.cache, "rule": f"largest w with rho >= rho(w=0) - {HYBRID_RHO_DROP}", "base": base, "forms": {}}
    for form, sigma in HYBRID_FORMS.items():
        rows, chosen = _weight_sweep(sig, card, base, form, HYBRID_WEIGHTS, lambda w, sigma=sigma: hybrid(w, sigma))
        res["forms"][form] = {"sigma_px": sigma, "rows": rows, "chosen_w": chosen}
        print(f"{form}: chosen w = {chosen:g}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1, ensure_ascii=False) + "\n")
    return 0


# -- the residual normalised by what an in-range output leaves (issue 16, the idea left untried) -----------
#: |DPM| bins (µm, σ 4 px local mean of the identity pass's DPM) of the expected residual r0(|DPM|).
EXCESS_DPM_EDGES = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0)
#: Weights tried per form; the rule (written before any held-out or real image was measured with it): per form,
#: the largest weight whose tuning-set ρ is at most HYBRID_RHO_DROP below the spread map's; between forms, the
#: one whose chosen weight separates the tuning families' "pixel 2x coarse, undeclared" fields best (AUC), the
#: first listed on a tie within 0.01.
EXCESS_WEIGHTS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)


def _local_dpm(pl):
    return np.abs(gaussian_filter(pl["dpm"], T.SIGMA_PX)) if pl["dpm"] is not None else np.zeros_like(pl["xz"])


def _input_contrast(pl):
    return _local_std(pl["xz"]) + 0.05


def fit_expected_residual(sig, q):
    """Quantile ``q`` of the residual per |DPM| bin over the tuning set's in-domain pixels: r0(|DPM|)."""
    r, a = [], []
    for rec, _, _, _, planes in sig:
        if rec["group"] == "in-domain":
            r.append(_crop(planes[0]["residual"]))
            a.append(_crop(_local_dpm(planes[0])))
    r, a = np.concatenate(r), np.concatenate(a)
    edges = np.asarray(EXCESS_DPM_EDGES)
    centres = 0.5 * (edges[:-1] + edges[1:])
    vals = [float(np.quantile(r[(a >= lo) & (a < hi)], q)) if np.any((a >= lo) & (a < hi)) else np.nan
            for lo, hi in zip(edges[:-1], edges[1:])]
    ok = np.isfinite(vals)
    return centres[ok], np.asarray(vals)[ok]


def _fine(a):
    """Local RMS (σ 4 px) of a plane's fine band (< 2 px), + 0.02 z-units."""
    return np.sqrt(gaussian_filter((a - gaussian_filter(a, 2.0)) ** 2, T.SIGMA_PX)) + 0.02


#: Ratio forms: (numerator, denominator) of a per-pixel ratio whose in-domain quantile is the threshold; the
#: term is ``denominator · max(ratio − threshold, 0)`` (z-units: numerator in excess of threshold · denominator).
RATIO_FORMS = {
    "input-contrast q90": (lambda pl: pl["residual"], _input_contrast),
    "output-detail q90": (lambda pl: pl["residual"], lambda pl: _fine(pl["yz"])),
    "input/output fine q95": (lambda pl: _fine(pl["xz"]), lambda pl: _fine(pl["yz"])),
}


def fit_ratio_quantile(sig, q, form="input-contrast q90"):
    """Quantile ``q`` of a ratio form's ratio over the tuning set's in-domain pixels."""
    num, den = RATIO_FORMS[form]
    v = [_crop(num(pl) / den(pl)) for rec, _, _, _, planes in sig if rec["group"] == "in-domain" for pl in planes[:1]]
    return float(np.quantile(np.concatenate(v), q))


def excess_term(form, table):
    """The extra doubt term (before its weight) of a form: z-units, 0 where the residual is what in-range leaves."""
    def term(pl):
        key = f"excess_{form}"
        if key not in pl:
            r = pl["residual"]
            if form in ("dpm median", "dpm q90"):
                r0 = np.interp(_local_dpm(pl), *table)
                pl[key] = np.maximum(r - r0, 0.0)
            elif form == "dpm ratio":
                r0 = np.interp(_local_dpm(pl), *table)
                pl[key] = 0.25 * np.maximum(r / np.maximum(r0, 0.02) - 1.0, 0.0)  # 0.25: one trust scale per r0
            elif form in RATIO_FORMS:
                num, den = RATIO_FORMS[form]
                d = den(pl)
                pl[key] = d * np.maximum(num(pl) / d - table, 0.0)
        return pl[key]
    return term


def excess_trust(w, term):
    """doubt = max(doubt of the spread-and-range map, w · term(pl)) (the retuned map's doubt cached in ``pl``)."""
    def trust(pl, card):
        if "doubt_new" not in pl:
            pl["doubt_new"] = T.doubt_from(pl["spread"], pl["xz"], pl["beyond"])
        return T.trust_of(np.maximum(pl["doubt_new"], w * term(pl)), card)
    return trust


def excess_sweep(args):
    card = load_model(args.model).card
    sig = signals(load(Path(args.cache)), card)
    base = evaluate(sig, card, trust=hybrid(0.0))
    print(_line("w = 0 (the spread-and-range map)", base), flush=True)
    tables = {"dpm median": fit_expected_residual(sig, 0.5), "dpm q90": fit_expected_residual(sig, 0.9),
              "dpm ratio": fit_expected_residual(sig, 0.5), "input-contrast q90": fit_ratio_quantile(sig, 0.9),
              "output-detail q90": fit_ratio_quantile(sig, 0.9, "output-detail q90"),
              "input/output fine q95": fit_ratio_quantile(sig, 0.95, "input/output fine q95")}
    for k, t in tables.items():
        print(f"r0 table {k}: " + (" ".join(f"{c:g}:{v:.3f}" for c, v in zip(*t)) if isinstance(t, tuple) else f"{t:.3f}"))
    res = {"cache": args.cache, "rule": f"per form the largest w with rho >= rho(w=0) - {HYBRID_RHO_DROP}; between forms the best "
           "AUC on 'pixel 2x coarse, undeclared', the first listed on a tie within 0.01", "base": base, "forms": {}}
    best = None
    for form, table in tables.items():
        term = excess_term(form, table)
        rows, chosen = _weight_sweep(sig, card, base, form, EXCESS_WEIGHTS, lambda w, term=term: excess_trust(w, term))
        a = rows[f"{chosen:g}"]["auc"].get("pixel 2x coarse, undeclared", 0.0) if chosen else 0.0
        res["forms"][form] = {"table": [list(map(float, t)) for t in table] if isinstance(table, tuple) else table,
                              "rows": rows, "chosen_w": chosen, "chosen_auc_2x_coarse": a}
        print(f"{form}: chosen w = {chosen:g} (2x coarse AUC {a:.2f})", flush=True)
        if chosen and (best is None or a > best[2] + 0.01):
            best = (form, chosen, a)
    res["chosen"] = best
    print(f"chosen: {best}")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1, ensure_ascii=False) + "\n")
    return 0


#: Per-pixel features of the separability check: the residual and the normalisers tried (z-units or ratios).
SEPARABILITY_FEATURES = {
    "residual": lambda pl, r0: pl["residual"],
    "residual − r0(|DPM|) (median)": lambda pl, r0: pl["residual"] - np.interp(_local_dpm(pl), *r0),
    "residual ÷ r0(|DPM|) (median)": lambda pl, r0: pl["residual"] / np.maximum(np.interp(_local_dpm(pl), *r0), 0.02),
    "residual ÷ input local std": lambda pl, r0: pl["residual"] / _input_contrast(pl),
    "residual ÷ input fine band": lambda pl, r0: pl["residual"] / _fine(pl["xz"]),
    "residual ÷ output fine band": lambda pl, r0: pl["residual"] / _fine(pl["yz"]),
    "input fine band ÷ output fine band": lambda pl, r0: _fine(pl["xz"]) / _fine(pl["yz"]),
}
#: Real cases of the check (scripts/trust_real.py's cache): the wrong-pixel-size failure and in-focus fields.
SEPARABILITY_REAL = ("dsb_at_0.325_(wrong)", "sephace_dapi2_infocus", "bbbc022_infocus", "ctc_frame",
                     "cells3d_plane10_defocused")


def separability(args):
    """Can a normalised residual separate the real wrong-pixel-size failure at all? (a check, chooses nothing)

    Per feature, the share of each real image's pixels above the in-domain tuning pixels' 90th / 95th percentile
    (all of 1–5 µm, and only those whose local |DPM| is 2.5–3.75 µm, around the DSB image's median 3.1 µm).
    """
    card = load_model(args.model).card
    sig = signals(load(Path(args.cache)), card)
    r0 = fit_expected_residual(sig, 0.5)
    ind, dpm = {k: [] for k in SEPARABILITY_FEATURES}, []
    for rec, _, _, _, planes in sig:
        if rec["group"] == "in-domain":
            dpm.append(_crop(_local_dpm(planes[0])))
            for k, f in SEPARABILITY_FEATURES.items():
                ind[k].append(_crop(f(planes[0], r0)))
    dpm = np.concatenate(dpm)
    band = (dpm >= 2.5) & (dpm < 3.75)
    real = {}
    for name in SEPARABILITY_REAL:
        with np.load(Path(args.real_cache) / f"{name}.npz") as z:
            pl = {"xz": z["xz"], "yz": z["yz"], "dpm": z["dpm"] if z["dpm"].size else None}
        pl["residual"] = T.range_residual(pl["xz"], pl["yz"], card)
        real[name] = {"median |DPM|": float(np.median(_local_dpm(pl))),
                      **{k: f(pl, r0) for k, f in SEPARABILITY_FEATURES.items()}}
    res = {"cache": args.cache, "real_cache": args.real_cache, "real": list(real), "features": {}}
    print("share of each real image's pixels above the in-domain quantile: " + ", ".join(real))
    for k in SEPARABILITY_FEATURES:
        v = np.concatenate(ind[k])
        row = {}
        for q in (0.9, 0.95):
            for lab, pool in (("all", v), ("|DPM| 2.5-3.75", v[band])):
                thr = float(np.quantile(pool, q))
                row[f"q{round(100 * q)} {lab}"] = {n: round(float(np.mean(real[n][k] > thr)), 3) for n in real}
        res["features"][k] = row
        print(f"{k[:36]:36s} " + " || ".join(f"{c}: " + " ".join(f"{x:.2f}" for x in d.values()) for c, d in row.items()))
    res["median_abs_dpm"] = {n: round(real[n]["median |DPM|"], 2) for n in real}
    print("median |DPM|: " + json.dumps(res["median_abs_dpm"]))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1, ensure_ascii=False) + "\n")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=("cache", "report", "maps", "hybrid", "excess", "separability"))
    ap.add_argument("--model", default="default")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--passes", type=int, default=8)
    ap.add_argument("--families", nargs="+", default=list(TUNE_FAMILIES))
    ap.add_argument("--seeds", type=int, nargs="+", default=list(TUNE_SEEDS))
    ap.add_argument("--cache", default=None, help="default: /tmp/deepr_trust_tune/SEEDS_SIZE")
    ap.add_argument("--out", default=None, help="report: a JSON; maps: a PNG")
    ap.add_argument("--real-cache", default="/tmp/deepr_trust_real_v1", help="separability: scripts/trust_real.py's cache")
    ap.add_argument("--labels", nargs="+", default=["tissue s7101 z=+4", "beads s7101 z=+3", "filaments s7102 z=-4",
                                                    "cytoplasm s7101 z=+2", "texture s7102 z=-5"], help="maps: fields")
    args = ap.parse_args()
    if args.cache is None:
        args.cache = f"/tmp/deepr_trust_tune/{'-'.join(map(str, args.seeds))}_{args.size}"
    return {"cache": cache, "report": report, "maps": maps, "hybrid": hybrid_sweep, "excess": excess_sweep, "separability": separability}[args.step](args)


def _crop(a):
    c = slice(CROP, -CROP)
    return np.asarray(a)[c, c][::2, ::2].ravel()


def untrusted(trust):
    return float(np.mean(trust[CROP:-CROP, CROP:-CROP] < T.TRUSTED))


def _rho(errs, doubts, keys, pick):
    sel = [i for i, k in enumerate(keys) if pick(k)]
    return float(spearmanr(np.concatenate([errs[i] for i in sel]), np.concatenate([doubts[i] for i in sel])).statistic)


def evaluate(sig, card, trust=None, doubt=None):
    """ρ(|error|, doubt) pooled, per |z| and per family; with ``trust`` also the AUCs of the untrusted share
    (``auc`` with the engine's cap for images it knows are out of domain, ``auc_content`` without)."""
    errs, doubts, keys, images = [], [], [], []
    for rec, cap, out, truth, planes in sig:
        if trust is not None:
            t0 = np.mean([trust(pl, card) for pl in planes], axis=0)
            t = np.minimum(t0, cap)
            images.append((rec["group"], untrusted(t), untrusted(t0)))
            d = 1 - t
        elif rec["group"] == "in-domain":
            d = np.mean([doubt(pl) for pl in planes], axis=0)
        if rec["group"] == "in-domain":
            errs.append(_crop(np.abs(zscore(out) - truth)))
            doubts.append(_crop(d))
            keys.append((rec["kind"], abs(rec["z"])))
    res = {"rho": _rho(errs, doubts, keys, lambda k: True),
           "rho_by_abs_z": {f"{z:g}": _rho(errs, doubts, keys, lambda k, z=z: k[1] == z) for z in sorted({k[1] for k in keys})},
           "rho_by_family": {f: _rho(errs, doubts, keys, lambda k, f=f: k[0] == f) for f in sorted({k[0] for k in keys})}}
    if images:
        for key, col in (("auc", 1), ("auc_content", 2)):
            neg = [im[col] for im in images if im[0] == "in-domain"]
            res[key] = {g: auc([im[col] for im in images if (im[0] in OOD_SETS if g == "all" else im[0] == g)], neg)
                        for g in sorted({im[0] for im in images} - {"in-domain"}) + ["all"]}
        res["in_domain_untrusted_share"] = float(np.mean([im[1] for im in images if im[0] == "in-domain"]))
    return res


def spread_gain(sig):
    """Median |error| ÷ spread (σ 1 px) per decile of the spread, over the in-domain pixels (SPREAD_GAIN)."""
    e, s = [], []
    for rec, _, out, truth, planes in sig:
        if rec["group"] == "in-domain":
            e.append(_crop(np.abs(zscore(out) - truth)))
            s.append(_crop(gaussian_filter(planes[0]["spread"], T.SPREAD_SIGMA_PX)))
    e, s = np.concatenate(e), np.concatenate(s)
    edges = np.percentile(s, np.linspace(0, 100, 11))
    rows = []
    for a, b in zip(edges[:-1], edges[1:]):
        m = (s >= a) & (s <= b)
        rows.append({"spread": [float(a), float(b)], "median_abs_error": float(np.median(e[m])),
                     "median_ratio": float(np.median(e[m] / s[m]))})
    return {"overall_median_ratio": float(np.median(e / s)), "deciles": rows}


def _line(name, r):
    txt = (f"{r['rho']:.3f} | " + " ".join(f"{v:.2f}" for v in r["rho_by_abs_z"].values()) + " | "
           + " ".join(f"{v:.2f}" for v in r["rho_by_family"].values()))
    if "auc" in r:
        a, c = r["auc"], r["auc_content"]
        txt += (f" | {a['defocus 2x range']:.2f} {a['all']:.2f} | {c['brightfield']:.2f} {c['pixel 3x off']:.2f}"
                f" {c['all']:.2f} | {r['in_domain_untrusted_share']:.2f}")
    return f"{name[:62]:62s} {txt}"


def report(args):
    card = load_model(args.model).card
    sig = signals(load(Path(args.cache)), card)
    fams = sorted({rec["kind"] for rec, *_ in sig if rec["group"] == "in-domain"})
    print(f"{len(sig)} fields from {args.cache}; in-domain families {', '.join(fams)}")
    print(f"{'':62s} rho   | by |z| 1..5 | by family | AUC 2x, all | content-only AUC bf, px, all | in-domain untrusted")
    res = {"cache": args.cache, "seeds": args.seeds, "size": args.size, "model": f"{card.name} {card.version}",
           "trust": {}, "components": {}}
    for name, m in TRUST_METHODS.items():
        res["trust"][name] = r = evaluate(sig, card, trust=m)
        print(_line(name, r), flush=True)
    for name, m in COMPONENTS.items():
        res["components"][name] = r = evaluate(sig, card, doubt=m)
        print(_line("component: " + name, r), flush=True)
    res["spread_gain"] = g = spread_gain(sig)
    print("median |error| / spread: " + f"{g['overall_median_ratio']:.2f} overall; by decile "
          + " ".join(f"{row['median_ratio']:.1f}" for row in g["deciles"]))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1, ensure_ascii=False) + "\n")
    return 0


def maps(args):
    """A figure of a few tuning fields: input, output, |error| and the doubt (1 − trust) before and now."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    card = load_model(args.model).card
    fields = [(rec, f) for rec, f in load(Path(args.cache)) if rec["label"] in args.labels and rec["group"] == "in-domain"]
    sig = signals(fields, card)
    fig, axes = plt.subplots(len(sig), 5, figsize=(12, 2.5 * len(sig)), squeeze=False)
    for ax, (rec, _cap, out, truth, planes) in zip(axes, sig):
        pl = planes[0]
        err = np.abs(zscore(out) - truth)
        before, now = 1 - v1_trust(pl, card), 1 - TRUST_METHODS[next(k for k in TRUST_METHODS if k.startswith("now"))](pl, card)
        panels = [("input", pl["xz"], "gray"), ("output", pl["yz"], "gray"), ("|error| vs true focus", err, "magma"),
                  (f"doubt before (ρ {spearmanr(_crop(err), _crop(before)).statistic:.2f})", before, "magma"),
                  (f"doubt now (ρ {spearmanr(_crop(err), _crop(now)).statistic:.2f})", now, "magma")]
        for a, (title, im, cmap) in zip(ax, panels):
            lo, hi = (np.percentile(im, [1, 99.5]) if cmap == "gray" else (0, max(np.percentile(im, 99.5), 1e-6)))
            a.imshow(im, cmap=cmap, vmin=lo, vmax=hi)
            a.set_title(title if title != "input" else f"input: {rec['label']}", fontsize=8)
            a.set_xticks([])
            a.set_yticks([])
    fig.tight_layout()
    out = args.out or "docs/trust_maps_tune.png"
    fig.savefig(out, dpi=60)
    from PIL import Image

    Image.open(out).convert("RGB").quantize(128).save(out, optimize=True)  # a figure for the docs, kept small
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
