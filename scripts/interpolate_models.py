#!/usr/bin/env python
"""Mix a fine-tuned model's generator weights with its parent's (a weight-space ensemble).

``w = alpha * child + (1 - alpha) * parent`` for every initializer of ``generator.onnx`` (the two
graphs must have the same initializers, as two exports of the same architecture do); the DPM decoder
and the card are the child's, and the card records the mix. A fine-tune on a small dataset gains where
its data are informative and drifts elsewhere; mixing with the parent keeps part of both (Wortsman et
al., "Robust fine-tuning of zero-shot models", CVPR 2022, call this WiSE-FT). Not an option of
``deepr train``: a diagnostic for issue 18, and how the bundled model 2.1.0 was made from 2.0.0 and
its parent 1.0.0 (alpha 0.8, chosen by ``scripts/mix_selection.py``; docs/MODEL_QUALITY.md)::

    python scripts/interpolate_models.py CHILD --parent deepr-fluo-20x --alpha 0.5 -o MIXED
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("child", help="fine-tuned model folder")
    p.add_argument("--parent", default="deepr-fluo-20x", help="parent model (name or folder)")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the child (0 = parent, 1 = child)")
    p.add_argument("-o", "--out", required=True)
    args = p.parse_args(argv)

    import onnx
    from onnx import numpy_helper

    from napari_deepr.engine.model import load_model

    parent_dir = Path(args.parent) if Path(args.parent).is_dir() else Path(load_model(args.parent).location)
    if parent_dir.is_file():
        parent_dir = parent_dir.parent
    child = onnx.load(str(Path(args.child) / "generator.onnx"))
    parent = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(parent_dir / "generator.onnx")).graph.initializer}
    names = [i.name for i in child.graph.initializer]
    if set(names) != set(parent) or any(numpy_helper.to_array(i).shape != parent[i.name].shape
                                        for i in child.graph.initializer):
        raise SystemExit("the two generators do not have the same weights (another architecture?)")
    for init in child.graph.initializer:
        c = numpy_helper.to_array(init)
        if np.issubdtype(c.dtype, np.floating):
            mixed = (args.alpha * c.astype(np.float64) + (1 - args.alpha) * parent[init.name]).astype(c.dtype)
            init.CopyFrom(numpy_helper.from_array(mixed, init.name))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=False)
    onnx.save(child, str(out / "generator.onnx"))
    for f in ("dpm.onnx",):
        if (Path(args.child) / f).is_file():
            shutil.copy2(Path(args.child) / f, out / f)
    card = json.loads((Path(args.child) / "model.json").read_text())
    card["name"] = out.name
    card.setdefault("provenance", {})["weight_mix"] = {"child": str(args.child), "parent": str(parent_dir),
                                                       "alpha_child": args.alpha}
    (out / "model.json").write_text(json.dumps(card, indent=1))
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
