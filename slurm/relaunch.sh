#!/bin/bash
# relaunch.sh COMMAND...: run a job step, and run it again after a transient failure, so that a
# crashed, killed or hung rank costs a restart in the same allocation, not a person's resubmit.
#
# The training itself counts failures in its run directory and gives up after --max-failures
# (exit 5); a completed epoch resets the count. Exit codes that a relaunch would not change end
# the loop (dist_train/exits.py): 0 complete or requeued, 2 user error, 3 non-finite loss,
# 4 save failed, 5 too many failures, 75 saved and stopped, 130 SIGINT, 143 SIGTERM.
# torchrun exits 1 whatever its ranks exited with: a rank that stops on one of 2-5 also writes
# its code into DIST_TRAIN_EXIT_FILE (in the submit directory, which every node sees), and the
# loop ends with that code.
# MAX_RELAUNCHES (default 10) bounds the loop where the training cannot count (it dies before).
max=${MAX_RELAUNCHES:-10}
if [[ ! $max =~ ^[0-9]+$ ]]; then  # bash arithmetic would read a word as a variable (0), or run $(...)
  echo "relaunch.sh: MAX_RELAUNCHES=$max is not a whole number" >&2
  exit 2
fi
export DIST_TRAIN_EXIT_FILE="$PWD/.dist_train-exit.${SLURM_JOB_ID:-local}.$$"  # one per relaunch.sh
trap 'rm -f "$DIST_TRAIN_EXIT_FILE"' EXIT
for ((launch = 0; ; launch++)); do
  rm -f "$DIST_TRAIN_EXIT_FILE"
  status=0
  "$@" || status=$?
  case "$status" in
    0|2|3|4|5|75|130|143) exit "$status" ;;
  esac
  told=$(head -c 4 "$DIST_TRAIN_EXIT_FILE" 2>/dev/null || true)
  case "$told" in
    2|3|4|5)
      echo "relaunch.sh: the job step failed (exit $status) after a rank exited $told, which a relaunch would repeat (its error line says why); not relaunching" >&2
      exit "$told" ;;
  esac
  if ((launch >= max)); then
    echo "relaunch.sh: the job step failed $((launch + 1)) times (last exit $status); giving up" >&2
    exit "$status"
  fi
  echo "relaunch.sh: the job step failed (exit $status); relaunching it ($((launch + 1))/$max)" >&2
  sleep 2
done
