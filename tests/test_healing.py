"""A dead, stopped or failing rank: detected, the last finished step saved by a survivor, the run
restarted in the job and finished bit for bit; failures counted so that a failing run stops."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import (REPO, SMALL_RUN, Launch, alive, assert_same_training_state, newest_checkpoint,
                      process_tree, run, signal_all)
from dist_train import exits, healing
from dist_train.errors import SaveFailedError, UserError
from dist_train.watchdog import AGREEING, COMPUTING, LOADING, Beat, Seen, find_fault


def seen(count_age: float, step: int, phase: str, phase_since: float, now: float = 100.0) -> Seen:
    return Seen(Beat(1, step, phase, phase_since), count_changed=now - count_age)


def test_a_silent_rank_is_named_with_what_it_was_doing():
    peers = [seen(1, 7, COMPUTING, 30), seen(65, 7, LOADING, 0.5)]
    assert find_fault(peers, 100.0, timeout=60) == \
        "rank 1 does not respond: no heartbeat for 65 s, last seen at step 7 loading a batch"


def test_a_hung_rank_is_told_from_the_ranks_waiting_for_it():
    peers = [seen(1, 7, COMPUTING, 70), seen(1, 7, LOADING, 71), seen(1, 7, AGREEING, 69)]
    assert find_fault(peers, 100.0, timeout=60) == "rank 1 hangs: step 7, loading a batch for 71 s"
    assert find_fault([seen(1, 7, COMPUTING, 70), seen(1, 7, COMPUTING, 70)], 100.0, 60).count("hangs") == 2


def test_a_healthy_run_has_no_fault():
    assert find_fault([seen(2, 7, COMPUTING, 59), seen(4, 8, LOADING, 1)], 100.0, timeout=60) is None


def test_failures_are_counted_until_an_epoch_completes(tmp_path):
    assert healing.count_launch(tmp_path, next_epoch=0, max_failures=2) == 0  # this launch
    assert healing.count_launch(tmp_path, 0, 2) == 1  # the first one died without a word
    with pytest.raises(healing.TooManyFailures, match="2 launches in a row failed"):
        healing.count_launch(tmp_path, 0, 2)
    assert healing.count_launch(tmp_path, next_epoch=1, max_failures=2) == 0  # progress since: reset
    healing.end_launch_cleanly(tmp_path)  # a requeue or a stop is not a failure
    assert healing.count_launch(tmp_path, 1, 2) == 0
    healing.record_epoch_done(tmp_path, next_epoch=2)
    assert healing.count_launch(tmp_path, 2, 2) == 1


@pytest.mark.parametrize("text", ['[1, 2]', '{"epoch": 0, "failures": "9"}', '{"epoch": 0, "failures": -5}',
                                  '{"epoch": 0, "failures": true}', "not json", ""])
def test_a_damaged_failure_record_counts_as_none(tmp_path, text):
    """RUN_DIR/failures.json is a file anyone can edit: what is not a count is no count, not a
    TypeError at start (nor a negative count that would never stop a failing run)."""
    (tmp_path / healing.FAILURES_FILE).write_text(text)
    assert healing.count_launch(tmp_path, next_epoch=0, max_failures=2) == 0
    assert healing.count_launch(tmp_path, next_epoch=0, max_failures=2) == 1


def test_a_failure_record_that_cannot_be_written_is_a_failed_save(tmp_path):
    (tmp_path / healing.FAILURES_FILE).mkdir()
    with pytest.raises(SaveFailedError, match=f"^could not write {tmp_path / healing.FAILURES_FILE}: Is a directory$"):
        healing.count_launch(tmp_path, next_epoch=0, max_failures=2)
    assert [p.name for p in tmp_path.iterdir()] == [healing.FAILURES_FILE]  # no temp file left


def test_the_relaunch_loop_stops_on_every_code_a_relaunch_would_not_change():
    script = (REPO / "slurm" / "relaunch.sh").read_text()
    stops = {int(code) for code in re.search(r"\n\s+([\d|]+)\) exit", script).group(1).split("|")}
    assert stops == exits.PERMANENT | {exits.COMPLETE, exits.STOPPED, exits.INTERRUPTED, exits.TERMINATED}
    assert exits.PEER_FAILED not in stops and exits.CRASH not in stops


def test_the_relaunch_loop_bound_must_be_a_number(tmp_path):
    """MAX_RELAUNCHES=ten was bash arithmetic on an unset name (0): one failure and it gave up,
    silently; a value like 'a[$(cmd)]' would even run cmd. Now refused; a number bounds the loop."""
    count = tmp_path / "count"
    step = f"echo x >> {count}; exit 1"
    for bad in ("ten", "a[$(touch {0})]".format(tmp_path / "ran"), "-1"):
        result = subprocess.run(["bash", str(REPO / "slurm" / "relaunch.sh"), "bash", "-c", step],
                                env=dict(os.environ, MAX_RELAUNCHES=bad), capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and "MAX_RELAUNCHES" in result.stderr and not count.exists(), (bad, result)
    assert not (tmp_path / "ran").exists()
    result = subprocess.run(["bash", str(REPO / "slurm" / "relaunch.sh"), "bash", "-c", step],
                            env=dict(os.environ, MAX_RELAUNCHES="1"), capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and count.read_text() == "x\nx\n" and "giving up" in result.stderr


def test_fault_injection_is_refused_when_malformed():
    assert healing.parse_fault("kill@1:7") == ("kill", 1, 7)
    with pytest.raises(UserError, match="raise|kill|stop@RANK:STEP"):  # one line, exit 2
        healing.parse_fault("explode@1:7")


# (a) SIGKILL, (b) SIGSTOP, (c) an exception, of rank 1 after step 7 of 24, under torchrun
# --max-restarts=1. A periodic checkpoint is written every 5 steps, so resuming from step 7 (not
# 5) proves the survivor's save: no step is trained twice.
@pytest.mark.parametrize("kind", ["kill", "stop", "raise"])
def test_a_failed_rank_costs_no_step_under_torchrun(kind, reference_ws2, session_dir):
    run_dir = session_dir / f"heal_{kind}"
    args = SMALL_RUN + ["--run-dir", str(run_dir), "--hang-timeout", "10"]
    launch = Launch(args, session_dir / f"heal_{kind}.log", nproc=2, torchrun_flags=["--max-restarts=1"],
                    env_extra={healing.FAULT_VARIABLE: f"{kind}@1:7"})
    launch.wait_for(r"injecting fault", timeout=180)
    fault_at = time.monotonic()
    launch.wait_for(r"resuming from .*step_000000007\.pt", timeout=240)
    launch.wait_for(r"epoch 0 step 8 batch", timeout=120)
    recovery = time.monotonic() - fault_at
    assert launch.wait(timeout=240) == 0, launch.output()[-3000:]
    out = launch.output()
    assert "of the last finished step after the fault" in out, out[-3000:]
    trained = [int(s) for s in re.findall(r"epoch \d+ step (\d+) batch", out)]
    assert len(trained) - len(set(trained)) == 0, "a step was trained twice"
    assert_same_training_state(newest_checkpoint(run_dir), newest_checkpoint(reference_ws2))
    print(f"\n{kind}: fault to the first step after recovery {recovery:.0f} s, 0 steps trained twice")


def test_a_suspended_job_goes_on_without_a_fault(reference_ws2, session_dir):
    """The whole job stopped, then continued (`scontrol suspend`/`resume`, gang scheduling with
    PreemptMode=SUSPEND, SIGSTOP/SIGCONT by hand) for longer than --hang-timeout: the clocks ran on
    while no rank ran, so at the continue each rank found the others silent for that long (before:
    "rank 1 does not respond: no heartbeat for 15 s", a survivor's save, exit 76 on every rank: a
    restart spent, counted towards --max-failures). A watchdog that finds that it did not run
    itself discounts that time; the training goes on and ends bit for bit."""
    run_dir = session_dir / "suspended"
    launch = Launch(SMALL_RUN + ["--run-dir", str(run_dir), "--hang-timeout", "5"], session_dir / "suspended.log",
                    nproc=2, env_extra={healing.FAULT_VARIABLE: "slow@0:300"})  # 24 steps of 300+ ms
    launch.wait_for(r"epoch 0 step 4 batch", timeout=180)
    tree = process_tree(launch.proc.pid)
    signal_all(tree, signal.SIGSTOP)
    time.sleep(15)  # 3 x --hang-timeout
    signal_all(tree, signal.SIGCONT)
    assert launch.wait(timeout=240) == 0, launch.output()[-3000:]
    out = launch.output()
    assert "does not respond" not in out and " hangs" not in out, out[-3000:]
    trained = [int(s) for s in re.findall(r"epoch \d+ step (\d+) batch", out)]
    assert trained == list(range(1, 25)), trained
    assert_same_training_state(newest_checkpoint(run_dir), newest_checkpoint(reference_ws2))


def test_a_rank_wedged_by_its_loader_workers_is_restarted_and_its_workers_do_not_hold_the_run(reference_ws2,
                                                                                                session_dir):
    """A DataLoader worker that never answers (seen here: forked while another thread was
    starting or ending, it deadlocked inside os.fork, CPython 3.11.7's gh-112275; also a worker
    stuck in I/O) wedges its rank: the watchdog ends the rank for a restart. But the worker shares
    the run directory's lock (forked children share the flock's open file description) and
    outlived the rank: the restart's main rank found the run directory "in use by PID n" (n dead),
    exit 2, the run over. Stopped workers stand in for wedged ones here. A rank that ends at once
    now drops the lock for its children too, and kills them."""
    run_dir = session_dir / "wedged_workers"
    args = SMALL_RUN + ["--run-dir", str(run_dir), "--hang-timeout", "5", "--data-path", "loader", "--no-async-save"]
    launch = Launch(args, session_dir / "wedged_workers.log", nproc=2, torchrun_flags=["--max-restarts=1"])
    launch.wait_for(r"epoch 0 step 3 batch", timeout=180)
    rank0 = _rank_zero(launch)
    workers = [pid for pid in process_tree(rank0) if pid != rank0]
    assert len(workers) == 2, workers  # --num-workers 2, no writer process (--no-async-save)
    signal_all(workers, signal.SIGSTOP)
    try:
        assert launch.wait(timeout=300) == 0, launch.output()[-3000:]
        left = [pid for pid in workers if alive(pid)]  # the rank's doing, not the cleanup's
    finally:
        signal_all(workers, signal.SIGKILL)
    assert not left, "the wedged workers outlived their rank"
    out = launch.output()
    assert "rank 0 hangs: step" in out and "loading a batch" in out, out[-3000:]
    assert "is in use by" not in out, out[-3000:]
    assert_same_training_state(newest_checkpoint(run_dir), newest_checkpoint(reference_ws2))


def test_a_killed_rank_takes_its_loader_workers_with_it_and_leaves_the_run_directory_free(reference_ws1,
                                                                                         session_dir):
    """A rank SIGKILLed (the OOM killer, a kill -9; nothing of the rank runs) left its loader
    workers behind, holding the run directory's lock (forked children share the flock): a stuck or
    stopped one for ever, an idle one until DataLoader's own parent check (every 5 s). The relaunch
    found the run directory "in use by PID n", n dead, and exited 2. Workers now die with their
    rank (PR_SET_PDEATHSIG) and drop their copy of the lock as they start."""
    run_dir = session_dir / "killed_with_workers"
    args = SMALL_RUN + ["--run-dir", str(run_dir), "--data-path", "loader", "--no-async-save"]
    launch = Launch(args, session_dir / "killed_with_workers.log")
    launch.wait_for(r"epoch 0 step 7 batch", timeout=180)
    workers = [pid for pid in process_tree(launch.proc.pid) if pid != launch.proc.pid]
    assert len(workers) == 2, workers  # --num-workers 2, no writer process (--no-async-save)
    signal_all(workers, signal.SIGSTOP)
    try:
        # A worker that cannot take a signal (in uninterruptible I/O) must not hold the lock either.
        holders = [pid for pid in [launch.proc.pid, *workers] if str(run_dir / ".lock") in _open_files(pid)]
        assert holders == [launch.proc.pid], holders
        launch.proc.kill()
        launch.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [pid for pid in workers if alive(pid)]
        relaunch = run(args, timeout=300, check=False)
    finally:
        signal_all(workers, signal.SIGKILL)
    assert not left, "the workers outlived their rank"
    assert relaunch.returncode == 0 and "is in use by" not in relaunch.stdout, relaunch.stdout[-3000:]
    assert_same_training_state(newest_checkpoint(run_dir), newest_checkpoint(reference_ws1))


def _open_files(pid: int) -> list[str]:
    files = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            files.append(os.readlink(fd))
        except OSError:  # closed meanwhile
            pass
    return files


def _rank_zero(launch: Launch) -> int:
    """The PID of the launch's rank 0: the agent's child whose environment says RANK=0."""
    for pid in process_tree(launch.proc.pid):
        try:
            parent = int(Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[1])
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if parent == launch.proc.pid and b"RANK=0" in environ:
            return pid
    raise AssertionError("no rank 0 found")


@pytest.mark.parametrize("flags, message", [
    (["--hang-timeout", "nan"], "--hang-timeout must be a finite number"),
    (["--hang-timeout", "inf"], "--hang-timeout must be a finite number"),
    (["--hang-timeout", "-1"], "--hang-timeout must not be negative"),
    (["--max-failures", "-1"], "--max-failures must not be negative"),
    (["--max-failures", "two"], "invalid int value"),
])
def test_careless_healing_flags_are_one_line_errors(flags, message, tmp_path):
    from dist_train.config import UserError, parse_config

    with pytest.raises(UserError, match=message):
        parse_config(flags + ["--run-dir", str(tmp_path / "run")], environ={})
    assert not (tmp_path / "run").exists()
