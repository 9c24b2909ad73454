#!/usr/bin/env bash
# Set up everything a fresh machine lacks and run the test suite (the README's test command; CI runs it).
#   scripts/test.sh [pytest arguments]
# It installs into .venv what the tests need (PyTorch CPU, the package with all extras) and leaves the
# runtime the README's first command made as it was: onnxruntime stays onnxruntime. The bf16 tests on
# onnxruntime-openvino run in their own environment, .venv-openvino, only when asked:
#   DEEPR_TEST_OPENVINO=1 scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# Xvfb and the xcb/GL libraries a napari viewer needs (Debian names). Installed only when missing, and
# only as root or with password-less sudo; otherwise the command to run is printed.
need_apt=0
command -v Xvfb >/dev/null 2>&1 || need_apt=1
ldconfig -p 2>/dev/null | grep -q libxkbcommon-x11 || need_apt=1
ldconfig -p 2>/dev/null | grep -q libxcb-cursor || need_apt=1
APT_PKGS="xvfb xauth libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 \
libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0 libxcb-shape0 libxcb-cursor0 libegl1 libgl1 \
libglx-mesa0 libdbus-1-3 libfontconfig1"
if [ "$need_apt" = 1 ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""
  elif sudo -n true 2>/dev/null; then SUDO="sudo -n"
  else
    echo "The napari tests need a virtual display. Install it once, then rerun:" >&2
    echo "  sudo apt-get install -y $APT_PKGS" >&2
    exit 1
  fi
  $SUDO apt-get update -qq
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $APT_PKGS >/dev/null
fi

pip_install() {  # quiet, minus the local-index notices some machines print for every package
  local py=$1; shift
  "$py" -m pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip_install .venv/bin/python --upgrade pip
# torch first and pinned: an open range would pull a multi-GB CUDA build on a machine without torch.
pip_install .venv/bin/python torch==2.13.0
pip_install .venv/bin/python -e ".[all]"

export QT_API=pyqt6
.venv/bin/python -m pytest "$@"

# bf16 runs through onnxruntime-openvino (x86-64 only), which ships the same `onnxruntime` module and
# so replaces onnxruntime wherever it is installed: its tests get their own environment.
if [ "${DEEPR_TEST_OPENVINO:-0}" = 1 ]; then
  if [ "$(uname -m)" != x86_64 ]; then
    echo "onnxruntime-openvino is x86-64 only; bf16 tests skipped" >&2
    exit 0
  fi
  [ -x .venv-openvino/bin/python ] || "$PY" -m venv .venv-openvino
  pip_install .venv-openvino/bin/python --upgrade pip
  pip_install .venv-openvino/bin/python -e ".[test]"
  pip_install .venv-openvino/bin/python torch==2.13.0
  .venv-openvino/bin/python -m pip uninstall -y -q onnxruntime 2>&1 | { grep -v "^WARNING" || true; }
  pip_install .venv-openvino/bin/python --force-reinstall --no-deps "onnxruntime-openvino>=1.20"
  .venv-openvino/bin/python -m pytest "$@" tests/test_precision.py tests/test_bench.py
fi
