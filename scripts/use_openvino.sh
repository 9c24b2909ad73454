#!/usr/bin/env bash
# Swap this checkout's onnxruntime for onnxruntime-openvino: the same onnxruntime API (CPU provider
# included) plus the OpenVINO execution provider, which runs precision="bf16" on CPUs with
# AVX512-BF16/AMX. Both packages ship the `onnxruntime` module, so one must replace the other
# (as with onnxruntime-gpu); re-running after `pip install -e .` (which brings onnxruntime back) is safe.
#   scripts/use_openvino.sh            (x86-64 Linux or Windows; needs the .venv from scripts/test.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
quiet() { "$@" 2>&1 | { grep -v -e "^WARNING: Location" -e "^WARNING: Skipping" || true; }; }
quiet $PY -m pip uninstall -y -q onnxruntime
# --force-reinstall restores files the uninstall above removed when both were present.
quiet $PY -m pip install -q --force-reinstall --no-deps "onnxruntime-openvino>=1.20"
$PY -c "import onnxruntime as o; p = o.get_available_providers(); assert 'OpenVINOExecutionProvider' in p, p; print('onnxruntime', o.__version__, p)"
