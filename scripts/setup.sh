#!/usr/bin/env bash
# Create .venv (once) and install mopeq with the CPU build of torch. Sourced by app.sh/test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch first, pinned to the CPU wheel (a plain "torch" would pull a multi-GB CUDA build).
.venv/bin/pip install -q --disable-pip-version-check "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/pip install -q --disable-pip-version-check -e ".[${EXTRAS:-test}]"
