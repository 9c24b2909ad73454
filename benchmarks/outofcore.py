#!/usr/bin/env python
"""Whole-slide refocus disk to disk: peak resident memory and agreement with an in-memory run.

    python benchmarks/outofcore.py WORK_DIR [--size 16384] [--model default]

1. Writes a SIZE² uint16 tiled BigTIFF of a physically defocused (+3 µm) field, tile by tile.
2. Runs ``deepr refocus big.tif -o big_refocused.zarr --out-of-core`` under ``/usr/bin/time -v``
   and reads its maximum resident set size.
3. Refocuses a 2048² crop in memory with the whole image's normalization and compares it with the
   same region of the out-of-core result, away from the crop's own borders.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tifffile


def make_big(path: Path, size: int, tile: int = 1024) -> None:
    from napari_deepr.bench import bench_image

    block = bench_image(tile, seed=1)
    blocks = [np.roll(block, (17 * k, 29 * k), axis=(0, 1)) for k in range(4)]

    def tiles():
        for ty in range(size // 256):
            for tx in range(size // 256):
                b = blocks[(ty // 4 + tx // 4) % 4]
                yield b[(ty % 4) * 256:(ty % 4 + 1) * 256, (tx % 4) * 256:(tx % 4 + 1) * 256]

    tifffile.imwrite(path, tiles(), shape=(size, size), dtype=np.uint16, tile=(256, 256), bigtiff=True,
                     resolution=(1e4 / 0.325, 1e4 / 0.325), resolutionunit="CENTIMETER",
                     metadata={"axes": "YX", "PhysicalSizeX": 0.325, "PhysicalSizeY": 0.325}, ome=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("work")
    p.add_argument("--size", type=int, default=16384)
    p.add_argument("--model", default="default")
    p.add_argument("--tile", type=int, default=1024, help="tile side: sets the activation memory (~1 GB at 1024²)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "int8"))
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    big = work / f"big_{args.size}.ome.tif"
    if not big.exists():
        make_big(big, args.size)
    out = work / f"big_{args.size}_refocused_{args.precision}.zarr"
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "napari_deepr.cli", "refocus", str(big), "-o", str(out),
           "--model", args.model, "--tile", str(args.tile), "--out-of-core", "-q", "--precision", args.precision]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        print(r.stderr[-2000:], file=sys.stderr)
        return r.returncode
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    import zarr

    from napari_deepr.engine.refocus import plane_stats

    data = tifffile.imread(big, aszarr=True)
    src = zarr.open(data, mode="r")
    import dask.array as da

    from napari_deepr.engine.refocus import RefocusJob

    norm = plane_stats(da.from_zarr(src)[None])  # the whole slide's statistics, as the out-of-core run used
    y0 = x0 = args.size // 2 - 1024
    crop = np.asarray(src[y0:y0 + 2048, x0:x0 + 2048])

    job = RefocusJob(crop, args.model, tile=args.tile, norm={(): norm})
    job.run()
    res = np.asarray(zarr.open(str(out / "0"), mode="r")[y0:y0 + 2048, x0:x0 + 2048])
    m = 256  # away from the crop's own borders, where its context differs from the whole slide's
    diff = np.abs(res[m:-m, m:-m] - job.output[m:-m, m:-m])
    report = {"size": args.size, "tile": args.tile, "precision": args.precision, "megapixels": args.size**2 / 1e6, "wall_s": wall,
              "mp_per_s": args.size**2 / 1e6 / wall, "max_rss_mb": rss_kb / 1024,
              "crop_max_abs_diff_rel": float(diff.max() / np.ptp(job.output)),
              "crop_mean_abs_diff_rel": float(diff.mean() / np.ptp(job.output))}
    print(json.dumps(report, indent=1))
    (work / f"outofcore_report_{args.precision}.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
