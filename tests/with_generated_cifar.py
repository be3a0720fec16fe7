"""Run a script with torchvision's CIFAR10 accepting generated files.

CIFAR10 checks each file against the md5 of the real download; generated test files cannot
match it. This wrapper sets the expected md5s to those of the files under --data-dir, then runs
the script unchanged, so the real CIFAR10 class reads real pickle batches.

    python tests/with_generated_cifar.py launch/train.py --dataset cifar10 --data-dir DIR ...
"""

import hashlib
import runpy
import sys
from pathlib import Path

from torchvision.datasets import CIFAR10


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def accept_generated_files(data_dir: str) -> None:
    """Make CIFAR10 (in this process) accept the files under data_dir as the real download."""
    folder = Path(data_dir) / CIFAR10.base_folder
    CIFAR10.train_list = [[name, _md5(folder / name)] for name, _ in CIFAR10.train_list]
    CIFAR10.test_list = [[name, _md5(folder / name)] for name, _ in CIFAR10.test_list]
    CIFAR10.meta = dict(CIFAR10.meta, md5=_md5(folder / CIFAR10.meta["filename"]))


def main() -> None:
    script, args = sys.argv[1], sys.argv[2:]
    accept_generated_files(args[args.index("--data-dir") + 1])
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
