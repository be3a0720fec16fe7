"""dist_train: a small PyTorch DDP training template whose general checkpoints resume bit for bit."""

from importlib import metadata

try:  # one version string: pyproject.toml's, as the installed package's metadata has it
    __version__ = metadata.version("dist_train")
except metadata.PackageNotFoundError:  # a checkout run without installing (python launch/train.py)
    __version__ = "0+unknown"
