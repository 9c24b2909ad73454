#!/usr/bin/env bash
# Retrain the bundled model models/deepr-fluo-20x from scratch with the project's own trainer.
#   scripts/train_bundled.sh [WORK_DIR]      (stages 1-3, 5-7: about 6 h on 2 CPU cores; stage 4: ~11 min
#   on an H200, hours on a CPU; needs the [train] extra)
# Reads models/deepr-fluo-20x/train_config.json (nine stages, see its "stages"); real in-focus images
# come from ${DEEPR_REAL_DATA:-../shared/data/real} at training time (nothing is copied into the repository).
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
head = {"name": c["name"], "description": c["description"]}
json.dump({"synthetic": spec, **head}, open(os.path.join(work, "synthetic_stage1.json"), "w"), indent=1)
spec2 = dict(spec, specimen_kinds=spec["specimen_kinds"] + c["added_specimen_kinds"])
json.dump({"synthetic": spec2, **head}, open(os.path.join(work, "synthetic_stage2.json"), "w"), indent=1)
spec5 = dict(spec2, specimen_kinds=spec2["specimen_kinds"] + c["stage5_added_specimen_kinds"])
json.dump({"synthetic": spec5, **head}, open(os.path.join(work, "synthetic_stage5.json"), "w"), indent=1)
spec6 = dict(spec5, **c["stage6_synthetic_additions"])
json.dump({"synthetic": spec6, **head}, open(os.path.join(work, "synthetic_stage6.json"), "w"), indent=1)
spec7 = dict(spec5, **c["stage7_synthetic_additions"])
json.dump({"synthetic": spec7, **head}, open(os.path.join(work, "synthetic_stage7.json"), "w"), indent=1)
spec8 = dict(spec5, **c["stage8_synthetic_additions"])
json.dump({"synthetic": spec8, **head}, open(os.path.join(work, "synthetic_stage8.json"), "w"), indent=1)
for key, fname in (("trainer_args", "args1.txt"), ("dpm_redo_args", "args2.txt"), ("fine_tune_args", "args3.txt"),
                   ("gpu_stage_args", "args4.txt"), ("stage5_args", "args5.txt"),
                   ("stage6_args", "args6.txt"), ("stage7_args", "args7.txt"),
                   ("stage8_args", "args8.txt"), ("stage9_args", "args9.txt")):
    open(os.path.join(work, fname), "w").write(" ".join(c[key]))
PY
TRAIN=(.venv/bin/python -m napari_deepr.train)
# 1. generator from scratch (and a first DPM decoder, replaced in stage 2)
"${TRAIN[@]}" "$WORK/synthetic_stage1.json" -o "$WORK/stage1" --name deepr-fluo-20x $(cat "$WORK/args1.txt") \
  | tee "$WORK/stage1_log.jsonl"
# 2. a fresh DPM decoder with the cytoplasm family added
rm -rf "$WORK/stage2" && cp -r "$WORK/stage1" "$WORK/stage2"
"${TRAIN[@]}" "$WORK/synthetic_stage2.json" -o "$WORK/stage2" --name deepr-fluo-20x $(cat "$WORK/args1.txt") \
  $(cat "$WORK/args2.txt") | tee "$WORK/stage2_log.jsonl"
# 3. fine-tune generator and DPM decoder from stage 2 on the extended data
"${TRAIN[@]}" "$WORK/synthetic_stage2.json" -o "$WORK/model" --name deepr-fluo-20x --init-from "$WORK/stage2" \
  $(cat "$WORK/args3.txt") | tee "$WORK/stage3_log.jsonl"
# 4. the same data at 256 px, batch 16, fixed update counts (shipped from a lent GPU; on a CPU this takes hours)
"${TRAIN[@]}" "$WORK/synthetic_stage2.json" -o "$WORK/stage4" --name deepr-fluo-20x --init-from "$WORK/model" \
  --device auto --workers "$(( $(nproc) > 2 ? $(nproc) - 3 : 1 ))" $(cat "$WORK/args4.txt") | tee "$WORK/stage4_log.jsonl"
# 5. the power-law 'texture' family added (2 of 8 procedural draws): generator and DPM fine-tuned on 2 CPU cores
"${TRAIN[@]}" "$WORK/synthetic_stage5.json" -o "$WORK/stage5" --name deepr-fluo-20x --init-from "$WORK/stage4" \
  $(cat "$WORK/args5.txt") | tee "$WORK/stage5_log.jsonl"
# 6. 35 % of the samples on random tilted/curved/wavy surfaces (per-pixel DPM targets), 2 CPU cores
"${TRAIN[@]}" "$WORK/synthetic_stage6.json" -o "$WORK/stage6" --name deepr-fluo-20x \
  --init-from "$WORK/stage5/checkpoint.pt" $(cat "$WORK/args6.txt") | tee "$WORK/stage6_log.jsonl"
# 7. the DPM decoder alone (one no-op generator update) with 60 % of the samples on surfaces
"${TRAIN[@]}" "$WORK/synthetic_stage7.json" -o "$WORK/stage7" --name deepr-fluo-20x \
  --init-from "$WORK/stage6/checkpoint.pt" $(cat "$WORK/args7.txt") | tee "$WORK/stage7_log.jsonl"
# 8-9. v2: data that teaches smooth-at-focus (own-smoothness low-pass, thick samples, real images at several
# scales, 48 % of pairs within 1 µm of focus); shipped from a lent GPU (scripts/gpu_train.sh, docs/gpu_check.md),
# on a CPU these two stages take many hours
DEV=(--device auto --workers "$(( $(nproc) > 2 ? $(nproc) - 3 : 1 ))")
"${TRAIN[@]}" "$WORK/synthetic_stage8.json" -o "$WORK/stage8" --name deepr-fluo-20x \
  --init-from "$WORK/stage7/checkpoint.pt" "${DEV[@]}" $(cat "$WORK/args8.txt") | tee "$WORK/stage8_log.jsonl"
"${TRAIN[@]}" "$WORK/synthetic_stage8.json" -o "$WORK/stage9" --name deepr-fluo-20x \
  --init-from "$WORK/stage8/checkpoint.pt" "${DEV[@]}" $(cat "$WORK/args9.txt") | tee "$WORK/train_log.jsonl"
rm -rf "$WORK/model" && mv "$WORK/stage9" "$WORK/model"
scripts/finish_bundled.sh "$WORK"
