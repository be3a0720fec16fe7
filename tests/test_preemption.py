"""Signal flag, requeue command, rank discovery and run directories, in-process with real signals,
real forks and a real (missing or failing) scontrol."""

from __future__ import annotations

import logging
import os
import signal

import pytest

from dist_train.config import UserError, default_run_dir, parse_config
from dist_train.distributed import discover_ranks
from dist_train import exits, preemption
from dist_train.preemption import NONE, REQUEUE, TERMINATE, StopFlag, requeue_slurm_job
from dist_train.train import main as train_main


def test_signals_set_the_strongest_request_once(restore_signals):
    flag = StopFlag().install()
    assert flag.request == NONE
    os.kill(os.getpid(), signal.SIGTERM)
    assert flag.request == TERMINATE
    os.kill(os.getpid(), signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGUSR1)  # a second signal changes nothing
    assert (flag.request, flag.signal_name) == (REQUEUE, "SIGUSR1")
    os.kill(os.getpid(), signal.SIGTERM)  # never lowers the request
    assert flag.request == REQUEUE
    flag = StopFlag().install()
    os.kill(os.getpid(), signal.SIGUSR2)  # submitit's choice: its default action would kill the rank
    assert (flag.request, flag.signal_name) == (REQUEUE, "SIGUSR2")


def test_a_forked_child_does_not_act_on_the_inherited_handler(restore_signals):
    flag = StopFlag().install()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # as a DataLoader worker would, before its worker_init_fn runs
        os.kill(os.getpid(), signal.SIGUSR1)
        os.write(write, str(flag.request).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 8) == str(NONE).encode()
    assert flag.request == NONE


def test_requeue_says_plainly_when_scontrol_is_missing_or_fails(monkeypatch, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("SLURM_JOB_ID", "12345")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol on it
    assert requeue_slurm_job(max_requeues=3) is False
    assert "scontrol not found" in caplog.text and "checkpoint is saved" in caplog.text

    failing = tmp_path / "scontrol"
    failing.write_text(f"#!/bin/sh\necho x >> {tmp_path}/calls\necho 'Invalid job id specified' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setattr(preemption, "REQUEUE_PAUSE_S", 0.0)
    caplog.clear()
    assert requeue_slurm_job(max_requeues=3) is False
    assert "scontrol requeue 12345 failed (Invalid job id specified)" in caplog.text
    assert len((tmp_path / "calls").read_text().split()) == preemption.REQUEUE_TRIES


def test_requeue_survives_a_usr1_during_scontrol_and_a_busy_controller(monkeypatch, tmp_path, caplog):
    """SLURM signals every process of the step: a second USR1 must not kill scontrol; and a
    controller that fails a call (busy: socket timed out) is asked again."""
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("SLURM_JOB_ID", "12345")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(preemption, "REQUEUE_PAUSE_S", 0.0)
    scontrol = tmp_path / "scontrol"
    scontrol.write_text("#!/bin/sh\nkill -USR1 $$\nexit 0\n")  # as the step's second USR1 would
    scontrol.chmod(0o755)
    assert requeue_slurm_job(max_requeues=3) is True
    scontrol.write_text(f"#!/bin/sh\n[ -e {tmp_path}/once ] && exit 0\n: > {tmp_path}/once\n"
                        "echo 'Socket timed out on send/recv operation' >&2\nexit 1\n")
    assert requeue_slurm_job(max_requeues=3) is True
    assert "failed (Socket timed out on send/recv operation); trying again" in caplog.text


def test_requeue_targets_the_array_task_and_stops_at_max_requeues(monkeypatch, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    recorder = tmp_path / "scontrol"
    recorder.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/args\n")
    recorder.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("SLURM_JOB_ID", "101")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "100")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert requeue_slurm_job(max_requeues=2) is True
    assert (tmp_path / "args").read_text().split() == ["requeue", "100_1"]
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert requeue_slurm_job(max_requeues=2) is False
    assert "--max-requeues 2" in caplog.text


def test_rank_discovery_torchrun_wins_over_srun():
    srun = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "0"}
    assert discover_ranks(srun) == (3, 1, 4)
    torchrun = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "29500"}
    assert discover_ranks(srun | torchrun) == (0, 0, 2)
    batch_script = {k: v for k, v in srun.items() if k != "SLURM_STEP_ID"}  # no srun: one process
    assert discover_ranks(batch_script) == (0, 0, 1)


