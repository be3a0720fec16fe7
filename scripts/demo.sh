#!/usr/bin/env bash
# demo.sh: install, train on real handwritten digits (offline) and evaluate; then run the same
# training again, kill it mid-epoch, relaunch it, and compare the two results bit for bit.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh digits
RUN_DIR=${RUN_DIR:-runs/demo}
KILLED=$RUN_DIR-killed
mkdir -p "$(dirname "$RUN_DIR")"
# One thread per process for both runs: a bit-exact resume needs the thread count its run started
# with, and on a small machine one thread is also the quickest for this model.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

TRAIN=(.venv/bin/python launch/train.py --config scripts/demo.toml)
# The whole log goes to RUN_DIR.log; on screen, the lines a newcomer wants.
show() { grep --line-buffered -E "accuracy|resuming|complete|error" || true; }
fail() { echo "failed; the end of $1:"; tail -n 20 "$1"; exit 1; }

echo "== 1. train the recipe's Net on scikit-learn's handwritten digits (no download)"
"${TRAIN[@]}" --run-dir "$RUN_DIR" 2>&1 | tee "$RUN_DIR.log" | show || fail "$RUN_DIR.log"
.venv/bin/dist-train evaluate "$RUN_DIR"

echo "== 2. the same training again, killed (SIGKILL) mid-epoch, then relaunched"
rm -rf "$KILLED"
"${TRAIN[@]}" --run-dir "$KILLED" > "$KILLED.log" 2>&1 &  # $! is python itself
pid=$!
# Epoch 3 is steps 136-180; checkpoints are written at steps 140 and 160; kill at about step 165.
until grep -q "epoch 3 step 165 batch" "$KILLED.log"; do
  kill -0 "$pid" 2>/dev/null || fail "$KILLED.log"
  sleep 0.1
done
kill -KILL "$pid"
wait "$pid" 2>/dev/null || true
echo "killed after: $(grep -oE 'epoch [0-9]+ step [0-9]+ batch [0-9]+/[0-9]+' "$KILLED.log" | tail -n 1)"
"${TRAIN[@]}" --run-dir "$KILLED" 2>&1 | tee -a "$KILLED.log" | show || fail "$KILLED.log"

echo "== 3. the resumed run's final checkpoint against the uninterrupted run's"
.venv/bin/dist-train compare "$RUN_DIR" "$KILLED"
