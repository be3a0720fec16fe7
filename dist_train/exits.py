"""Exit codes: what a scheduler (sacct, --dependency=afterok, a relaunch loop) learns from a run.

0 means the training is complete or the job was requeued to continue; anything else means the
model is not finished. PERMANENT lists the failures that a restart with the same command would
repeat (slurm/relaunch.sh stops on them); the other codes are interruptions or transient faults
that a relaunch resumes from.
"""

COMPLETE = 0  # training complete (or already complete), or the SLURM job was requeued
CRASH = 1  # an unexpected exception (a traceback); restarting may help
USER_ERROR = 2  # a bad flag, config file, checkpoint or run directory (or one in use by another
#                run, or not lockable): fix it, then relaunch
DIVERGED = 3  # the loss became non-finite; nothing was saved from that step on
SAVE_FAILED = 4  # a checkpoint could not be written (disk full, read-only or vanished run dir)
GAVE_UP = 5  # --max-failures failures in a row without a completed epoch: a person must look
STOPPED = 75  # saved and stopped early without a requeue (USR1 or USR2 outside SLURM, requeue refused
#               or failed): relaunch the same command to resume (75 = EX_TEMPFAIL)
PEER_FAILED = 76  # another rank died or hung (saved the last finished step where a survivor could)
INTERRUPTED = 130  # SIGINT (Ctrl-C): saved, then stopped (128 + 2, the shell's convention); a second
#                   SIGINT exits with it at once, without saving
TERMINATED = 143  # SIGTERM (preemption, scancel, torchrun's shutdown) or SIGHUP: saved, then stopped (128 + 15)

PERMANENT = frozenset({USER_ERROR, DIVERGED, SAVE_FAILED, GAVE_UP})  # a restart would fail the same way
