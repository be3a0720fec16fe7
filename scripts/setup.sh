#!/usr/bin/env bash
# setup.sh: create .venv and install dist_train with its test extra (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q -e '.[test]'
