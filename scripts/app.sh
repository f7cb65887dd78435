#!/usr/bin/env bash
# Run the app on the embedded model: http://127.0.0.1:7860
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
EXTRAS=app bash scripts/setup.sh
exec .venv/bin/python app.py "$@"
