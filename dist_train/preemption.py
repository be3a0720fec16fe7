"""Signals -> a flag; ranks agree on when to stop; requeue through scontrol; ranks die with torchrun.

SIGUSR1 (what `#SBATCH --signal=USR1@SECONDS` sends before the time limit) asks for save and
requeue, and so does SIGUSR2 (submitit's choice, `--signal=USR2@90`; its default action would
kill the rank unsaved); SIGTERM (preemption, scancel, torchrun's shutdown), SIGHUP (a closed terminal) and SIGINT
(Ctrl-C; a second one exits at once) ask for save and exit. The handler only records the request: no I/O, no collectives.
SLURM signals every process of a job step, DataLoader workers included, and a forked worker
inherits the handler, so it acts only in the process that installed it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dist_train import exits, processes
from dist_train.errors import environment_int

if TYPE_CHECKING:
    from dist_train.distributed import DistEnv

# torch is imported where it is used: the training script installs StopFlag before importing
# torch (seconds), so that a signal during start-up is kept rather than fatal.

log = logging.getLogger(__name__)

NONE, TERMINATE, INTERRUPT, REQUEUE = 0, 1, 2, 3  # ordered: the strongest request on any rank wins
# SIGHUP: the terminal of a run started by hand went away (a dropped ssh connection); without a
# handler it would kill the rank and its loader workers before any save.
SIGNAL_REQUESTS = {signal.SIGTERM: TERMINATE, signal.SIGHUP: TERMINATE, signal.SIGINT: INTERRUPT,
                   signal.SIGUSR1: REQUEUE, signal.SIGUSR2: REQUEUE}
REQUEUE_SIGNALS = tuple(signum for signum, request in SIGNAL_REQUESTS.items() if request == REQUEUE)
# What a loader worker and the writer process ignore: the rank's main process acts.
HANDLED_BY_THE_RANK = tuple(SIGNAL_REQUESTS)


class StopFlag:
    """Set by SIGUSR1/SIGUSR2/SIGTERM/SIGHUP/SIGINT in this process; a later signal never lowers the request."""

    def __init__(self):
        self.request = NONE
        self.signal_name = None
        self._pid = os.getpid()
        self._interrupted = False

    def install(self) -> "StopFlag":
        for signum in SIGNAL_REQUESTS:
            signal.signal(signum, self._handle)
        return self

    def ignore_from_now_on(self) -> None:
        """After the last save a signal has nothing left to save: ignore it rather than die of it
        (USR1's default action) and turn a finished job into a failed one. SIGINT keeps its
        handler: a second Ctrl-C still exits at once."""
        for signum in HANDLED_BY_THE_RANK:
            if signum != signal.SIGINT:
                signal.signal(signum, signal.SIG_IGN)

    def _handle(self, signum, _frame) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker: the main process acts
            return
        if signum == signal.SIGINT:
            if self._interrupted:  # the user means it: no save, no teardown
                processes.end_now(exits.INTERRUPTED)
            self._interrupted = True
        if SIGNAL_REQUESTS[signum] > self.request:
            self.request = SIGNAL_REQUESTS[signum]
            self.signal_name = signal.Signals(signum).name


@dataclass(frozen=True)
class Agreed:
    """What all ranks agreed on at a step boundary."""

    request: int = NONE  # the strongest stop request of any rank
    save_due: bool = False  # the main rank's clock says a timed save (--save-every-minutes) is due
    save_failed: bool = False  # the main rank's background write failed (async_save.py)


class SaveClock:
    """Due once every `minutes` of wall time (0: never); restarts when it says so."""

    def __init__(self, minutes: float):
        self.seconds = minutes * 60
        self._start = time.monotonic()

    def due(self) -> bool:
        if not self.seconds or time.monotonic() - self._start < self.seconds:
            return False
        self._start = time.monotonic()
        return True


# A stop request is agreed on at most ~2 agreements after the signal; agreements come at least this
# often (in seconds of steps), whatever --stop-check-every-steps says, so that slow steps (a large
# model, 10 s a step) still stop within SLURM's and torchrun's grace of 30 s after SIGTERM.
AGREE_WITHIN_S = 5.0


class StopAgreement:
    """Every rank learns the strongest stop request of all ranks at the same step boundary, and
    whether the main rank wants a timed save or saw its background write fail.

    At agreement boundaries a MAX all-reduce starts on a gloo group, asynchronously; the result is
    read at the next one, so the collective overlaps training and never waits for the GPU. A stop
    therefore comes one to two agreements after the signal, at the same step on every rank;
    likewise a timed save, so that every rank enters the (collective) save at the same step.

    Agreements come every `every` steps, or more often where steps are slow: the main rank times
    the steps and sends, with each agreement, how many steps make AGREE_WITHIN_S seconds (at most
    `every`); every rank reads it at the same boundary and keeps to it from there. The first
    agreement is at the first step, before any step is timed. Training never depends on when
    ranks agree, so neither do its bits.
    """

    def __init__(self, env: DistEnv, every: int = 1, within_s: float = AGREE_WITHIN_S, clock=time.monotonic):
        import torch.distributed as dist

        self.env, self.every, self.within_s, self._clock = env, every, within_s, clock
        self._group = dist.new_group(backend="gloo") if env.distributed else None
        self._pending = None  # (work, tensor) of the all-reduce in flight
        self._boundaries = 0
        self.interval, self._next_at = 1, 1  # steps between agreements; the boundary of the next one
        self._timed_from = (0, clock())  # (boundary, time) the main rank times the steps from
        self._save_due = self._save_failed = False  # to send at the next agreement
        self._launcher = os.getppid() if launched_by_torchrun() else None

    def poll(self, local_request: int, save_due: bool = False, save_failed: bool = False) -> Agreed:
        """Called at each step boundary on every rank; returns what all ranks agree on."""
        if self._launcher is not None and os.getppid() != self._launcher:
            # The torchrun agent is gone (where PR_SET_PDEATHSIG is missing): save and stop.
            log.warning("the torchrun agent (PID %d) is gone: stopping", self._launcher)
            self._launcher, local_request = None, max(local_request, TERMINATE)
        if not self.env.distributed:
            return Agreed(local_request, save_due, save_failed)
        import torch
        import torch.distributed as dist

        self._boundaries += 1
        # Kept until sent: the clock says "due" once, perhaps between two agreements.
        self._save_due, self._save_failed = self._save_due or save_due, self._save_failed or save_failed
        if self._boundaries < self._next_at:
            return Agreed()
        agreed = Agreed()
        if self._pending is not None:
            work, tensor = self._pending
            work.wait()
            request, due, failed, interval = tensor.tolist()
            agreed = Agreed(request, bool(due), bool(failed))
            self.interval = interval  # the main rank's, on every rank at this boundary
        self._next_at = self._boundaries + self.interval
        tensor = torch.tensor([local_request, int(self._save_due), int(self._save_failed), self._proposal()],
                              dtype=torch.int32)
        self._save_due = False
        self._pending = (dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self._group, async_op=True),
                         tensor)
        return agreed

    def _proposal(self) -> int:
        """The main rank's: as many steps as take AGREE_WITHIN_S at the pace since the last
        agreement, 1 to `every` (the other ranks send 0; MAX keeps the main rank's)."""
        if not self.env.is_main:
            return 0
        now, (boundary, then) = self._clock(), self._timed_from
        self._timed_from = (self._boundaries, now)
        step_s = (now - then) / max(1, self._boundaries - boundary)
        most = min(self.every, 2**31 - 1)  # sent as an int32
        return max(1, min(most, int(self.within_s / step_s))) if step_s > 0 else most

    def close(self) -> None:
        """Wait for the all-reduce in flight, so no rank leaves one unanswered."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None


def launched_by_torchrun(environ=os.environ) -> bool:
    """torchrun (its elastic agent) sets TORCHELASTIC_RUN_ID for its workers; srun and a shell do not."""
    return "TORCHELASTIC_RUN_ID" in environ


def die_with_launcher(environ=os.environ) -> None:
    """Under torchrun, have the kernel SIGKILL this rank when its agent dies.

    torchrun starts each rank in a session of its own, so a `kill -9` of the agent leaves the
    ranks (and their loader workers) training, saving and racing the relaunch. SIGKILL, not
    SIGTERM: a save would need collectives with ranks that may be gone; the atomic writes make
    dying at any instant safe. Only under torchrun: under srun or a shell the parent is not a
    launcher whose death means the run is over. Linux only; elsewhere StopAgreement's parent check
    stops the rank at the next agreement."""
    if not launched_by_torchrun(environ) or not processes.kill_on_parent_death():
        return  # elsewhere the parent check at the stop agreement remains
    if os.getppid() == 1:  # the agent died before the prctl took effect
        os._exit(exits.TERMINATED)


def restart_count(environ=os.environ) -> int:
    if not environ.get("SLURM_RESTART_COUNT"):  # unset, or empty: no restart yet
        return 0
    return environment_int(environ, "SLURM_RESTART_COUNT")


def slurm_job_to_requeue(environ=os.environ) -> str | None:
    """ARRAYJOB_TASK for an array task, else the job id; None outside SLURM."""
    if environ.get("SLURM_ARRAY_JOB_ID") and environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    return environ.get("SLURM_JOB_ID")


REQUEUE_TRIES, REQUEUE_PAUSE_S = 3, 2.0  # a busy slurmctld answers some calls with an error


def requeue_slurm_job(max_requeues: int, timeout: float = 30.0) -> bool:
    """`scontrol requeue` this job (after the checkpoint is written: it kills the job at once).
    A failed call is tried again (REQUEUE_TRIES in all); a missing scontrol or a timeout is not."""
    job = slurm_job_to_requeue()
    if job is None:
        log.warning("SIGUSR1/SIGUSR2 outside a SLURM job: checkpoint saved, nothing to requeue")
        return False
    if restart_count() >= max_requeues:
        log.warning("not requeueing job %s: it has restarted %d times (--max-requeues %d); "
                    "relaunch to resume", job, restart_count(), max_requeues)
        return False
    log.info("requeueing SLURM job %s (restart %d)", job, restart_count() + 1)
    for attempt in range(1, REQUEUE_TRIES + 1):
        try:
            problem = _scontrol_requeue(job, timeout)
        except FileNotFoundError:
            log.error("scontrol not found: job %s not requeued; the checkpoint is saved, resubmit to resume", job)
            return False
        except subprocess.TimeoutExpired:
            log.error("scontrol requeue %s timed out after %.0fs; the checkpoint is saved", job, timeout)
            return False
        if problem is None:
            return True
        if attempt < REQUEUE_TRIES:
            log.warning("scontrol requeue %s failed (%s); trying again in %.0fs", job, problem, REQUEUE_PAUSE_S)
            time.sleep(REQUEUE_PAUSE_S)
    log.error("scontrol requeue %s failed (%s); the checkpoint is saved, resubmit to resume", job, problem)
    return False


def _scontrol_requeue(job: str, timeout: float) -> str | None:
    """One `scontrol requeue`: None if it succeeded, else what it said.

    SIGUSR1 and SIGUSR2 are ignored while it runs, by scontrol too (an ignored signal stays
    ignored across exec): SLURM's --signal and `scancel --signal` reach every process of the step,
    and a second USR1 would kill scontrol mid-call (seen here: a requeue that failed without a word)."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = [signal.signal(s, signal.SIG_IGN) for s in REQUEUE_SIGNALS] if in_main_thread else None
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=timeout)
    finally:
        if in_main_thread:
            for signum, handler in zip(REQUEUE_SIGNALS, previous):
                signal.signal(signum, handler)
    if result.returncode == 0:
        return None
    said = (result.stderr or result.stdout).strip()
    if result.returncode < 0:
        return said or f"killed by {signal.Signals(-result.returncode).name}"
    return said or f"exit {result.returncode}"
