#!/usr/bin/env bash
# gpu_check.sh: on one GPU, train, SIGKILL mid-run, resume, and compare with an uninterrupted run
# bit for bit; then with --data-path loader (also compared with the default device path); then
# with bf16 autocast (and fp16 + GradScaler on CUDA). Prints PASS or FAIL; a minute or two on one GPU.
#   bash bench/gpu_check.sh            (DEVICE=cpu bash bench/gpu_check.sh checks the script itself)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DEVICE=${DEVICE:-cuda}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"

compare() {  # compare RUN_DIR_A RUN_DIR_B: the final checkpoints' weights and momentum, bit for bit
  $PY - "$1" "$2" <<'PYEOF'
import sys, torch
from pathlib import Path
def final(run_dir):
    return torch.load(sorted(Path(run_dir, "checkpoints").glob("step_*.pt"))[-1], weights_only=True)
a, b = final(sys.argv[1]), final(sys.argv[2])
same = a["global_step"] == b["global_step"] and all(
    torch.equal(a["model_state_dict"][k], b["model_state_dict"][k]) for k in a["model_state_dict"])
same = same and all(torch.equal(x["momentum_buffer"], y["momentum_buffer"]) for x, y in
                    zip(a["optimizer_state_dict"]["state"].values(), b["optimizer_state_dict"]["state"].values()))
print("bitwise equal" if same else "DIFFERENT", "at step", a["global_step"], b["global_step"])
sys.exit(0 if same else 1)
PYEOF
}

check() {  # check NAME EXTRA_FLAGS...
  local name=$1; shift
  local args=(--device "$DEVICE" --dataset fake --fake-size 2048 --batch-size 32 --epochs 2
              --num-workers 2 --save-every-steps 10 --log-every-steps 1 --model resnet18 "$@")
  $PY launch/train.py "${args[@]}" --run-dir "$WORK/$name-ref" > "$WORK/$name-ref.log" 2>&1 \
    || { echo "FAIL $name: reference run"; tail -n 20 "$WORK/$name-ref.log"; return 1; }
  $PY launch/train.py "${args[@]}" --run-dir "$WORK/$name-cut" > "$WORK/$name-cut.log" 2>&1 &
  local pid=$!
  until grep -q "step 75 batch" "$WORK/$name-cut.log" 2>/dev/null; do
    kill -0 $pid 2>/dev/null || { echo "FAIL $name: exited early"; tail -n 20 "$WORK/$name-cut.log"; return 1; }
    sleep 0.05
  done
  kill -9 $pid; wait $pid 2>/dev/null
  $PY launch/train.py "${args[@]}" --run-dir "$WORK/$name-cut" > "$WORK/$name-resume.log" 2>&1 \
    || { echo "FAIL $name: resume"; tail -n 20 "$WORK/$name-resume.log"; return 1; }
  grep -q "resuming from" "$WORK/$name-resume.log" || { echo "FAIL $name: did not resume"; return 1; }
  compare "$WORK/$name-ref" "$WORK/$name-cut"
  local rc=$?
  [ $rc = 0 ] && echo "PASS $name" || echo "FAIL $name"
  return $rc
}

t0=$(date +%s)
check fp32; r1=$?
# The DataLoader path (the default is the device path) resumes exactly and trains to the same bits.
check loader --data-path loader && compare "$WORK/fp32-ref" "$WORK/loader-ref" || r1=1
check bf16 --amp bf16; r2=$?
if [ "$DEVICE" = cuda ]; then check fp16 --amp fp16 || r2=1; fi
echo "elapsed $(( $(date +%s) - t0 )) s"
if [ $r1 = 0 ] && [ $r2 = 0 ]; then echo "GPU CHECK PASS"; else echo "GPU CHECK FAIL"; exit 1; fi
