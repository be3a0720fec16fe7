"""The reference for bench/throughput.py: a bare, hand-written DDP training loop doing the
template's work (CIFAR10 from --data-dir, RandomCrop(32, 4) + flip + normalize, DistributedSampler,
the recipe's Net, SGD with momentum, one save at the end) and nothing else.

    torchrun --nproc_per_node=2 bench/bare_ddp.py --data-dir DIR --epochs 1 --batch-size 64 --num-workers 1
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402
from torchvision import transforms as T  # noqa: E402
from torchvision.datasets import CIFAR10  # noqa: E402

from dist_train.data import CIFAR10_MEAN, CIFAR10_STD  # noqa: E402
from dist_train.models import build_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--model", default="net")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available()  # as the template's --device auto: cuda:LOCAL_RANK, nccl
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    torch.manual_seed(0)
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(CIFAR10_MEAN, CIFAR10_STD)])
    dataset = CIFAR10(args.data_dir, train=True, transform=transform)
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
                        pin_memory=cuda)
    model = build_model(args.model).to(device)
    if world_size > 1:
        model = DDP(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for inputs, targets in loader:
            inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(inputs), targets).backward()
            optimizer.step()
    if rank == 0 and args.out:
        plain = model.module if world_size > 1 else model
        torch.save({"model_state_dict": plain.state_dict(), "optimizer_state_dict": optimizer.state_dict(),
                    "epoch": args.epochs - 1}, args.out)
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
