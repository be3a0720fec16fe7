#!/usr/bin/env bash
# setup.sh [EXTRAS]: create .venv and install dist_train with EXTRAS (default: test) (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${1:-test}
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q -e ".[$EXTRAS]"
