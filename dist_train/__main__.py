"""python -m dist_train: the dist-train command."""

from dist_train.cli import entry

entry()
