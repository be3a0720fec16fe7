"""torchrun faults: SIGTERM to the agent saves and exits; a killed worker under --max-restarts
resumes. Both end bit for bit where the uninterrupted run ends."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from conftest import SMALL_RUN, TRAIN, Launch, assert_same_training_state, newest_checkpoint, process_tree, run

from dist_train import exits, healing


def worker_pid(agent_pid: int, rank: int) -> int:
    """The pid of torchrun's worker process of `rank`, not one of its DataLoader workers (which
    inherit the same environment but have the rank process as parent)."""
    def has_rank(pid: int) -> bool:
        try:
            return f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            return False

    for pid in process_tree(agent_pid)[1:]:
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        if has_rank(pid) and not has_rank(ppid):
            return pid
    raise AssertionError(f"no worker of rank {rank} under {agent_pid}")


def test_sigterm_to_torchrun_saves_then_resume_is_exact(reference_ws2, session_dir):
    run_dir = session_dir / "sigterm_ws2"
    args = SMALL_RUN + ["--save-every-steps", "0", "--stop-check-every-steps", "2", "--run-dir", str(run_dir)]
    launch = Launch(args, session_dir / "sigterm_ws2.log", nproc=2)
    launch.wait_for(r"step 4 batch")
    os.kill(launch.proc.pid, signal.SIGTERM)  # the torchrun agent forwards it to its workers
    launch.wait(timeout=120)
    out = launch.output()
    assert "stop requested by SIGTERM" in out, out[-3000:]
    stopped = newest_checkpoint(run_dir)
    assert stopped["next_batch"] != 0 and stopped["global_step"] > 4  # mid-epoch: no periodic saves here
    assert "requeueing" not in out

    resumed = run(args, nproc=2).stdout
    assert "resuming from" in resumed and "training complete" in resumed
    assert_same_training_state(newest_checkpoint(run_dir), newest_checkpoint(reference_ws2))


def test_killed_worker_under_max_restarts_resumes_and_finishes(reference_ws2, session_dir):
    run_dir = session_dir / "restart_ws2"
    args = SMALL_RUN + ["--run-dir", str(run_dir)]
    launch = Launch(args, session_dir / "restart_ws2.log", nproc=2, torchrun_flags=["--max-restarts=1"])
    launch.wait_for(r"step 7 batch")  # after the checkpoint of step 5
    os.kill(worker_pid(launch.proc.pid, rank=1), signal.SIGKILL)
    assert launch.wait(timeout=240) == 0, launch.output()[-3000:]
    out = launch.output()
    assert "resuming from" in out and "training complete" in out, out[-3000:]
    assert_same_training_state(newest_checkpoint(run_dir), newest_checkpoint(reference_ws2))


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGUSR2])
def test_a_signal_during_start_up_is_kept_and_acted_on_at_the_first_step(tmp_path, sig):
    """SIGUSR2 as SIGUSR1 (submitit's --signal=USR2@90): its default action killed the rank, unsaved."""
    run_dir = tmp_path / "run"
    launch = Launch(SMALL_RUN + ["--run-dir", str(run_dir)], tmp_path / "startup.log")
    time.sleep(1.0)  # the handler is in place within milliseconds; torch takes seconds to import
    assert "step 1 batch" not in launch.output()
    os.kill(launch.proc.pid, sig)
    assert launch.wait(timeout=120) == exits.STOPPED  # saved, not requeued: not a finished run
    out = launch.output()
    assert f"stop requested by {sig.name}" in out and "outside a SLURM job" in out, out[-3000:]
    assert newest_checkpoint(run_dir)["global_step"] == 1


# torchrun's entry point for the test below: rank 1 runs launch/train.py with other flags, or with
# another thread count, as a node that read another config file or has other software would.
RANK_1_DIFFERS = """
import os, runpy, sys
sys.argv = sys.argv[1:]  # launch/train.py and its flags
if os.environ["RANK"] == "1":
    sys.argv += os.environ["RANK_1_FLAGS"].split()
    if os.environ.get("RANK_1_THREADS"):
        import torch
        torch.set_num_threads(int(os.environ["RANK_1_THREADS"]))
    if os.environ.get("RANK_1_CODE"):  # a node with another copy of the code
        import dist_train.state
        dist_train.state.code_digest = lambda: os.environ["RANK_1_CODE"]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("flags, threads, code, named", [
    ("--lr 0.02", "", "", "lr: 0.01 on rank 0, 0.02 on rank 1"),
    ("", "2", "", "thread count (torch.get_num_threads): 1 on rank 0, 2 on rank 1"),
    ("", "", "0123456789abcdef", "'0123456789abcdef' on rank 1"),  # code_digest: a stale copy on its node
])
def test_a_rank_that_runs_with_other_settings_than_the_main_rank_is_refused(tmp_path, flags, threads, code, named):
    """Each rank parses its own command line, config file and environment. A rank with another lr
    (a node that read another copy of the config file) trained its replica with it, silently: DDP
    averages gradients, not weights, and only the main rank's weights are saved. A rank with
    another thread count computes other bits, and the checkpoint records the main rank's alone."""
    script = tmp_path / "rank_1_differs.py"
    script.write_text(RANK_1_DIFFERS)
    run_dir = tmp_path / "run"
    args = [str(TRAIN), *SMALL_RUN, "--num-workers", "0", "--run-dir", str(run_dir)]
    rank_1 = {"RANK_1_FLAGS": flags, "RANK_1_THREADS": threads, "RANK_1_CODE": code}
    out = run(args, nproc=2, script=script, check=False, env_extra=rank_1)
    # torchrun exits 1 when a worker fails, and reports the workers' exit code
    assert out.returncode == 1 and f"(exitcode: {exits.USER_ERROR})" in out.stdout, out.stdout[-3000:]
    (line,) = [line for line in out.stdout.splitlines() if line.startswith("error:")]
    assert "rank 1 of 2 does not run with the main rank's settings" in line and named in line, line
    # torchrun's failure summary shows the line (each rank's error file), not a link to its docs
    assert out.stdout.count(f"traceback : {line}") == 2 and "To enable traceback" not in out.stdout, out.stdout[-3000:]
    assert not list((run_dir / "checkpoints").glob("step_*")) and not (run_dir / "config.json").exists()


# torchrun's entry point for the test below: rank 1 dies at start-up, at the first collective.
RANK_1_DIES_AT_START = """
import os, runpy, sys
sys.argv = sys.argv[1:]
if os.environ["RANK"] == "1":
    import dist_train.train
    dist_train.train.check_ranks_agree = lambda *args: os._exit(9)
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_rank_that_dies_at_start_up_is_one_line_on_the_others_not_a_traceback(tmp_path):
    """In the loop a peer's death is a survivor's save and exit 76; before it (and after it) the
    collective's RuntimeError was a traceback on the other ranks, exit 1 (a crash) under srun."""
    script = tmp_path / "rank_1_dies.py"
    script.write_text(RANK_1_DIES_AT_START)
    run_dir = tmp_path / "run"
    out = run([str(TRAIN), *SMALL_RUN, "--num-workers", "0", "--run-dir", str(run_dir)], nproc=2, script=script,
              check=False)
    # (torchrun's own traceback, of its ChildFailedError, stays: rank 1 exited 9)
    assert "[rank0]: Traceback" not in out.stdout and "RuntimeError" not in out.stdout, out.stdout[-3000:]
    (line,) = [line for line in out.stdout.splitlines() if line.startswith("error:")]
    assert "another rank went away outside the training loop" in line and healing.peer_failure(Exception(line)), line
    assert not list((run_dir / "checkpoints").glob("step_*"))


def test_the_error_line_goes_into_torchruns_error_file_and_never_over_another_file(tmp_path):
    """torchrun's agent reads the file it named in TORCHELASTIC_ERROR_FILE; the line is its message.
    A file that exists already (the variable set by hand) is left as it was."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from dist_train.distributed import tell_torchrun

    path = tmp_path / "error.json"
    line = "error: --lr must be positive"
    tell_torchrun(line, {"TORCHELASTIC_ERROR_FILE": str(path)})
    assert ProcessFailure(local_rank=0, pid=1, exitcode=exits.USER_ERROR, error_file=str(path)).message == line
    other = tmp_path / "precious"
    other.write_text("keep")
    tell_torchrun(line, {"TORCHELASTIC_ERROR_FILE": str(other)})
    assert other.read_text() == "keep"
    tell_torchrun(line, {})  # not under torchrun: nothing to do


FINALIZED = """
import atexit, os, runpy, sys, threading, time
class Finalized:  # says so when the interpreter finalizes, as gloo's threads' tensors are released then
    def __del__(self):
        os.write(2, b"finalized\\n")
KEEP = Finalized()
threading.Thread(target=lambda: (time.sleep(0.3), print("thread done"))).start()
atexit.register(print, "atexit ran")
sys.stdout.write("buffered, ")
from dist_train import processes
if sys.argv[1] == "after-a-process-group":
    processes.finalizing_is_unsafe()
    processes.leave(7)
if sys.argv[1] == "single-process":
    processes.leave(7)
sys.argv = sys.argv[2:]
runpy.run_module("dist_train", run_name="__main__") if sys.argv[0] == "-m" else runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_after_a_process_group_the_entry_points_exit_without_finalizing_the_interpreter(tmp_path):
    """A gloo worker thread that frees a tensor of the last collective while the interpreter
    finalizes aborts it (SIGABRT, exit 134 after a complete run: 2 processes in 66 of a two-rank
    save-and-teardown loop here). leave() is then sys.exit without the finalization: threads
    joined, atexit handlers run, output flushed, the code kept; launch/train.py and dist-train end
    with it. A single process exits as usual (a SystemExit, for callers that run it in-process)."""
    import subprocess
    import sys

    from conftest import REPO, python_env

    script = tmp_path / "finalized.py"
    script.write_text(FINALIZED)

    def output(*args: str) -> tuple[int, str]:
        done = subprocess.run([sys.executable, str(script), *args], env=python_env() | {"PYTHONUNBUFFERED": ""},
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        return done.returncode, done.stdout + done.stderr

    assert output("after-a-process-group") == (7, "buffered, thread done\natexit ran\n")
    assert output("single-process") == (7, "buffered, thread done\natexit ran\nfinalized\n")  # the probe tells
    for entry_point in ([str(TRAIN), "--lr", "-1"], ["-m", "dist_train", "list", str(tmp_path / "none")]):
        code, out = output("entry", *entry_point)
        assert code == exits.USER_ERROR and "error:" in out and "atexit ran" in out and "finalized" in out, \
            (entry_point, out)
    two_ranks = run(["entry", str(TRAIN), "--dataset", "fake", "--fake-size", "64", "--batch-size", "16", "--epochs", "1",
                     "--num-workers", "0", "--no-eval", "--run-dir", str(tmp_path / "run")], nproc=2, script=script)
    assert two_ranks.stdout.count("atexit ran") == 2 and "training complete" in two_ranks.stdout, two_ranks.stdout[-3000:]
    assert "finalized" not in two_ranks.stdout, two_ranks.stdout[-3000:]


def test_only_a_permanent_code_goes_into_relaunch_shs_file_and_never_over_another_file(tmp_path):
    from dist_train.distributed import tell_relaunch

    path = tmp_path / "exit"
    tell_relaunch(exits.PEER_FAILED, {"DIST_TRAIN_EXIT_FILE": str(path)})  # a relaunch resumes from it
    assert not path.exists()
    tell_relaunch(exits.USER_ERROR, {"DIST_TRAIN_EXIT_FILE": str(path)})
    tell_relaunch(exits.DIVERGED, {"DIST_TRAIN_EXIT_FILE": str(path)})  # another rank's: the first stays
    assert path.read_text() == "2\n"
    tell_relaunch(exits.USER_ERROR, {})  # not under relaunch.sh: nothing to do
