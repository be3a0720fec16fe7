"""Two real gloo ranks: only rank 0 writes, and the checkpoint holds each rank's RNG state."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dist_train.checkpoint import load_checkpoint
from dist_train.distributed import DistEnv, teardown
from dist_train.loop import build_scheduler
from dist_train.models import Net
from dist_train.rng import capture_rng_state
from dist_train.state import Progress, Training, save_training_state


def _rank_main(rank: int, tmp: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    env = DistEnv(rank, rank, 2, torch.device("cpu"))
    try:
        torch.manual_seed(100 + rank)  # distinct streams per rank
        model = Net()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        training = Training(model, optimizer, build_scheduler(optimizer, "constant", 1))
        torch.save(capture_rng_state(env.device), f"{tmp}/rng_{rank}.pt")
        # Each rank is handed its own directory: only rank 0's may receive a file.
        os.makedirs(f"{tmp}/ckpt_{rank}")
        path = save_training_state(f"{tmp}/ckpt_{rank}", 2, training, Progress(global_step=3),
                                   float(rank), {}, env)
        assert (path is not None) == (rank == 0)
    finally:
        teardown(env)  # as the training ends


def test_only_rank_zero_writes_and_every_rank_rng_is_gathered(tmp_path):
    from conftest import assert_bitwise_equal, free_port

    mp.start_processes(_rank_main, args=(str(tmp_path), free_port()), nprocs=2, start_method="spawn")
    assert not list((tmp_path / "ckpt_1").iterdir())
    checkpoint = load_checkpoint(tmp_path / "ckpt_0" / "step_000000003.pt")
    assert checkpoint["world_size"] == 2 and checkpoint["loss"] == 0.5  # mean over ranks of 0 and 1
    for rank in (0, 1):
        assert_bitwise_equal(checkpoint["rng_states"][rank],
                             torch.load(tmp_path / f"rng_{rank}.pt", weights_only=True))
