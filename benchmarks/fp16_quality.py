"""The fp16 graphs' quality cost against fp32, measurable without a GPU.

    python benchmarks/fp16_quality.py      # writes models/deepr-fluo-20x/fp16_quality.json

The same 12 simulated 512² pairs as ``quality_delta`` (seed 99). The fp16 graphs run on onnxruntime's
CPU provider, which has float16 kernels: the engine refuses ``precision="fp16"`` on the CPU only
because it is slow there. On a GPU, ``quality_delta(model, "fp16", providers="cuda")`` measures it.
"""
import json
import numpy as np
from napari_deepr.engine.dpm import structure_mask
from napari_deepr.engine.fp16 import fp16_variant
from napari_deepr.engine.model import load_model
from napari_deepr.engine.refocus import RefocusJob
from napari_deepr.optics.simulate import random_training_pair
from napari_deepr.science.metrics import ssim
# Same pairs as quality_delta (seed 99, 12 pairs of 512²); the fp16 graphs run on onnxruntime's CPU
# provider (its float16 kernels), because no GPU is at hand: the engine only refuses fp16 on CPU for speed.
m = load_model("models/deepr-fluo-20x")
rng = np.random.default_rng(99)
s = {"fp32": [], "fp16": []}; d = {"fp32": [], "fp16": []}
for _ in range(12):
    x, y, z = random_training_pair(rng, patch=512)
    mask = structure_mask(y)
    for prec in ("fp32", "fp16"):
        job = RefocusJob(x, m, dpm=True, providers="cpu")
        if prec == "fp16":
            job.generator_path, job.dpm_path = fp16_variant(m.generator_path), fp16_variant(m.dpm_path)
            job._open_sessions()
        out, dpm = job.run()
        s[prec].append(ssim(out, y)); d[prec].append(float(np.abs(dpm[mask] - abs(float(z))).mean()))
a, b = np.array(s["fp32"]), np.array(s["fp16"])
q = {"precision": "fp16", "pairs": 12, "ssim_fp32": float(a.mean()), "ssim_fp16": float(b.mean()), "delta": float(b.mean() - a.mean()),
     "worst_pair_delta": float((b - a).min()), "dpm_mae_fp32_um": float(np.mean(d["fp32"])), "dpm_mae_fp16_um": float(np.mean(d["fp16"])),
     "max_abs_ssim_change": float(np.abs(b - a).max())}
q["acceptable"] = q["delta"] >= -0.01
q["measured_on"] = "the fp16 graphs on onnxruntime's CPU provider (float16 kernels; no GPU at hand), same pairs as quality_delta (seed 99)"
print(json.dumps(q))
open("models/deepr-fluo-20x/fp16_quality.json", "w").write(json.dumps(q, indent=1) + "\n")
