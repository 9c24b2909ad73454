#!/usr/bin/env python
"""The full chain on real z-stacks: pairs -> train (a few minutes) -> export -> deepr refocus -> SSIM.

    python scripts/real_chain.py WORK_DIR [--minutes 3]

Fluorescence: trains on two real stacks and holds a third out; brightfield: trains on sephace set 1
and holds set 2 out. For every held-out plane within the range, reports SSIM (z-scored, 10 px crop)
of the input and of the refocused output against the stack's in-focus plane.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from napari_deepr import io
from napari_deepr.science.metrics import ssim

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
CHAINS = {
    "fluorescence": {
        "train": ["cells3d_nuclei_confocal_zstack.tif", "pycudadecon_lls_bead_psf.tif"],
        "held_out": ("bian_beads_confocal_zstack.tif", 24),
        "pairs_args": ["--range", "2", "--patch", "64"],
    },
    "brightfield": {
        "train": ["sephace_brightfield_set1_zstack.tif"],
        "held_out": ("sephace_brightfield_set2_zstack.tif", 3),
        "pairs_args": ["--range", "2", "--patch", "128", "--z-step", "1.0", "--infocus-index", "3"],
    },
}


def deepr(*args):
    cmd = [sys.executable, "-m", "napari_deepr.cli", *map(str, args)]
    print("$ deepr " + " ".join(map(str, args)), file=sys.stderr)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL if args[0] == "train" else None)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("work")
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    report = {}
    for name, chain in CHAINS.items():
        d = work / name
        d.mkdir(exist_ok=True)
        deepr("pairs", *[REAL / f for f in chain["train"]], "-o", d / "pairs", *chain["pairs_args"], "-q")
        deepr("train", d / "pairs", "-o", d / "model", "--minutes", args.minutes, "--dpm-minutes", 0.5, "--base", 8,
              "--patch", 64 if name == "fluorescence" else 128, "--no-gan", "--threads", args.threads, "--val-every", 20)
        held, focus = chain["held_out"]
        stack = io.read_stack(REAL / held)
        io.write_image(d / "held_out.tif", np.asarray(stack.data), axes="ZYX", pixel_size_um=stack.pixel_size_um,
                       z_step_um=stack.z_step_um)
        deepr("refocus", d / "held_out.tif", "-o", d / "held_out_refocused.tif", "--model", d / "model", "-q")
        out = np.asarray(io.read_image(d / "held_out_refocused.tif").data)
        data = np.asarray(stack.data)
        rows = []
        for k in range(data.shape[0]):
            if k == focus:
                continue
            rows.append({"plane": k, "dz_planes": k - focus, "ssim_input": ssim(data[k], data[focus]),
                         "ssim_output": ssim(out[k], data[focus])})
        near = [r for r in rows if abs(r["dz_planes"]) <= (16 if name == "fluorescence" else 3)]
        report[name] = {"held_out": held, "in_focus_plane": focus, "rows": rows,
                        "mean_ssim_input": float(np.mean([r["ssim_input"] for r in near])),
                        "mean_ssim_output": float(np.mean([r["ssim_output"] for r in near]))}
        print(json.dumps({k: v for k, v in report[name].items() if k != "rows"}), file=sys.stderr)
    (work / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "rows"} for k, v in report.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
