"""Trust map on real images: the share of untrusted pixels (trust < 0.5) on fields whose answer is known.

    python scripts/trust_real.py [--cache /tmp/deepr_trust_real] [--out docs/trust_real.json] [--png FILE]

Cases (real files, none used for tuning): the DSB 2018 nuclei image read at the WRONG pixel size
(0.325 µm, the model's, where the model invents fragments) -- uncalibrated, so the engine assumes it, and
told so by a user -- and at its right one (0.65 µm); in-focus
fields (SEPHACE DAPI, BBBC022, a CTC frame, cells3d plane 30) that should be ~all trusted; defocused
planes of confocal stacks (cells3d planes 10 and 0, beads plane 5).

For each case the engine is run once with 8 D4 passes (``trust_tune.capture_run``, which keeps the
planes at the model's sampling; cached in ``--cache``) and the untrusted share is reported for the
shipped map (the engine's, on the input grid) and, on the model grid, for the map before issue 16
(``v1``), the spread-and-range map of the retuning (``new``), that map with the residual's ceiling
(``hybrid``, :data:`~napari_deepr.engine.trust.RESIDUAL_WEIGHT`), the shipped one recomputed, and each
component alone, and the normalised-residual forms of ``trust_tune.py excess`` at the weights its rule chose
(read from ``--excess``, default docs/trust_tune_excess.json; none of them is shipped). The cache keeps the engine's map of the run that made it: clear it after changing
the map.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trust_tune import capture_run, excess_term, excess_trust, hybrid, v1_trust, variant  # noqa: E402

from napari_deepr.engine import trust as T  # noqa: E402
from napari_deepr.engine.model import load_model  # noqa: E402

REAL = Path("/work/shared/data/real")
HELD = Path.home() / ".cache/napari-deepr/heldout"
CASES = {
    "dsb_uncalibrated_(assumed_0.325,_wrong)": (HELD / "dsb2018_nuclei_2d.tif", None, None),
    "dsb_at_0.325_(wrong)": (HELD / "dsb2018_nuclei_2d.tif", 0.325, None),
    "dsb_at_0.65_(right)": (HELD / "dsb2018_nuclei_2d.tif", 0.65, None),
    "sephace_dapi2_infocus": (REAL / "sephace_dapi_set2_2d.tif", None, None),
    "bbbc022_infocus": (REAL / "bbbc022_IXMtest_A02_s9_w1_2d.tif", None, None),
    "ctc_frame": (HELD / "ctc_timelapse_frame0_2d.tif", None, None),
    "cells3d_focus_plane30": (REAL / "cells3d_nuclei_confocal_zstack.tif", None, 30),
    "cells3d_plane10_defocused": (REAL / "cells3d_nuclei_confocal_zstack.tif", None, 10),
    "cells3d_plane0_far": (REAL / "cells3d_nuclei_confocal_zstack.tif", None, 0),
    "beads_plane5_far": (REAL / "bian_beads_confocal_zstack.tif", None, 5),
}


def load_case(path, z):
    img = tifffile.imread(path).astype(np.float32)
    if z is not None:
        img = img[z]
    if img.ndim == 3:
        img = img[..., 0] if img.shape[-1] in (3, 4) else img[0]
    return img


def captured(name, model, cache: Path):
    """(input, output, engine trust on the input grid, plane dict at the model's sampling), cached."""
    f = cache / f"{name}.npz"
    path, px, z = CASES[name]
    img = load_case(path, z)
    if not f.exists():
        kw = {"pixel_size_um": px} if px else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out, trust, planes = capture_run(img, model, 8, **kw)
        pl = planes[0]
        np.savez(f, out=out, trust=trust, xz=pl["xz"], yz=pl["yz"], passes_z=pl["passes_z"],
                 dpm=pl["dpm"] if pl["dpm"] is not None else np.zeros(0), cap=pl["cap"])
    with np.load(f) as d:
        pl = {k: d[k] for k in d.files}
    pl["dpm"] = pl["dpm"] if pl["dpm"].size else None
    pl["spread"] = pl["passes_z"].std(axis=0, ddof=1)
    return img, pl.pop("out"), pl.pop("trust"), pl


def share(t):
    return round(float(np.mean(np.asarray(t) < T.TRUSTED)), 3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default="/tmp/deepr_trust_real")
    ap.add_argument("--out", default=None)
    ap.add_argument("--png", default=None)
    ap.add_argument("--excess", default="docs/trust_tune_excess.json", help="trust_tune.py excess output ('' to skip)")
    args = ap.parse_args()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    model = load_model("default")
    card = model.card
    from scipy.ndimage import gaussian_filter

    excess = {}
    if args.excess and Path(args.excess).exists():
        for form, f in json.loads(Path(args.excess).read_text())["forms"].items():
            if f["chosen_w"]:
                table = tuple(np.asarray(t) for t in f["table"]) if isinstance(f["table"], list) else f["table"]
                excess[f"excess: {form}, w {f['chosen_w']:g}"] = excess_trust(f["chosen_w"], excess_term(form, table))
    res, figs = {}, []
    for name in CASES:
        img, out, eng, pl = captured(name, model, cache)
        pl["beyond"] = T.beyond_range(pl["xz"], pl["dpm"], card)
        pl["residual"] = T.range_residual(pl["xz"], pl["yz"], card)
        # What the engine knew of the pixel size: the case's number, or nothing (a bare array: unknown).
        shipped, parts = T.trust_map(pl["xz"], pl["spread"], pl["dpm"], card, y=pl["yz"],
                                     scale_known=CASES[name][1] is not None)
        comp = {
            "v1 (before issue 16)": v1_trust(pl, card),
            "new (3.3 spread ⊕ beyond·signal)": variant()(pl, card),
            f"hybrid (new, doubt ≥ {T.RESIDUAL_WEIGHT:g}·residual)": hybrid(T.RESIDUAL_WEIGHT, T.RESIDUAL_SIGMA_PX)(pl, card),
            "shipped (engine, input grid)": eng,
            "shipped (model grid)": shipped,
            "v1 part: residual alone exp(-(r/0.35)^2)": np.exp(-(pl["residual"] / 0.35) ** 2),
            "v1 part: spread σ4 alone": np.exp(-(gaussian_filter(pl["spread"], 4.0) / 0.35) ** 2),
            "v1 part: 1 - beyond": 1 - pl["beyond"],
            "new part: 3.3 spread σ1": variant(beyond="none")(pl, card),
        }
        res[name] = {k: share(v) for k, v in comp.items()}
        res[name].update({k: share(m(pl, card)) for k, m in excess.items()})
        res[name]["median residual"] = round(float(np.median(pl["residual"])), 3)
        res[name]["shipped recipe"] = parts["recipe"]
        print(name, json.dumps(res[name], ensure_ascii=False), flush=True)
        figs.append((name, pl, comp))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1, ensure_ascii=False) + "\n")
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cols = ["input", "output"] + [k for k in figs[0][2] if k != "shipped (engine, input grid)"] + ["residual"]
        fig, axs = plt.subplots(len(figs), len(cols), figsize=(2 * len(cols), 2 * len(figs)))
        for i, (name, pl, comp) in enumerate(figs):
            for j, c in enumerate(cols):
                a = {"input": pl["xz"], "output": pl["yz"], "residual": pl["residual"]}.get(c, comp.get(c))
                kw = {"cmap": "gray"} if c in ("input", "output") else (
                    {"cmap": "magma", "vmin": 0, "vmax": 1} if c == "residual" else {"cmap": "RdYlGn", "vmin": 0, "vmax": 1})
                axs[i, j].imshow(a, **kw)
                axs[i, j].set_xticks([])
                axs[i, j].set_yticks([])
                if i == 0:
                    axs[i, j].set_title(c[:28], fontsize=6)
            axs[i, 0].set_ylabel(name, fontsize=6)
        fig.tight_layout()
        fig.savefig(args.png, dpi=80)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
