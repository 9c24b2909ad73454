#!/usr/bin/env bash
# Train on a lent GPU machine that has PyTorch but no package index and no psfmodels.
#
#   bash scripts/gpu_train.sh KIT OUT [trainer arguments...]
#
# KIT is a folder made here (see docs/gpu_check.md, "Training on a lent GPU"):
#   wh/*.whl         pure or cp312 wheels for whatever the machine's Python lacks (scipy, tifffile,
#                    pytorch_msssim, pillow); each is unpacked into /tmp/site only if its module is missing
#   psf_bank.npz     scripts/make_psf_bank.py CONFIG: every PSF plane the simulator will ask for
#   synthetic.json   the training config, real_images_dir relative to KIT (DEEPR_GPU_CONFIG=NAME picks
#                    another config file in KIT, e.g. to train two variants side by side)
#   init.pt          optional: weights to fine-tune from ({"generator": ..., "dpm": ...})
# The model folder stays on the machine (${DEEPR_GPU_WORK:-/tmp/deepr_gpu_model}): a resumable checkpoint with
# three optimiser states is more than a lent machine's call brings back. OUT receives weights.pt
# ({"generator", "dpm"}: export it here with --init-from, docs/gpu_check.md), train.log, train.err and the
# last validation preview.
set -euo pipefail
KIT=$(cd "$1" && pwd); OUT=$2; shift 2
PY=${PYTHON:-python3}
SITE=/tmp/site
mkdir -p "$SITE" "$OUT"
for pair in scipy:scipy tifffile:tifffile pytorch_msssim:pytorch_msssim PIL:pillow; do
    mod=${pair%%:*}; whl=${pair##*:}
    if ! PYTHONPATH=$SITE $PY -c "import $mod" 2>/dev/null; then
        f=$(ls "$KIT"/wh/"$whl"-*.whl 2>/dev/null | head -1)
        if [ -z "$f" ]; then echo "missing $mod and no wheel for it in $KIT/wh" >&2; exit 2; fi
        $PY -m zipfile -e "$f" "$SITE"
        echo "unpacked $(basename "$f")"
    fi
done
if [ -d /opt/torch/.venv/lib/python3.12/site-packages/nvidia ]; then
    N=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
    export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$N/cu13/lib:$N/cudnn/lib
fi
export PYTHONPATH=$SITE:$(cd "$(dirname "$0")/.." && pwd)/src PYTHONUNBUFFERED=1
export DEEPR_PSF_BANK=$KIT/psf_bank.npz
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
INIT=()
[ -f "$KIT/init.pt" ] && INIT=(--init-from "$KIT/init.pt")
WORK=${DEEPR_GPU_WORK:-/tmp/deepr_gpu_model}
$PY -m napari_deepr.train "$KIT/${DEEPR_GPU_CONFIG:-synthetic.json}" -o "$WORK" "${INIT[@]}" --no-export "$@" \
    > "$OUT/train.log" 2> "$OUT/train.err" || { echo "trainer failed:"; tail -30 "$OUT/train.err"; tail -5 "$OUT/train.log"; exit 1; }
$PY - "$WORK/checkpoint.pt" "$OUT/weights.pt" <<'PY'
import sys, torch
s = torch.load(sys.argv[1], map_location="cpu", weights_only=True)  # tensors and plain values only
torch.save({"generator": s["generator"], "dpm": s["dpm"], "phase": s["phase"]}, sys.argv[2])
PY
last=$(ls "$WORK"/previews/*.png 2>/dev/null | tail -1); [ -n "$last" ] && cp "$last" "$OUT/"
tail -3 "$OUT/train.log"
