"""dist_train: a small PyTorch DDP training template whose general checkpoints resume bit for bit."""

__version__ = "0.1.0"
