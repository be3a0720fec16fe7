"""Logging with the rank in every line: at INFO only the main rank speaks, other ranks only warn."""

from __future__ import annotations

import logging
import sys


def setup_logging(rank: int, level: str = "INFO") -> None:
    fmt = f"%(asctime)s [rank {rank}] %(levelname)s %(message)s"
    logging.basicConfig(stream=sys.stderr, format=fmt, datefmt="%H:%M:%S", force=True,
                        level=level if rank == 0 else max(logging.WARNING, logging.getLevelName(level)))
