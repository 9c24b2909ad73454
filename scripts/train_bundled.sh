#!/usr/bin/env bash
# Retrain the bundled model models/deepr-fluo-20x from scratch with the project's own trainer.
#   scripts/train_bundled.sh [WORK_DIR]      (about 2 h on 2 CPU cores; needs the [train] extra)
# Reads models/deepr-fluo-20x/train_config.json; real in-focus images come from
# ${DEEPR_REAL_DATA:-../shared/data/real} at training time (nothing is copied into the repository).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/deepr-fluo-20x-train}
REAL=$(realpath "${DEEPR_REAL_DATA:-../shared/data/real}")
CFG=models/deepr-fluo-20x/train_config.json
mkdir -p "$WORK/real"
.venv/bin/python - "$CFG" "$WORK" "$REAL" <<'PY'
import json, os, sys
cfg, work, real = sys.argv[1:]
c = json.load(open(cfg))
spec = dict(c["synthetic"])
# Only the listed real images are used for training; the held-out ones must never be linked here.
for name in spec.pop("real_images"):
    dst = os.path.join(work, "real", name)
    if not os.path.lexists(dst):
        os.symlink(os.path.join(real, name), dst)
spec["real_images_dir"] = os.path.join(work, "real")
json.dump({"synthetic": spec, "name": c["name"], "description": c["description"]}, open(os.path.join(work, "synthetic.json"), "w"), indent=1)
open(os.path.join(work, "args.txt"), "w").write(" ".join(c["trainer_args"]))
PY
.venv/bin/python -m napari_deepr.train "$WORK/synthetic.json" -o "$WORK/model" --name deepr-fluo-20x $(cat "$WORK/args.txt") \
  | tee "$WORK/train_log.jsonl"
scripts/finish_bundled.sh "$WORK"
