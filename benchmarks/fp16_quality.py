"""The fp16 graphs' quality cost against fp32, measurable without a GPU.

    python benchmarks/fp16_quality.py                      # 12 pairs simulated here (seed 99)
    python benchmarks/fp16_quality.py --pairs pairs.npz --n 4 --json out.json   # pairs made elsewhere

The same simulated 512² pairs as ``quality_delta`` (seed 99; ``scripts/make_check_pairs.py`` saves
them for machines without psfmodels). The fp16 graphs run on onnxruntime's CPU provider, which has
float16 kernels: the engine refuses ``precision="fp16"`` on the CPU only because it is slow there, so
this script lets the CPU count as an fp16 provider. The run fails if the engine fell back to fp32.
On a GPU, ``quality_delta(model, "fp16", providers="cuda")`` measures the same thing.
"""
import argparse
import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from napari_deepr.engine import providers as engine_providers
from napari_deepr.engine.quantize import quality_delta

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="models/deepr-fluo-20x")
ap.add_argument("--pairs", help="npz from scripts/make_check_pairs.py (else simulated here)")
ap.add_argument("--n", type=int, default=12)
ap.add_argument("--json", help="write the result here (default: <model>/fp16_quality.json when all 12 pairs run)")
args = ap.parse_args()
# The engine asks each provider's traits whether it runs float16; here the CPU says yes.
_cpu = engine_providers.TRAITS_BY_ORT["CPUExecutionProvider"]
engine_providers.TRAITS_BY_ORT["CPUExecutionProvider"] = dataclasses.replace(_cpu, fp16=True)
pairs = None
if args.pairs:
    d = np.load(args.pairs)
    pairs = [(d["x"][i].astype(np.float32), d["y"][i].astype(np.float32), float(d["z"][i])) for i in range(min(args.n, len(d["z"])))]
with warnings.catch_warnings():
    warnings.simplefilter("error", RuntimeWarning)  # a fallback to fp32 would make the comparison empty
    q = quality_delta(args.model, precision="fp16", n=args.n, pairs=pairs, providers="cpu")
q["measured_on"] = (f"the fp16 graphs on onnxruntime {ort.__version__}'s CPU provider (float16 kernels; no GPU at hand), "
                    f"onnx {onnx.__version__}, same pairs as quality_delta (seed 99)")
print(json.dumps(q))
target = args.json or (f"{args.model}/fp16_quality.json" if q["pairs"] == 12 and not args.pairs else None)
if target:
    Path(target).write_text(json.dumps(q, indent=1) + "\n")
