#!/usr/bin/env python
"""Two models' quality.json (from scripts/evaluate_model.py, same protocol) side by side, as Markdown.

    python scripts/compare_quality.py OLD/quality.json NEW/quality.json --names v1 v2 > table.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROWS = [
    # (label, summary key or callable, format, better: "high" / "low" / None)
    ("Do no harm: worst output − input SSIM at \\|z\\| ≤ 1 µm (≥ −0.01)", "do_no_harm_worst_delta", "{:+.3f}", "high"),
    ("DPM mean on in-focus fields, mean over fields (µm)", "dpm_mean_in_focus", "{:.2f}", "low"),
    ("DPM mean on in-focus fields, worst field (≤ 0.6 µm)", "dpm_mean_in_focus_worst", "{:.2f}", "low"),
    ("Mean output SSIM, 2 ≤ \\|z\\| ≤ 5 µm (≥ 0.85)", "mean_ssim_output_2to5", "{:.3f}", "high"),
    ("SSIM gain over the input, \\|z\\| ≥ 3 µm", "gain_ssim_ge3", "{:+.3f}", "high"),
    ("Above RL-100 and Landweber-100 at every 2 ≤ \\|z\\| ≤ 5 µm", "beats_rl_and_landweber_every_z_2to5", "{}", None),
    ("Above both on each real field (2–5 µm)", lambda s: ", ".join(
        f"{k.split('_')[0]} {'yes' if v else 'no'}" for k, v in s.get("beats_rl_and_landweber_per_real_field_2to5", {}).items()),
     "{}", None),
    ("Worst bead FWHM / in-focus, \\|z\\| ≤ 4 µm (≤ 1.3)", "fwhm_output_worst_ratio_le4", "{:.2f}", "low"),
    ("DPM MAE within ±5 µm, mean over z (≤ 0.4 µm)", "dpm_mae_within_range", "{:.2f}", "low"),
    ("DPM MAE, worst z (µm)", "dpm_mae_worst_within_range", "{:.2f}", "low"),
    ("1.5° tilt (held-out cells), fitted (°)", "tilt_fitted_deg", "{:.2f}", None),
    ("1.5° tilt, worst error over six specimen types (≤ 0.2°)", "tilt_worst_error_deg_by_specimen", "{:.2f}", "low"),
    ("1.5° tilt, mean error over six specimen types (°)", "tilt_mean_error_deg_by_specimen", "{:.2f}", "low"),
    ("1.5° tilt centred on focus, mean error (°)", "tilt_through_focus_mean_error_deg_by_specimen", "{:.2f}", "low"),
    ("Pixels flagged out of range at ±6 µm (DPM alone)", "oor_fraction_beyond_range", "{:.0%}", "high"),
    ("Reserve family (mitochondria): output SSIM 2–5 µm", "reserve_ssim_output_2to5", "{:.3f}", "high"),
]


def value(summary: dict, key):
    return key(summary) if callable(key) else summary.get(key)


def table(old: dict, new: dict, names=("old", "new")) -> str:
    """Markdown rows for the headline numbers of two evaluations (same protocol)."""
    so, sn = old["summary"], new["summary"]
    lines = [f"| measure | {names[0]} | {names[1]} | |", "|---|---|---|---|"]
    for label, key, fmt, better in ROWS:
        a, b = value(so, key), value(sn, key)
        if a is None and b is None:
            continue
        verdict = ""
        if (better and isinstance(a, (int, float)) and isinstance(b, (int, float)) and np.isfinite(a)
                and np.isfinite(b) and abs(a - b) > 1e-9):
            verdict = f"{names[1]} {'better' if (b > a) == (better == 'high') else 'worse'}"
        fa = fmt.format(a) if a is not None else "–"
        fb = fmt.format(b) if b is not None else "–"
        lines.append(f"| {label} | {fa} | {fb} | {verdict} |")
    return "\n".join(lines)


def per_field(old: dict, new: dict, names=("old", "new"), lo: float = 2.0, hi: float = 5.0) -> str:
    """Per held-out field: mean output SSIM over lo ≤ |z| ≤ hi and the worst do-no-harm delta, both models."""
    def stats(res):
        rows = [r for r in res["per_z"] if lo <= abs(r["z_um"]) <= hi]
        near = [r for r in res["per_z"] if abs(r["z_um"]) <= 1]
        out = {}
        for n in rows[0]["fields"]:
            out[n] = (float(np.mean([r["fields"][n]["ssim_output"] for r in rows])),
                      float(min(r["fields"][n]["ssim_output"] - r["fields"][n]["ssim_input"] for r in near)),
                      float(np.mean([r["fields"][n]["ssim_input"] for r in rows])))
        return out

    a, b = stats(old), stats(new)
    lines = [(f"| field | SSIM in (2–5 µm) | {names[0]} out | {names[1]} out | {names[0]} worst Δ at \\|z\\| ≤ 1 | "
              f"{names[1]} worst Δ at \\|z\\| ≤ 1 |"), "|---|---|---|---|---|---|"]
    for n in b:
        if n in a:
            lines.append(f"| {n} | {b[n][2]:.3f} | {a[n][0]:.3f} | {b[n][0]:.3f} | {a[n][1]:+.3f} | {b[n][1]:+.3f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--names", nargs=2, default=("old", "new"))
    a = p.parse_args()
    old, new = (json.loads(Path(f).read_text()) for f in (a.old, a.new))
    print(table(old, new, a.names))
    print()
    print(per_field(old, new, a.names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
