"""Make the kit that trains the brightfield model deepr-bf-he-20x on a lent GPU machine in one call.

    python scripts/make_bf_kit.py KIT [--real ../shared/data/real] [--wheels OLD_KIT/wh]

Writes (KIT should be an ignored folder, e.g. ``.gpu/bfkit``; ``echo /.gpu/ >> .git/info/exclude``):

* ``KIT/synthetic.json`` -- the ``synthetic`` block of ``models/deepr-bf-he-20x/train_config.json``
  (``real_images_dir`` is ``real``, relative to the kit);
* ``KIT/real/*.tif`` -- RGB TIFF *copies* (carry does not follow links) of the training part of each
  real in-focus image: columns 0-383 of ``skin_he_rgb_2d.tif`` and ``skimage_ihc_rgb_2d.tif``;
* ``KIT/heldout/*.tif`` -- their columns 384-511, for the model card's held-out table (never trained on);
* ``KIT/args.txt`` -- the trainer arguments of the config, for ``scripts/gpu_train.sh``;
* ``KIT/wh/`` -- copied from ``--wheels`` when given (cp312 wheels of scipy, tifffile, pytorch_msssim,
  pillow; see docs/gpu_check.md for the ``pip download`` line); the brightfield simulator needs no
  PSF bank.

Then one ``run`` call on the lent machine (carry the kit)::

    bash scripts/gpu_train.sh KIT $OUT $(cat KIT/args.txt)

and, back here, the export and the quality table (docs/BRIGHTFIELD.md, "Training the model").
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from napari_deepr.engine.contract import TRAIN_CONFIG_FILE

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "models" / "deepr-bf-he-20x" / TRAIN_CONFIG_FILE
IMAGES = ("skin_he_rgb_2d.tif", "skimage_ihc_rgb_2d.tif")
SPLIT_COLUMN = 384


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kit")
    ap.add_argument("--real", default=str(ROOT.parent / "shared" / "data" / "real"))
    ap.add_argument("--wheels", help="folder of cp312 wheels to copy into KIT/wh")
    args = ap.parse_args(argv)
    import tifffile

    kit = Path(args.kit)
    cfg = json.loads(CONFIG.read_text())
    (kit / "real").mkdir(parents=True, exist_ok=True)
    (kit / "heldout").mkdir(exist_ok=True)
    real = Path(args.real)
    if not real.is_dir():
        real = Path("/work/shared/data/real")
    for name in IMAGES:
        rgb = np.asarray(tifffile.imread(real / name))
        if rgb.ndim != 3 or rgb.shape[-1] != 3:
            raise SystemExit(f"{name} is not an (H, W, 3) RGB image.")
        tifffile.imwrite(kit / "real" / name, np.ascontiguousarray(rgb[:, :SPLIT_COLUMN]), photometric="rgb")
        tifffile.imwrite(kit / "heldout" / name, np.ascontiguousarray(rgb[:, SPLIT_COLUMN:]), photometric="rgb")
    spec = dict(cfg["synthetic"], real_images_dir="real")
    (kit / "synthetic.json").write_text(json.dumps({"name": cfg["name"], "description": cfg["description"],
                                                    "synthetic": spec}, indent=1))
    (kit / "args.txt").write_text(" ".join(cfg["trainer_args"]) + "\n")
    if args.wheels:
        shutil.copytree(args.wheels, kit / "wh", dirs_exist_ok=True)
    size = sum(p.stat().st_size for p in kit.rglob("*") if p.is_file())
    print(f"kit {kit}: {size / 2**20:.1f} MiB; train with: bash scripts/gpu_train.sh {kit} $OUT $(cat {kit}/args.txt)")
    if not (kit / "wh").is_dir():
        print("note: no KIT/wh wheels; the lent machine lacked scipy, tifffile and pytorch_msssim last time.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
