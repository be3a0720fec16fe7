"""SLURM requeue-and-resume against real daemons (munged, slurmctld, two slurmd), with the
project's own sbatch scripts from slurm/ running the real training script on CPU."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import REPO, SMALL_RUN, assert_same_training_state, newest_checkpoint, run
from slurm_cluster import LocalSlurm, missing_binaries

# SMALL_RUN with more images (96 steps an epoch on one rank), so a signal sent at step 3 lands mid-run.
SLURM_RUN = SMALL_RUN + ["--fake-size", "1536"]
# A time-limit run long enough that USR1 lands mid-training: slurmctld checks time limits on a
# ~30 s timer and signals early rather than late, so --time=2 --signal=USR1@60 signals 30-60 s
# after the start (with --time=1 and USR1@50 it came 0-30 s after, at times before the job step
# existed, and the signal was lost). 1,250 steps of 11 ms (idle) to 35 ms (loaded) would end
# before it on an idle machine; a test-only 60 ms sleep after each step (TIME_LIMIT_PACE) makes
# them last 89-120 s wherever the suite runs: 2 to 4 runs of 30-60 s.
LONG_RUN = ["--device", "cpu", "--dataset", "fake", "--fake-size", "40000", "--batch-size", "64", "--epochs", "2",
            "--num-workers", "1", "--save-every-steps", "0", "--log-every-steps", "100", "--no-eval"]
TIME_LIMIT_PACE = "DIST_TRAIN_INJECT_FAULT=slow@0:60"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = missing_binaries()
    if missing or os.geteuid() != 0:
        reason = f"SLURM not usable here (missing: {missing or 'root'}); scripts/test.sh installs it as root"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    # Not under pytest's temp dir: munged needs every directory above its socket world-executable.
    root = Path(tempfile.mkdtemp(prefix="dist-train-slurm-"))
    cluster = LocalSlurm(root, nodes=2, cpus=4).start()
    yield cluster
    cluster.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def jobs_dir(tmp_path_factory) -> Path:
    """Where jobs are submitted from: launch/ and slurm/ as in the repository, runs/ of its own."""
    directory = tmp_path_factory.mktemp("jobs")
    for name in ("launch", "slurm"):
        (directory / name).symlink_to(REPO / name)
    return directory


def submit(slurm: LocalSlurm, jobs_dir: Path, sbatch_args: list[str], script: str, train_args: list[str],
           extra_env: str = "") -> str:
    env = f"ALL,PYTHON={sys.executable},OMP_NUM_THREADS=1,PYTHONPATH={REPO}" + (f",{extra_env}" if extra_env else "")
    return slurm.sbatch(*sbatch_args, f"--export={env}", f"slurm/{script}", *train_args, cwd=jobs_dir)


def wait_for_text(path: Path, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"no {text!r} in {path} within {timeout}s:\n" + (path.read_text()[-3000:] if path.exists() else ""))


def assert_requeued_once_and_finished(log: str) -> None:
    assert log.count("stop requested by SIGUSR1") == 1, log[-4000:]  # a second USR1 never saves twice
    assert "requeueing SLURM job" in log and "restart count 1" in log, log[-4000:]
    assert "resuming from" in log and "training complete" in log, log[-4000:]


@pytest.fixture(scope="module")
def time_limit_job(slurm, jobs_dir):
    """Submitted first, so that it runs while the other tests do: --time=2 --signal=USR1@60."""
    job = submit(slurm, jobs_dir, ["--time=2", "--signal=USR1@60", "--ntasks-per-node=1", "--cpus-per-task=1",
                                   "--output=timelimit-%j.out"],
                 "single_node.sbatch", LONG_RUN + ["--run-dir", "runs/timelimit"], extra_env=TIME_LIMIT_PACE)
    return job


@pytest.fixture(scope="module")
def reference_of_seed(tmp_path_factory):
    """Uninterrupted single-process runs of SLURM_RUN, one per seed, made when first asked for."""
    made = {}

    def reference(seed: int) -> dict:
        if seed not in made:
            run_dir = tmp_path_factory.mktemp(f"reference_seed{seed}")
            run(SLURM_RUN + ["--seed", str(seed), "--run-dir", str(run_dir)], env_extra={"OMP_NUM_THREADS": "1"})
            made[seed] = newest_checkpoint(run_dir)
        return made[seed]

    return reference


@pytest.fixture(scope="module")
def reference_ws2_slurm(tmp_path_factory) -> dict:
    """An uninterrupted 2-rank torchrun run of SLURM_RUN (torchrun sets OMP_NUM_THREADS=1 too)."""
    run_dir = tmp_path_factory.mktemp("reference_ws2_slurm")
    run(SLURM_RUN + ["--run-dir", str(run_dir)], nproc=2)
    return newest_checkpoint(run_dir)


def test_sweep_array_usr1_requeues_and_resumes_bit_exactly(slurm, jobs_dir, time_limit_job, reference_of_seed):
    (jobs_dir / "sweep.txt").write_text("# seed per task\n--seed 1\n--seed 2\n")
    # Paced (a test-only 40 ms sleep after each step, as the chain's): unpaced, task 1 once finished
    # all 192 steps in 2 s, before the signals to task 0 were sent and its own could be.
    job = submit(slurm, jobs_dir, ["--array=0-1", "--time=10", "--cpus-per-task=1", "--output=sweep-%A_%a.out"],
                 "sweep.sbatch", SLURM_RUN + ["--sweep-file", "sweep.txt"], extra_env="DIST_TRAIN_INJECT_FAULT=slow@0:40")
    for task in (0, 1):
        wait_for_text(jobs_dir / f"sweep-{job}_{task}.out", "step 3 batch")
        # As --signal=USR1@N does: to the job step (every rank and loader worker), and twice.
        slurm.scancel("--signal=USR1", f"{job}_{task}")
        slurm.scancel("--signal=USR1", f"{job}_{task}")
    slurm.wait_gone(job, timeout=240)

    for task, seed in ((0, 1), (1, 2)):
        log = (jobs_dir / f"sweep-{job}_{task}.out").read_text()
        assert_requeued_once_and_finished(log)
        resumed = newest_checkpoint(jobs_dir / "runs" / f"{job}_{task}")
        assert resumed["config"]["seed"] == seed
        assert_same_training_state(resumed, reference_of_seed(seed))


def test_chained_array_tasks_continue_one_training(slurm, jobs_dir, time_limit_job, reference_of_seed):
    # Paced (40 ms after each step, the bits unchanged): unpaced, task 1 once trained all 192 steps
    # in 7 s and ended before the USR1 sent 1 s after its "resuming from" reached it.
    job = submit(slurm, jobs_dir, ["--array=0-2%1", "--time=10", "--cpus-per-task=1", "--output=chain-%A.out"],
                 "chain.sbatch", SLURM_RUN + ["--seed", "1"], extra_env="DIST_TRAIN_INJECT_FAULT=slow@0:40")
    out = jobs_dir / f"chain-{job}.out"
    wait_for_text(out, "step 3 batch")
    slurm.scancel("--signal=USR1", f"{job}_0")  # task 0 saves and ends; task 1 continues
    wait_for_text(out, "resuming from")
    time.sleep(1.0)
    slurm.scancel("--signal=USR1", f"{job}_1")
    slurm.wait_gone(job, timeout=240)
    log = out.read_text()
    assert log.count("stop requested by SIGUSR1") == 2 and log.count("not requeueing") == 2, log[-4000:]
    assert log.count("resuming from") == 2 and log.count("training complete") == 1, log[-4000:]
    resumed = newest_checkpoint(jobs_dir / "runs" / f"chain-{job}")
    assert_same_training_state(resumed, reference_of_seed(1))


def test_a_plain_scancel_saves_the_step_it_stops_at(slurm, jobs_dir):
    """scancel without --signal (and preemption with PreemptMode=CANCEL, and the time limit) sends
    SIGTERM to the job's steps and to the batch shell at once, and SIGKILL KillWait (10 s here)
    later: the ranks must have saved by then, whatever relaunch.sh and the batch shell do."""
    job = submit(slurm, jobs_dir, ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=10",
                                   "--output=scancel-%j.out"], "single_node.sbatch", SLURM_RUN)
    out = jobs_dir / f"scancel-{job}.out"
    wait_for_text(out, "step 3 batch")
    slurm.scancel(job)
    slurm.wait_gone(job, timeout=120)
    time.sleep(1)  # the last lines of a step killed with the job
    log = out.read_text()
    assert "stop requested by SIGTERM" in log, log[-4000:]
    saved = [line for line in log.splitlines() if "saved checkpoint" in line and "stop requested by SIGTERM" in line]
    assert len(saved) == 1, log[-4000:]
    step = int(saved[0].split("step ")[-1].split(",")[0])
    assert newest_checkpoint(jobs_dir / "runs" / job)["global_step"] == step
    assert "relaunching" not in log, log[-4000:]


def test_two_node_job_requeues_and_resumes_bit_exactly(slurm, jobs_dir, time_limit_job, reference_ws2_slurm):
    job = submit(slurm, jobs_dir, ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=10",
                                   "--output=twonode-%j.out"], "multi_node.sbatch", SLURM_RUN)
    out = jobs_dir / f"twonode-{job}.out"
    wait_for_text(out, "step 3 batch")
    slurm.scancel("--signal=USR1", job)
    slurm.wait_gone(job, timeout=240)
    log = out.read_text()
    assert_requeued_once_and_finished(log)
    resumed = newest_checkpoint(jobs_dir / "runs" / job)  # the default run directory of a job
    assert resumed["world_size"] == 2
    assert_same_training_state(resumed, reference_ws2_slurm)


def test_time_limit_signal_saves_requeues_and_finishes(slurm, jobs_dir, time_limit_job):
    slurm.wait_gone(time_limit_job, timeout=600)
    log = (jobs_dir / f"timelimit-{time_limit_job}.out").read_text()
    assert "stop requested by SIGUSR1" in log and "restart count 1" in log, log[-4000:]
    # A signal agreed at the last step finishes the training in that run (no requeue), so the
    # last run always ends with "training complete", never with "is complete; nothing to do".
    assert "resuming from" in log and "training complete: 2 epochs, 1250 steps" in log, log[-4000:]
    # jobcomp records a requeued run as PENDING; the last run completes.
    states = slurm.job_states(time_limit_job)
    assert states[-1] == ":COMPLETED" and states[:-1] == [":PENDING"] * log.count("requeueing SLURM job"), states


def test_srun_torchrun_forwards_usr1_then_requeues_and_resumes_bit_exactly(slurm, jobs_dir, time_limit_job,
                                                                            reference_ws2_slurm):
    """slurm/multi_node_torchrun.sbatch: one torchrun agent per node (torchrun's variables win over
    srun's), USR1 to the whole step: the agents forward it, the ranks save, rank 0 requeues."""
    job = submit(slurm, jobs_dir, ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=10",
                                   "--output=torchrun-%j.out"], "multi_node_torchrun.sbatch", SLURM_RUN,
                 extra_env="NPROC_PER_NODE=1")
    out = jobs_dir / f"torchrun-{job}.out"
    wait_for_text(out, "step 3 batch")
    slurm.scancel("--signal=USR1", job)
    slurm.wait_gone(job, timeout=240)
    log = out.read_text()
    assert_requeued_once_and_finished(log)
    resumed = newest_checkpoint(jobs_dir / "runs" / job)
    assert resumed["world_size"] == 2
    assert_same_training_state(resumed, reference_ws2_slurm)


