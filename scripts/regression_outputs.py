"""Run `deepr refocus` on fixed real images and options and print a SHA-256 of every output.

Used to show that a refactor leaves the command's outputs byte-identical::

    python scripts/regression_outputs.py /tmp/before > before.json   # on the old commit
    python scripts/regression_outputs.py /tmp/after > after.json     # on the new one
    diff before.json after.json

Images come from ../shared/data/real (see its SOURCES.md); nothing is written into the repository.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"

# name: (input, output suffix, extra options)
CASES = {
    "2d_tif_dpm_trust": ("sephace_dapi_set2_2d.tif", ".tif", ["--dpm", "{out}.dpm.tif", "--trust", "{out}.trust.tif"]),
    "2d_tiled_256": ("bian_bpae_nuclei_2d.tif", ".tif", ["--tile", "256", "--overlap", "32", "--pixel-size", "0.325"]),
    "2d_resample_0.65": ("bbbc022_IXMtest_A02_s9_w1_2d.tif", ".tif", ["--pixel-size", "0.65", "--dpm", "{out}.dpm.tif"]),
    "stack_zarr_dpm": ("cells3d_nuclei_confocal_zstack.tif", ".zarr", ["--dpm", "{out}.dpm.zarr"]),
    "stack_ome_tif": ("bian_beads_confocal_zstack.tif", ".ome.tif", ["--pixel-size", "0.325"]),
    "out_of_core": ("sephace_dapi_set1_2d.tif", ".zarr", ["--out-of-core", "--tile", "256"]),
    "rgb_forced": ("skimage_ihc_rgb_2d.tif", ".tif", ["--force-modality", "--pixel-size", "0.325", "--dpm", "{out}.dpm.tif"]),
    "batch1_threads1": ("sephace_dapi_set1_2d.tif", ".tif", ["--batch", "1", "--threads", "1", "--tile", "128"]),
}


# OME-TIFF writers give every file a fresh random UUID; it is the only byte that differs between runs.
_UUID = re.compile(rb'UUID="urn:uuid:[0-9a-f-]+"')


def digest(path: Path) -> str:
    """SHA-256 of a file, or of every file under a folder (relative names included), OME UUIDs masked."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        data = f.read_bytes()
        if f.suffix in (".tif", ".tiff"):
            # Mask the UUID in place with a same-length run so offsets inside the TIFF stay valid.
            data = _UUID.sub(lambda m: b"U" * len(m.group(0)), data)
        h.update(data)
    return h.hexdigest()


def main(workdir: str) -> None:
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    deepr = str(Path(sys.executable).with_name("deepr"))
    result = {}
    for name, (image, suffix, extra) in CASES.items():
        out = work / f"{name}{suffix}"
        args = [a.format(out=work / name) for a in extra]
        cmd = [deepr, "refocus", str(REAL / image), "-o", str(out), "-q", "--overwrite", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        written = sorted(p for p in work.iterdir() if p.name.startswith(name))
        result[name] = {
            "exit": proc.returncode,
            "stderr_last": proc.stderr.strip().splitlines()[-1:] if proc.returncode else [],
            "outputs": {p.name: digest(p) for p in written},
        }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/deepr_regression")
