"""A resume with several ranks reads the checkpoint file once, on the main rank, and broadcasts
it; measured per rank with /proc/self/io rchar (read syscalls, page cache included)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import assert_bitwise_equal, free_port

from dist_train.checkpoint import checkpoint_path
from dist_train.saving import save_checkpoint
from dist_train.distributed import DistEnv
from dist_train.state import choose_resume_checkpoint


def bytes_read() -> int:
    for line in open("/proc/self/io"):
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar")


def _rank_main(rank: int, ckpt_dir: str, port: int, read_once: bool, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=4)
    try:
        env = DistEnv(rank, rank, 4, torch.device("cpu"))
        dist.barrier()
        before = bytes_read()
        checkpoint = choose_resume_checkpoint(ckpt_dir, None, env, read_once)
        read = bytes_read() - before
        torch.save({"read": read, "checkpoint": checkpoint}, f"{out}/rank_{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("read_once", [True, False])
def test_with_four_ranks_only_the_main_rank_reads_the_file(read_once, tmp_path):
    from test_checkpoint import trained_checkpoint

    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    written = trained_checkpoint(7)
    save_checkpoint(written, ckpt_dir, keep=1)
    size = checkpoint_path(ckpt_dir, 7).stat().st_size
    mp.start_processes(_rank_main, args=(str(ckpt_dir), free_port(), read_once, str(tmp_path)), nprocs=4,
                       start_method="spawn")
    results = [torch.load(tmp_path / f"rank_{rank}.pt", weights_only=True) for rank in range(4)]
    for result in results:
        assert_bitwise_equal(result["checkpoint"]["model_state_dict"], written["model_state_dict"])
    reads = [result["read"] for result in results]
    print("bytes read per rank:", reads, "file:", size)
    assert size <= reads[0] < 4 * size  # the digest check and the load
    if read_once:
        assert all(read < size // 10 for read in reads[1:]), reads
    else:
        assert all(read >= size for read in reads[1:]), reads
