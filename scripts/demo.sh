#!/usr/bin/env bash
# demo.sh: install, then a short real training on generated data (offline), then its evaluation.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
RUN_DIR=${RUN_DIR:-runs/demo}
.venv/bin/python launch/train.py --dataset fake --fake-size 2048 --epochs 2 --run-dir "$RUN_DIR" \
  --save-every-steps 10 --log-every-steps 10
.venv/bin/python launch/evaluate.py "$(ls -1 "$RUN_DIR"/checkpoints/step_*.pt | tail -n 1)"
