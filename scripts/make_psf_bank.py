"""Write the PSF bank a synthetic training config needs, for machines without psfmodels.

``random_training_pair`` draws the emission wavelength in 10 nm steps and the defocus in
``z_quantum_um`` steps, so a finite set of planes covers a whole training run. Usage::

    python scripts/make_psf_bank.py CONFIG.json BANK.npz
    DEEPR_PSF_BANK=BANK.npz python -m napari_deepr.train CONFIG.json -o MODEL ...
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from napari_deepr.optics.psf import OPTICS_20X_075, write_psf_bank
from napari_deepr.train.synthetic import _optics_from_spec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", help='training JSON {"synthetic": {...}}')
    p.add_argument("out", help="bank .npz to write")
    a = p.parse_args()
    with open(a.config) as f:
        spec = json.load(f)["synthetic"]
    base = _optics_from_spec(spec.get("optics")) or OPTICS_20X_075
    lo, hi = spec.get("wavelength_range_um", (0.45, 0.65))
    # same rounding as random_training_pair: round(uniform(lo, hi), 2)
    wls = sorted({round(w, 2) for w in np.arange(round(lo, 2), round(hi, 2) + 1e-9, 0.01)})
    zlo, hi_z = spec.get("z_range_um", (-5.0, 5.0))
    q = float(spec.get("z_quantum_um", 0.1))
    zs = sorted({round(round(z / q) * q, 6) for z in np.arange(zlo, hi_z + q / 2, q)} | {0.0})
    t0 = time.perf_counter()
    n = write_psf_bank(a.out, [base.replace(wavelength_um=w) for w in wls], zs)
    print(f"{n} planes ({len(wls)} wavelengths x {len(zs)} z) -> {a.out} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
