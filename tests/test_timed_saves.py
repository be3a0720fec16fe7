"""--save-every-minutes: the main rank's clock decides, the stop agreement carries it, so every
rank enters the (collective) save at the same step; a run with timed saves resumes bit for bit.
The agreement's own pace: every --stop-check-every-steps steps, more often where steps are slow."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import SMALL_RUN, assert_same_training_state, free_port, kill_and_resume, newest_checkpoint

from dist_train.distributed import DistEnv
from dist_train.preemption import NONE, TERMINATE, StopAgreement


def _on_rank(rank: int, body, tmp: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.save(body(DistEnv(rank, rank, 2, torch.device("cpu"))), f"{tmp}/result_{rank}.pt")
    finally:
        dist.destroy_process_group()


def on_two_ranks(body, tmp_path) -> list:
    """body(env) on two real gloo ranks (spawned processes); what each rank returned."""
    mp.start_processes(_on_rank, args=(body, str(tmp_path), free_port()), nprocs=2, start_method="spawn")
    return [torch.load(tmp_path / f"result_{rank}.pt") for rank in (0, 1)]


def _steps_with_a_timed_save(env: DistEnv) -> list[int]:
    agreement = StopAgreement(env, every=2)
    saved_at = []
    for step in range(1, 30):
        due = env.rank == 0 and step in (3, 4, 11)  # only the main rank's clock counts
        if agreement.poll(NONE, save_due=due).save_due:
            saved_at.append(step)
    agreement.close()
    return saved_at


def test_every_rank_learns_of_a_timed_save_at_the_same_step(tmp_path):
    saved_at = on_two_ranks(_steps_with_a_timed_save, tmp_path)
    assert saved_at[0] == saved_at[1]
    assert saved_at[0] == [6, 14]  # sent at the agreement of steps 4 and 12, read 2 steps later


def test_a_two_rank_run_with_timed_saves_resumes_bit_exactly(reference_ws2, tmp_path):
    run_dir = tmp_path / "run"
    args = SMALL_RUN + ["--run-dir", str(run_dir), "--data-path", "device", "--save-every-steps", "0",
                        "--save-every-minutes", "0.0001", "--stop-check-every-steps", "1"]
    outputs = kill_and_resume(args, run_dir, kill_after_steps=[9], nproc=2)
    assert "timed)" in outputs[0] and "resuming from" in outputs[1]
    resumed_from = int(outputs[1].split("resuming from")[1].split("step_")[1][:9])
    assert 0 < resumed_from < 12  # a timed save mid-epoch 0 (no periodic saves in this run)
    assert_same_training_state(newest_checkpoint(run_dir), newest_checkpoint(reference_ws2))


# (seconds a step on the main rank's clock, --stop-check-every-steps): the step at which a SIGTERM
# that rank 1 got at step 20 is agreed on. Fast steps: the agreements of steps 12, 22, 32 (sent at
# 22, read at 32). 3 s a step: one agreement a step, as 10 steps would take 30 s (it took 30 s
# more before, past torchrun's and SLURM's 30 s of grace). 1 s a step: every 5 steps, however
# many the flag allows (10**12 overflowed the int32 it is sent as).
PACES = [(0.001, 10, 32), (3.0, 10, 21), (1.0, 10**12, 27)]


def _steps_to_a_stop_at_each_pace(env: DistEnv) -> list[int]:
    stopped = []
    for step_s, every, _ in PACES:
        now = [0.0]
        agreement = StopAgreement(env, every=every, within_s=5.0,
                                  clock=lambda: now[0] if env.rank == 0 else 1e9)  # the main rank's counts
        stop = None
        for step in range(1, 45):
            now[0] = step * step_s
            request = TERMINATE if env.rank == 1 and step >= 20 else NONE
            if agreement.poll(request).request != NONE and stop is None:
                stop = step
        agreement.close()
        stopped.append(stop)
    return stopped


def test_slow_steps_are_agreed_on_more_often_so_a_stop_comes_within_seconds(tmp_path):
    stopped = on_two_ranks(_steps_to_a_stop_at_each_pace, tmp_path)
    assert stopped[0] == stopped[1] == [expected for _, _, expected in PACES]
