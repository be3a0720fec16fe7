"""Faults other than SIGKILL end cleanly, with real processes: divergence, a second launch on the
same run directory, a full disk, a vanished run directory, Ctrl-C, a killed torchrun agent,
odd files in checkpoints/."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import torch

from conftest import (REPO, SMALL_RUN, Launch, assert_same_training_state, launch_command, newest_checkpoint,
                      process_tree, python_env, run)

from dist_train import exits
from dist_train.checkpoint import list_checkpoints

TINY = ["--dataset", "fake", "--fake-size", "64", "--batch-size", "16", "--num-workers", "0",
        "--log-every-steps", "1", "--no-eval"]  # 4 steps an epoch


def error_lines(out: str) -> list[str]:
    assert "Traceback" not in out, out[-3000:]
    return [line for line in out.splitlines() if line.startswith("error:")]


def test_divergence_stops_before_saving_and_keeps_the_finite_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    args = TINY + ["--epochs", "3", "--save-every-steps", "1", "--keep", "2", "--lr", "1e4",
                   "--lr-schedule", "constant", "--run-dir", str(run_dir)]
    result = run(args, check=False)
    assert result.returncode == exits.DIVERGED, result.stdout[-3000:]
    (line,) = error_lines(result.stdout)
    assert "diverged" in line and "by step 3" in line
    paths = list_checkpoints(run_dir / "checkpoints")
    assert [p.name for p in paths] == ["step_000000002.pt", "step_000000001.pt"]
    for path in paths:
        checkpoint = torch.load(path, weights_only=True)
        assert all(torch.isfinite(t).all() for t in checkpoint["model_state_dict"].values())


def test_a_second_launch_on_a_run_directory_in_use_exits_at_once(tmp_path):
    run_dir = tmp_path / "run"
    args = TINY + ["--epochs", "200", "--run-dir", str(run_dir)]
    first = Launch(args, tmp_path / "first.log")
    first.wait_for(r"step 2 batch")
    second = run(args, check=False)
    assert second.returncode == exits.USER_ERROR
    (line,) = error_lines(second.stdout)
    assert f"is in use by PID {first.proc.pid} on host " in line, line
    first.kill()  # the kernel drops the dead holder's lock: the next launch takes it over
    assert (run_dir / ".lock").exists()
    third = Launch(args, tmp_path / "third.log")
    third.wait_for(r"resuming from")
    third.kill()


def _with_file_size_limit(limit: int):
    def preexec():
        # Writes past `limit` bytes fail with EFBIG, as writes to a full disk fail with ENOSPC.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


@pytest.mark.parametrize("mode", ["--async-save", "--no-async-save"])
def test_a_failed_save_removes_its_temp_file_keeps_older_checkpoints_and_says_why(mode, tmp_path):
    """A periodic save fails: written in the background (--async-save), the failure stops the run
    at the next step with the same line and exit code as a synchronous one."""
    run_dir = tmp_path / "run"
    args = TINY + ["--epochs", "1", "--keep", "2", "--run-dir", str(run_dir)]
    run(args)
    before = {p.name: p.read_bytes() for p in list_checkpoints(run_dir / "checkpoints")}
    more = args + ["--epochs", "2", "--allow-config-change", "--save-every-steps", "1", mode]
    result = subprocess.run(launch_command(more), env=python_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=300,
                            preexec_fn=_with_file_size_limit(100_000))  # a checkpoint is ~520 kB
    assert result.returncode == exits.SAVE_FAILED, result.stdout[-3000:]
    (line,) = error_lines(result.stdout)
    assert "could not save checkpoint" in line and "File too large" in line
    # the limit, not the disk: "free space" would send the user looking in the wrong place
    assert "may not write files over 0.1 MB (its file size limit, ulimit -f), and a checkpoint is ~0.5 MB" in line
    ckpt_dir = run_dir / "checkpoints"
    assert not [p for p in ckpt_dir.iterdir() if p.name.endswith(".tmp")]
    assert {p.name: p.read_bytes() for p in list_checkpoints(ckpt_dir)} == before


def test_a_failed_background_write_stops_every_rank_through_the_agreement(tmp_path):
    """2 ranks, --async-save: the save at step 40 fails in the background; the stop agreement
    carries the failure to every rank within 2 x --stop-check-every-steps, long before the next
    save (step 80) would have found it."""
    args = TINY + ["--fake-size", "2560", "--epochs", "1", "--save-every-steps", "40", "--async-save",
                   "--run-dir", str(tmp_path / "run")]  # 80 steps, one epoch: saves at 40 and at the end
    result = subprocess.run(launch_command(args, nproc=2), env=python_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=300,
                            preexec_fn=_with_file_size_limit(100_000))
    assert result.returncode != 0, result.stdout[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("error:")]  # printed by the main rank
    assert lines and all("could not save checkpoint" in line and "File too large" in line for line in lines), lines
    assert f"traceback : {lines[0]}" in result.stdout, result.stdout[-3000:]  # in torchrun's summary too
    assert "exitcode  : 4" in result.stdout or "exitcode: 4" in result.stdout, result.stdout[-3000:]
    steps = [int(step) for step in re.findall(r"step (\d+) batch", result.stdout)]
    assert 40 <= max(steps) < 80, max(steps)
    assert not list_checkpoints(tmp_path / "run" / "checkpoints")


def test_a_run_directory_that_vanishes_mid_run_stops_the_run(tmp_path):
    run_dir = tmp_path / "run"
    launch = Launch(TINY + ["--epochs", "200", "--save-every-steps", "1", "--run-dir", str(run_dir)],
                    tmp_path / "vanish.log")
    launch.wait_for(r"saved checkpoint")
    while run_dir.exists():
        shutil.rmtree(run_dir, ignore_errors=True)
    assert launch.wait(timeout=120) == exits.SAVE_FAILED, launch.output()[-3000:]
    (line,) = error_lines(launch.output())  # the checkpoint, or failures.json when an epoch ended just then
    assert "could not" in line and str(run_dir) in line and "No such file or directory" in line, line


def test_ctrl_c_saves_and_stops_then_the_resume_is_exact(reference_ws1, tmp_path):
    run_dir = tmp_path / "run"
    args = SMALL_RUN + ["--save-every-steps", "0", "--run-dir", str(run_dir)]
    launch = Launch(args, tmp_path / "sigint.log")
    launch.wait_for(r"step 3 batch")
    os.killpg(launch.proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the rank and its loader workers
    assert launch.wait(timeout=120) == exits.INTERRUPTED, launch.output()[-3000:]
    assert "stop requested by SIGINT" in launch.output()
    assert newest_checkpoint(run_dir)["next_batch"] != 0  # saved mid-epoch: no periodic saves here
    run(args)
    assert_same_training_state(newest_checkpoint(run_dir), newest_checkpoint(reference_ws1))


def test_a_stop_at_the_last_step_finishes_the_training_instead_of_requeueing(reference_ws1, tmp_path):
    """SLURM's time-limit USR1 agreed at the step that ends the training: the job would only be
    requeued to find a complete run; it evaluates and exits 0 instead, with the uninterrupted run's
    final state. SIGTERM there stops at once (the final evaluation skipped, and said so)."""
    run_dir = tmp_path / "usr1"
    fault = {"DIST_TRAIN_INJECT_FAULT": "usr1@0:48"}  # the last of SMALL_RUN's 48 steps
    out = run(SMALL_RUN + ["--run-dir", str(run_dir), "--data-path", "device"], env_extra=fault).stdout
    assert "stop requested by SIGUSR1" in out and "no requeue" in out, out[-3000:]
    assert "epoch 1 eval loss" in out and "training complete: 2 epochs, 48 steps" in out
    assert "outside a SLURM job" not in out  # no requeue was attempted
    assert_same_training_state(newest_checkpoint(run_dir), newest_checkpoint(reference_ws1))

    run_dir = tmp_path / "term"
    args = TINY[:-1] + ["--epochs", "2", "--run-dir", str(run_dir)]  # with its evaluation
    result = run(args, check=False, env_extra={"DIST_TRAIN_INJECT_FAULT": "term@0:8"})
    assert result.returncode == exits.TERMINATED, result.stdout[-3000:]
    assert "epoch 0 eval loss" in result.stdout and "epoch 1 eval loss" not in result.stdout
    assert "training complete: 2 epochs, 8 steps; the final evaluation was skipped" in result.stdout
    assert newest_checkpoint(run_dir)["next_epoch"] == 2
    assert "is complete" in run(args).stdout


def test_a_closed_terminal_saves_and_stops_then_the_resume_is_exact(reference_ws1, tmp_path):
    """A run in a terminal whose connection drops gets SIGHUP, its loader workers too (the shell
    signals the job's process group). It saves and stops as for SIGTERM, though nothing can be
    read from it any more (its output fails with EIO), and the relaunch ends bit for bit."""
    run_dir = tmp_path / "run"
    args = SMALL_RUN + ["--save-every-steps", "0", "--run-dir", str(run_dir), "--data-path", "loader"]  # workers
    pid, terminal = pty.fork()  # the child leads a new session, the pty its controlling terminal
    if pid == 0:
        os.chdir(REPO)
        os.execve(sys.executable, launch_command(args), python_env())
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a pty starts 0 wide
    seen, step_3 = b"", re.compile(rb"epoch 0: .* 3/24 ")  # on a terminal: a progress bar
    deadline = time.monotonic() + 120
    while not step_3.search(seen) and time.monotonic() < deadline:
        try:
            seen += os.read(terminal, 65536)
        except OSError:  # the child is gone
            break
    assert step_3.search(seen), seen.decode(errors="replace")[-3000:]
    os.close(terminal)  # the connection drops: the kernel hangs up the session (SIGHUP to its leader)
    os.killpg(pid, signal.SIGHUP)  # and a login shell sends its jobs SIGHUP, loader workers included
    status = wait_with_timeout(pid, 120)
    assert os.waitstatus_to_exitcode(status) == exits.TERMINATED
    assert newest_checkpoint(run_dir)["next_batch"] != 0  # saved mid-epoch: no periodic saves here
    run(args)
    assert_same_training_state(newest_checkpoint(run_dir), newest_checkpoint(reference_ws1))


def wait_with_timeout(pid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    raise AssertionError(f"process {pid} still running {timeout} s after the hang-up")


def test_a_second_ctrl_c_exits_at_once(tmp_path):
    run_dir = tmp_path / "run"
    launch = Launch(TINY + ["--epochs", "1", "--run-dir", str(run_dir)], tmp_path / "twice.log")
    time.sleep(1.0)  # the handler is in place within milliseconds; torch takes seconds to import
    # Signals that arrive while one is pending merge into one: repeat until the process is gone.
    # The first one handled asks for a save at step 1; the next one must end the process first.
    while launch.proc.poll() is None:
        os.killpg(launch.proc.pid, signal.SIGINT)
        time.sleep(0.3)
    assert launch.wait(timeout=120) == exits.INTERRUPTED
    assert "step 1 batch" not in launch.output() and not list_checkpoints(run_dir / "checkpoints")


def test_ranks_stop_when_their_torchrun_agent_is_killed(tmp_path):
    run_dir = tmp_path / "run"
    launch = Launch(SMALL_RUN + ["--epochs", "100", "--run-dir", str(run_dir)], tmp_path / "agent.log", nproc=2)
    launch.wait_for(r"step 2 batch")
    ranks_and_workers = process_tree(launch.proc.pid)[1:]
    assert len(ranks_and_workers) >= 2
    os.kill(launch.proc.pid, signal.SIGKILL)  # the agent alone, as `kill -9` of the launcher
    launch.wait(timeout=30)
    deadline = time.monotonic() + 120  # generous: without PR_SET_PDEATHSIG they train for minutes
    while [pid for pid in ranks_and_workers if _alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in ranks_and_workers if _alive(pid)], launch.output()[-2000:]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_odd_entries_in_checkpoints_neither_hang_nor_crash(tmp_path):
    run_dir = tmp_path / "run"
    args = TINY + ["--epochs", "1", "--run-dir", str(run_dir)]
    run(args)
    ckpt_dir = run_dir / "checkpoints"
    os.mkfifo(ckpt_dir / "step_000000099.pt")  # opened, it would block the reader forever
    (ckpt_dir / "step_000000098.pt").mkdir()
    out = run(args, timeout=120).stdout
    assert "run in" in out and "is complete" in out
    listing = run(["list", str(run_dir)], script=REPO / "dist_train" / "__main__.py", timeout=120).stdout
    assert "step_000000099" not in listing and "step_000000004.pt" in listing
    (ckpt_dir / "latest").unlink()
    (ckpt_dir / "latest").mkdir()
    result = run(args + ["--epochs", "2", "--allow-config-change"], check=False, timeout=120)
    assert result.returncode == exits.USER_ERROR
    (line,) = error_lines(result.stdout)
    assert "latest is a directory" in line
