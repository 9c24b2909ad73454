#!/usr/bin/env bash
# Set up everything a fresh machine lacks and run the test suite (the README's test command; CI runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# Xvfb and the xcb/GL libraries a napari viewer needs (Debian names); root or sudo required once.
need_apt=0
command -v Xvfb >/dev/null 2>&1 || need_apt=1
ldconfig -p 2>/dev/null | grep -q libxkbcommon-x11 || need_apt=1
ldconfig -p 2>/dev/null | grep -q libxcb-cursor || need_apt=1
if [ "$need_apt" = 1 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq xvfb xauth libxkbcommon-x11-0 libxcb-icccm4 \
    libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0 \
    libxcb-shape0 libxcb-cursor0 libegl1 libgl1 libglx-mesa0 libdbus-1-3 libfontconfig1 >/dev/null
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip_install() {  # quiet, minus the local-index notices some machines print for every package
  .venv/bin/python -m pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
}
pip_install --upgrade pip
# torch first and pinned: an open range would pull a multi-GB CUDA build on a machine without torch.
pip_install torch==2.13.0
pip_install -e ".[all]"

export QT_API=pyqt6
.venv/bin/python -m pytest "$@"
# bf16 runs through onnxruntime-openvino (x86-64 only), which replaces onnxruntime: run the
# precision tests again on that build; a failed download restores plain onnxruntime and skips them.
if [ "$(uname -m)" = x86_64 ] && [ "${DEEPR_SKIP_OPENVINO:-0}" != 1 ]; then
  if bash scripts/use_openvino.sh; then
    .venv/bin/python -m pytest "$@" tests/test_precision.py tests/test_bench.py
  else
    echo "onnxruntime-openvino could not be installed; bf16 tests skipped" >&2
    pip_install --force-reinstall --no-deps "onnxruntime>=1.18"
  fi
fi
