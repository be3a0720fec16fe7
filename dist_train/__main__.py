"""python -m dist_train: the dist-train command."""

import sys

from dist_train.cli import main

sys.exit(main())
