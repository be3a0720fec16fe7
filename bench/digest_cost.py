"""What verifying a checkpoint's digest (the zip's CRC32s) costs, in ms per GB, beside torch.load.

    python bench/digest_cost.py [SIZE_MB]

Writes one checkpoint-like file of SIZE_MB (default 512) to a temp directory, then alternates
rounds of checkpoint.verify_digest and torch.load(weights_only=True) on it (page cache warm, as
on a resume right after a save) and prints the median of each in ms per GB and their ratio.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dist_train.checkpoint import verify_digest  # noqa: E402

ROUNDS = 5


def ms_per_gb(action, path: Path) -> float:
    start = time.perf_counter()
    action(path)
    return (time.perf_counter() - start) * 1e3 / (path.stat().st_size / 1e9)


def main() -> None:
    size_mb = int(sys.argv[1]) if len(sys.argv) > 1 else 512
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "step_000000001.pt"
        tensors = {f"layer{i}.weight": torch.randn(size_mb * 2**20 // 4 // 8) for i in range(8)}
        torch.save({"model_state_dict": tensors}, path)
        verify, load = [], []
        for _ in range(ROUNDS):
            verify.append(ms_per_gb(verify_digest, path))
            load.append(ms_per_gb(lambda p: torch.load(p, weights_only=True), path))
        v, l = statistics.median(verify), statistics.median(load)
        print(f"{path.stat().st_size / 1e6:.0f} MB, {ROUNDS} rounds: verify_digest {v:.0f} ms/GB, "
              f"torch.load {l:.0f} ms/GB, ratio {v / l:.2f}")


if __name__ == "__main__":
    main()