@pytest.fixture(scope="module")
def bound_slurm():
    """One node that binds each task to its CPUs (TaskPlugin=task/affinity), as production clusters do."""
    if missing_binaries() or os.geteuid() != 0 or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs SLURM, root and 2 CPUs")
    root = Path(tempfile.mkdtemp(prefix="dist-train-slurm-bound-"))
    cluster = LocalSlurm(root, nodes=1, cpus=2, task_plugin="task/affinity").start()
    yield cluster
    cluster.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("script", ["single_node.sbatch", "sweep.sbatch", "chain.sbatch", "multi_node.sbatch",
                                    "multi_node_torchrun.sbatch"])
def test_every_script_gives_each_rank_its_cpus_and_threads(bound_slurm, jobs_dir, script):
    """--cpus-per-task=2 on a binding cluster: each rank may run on 2 CPUs with 2 threads (srun
    does not inherit --cpus-per-task since SLURM 22.05; every script passes it on)."""
    env = f"ALL,PYTHON={sys.executable},PYTHONPATH={REPO},NPROC_PER_NODE=1"
    job = bound_slurm.sbatch("--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=2", "--time=10", "--array=0",
                             f"--output=bound-{script}-%j.out", f"--export={env}", f"slurm/{script}",
                             "--device", "cpu", "--dataset", "fake", "--fake-size", "32", "--batch-size", "16",
                             "--epochs", "1", "--num-workers", "0", "--no-eval",
                             "--run-dir", f"runs/bound-{script}", cwd=jobs_dir)
    bound_slurm.wait_gone(job, timeout=120)
    log = next(jobs_dir.glob(f"bound-{script}-*.out")).read_text()
    assert "training complete" in log, log[-3000:]
    assert "device cpu, 2 CPUs, 2 threads (OMP_NUM_THREADS=2)" in log, log[-3000:]


