"""Evaluate a checkpoint: its weights in a plain model (no DDP), eval(), test loss and accuracy.

    python launch/evaluate.py runs/default     # a run directory: the checkpoint resume would take
    python launch/evaluate.py runs/default/checkpoints/step_000000500.pt --dataset fake

The code is dist_train/evaluate.py; `dist-train evaluate` runs the same.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout runs without installing

from dist_train.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
