"""Export a model folder trained with ``--no-export`` (for example on a GPU machine without onnx).

Rewinds the finished checkpoint to its export phase and resumes it on this machine's CPU, so the
export (final validation table, ``generator.onnx``, ``dpm.onnx``, ``model.json``) is the trainer's
own. Usage::

    python scripts/export_checkpoint.py CONFIG.json MODEL_DIR [trainer arguments, e.g. --name X]
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    config, model = sys.argv[1], Path(sys.argv[2])
    from napari_deepr.engine.contract import CHECKPOINT_FILE
    from napari_deepr.train.loop import load_checkpoint

    ckpt = model / CHECKPOINT_FILE

    s = load_checkpoint(ckpt)  # weights_only: a checkpoint never runs code
    if s["phase"] not in ("done", "export"):
        sys.exit(f"{ckpt} is in phase {s['phase']!r}; finish training before exporting.")
    s["phase"] = "export"
    s["config"]["export"] = True
    torch.save(s, ckpt)
    cmd = [sys.executable, "-m", "napari_deepr.train", config, "-o", str(model), "--resume", "--device", "cpu",
           "--workers", "1", *sys.argv[3:]]
    sys.exit(subprocess.call(cmd))


if __name__ == "__main__":
    main()
