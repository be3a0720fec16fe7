"""Who am I (single process, torchrun, srun), which device, and the few collectives the loop needs.

World size 1 needs no process group: every collective here is a no-op there, so the loop has no
`if ddp:` branches.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dist_train.config import UserError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def discover_ranks(environ=os.environ) -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's variables; (0, 0, 1) for a plain process."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return int(environ["RANK"]), int(environ.get("LOCAL_RANK", 0)), int(environ["WORLD_SIZE"])
    return 0, 0, 1


def pick_device(choice: str, local_rank: int) -> torch.device:
    """cuda:LOCAL_RANK where CUDA is asked for (or available with 'auto'), else cpu."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available here; use --device cpu")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def setup(device_choice: str, deterministic: bool = True) -> DistEnv:
    """Pick the device, join the process group (gloo on CPU, nccl on CUDA) when world size > 1."""
    rank, local_rank, world_size = discover_ranks()
    device = pick_device(device_choice, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        if deterministic:
            # Bit-exact resume on GPU needs deterministic kernels; cuBLAS needs this before first use.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.benchmark = False
            torch.use_deterministic_algorithms(True, warn_only=True)
    if world_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10), **kwargs)
    return DistEnv(rank, local_rank, world_size, device)


def teardown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    """Sum a few floats over all ranks (float64, so the sum does not depend on the rank count)."""
    if not env.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather_to_main(obj, env: DistEnv) -> list | None:
    """Every rank's `obj`, in rank order, on the main rank; None elsewhere."""
    if not env.distributed:
        return [obj]
    gathered = [None] * env.world_size if env.is_main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def broadcast_from_main(obj, env: DistEnv):
    """The main rank's `obj` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
