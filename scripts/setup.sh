#!/usr/bin/env bash
# Set up eclipse-stream on a fresh Debian machine (Python >= 3.10, run as root or with sudo):
# Debian packages that ffcv builds against, a virtualenv in .venv, the package with its extras.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v apt-get >/dev/null 2>&1; then
  missing=()
  for pkg in python3-venv python3-dev build-essential pkg-config libopencv-dev libturbojpeg0-dev curl; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch from the registry brings CUDA builds that also run on CPU; ffcv builds from source.
# curl: WebDataset streams http(s):// shards through it. cloud: fsspec + s3fs for s3:// inputs and outputs.
.venv/bin/python -m pip install -q -e ".[ffcv,tools,cloud,test,bench]"
.venv/bin/python -c "import eclipse_stream, ffcv, torch; print('eclipse-stream', eclipse_stream.__version__, \
'| torch', torch.__version__, '| cuda', torch.cuda.is_available())"
