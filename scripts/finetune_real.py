"""Real-data check of issue 18: fine-tune on one region of a real z-stack, refocus another region.

Protocol (docs/FINETUNE.md has the commands and the numbers):

1. The stack is split by rows: ``--train-rows`` build the pairs (``deepr pairs``; the trainer's own
   validation is a held-out band of that region), ``--test-rows`` are never seen in training and
   are separated from them by a gap.
2. ``deepr train PAIRS -o CHILD --minutes 8 --init-from deepr-fluo-20x`` (run separately).
3. This script: the test region's in-focus plane is chosen as in ``deepr pairs`` (highest SSIM to
   the wavelet EDOF image, after registration); every plane within ``±range`` is refocused with
   the parent and with the fine-tuned model through the engine (``napari_deepr.refocus``, which
   resamples to each model's pixel size), and SSIM of input, parent output and fine-tuned output
   against the in-focus plane is reported per plane (``science.metrics.ssim``: z-scored images,
   Gaussian 11-px window, ``--crop`` px edge crop).

Usage::

    python scripts/finetune_real.py STACK --test-rows 96 128 --parent deepr-fluo-20x --child CHILD \
        --pixel-size 0.26 --z-step 0.29 --range 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import warnings

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stack")
    p.add_argument("--test-rows", type=int, nargs=2, required=True)
    p.add_argument("--parent", default="deepr-fluo-20x")
    p.add_argument("--child", required=True)
    p.add_argument("--pixel-size", type=float, required=True)
    p.add_argument("--z-step", type=float, required=True)
    p.add_argument("--range", type=float, default=5.0)
    p.add_argument("--crop", type=int, default=4)
    p.add_argument("--no-register", action="store_true",
                   help="use the planes as recorded (a confocal stack on a fixed stage needs no registration, and "
                        "registering small noisy crops of nuclei drifts by several pixels)")
    p.add_argument("--json")
    args = p.parse_args(argv)

    import tifffile

    from napari_deepr import refocus
    from napari_deepr.science.metrics import ssim
    from napari_deepr.stacks.infocus import select_in_focus
    from napari_deepr.stacks.register import register_stack

    stack = tifffile.imread(args.stack).astype(np.float32)[:, args.test_rows[0]:args.test_rows[1], :]
    if not args.no_register:
        stack, _ = register_stack(stack)
    k0 = int(select_in_focus(stack, method="ssim_edof"))
    half = int(np.floor(args.range / args.z_step + 1e-6))
    planes = list(range(max(0, k0 - half), min(len(stack), k0 + half + 1)))
    ref = stack[k0]
    rows = []
    outs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, model in (("parent", args.parent), ("child", args.child)):
            outs[name] = np.asarray(refocus(stack[planes], model, axes="ZYX", pixel_size_um=args.pixel_size,
                                            force_modality=True))
    for i, k in enumerate(planes):
        rows.append({"plane": k, "z_um": round((k - k0) * args.z_step, 3),
                     "ssim_input": ssim(stack[k], ref, crop=args.crop),
                     "ssim_parent": ssim(outs["parent"][i], ref, crop=args.crop),
                     "ssim_child": ssim(outs["child"][i], ref, crop=args.crop)})
    off = [r for r in rows if r["z_um"] != 0]
    far = [r for r in rows if abs(r["z_um"]) >= 2.0]
    summary = {k: {"all_defocused": float(np.mean([r[k] for r in off])),
                   "abs_z_ge_2um": float(np.mean([r[k] for r in far]))}
               for k in ("ssim_input", "ssim_parent", "ssim_child")}
    result = {"stack": args.stack, "test_rows": args.test_rows, "registered": not args.no_register, "infocus_plane": k0, "crop": args.crop,
              "parent": args.parent, "child": args.child, "rows": rows, "summary": summary}
    print(f"in-focus plane {k0}; test rows {args.test_rows}; SSIM vs in-focus (crop {args.crop} px)")
    print(f"{'z um':>7} {'input':>7} {'parent':>7} {'tuned':>7}")
    for r in rows:
        print(f"{r['z_um']:>7.2f} {r['ssim_input']:>7.3f} {r['ssim_parent']:>7.3f} {r['ssim_child']:>7.3f}")
    for k, v in summary.items():
        print(f"mean {k}: defocused planes {v['all_defocused']:.3f}, |z| >= 2 um {v['abs_z_ge_2um']:.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
