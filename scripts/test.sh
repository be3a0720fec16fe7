#!/usr/bin/env bash
# test.sh: install everything the suite needs (the venv; SLURM too when run as root), then run it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "$(id -u)" = 0 ]; then
  bash scripts/install-slurm.sh
else
  echo "not root: SLURM is not installed; its tests skip unless it already is"
fi
exec .venv/bin/python -m pytest "$@"
