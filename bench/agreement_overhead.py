"""What the per-step stop agreement costs a DDP training step, measured side by side.

    torchrun --nproc_per_node=2 bench/agreement_overhead.py

Alternates rounds of recipe-Net DDP steps (batch 64 per rank, gloo, CPU) without any agreement,
with the asynchronous agreement of dist_train.preemption (every step, every 10 steps), and with a blocking all-reduce per step,
and prints the median step time of each and their ratios.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from dist_train import distributed  # noqa: E402
from dist_train.models import Net  # noqa: E402
from dist_train.preemption import NONE, StopAgreement  # noqa: E402

ROUNDS, STEPS = 15, 30


def main() -> None:
    env = distributed.setup("cpu")
    torch.manual_seed(0)
    model = DDP(Net())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    inputs, targets = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    agreement = StopAgreement(env, every=1)
    agreement_10 = StopAgreement(env, every=10)
    blocking_group = dist.new_group(backend="gloo")

    def none() -> None:
        pass

    def asynchronous() -> None:
        agreement.poll(NONE)

    def async_every_10() -> None:
        agreement_10.poll(NONE)

    def blocking() -> None:
        dist.all_reduce(torch.zeros(1, dtype=torch.int32), group=blocking_group)

    times = {f.__name__: [] for f in (none, asynchronous, async_every_10, blocking)}
    for _ in range(ROUNDS):
        for check in (none, asynchronous, async_every_10, blocking):
            distributed.barrier(env)
            start = time.perf_counter()
            for _ in range(STEPS):
                optimizer.zero_grad()
                F.cross_entropy(model(inputs), targets).backward()
                optimizer.step()
                check()
            times[check.__name__].append((time.perf_counter() - start) / STEPS)
    agreement.close()
    agreement_10.close()
    if env.is_main:
        base = statistics.median(times["none"])
        for name, values in times.items():
            median = statistics.median(values)
            print(f"{name:>12}: {median * 1e3:7.3f} ms/step  ratio to none {median / base:5.3f}  "
                  f"(median of {ROUNDS} rounds x {STEPS} steps, {env.world_size} ranks)")
    distributed.teardown(env)


if __name__ == "__main__":
    main()