TORCHRUN = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "29500"}
SRUN = {"SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"}


@pytest.mark.parametrize("environ, message", [
    (TORCHRUN | {"RANK": "x"}, "RANK='x' in the environment is not a whole number"),
    (TORCHRUN | {"LOCAL_RANK": "-1"}, "LOCAL_RANK='-1' in the environment is not a whole number >= 0"),
    (TORCHRUN | {"WORLD_SIZE": "0"}, "WORLD_SIZE='0' in the environment is not a whole number >= 1"),
    (TORCHRUN | {"RANK": "2"}, "RANK=2 is not below WORLD_SIZE=2"),
    ({k: v for k, v in TORCHRUN.items() if k != "MASTER_ADDR"}, "WORLD_SIZE=2 but MASTER_ADDR is not set"),
    (TORCHRUN | {"MASTER_PORT": "abc"}, "MASTER_PORT='abc' in the environment is not a whole number"),
    (TORCHRUN | {"MASTER_PORT": "70000"}, "MASTER_PORT='70000' in the environment is not a port (1 to 65535)"),
    (SRUN | {"SLURM_PROCID": "one"}, "SLURM_PROCID='one' in the environment is not a whole number"),
    (SRUN | {"SLURM_PROCID": "5"}, "SLURM_PROCID=5 is not below SLURM_NTASKS=2"),
])
def test_a_broken_launcher_environment_is_one_line_naming_the_variable(environ, message):
    with pytest.raises(UserError) as caught:
        discover_ranks(environ)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_master_port_in_use_is_one_line_not_a_traceback(tmp_path, monkeypatch, capsys, restore_signals):
    """The main rank serves the rendezvous store on MASTER_PORT (srun's: derived from the job id);
    another run or job on the host listening there was torch's DistNetworkError traceback, exit 1."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                            "MASTER_PORT": str(port)}.items():
            monkeypatch.setenv(name, value)
        assert train_main(["--dataset", "fake", "--device", "cpu", "--run-dir", str(tmp_path / "run")]) == \
            exits.USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith(f"error: MASTER_PORT={port} is in use on ") and err.count("\n") == 1, err


def test_a_master_addr_that_names_no_host_is_one_line_on_every_rank(tmp_path, monkeypatch, capsys,
                                                                     restore_signals):
    """A rank other than the main one connects to MASTER_ADDR; a name no host has was retried by
    torch for the whole 10 min timeout (a SIGTERM meanwhile only asks for a stop at a step)."""
    for name, value in {"RANK": "1", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "no-such-host.invalid",
                        "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    assert train_main(["--dataset", "fake", "--device", "cpu", "--run-dir", str(tmp_path / "run")]) == exits.USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("error: MASTER_ADDR='no-such-host.invalid' in the environment names no host") \
        and err.count("\n") == 1, err


def test_a_broken_launcher_environment_ends_a_launch_with_one_line(tmp_path, monkeypatch, capsys, restore_signals):
    monkeypatch.setenv("RANK", "x")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train_main(["--dataset", "fake", "--run-dir", str(tmp_path / "run")]) == exits.USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("error: RANK='x' in the environment") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()
    (tmp_path / "sweep.txt").write_text("--seed 1\n")
    with pytest.raises(UserError, match="SLURM_ARRAY_TASK_ID='abc' in the environment is not a whole number"):
        parse_config(["--sweep-file", str(tmp_path / "sweep.txt")], {"SLURM_ARRAY_TASK_ID": "abc"})
    with pytest.raises(UserError, match="SLURM_RESTART_COUNT='-3' in the environment is not a whole number"):
        preemption.restart_count({"SLURM_RESTART_COUNT": "-3"})


def test_run_directory_and_sweep_line_come_from_the_array_task(tmp_path):
    env = {"SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "1", "SLURM_JOB_ID": "79"}
    assert default_run_dir(env) == "runs/77_1"
    assert default_run_dir({"SLURM_JOB_ID": "79"}) == "runs/79"
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("# comment\n--seed 5 --lr 0.1\n\n--seed 6 --model resnet18\n")
    config = parse_config(["--seed", "1", "--sweep-file", str(sweep)], env)
    assert (config.seed, config.model, config.run_dir) == (6, "resnet18", "runs/77_1")
    with pytest.raises(UserError, match="array task 2 has none"):
        parse_config(["--sweep-file", str(sweep)], env | {"SLURM_ARRAY_TASK_ID": "2"})
