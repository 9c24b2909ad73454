#!/usr/bin/env python
"""Real images as recorded through one or more models, beside the input (and the in-focus plane of a
real confocal stack): the look at real data behind the model card's v1/v2 section.

    python scripts/fetch_heldout.py
    python scripts/real_images_figure.py v1=/path/to/v1 v2=models/deepr-fluo-20x   # -> docs/real_images_v1_v2.png
    python scripts/real_images_figure.py v2=/path/to/v2 v2.1=models/deepr-fluo-20x --out docs/real_images_v2_v21.png
"""
import sys
import warnings
from pathlib import Path

import matplotlib
import numpy as np
import tifffile

import napari_deepr
from napari_deepr.science.metrics import ssim

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the Agg backend

warnings.simplefilter("ignore")
H = Path.home() / ".cache/napari-deepr/heldout"
R = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
stack = tifffile.imread(R/"cells3d_nuclei_confocal_zstack.tif").astype(np.float32)
rows = [("DSB 2018 nuclei (held out), as recorded", tifffile.imread(H/"dsb2018_nuclei_2d.tif"), None),
        ("BBBC022 (held out), as recorded", tifffile.imread(R/"bbbc022_IXMtest_A02_s9_w1_2d.tif"), None),
        ("CTC frame (held out), as recorded", tifffile.imread(H/"ctc_timelapse_frame0_2d.tif"), None),
        ("cells3d confocal, plane 29+10 (2.9 µm)", stack[39], stack[29]),
        ("cells3d confocal, plane 29-10 (-2.9 µm)", stack[19], stack[29])]
args = sys.argv[1:]
out_png = Path(__file__).resolve().parents[1] / "docs" / "real_images_v1_v2.png"
if "--out" in args:
    i = args.index("--out")
    out_png = Path(args[i + 1])
    del args[i:i + 2]
models = [tuple(a.split("=", 1)) for a in args] or [("v2", "deepr-fluo-20x")]
ncol = len(models) + 2
fig, ax = plt.subplots(len(rows), ncol, figsize=(16, 4 * len(rows)))
for i, (title, a, ref) in enumerate(rows):
    a = a.astype(np.float32)
    c = (slice(0, 256), slice(0, 256)) if a.shape[0] > 256 else (slice(None), slice(None))
    lo, hi = np.percentile(a[c], [0.5, 99.8])
    ax[i, 0].imshow(a[c], cmap="gray", vmin=lo, vmax=hi)
    ax[i, 0].set_title("input: " + title, fontsize=9)
    for j, (mn, mp) in enumerate(models):
        out, dpm = napari_deepr.refocus(a, mp, dpm=True, pixel_size_um=0.325)
        extra = (f"SSIM to in-focus plane {ssim(out, ref):.3f} (input {ssim(a, ref):.3f})" if ref is not None
                 else f"SSIM(out, in) {ssim(out, a):.3f}")
        ax[i, j + 1].imshow(out[c], cmap="gray", vmin=lo, vmax=hi)
        ax[i, j + 1].set_title(f"{mn} output; DPM mean {float(dpm.mean()):.2f} µm\n{extra}", fontsize=9)
    if ref is not None:
        ax[i, ncol - 1].imshow(ref[c], cmap="gray", vmin=np.percentile(ref, 0.5), vmax=np.percentile(ref, 99.8))
        ax[i, ncol - 1].set_title("in-focus plane 29", fontsize=9)
    else:
        ax[i, ncol - 1].axis("off")
for a_ in ax.flat:
    a_.set_xticks([])
    a_.set_yticks([])
plt.tight_layout()
plt.savefig(out_png, dpi=55)
print(out_png)
