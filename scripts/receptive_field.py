#!/usr/bin/env python
"""How far does one input pixel reach in a model's output? Theoretical and effective receptive field.

The theoretical radius (:data:`napari_deepr.stacks.pairs.RECEPTIVE_FIELD_RADIUS_PX`, 223 px) is the
gradient support of the architecture (``tests/test_train.py`` checks it against the network): no
output pixel depends on an input pixel farther away. With trained weights most of that support
carries almost nothing. This script measures the *effective* reach of a model's generator on real
planes: it adds a one-pixel impulse (``--amplitude`` in units of the normalized input, i.e. standard
deviations of the plane) at the centre of a plane, runs the generator with and without it, and reports
(distances along the worse axis, as a band split separates regions) the radius that holds 99 % and
99.9 % of the total absolute change of the output, the largest distance at which the change is still
above 1e-3 of its peak, and beyond each radius the largest change relative to the peak.

Usage::

    python scripts/receptive_field.py models/deepr-fluo-20x STACK.tif --planes 22 33 46 --json out.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def impulse_reach(session, plane: np.ndarray, amplitude: float, size: int = 512) -> dict:
    """Radii of the output change caused by one impulse at the centre of ``plane`` (z-scored, padded)."""
    x = (plane - plane.mean()) / (plane.std() + 1e-6)
    py, px = max(0, size - x.shape[0]), max(0, size - x.shape[1])
    x = np.pad(x, ((py // 2, py - py // 2), (px // 2, px - px // 2)), mode="reflect")[:size, :size]
    x = x.astype(np.float32)[None, None]
    c = size // 2
    x2 = x.copy()
    x2[0, 0, c, c] += amplitude
    name = session.get_inputs()[0].name
    out = session.run(["output"], {name: np.concatenate([x, x2])})[0]
    d = np.abs(out[1, 0].astype(np.float64) - out[0, 0])
    yy, xx = np.indices(d.shape)
    # distance along the worse axis (Chebyshev): the support of a stack of square kernels is a square,
    # and a band split separates regions along one axis
    r = np.maximum(np.abs(yy - c), np.abs(xx - c)).ravel()
    dv = d.ravel()
    order = np.argsort(r, kind="stable")
    cum = np.cumsum(dv[order]) / dv.sum()
    rs = r[order]
    peak = dv.max()
    profile = {int(R): {"max_change_beyond_rel_peak": float(dv[r > R].max() / peak),
                        "share_of_total_change_beyond": float(dv[r > R].sum() / dv.sum())}
               for R in RADII}
    return {"r99_px": int(rs[np.searchsorted(cum, 0.99)]),
            "r999_px": int(rs[np.searchsorted(cum, 0.999)]),
            "r_above_1e-3_of_peak_px": int(r[dv > 1e-3 * peak].max()),
            "r_nonzero_px": int(r[dv > 0].max()),
            "centre_gain": float(d[c, c] / amplitude), "profile": profile}


RADII = (16, 32, 48, 64, 96, 128, 160, 192, 223)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="model folder with generator.onnx")
    p.add_argument("stack", help="z-stack TIFF whose planes are used as the background content")
    p.add_argument("--planes", type=int, nargs="+", required=True)
    p.add_argument("--amplitude", type=float, nargs="+", default=[0.5, 3.0])
    p.add_argument("--json")
    args = p.parse_args(argv)

    import onnxruntime as ort
    import tifffile

    from napari_deepr.stacks.pairs import RECEPTIVE_FIELD_RADIUS_PX

    sess = ort.InferenceSession(str(Path(args.model) / "generator.onnx"), providers=["CPUExecutionProvider"])
    stack = tifffile.imread(args.stack).astype(np.float32)
    rows = []
    for k in args.planes:
        for a in args.amplitude:
            row = {"plane": k, "amplitude": a, **impulse_reach(sess, stack[k], a)}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "profile"}))
    worst = {key: max(r[key] for r in rows) for key in ("r99_px", "r999_px", "r_above_1e-3_of_peak_px", "r_nonzero_px")}
    res = {"model": args.model, "stack": args.stack, "theoretical_radius_px": RECEPTIVE_FIELD_RADIUS_PX,
           "rows": rows, "worst": worst}
    print(f"theoretical radius {RECEPTIVE_FIELD_RADIUS_PX} px; effective (worst over planes and amplitudes): "
          f"99 % of the change within {worst['r99_px']:.0f} px, 99.9 % within {worst['r999_px']:.0f} px, "
          f"change > 1e-3 of its peak up to {worst['r_above_1e-3_of_peak_px']:.0f} px, any change up to "
          f"{worst['r_nonzero_px']:.0f} px (distances along the worse axis)")
    print("beyond R px: largest change relative to the peak / share of the total change (worst case)")
    for R in RADII:
        mx = max(r["profile"][R]["max_change_beyond_rel_peak"] for r in rows)
        sh = max(r["profile"][R]["share_of_total_change_beyond"] for r in rows)
        print(f"  R {R:>3}: {mx:.1e} / {sh:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
