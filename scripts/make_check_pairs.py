"""Simulated validation pairs saved as one small npz, for checks on machines without psfmodels.

    python scripts/make_check_pairs.py pairs.npz --n 12
"""

from __future__ import annotations

import argparse

import numpy as np

from napari_deepr.optics.simulate import random_training_pair

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--n", type=int, default=12)
ap.add_argument("--seed", type=int, default=99)  # the seed quality_delta uses, so numbers compare
args = ap.parse_args()
rng = np.random.default_rng(args.seed)
xs, ys, zs = [], [], []
for _ in range(args.n):
    x, y, z = random_training_pair(rng, patch=512)
    xs.append(x.astype(np.float16))
    ys.append(y.astype(np.float16))
    zs.append(float(z))
np.savez_compressed(args.out, x=np.stack(xs), y=np.stack(ys), z=np.array(zs))
print(f"wrote {args.out}")
