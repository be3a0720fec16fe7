#!/usr/bin/env bash
# test.sh: install everything the suite needs, then run it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
