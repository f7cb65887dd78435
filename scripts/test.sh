#!/usr/bin/env bash
# Install everything (Chromium from Debian for the browser tests, .venv with mopeq) and run pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "Chromium is missing: sudo apt-get install chromium (browser tests need it)" >&2
  fi
fi
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
