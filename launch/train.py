"""Train a model with DDP, saving general checkpoints that resume bit for bit.

    python launch/train.py --dataset fake                          # one process
    torchrun --nproc_per_node=4 launch/train.py --dataset fake     # one rank per process
    srun python launch/train.py --dataset fake                     # one rank per SLURM task

Relaunching the same command resumes from the newest valid checkpoint in RUN_DIR/checkpoints/.
The code is dist_train/train.py; `dist-train train` runs the same.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout runs without installing

from dist_train.preemption import StopFlag, die_with_launcher  # noqa: E402
from dist_train.processes import leave  # noqa: E402

# SIGUSR1/SIGUSR2/SIGTERM/SIGHUP/SIGINT from here on only set a flag: the loop saves at a step boundary, then exits.
# Installed before importing torch (seconds), so that a signal during start-up is not fatal.
STOP_FLAG = StopFlag().install()
die_with_launcher()  # under torchrun: a rank never outlives its agent

from dist_train.train import main  # noqa: E402

if __name__ == "__main__":
    leave(main(stop_flag=STOP_FLAG))  # sys.exit without finalizing the interpreter (see there)
