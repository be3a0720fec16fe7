"""The core promise: killed at any instant and resumed, a run ends bit for bit where the
uninterrupted run ends. Real processes, real SIGKILL of the whole process group."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import SMALL_RUN, Launch, assert_same_training_state, kill_and_resume, newest_checkpoint, run


def test_single_process_run_saves_every_5_steps_and_at_epoch_ends(reference_ws1):
    names = sorted(p.name for p in (reference_ws1 / "checkpoints").glob("step_*.pt"))
    assert names == ["step_000000040.pt", "step_000000045.pt", "step_000000048.pt"]  # --keep 3
    final = newest_checkpoint(reference_ws1)
    assert (final["epoch"], final["next_epoch"], final["next_batch"], final["global_step"]) == (1, 2, 0, 48)
    assert final["world_size"] == 1 and len(final["rng_states"]) == 1


def test_killed_single_process_run_resumes_bit_exactly(killed_ws1, reference_ws1):
    run_dir, outputs = killed_ws1
    for out in outputs[1:]:
        assert "resuming from" in out
    assert "training complete" in outputs[-1]
    assert_same_training_state(newest_checkpoint(run_dir), newest_checkpoint(reference_ws1))


def test_killed_two_rank_torchrun_resumes_bit_exactly(reference_ws2, session_dir):
    run_dir = session_dir / "killed_ws2"
    args = SMALL_RUN + ["--run-dir", str(run_dir), "--data-path", "device"]
    outputs = kill_and_resume(args, run_dir, kill_after_steps=[7, 16], nproc=2)
    assert all("resuming from" in out for out in outputs[1:])
    assert not any("[rank 1] INFO" in out for out in outputs)  # at INFO only rank 0 speaks
    final = newest_checkpoint(run_dir)
    assert final["world_size"] == 2 and len(final["rng_states"]) == 2
    assert_same_training_state(final, newest_checkpoint(reference_ws2))


@pytest.mark.parametrize("nproc,kill_after_steps", [(1, [8, 30]), (2, [7, 16])])
def test_killed_loader_path_run_resumes_to_the_same_bits_as_the_device_path(nproc, kill_after_steps, session_dir,
                                                                              request):
    """--data-path loader (2 DataLoader workers), killed and resumed, ends where an uninterrupted
    --data-path device run ends: the loader path resumes exactly, and both paths train alike."""
    reference = request.getfixturevalue(f"reference_ws{nproc}")
    run_dir = session_dir / f"killed_loader_ws{nproc}"
    args = SMALL_RUN + ["--run-dir", str(run_dir), "--data-path", "loader"]
    outputs = kill_and_resume(args, run_dir, kill_after_steps, nproc)
    assert all("resuming from" in out for out in outputs[1:])
    assert_same_training_state(newest_checkpoint(run_dir), newest_checkpoint(reference))


def test_killed_four_rank_run_resumes_bit_exactly(session_dir):
    """Four ranks on two cores: with more than two ranks the all-reduce sums in an order set by
    DDP's bucket layout, which must be the same before and after a resume. (fp32: with bf16
    autocast the gradients carry so few bits that the order rarely shows.)"""
    args = SMALL_RUN + ["--fake-size", "768", "--num-workers", "0"]
    reference = session_dir / "reference_ws4"
    assert "training complete: 2 epochs, 24 steps" in run(args + ["--run-dir", str(reference)], nproc=4).stdout
    run_dir = session_dir / "killed_ws4"
    kill_and_resume(args + ["--run-dir", str(run_dir)], run_dir, kill_after_steps=[6, 15], nproc=4)
    final = newest_checkpoint(run_dir)
    assert final["world_size"] == 4 and len(final["rng_states"]) == 4
    assert_same_training_state(final, newest_checkpoint(reference))


@pytest.fixture(scope="session")
def resnet_reference(session_dir) -> Path:
    run_dir = session_dir / "resnet_reference"
    run(RESNET_RUN + ["--run-dir", str(run_dir)])
    return run_dir


RESNET_RUN = ["--device", "cpu", "--model", "resnet18", "--dataset", "fake", "--fake-size", "96", "--batch-size",
              "8", "--epochs", "1", "--num-workers", "2", "--save-every-steps", "4", "--log-every-steps", "1",
              "--no-eval"]


@pytest.mark.parametrize("mode", ["--no-async-save", "--async-save"])
def test_kill_inside_a_save_leaves_a_loadable_checkpoint_and_resumes_bit_exactly(mode, resnet_reference,
                                                                                 session_dir):
    """resnet18's checkpoint (~90 MB with momentum) takes long enough to write that the kill is
    aimed at the instant its temp file exists: inside the save, or (--async-save) while the
    background writer writes it and training goes on."""
    args = RESNET_RUN + [mode]
    reference = resnet_reference

    run_dir = session_dir / f"resnet_killed{mode}"
    ckpt_dir = run_dir / "checkpoints"
    launch = Launch(args + ["--run-dir", str(run_dir)], session_dir / f"resnet_killed{mode}.log")
    launch.wait_for(r"saved checkpoint .*step_000000004")  # one complete checkpoint exists
    deadline = time.monotonic() + 120
    while not list(ckpt_dir.glob(".step_*.tmp")):  # the next save has begun
        assert time.monotonic() < deadline and launch.proc.poll() is None, launch.output()[-2000:]
        time.sleep(0.001)
    launch.kill()
    assert list(ckpt_dir.glob(".step_*.tmp")), "the kill should have landed inside the save"

    out = run(args + ["--run-dir", str(run_dir)]).stdout
    assert "resuming from" in out and "training complete" in out
    assert not list(ckpt_dir.glob(".*.tmp")), "the stale temp file is cleared at start-up"
    assert_same_training_state(newest_checkpoint(run_dir), newest_checkpoint(reference))