@pytest.mark.parametrize("kind", ["kill", "stop", "raise"])
def test_a_failed_rank_under_srun_is_relaunched_in_the_job_and_costs_no_step(slurm, jobs_dir, time_limit_job,
                                                                            reference_ws2_slurm, kind):
    """single_node.sbatch, 2 tasks: rank 1 SIGKILLed, SIGSTOPped or raising after step 7; the survivor
    saves step 7, slurm/relaunch.sh runs the step again, which resumes there and finishes."""
    job = submit(slurm, jobs_dir, ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=10",
                                   f"--output=heal-{kind}-%j.out"], "single_node.sbatch",
                 SLURM_RUN + ["--hang-timeout", "10"], extra_env=f"DIST_TRAIN_INJECT_FAULT={kind}@1:7")
    out = jobs_dir / f"heal-{kind}-{job}.out"
    wait_for_text(out, "injecting fault", timeout=180)
    fault_at = time.monotonic()
    wait_for_text(out, "resuming from", timeout=240)
    wait_for_text(out, "step 8 batch", timeout=120)
    recovery = time.monotonic() - fault_at
    slurm.wait_gone(job, timeout=300)
    log = out.read_text()
    assert "step_000000007.pt of the last finished step after the fault" in log, log[-4000:]
    assert "relaunch.sh: the job step failed" in log and "training complete" in log, log[-4000:]
    resumed = newest_checkpoint(jobs_dir / "runs" / job)
    assert_same_training_state(resumed, reference_ws2_slurm)
    assert slurm.job_states(job)[-1] == ":COMPLETED", slurm.job_states(job)
    print(f"\nsrun {kind}: fault to the first step after recovery {recovery:.0f} s, 0 steps trained twice")


def test_a_user_error_under_srun_torchrun_is_not_relaunched(slurm, jobs_dir):
    """torchrun exits 1 whatever its ranks exited with, so relaunch.sh relaunched a bad flag as a
    crash: MAX_RELAUNCHES times, each with torchrun's own --max-restarts. The ranks write their
    permanent code into relaunch.sh's DIST_TRAIN_EXIT_FILE; the step ends with it, at once."""
    job = submit(slurm, jobs_dir, ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=10",
                                   "--output=usererror-%j.out"], "multi_node_torchrun.sbatch",
                 SLURM_RUN + ["--lr", "-1"], extra_env="NPROC_PER_NODE=1,MAX_RELAUNCHES=2")
    slurm.wait_gone(job, timeout=300)
    log = (jobs_dir / f"usererror-{job}.out").read_text()
    assert "error: --lr must be positive, got -1.0" in log, log[-4000:]
    assert "relaunching it" not in log and "a rank exited 2" in log and "not relaunching" in log, log[-4000:]
    assert slurm.job_states(job) == [":FAILED"], slurm.job_states(job)
    assert not list(jobs_dir.glob(".dist_train-exit.*"))
