#!/usr/bin/env bash
# Second half of scripts/train_bundled.sh: install a finished training run as the bundled model,
# then measure it (model card table and figure), make its int8 variant, measure int8, bf16 and fp16, refresh the docs.
#   scripts/finish_bundled.sh WORK_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/deepr-fluo-20x-train}
M=models/deepr-fluo-20x
for f in generator.onnx dpm.onnx model.json; do cp "$WORK/model/$f" "$M/"; done
# CPU-friendly tiling: few large tiles (the engine shrinks them when memory is short).
.venv/bin/python - "$M/model.json" <<'PY'
import json, sys
p = sys.argv[1]; c = json.load(open(p))
c.update(tile=2048, overlap=96, halo=16)
json.dump(c, open(p, "w"), indent=1)
PY
LOGS=("$WORK/train_log.jsonl")
[ -f "$WORK/stage1_log.jsonl" ] && LOGS=("$WORK/stage1_log.jsonl" "$WORK/stage2_log.jsonl" "$WORK/stage3_log.jsonl" "$WORK/stage4_log.jsonl" "$WORK/stage5_log.jsonl" "$WORK/stage6_log.jsonl" "$WORK/stage7_log.jsonl" "$WORK/stage8_log.jsonl" "${LOGS[@]}")
.venv/bin/python scripts/summarize_training.py "${LOGS[@]}" > "$M/training_summary.json"
.venv/bin/python scripts/evaluate_model.py "$M"
.venv/bin/deepr quantize "$M" --json "$M/int8_quality.json"
# bf16 runs through onnxruntime-openvino (scripts/use_openvino.sh); skipped where it is not installed.
if .venv/bin/python -c "import onnxruntime as o, sys; sys.exit('OpenVINOExecutionProvider' not in o.get_available_providers())"; then
  .venv/bin/deepr quantize "$M" --precision bf16 --json "$M/bf16_quality.json"
fi
# fp16 (GPU providers): its arithmetic measured on onnxruntime's CPU float16 kernels.
.venv/bin/python benchmarks/fp16_quality.py
.venv/bin/python scripts/heldout_diagnosis.py --model "$M" --figure docs/heldout_cells.png
.venv/bin/deepr demo -o deepr_quickstart
cp deepr_quickstart/tilted_comparison.png docs/quickstart_comparison.png
