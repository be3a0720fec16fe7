"""After a rank dies or hangs: save the last finished step from a survivor, end for a restart,
and count failures so that a run that keeps failing stops asking to be restarted.

In DDP every rank holds the same model, optimizer, scheduler and scaler state, and every step
reseeds each rank's RNG from (seed, rank, step) (rng.seed_step), so any surviving rank can
write a complete checkpoint of the last finished step, provided its own state is not mid-step:
it must be blocked waiting for a peer (in the gradient all-reduce, the stop agreement, a save or
the evaluation), never between two parameter updates. The restart resumes from that file like
from any other.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

from dist_train import exits, processes
from dist_train.distributed import side_store
from dist_train.errors import UserError
from dist_train.rundir import read_run_record, write_run_file
from dist_train.watchdog import COMPUTING, CONSISTENT, Watchdog

log = logging.getLogger(__name__)

FAILURES_FILE = "failures.json"
FAULT_VARIABLE = "DIST_TRAIN_INJECT_FAULT"  # test-only: "KIND@RANK:STEP", KIND raise, kill, stop, usr1, term or slow


class TooManyFailures(Exception):
    pass


def count_launch(run_dir: Path, next_epoch: int, max_failures: int) -> int:
    """The main rank, at start: count this launch as a failure until it ends cleanly.

    RUN_DIR/failures.json holds the launches since the last completed epoch that did not end
    cleanly (a crash, a kill, a hang: nothing could record them as they happened). Raises
    TooManyFailures when `max_failures` launches in a row failed. Returns the failures so far."""
    path = Path(run_dir) / FAILURES_FILE
    record = _read(path)
    failures = record.get("failures", 0) if record.get("epoch") == next_epoch else 0
    if failures >= max_failures:
        raise TooManyFailures(f"{failures} launches in a row failed without completing an epoch "
                              f"(--max-failures {max_failures}); the log above says why. Fix the cause, "
                              f"then relaunch (or delete {path} to try again as it is)")
    _write(path, {"epoch": next_epoch, "failures": failures + 1})
    return failures


def end_launch_cleanly(run_dir: Path) -> None:
    """This launch ended as planned (complete, stopped by a signal, requeued): not a failure."""
    path = Path(run_dir) / FAILURES_FILE
    record = _read(path)
    if record.get("failures"):
        _write(path, dict(record, failures=record["failures"] - 1))


def record_epoch_done(run_dir: Path, next_epoch: int) -> None:
    """A completed epoch is progress: the failures before it no longer count (this launch does)."""
    _write(Path(run_dir) / FAILURES_FILE, {"epoch": next_epoch, "failures": 1})


def _read(path: Path) -> dict:
    """The record, or {} where there is none or it is not one (a file anyone can edit)."""
    return read_run_record(path, lambda record: all(type(record.get(key)) is int and record[key] >= 0
                                                    for key in ("epoch", "failures")), "failures")


def _write(path: Path, record: dict) -> None:
    write_run_file(path, json.dumps(record) + "\n", durable=False)


def track_forward(model, watchdog: Watchdog) -> None:
    """COMPUTING from the moment the plain model's forward starts (after DDP's buffer broadcast)."""
    def enter_computing(module, _inputs):
        if module.training:
            watchdog.enter(COMPUTING)

    model.register_forward_pre_hook(enter_computing)


def has_running_stats(model) -> bool:
    """Buffers that the forward changes (BatchNorm's running statistics in training mode)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    return any(isinstance(m, _BatchNorm) and m.track_running_stats for m in model.modules())


class SurvivorSave:
    """Writes the last finished step's checkpoint once, from whichever surviving rank gets there first."""

    def __init__(self, store, save, watchdog: Watchdog, forward_changes_state: bool):
        self.store, self.save, self.watchdog = store, save, watchdog  # save(): no collectives, returns the path
        self.consistent = CONSISTENT if forward_changes_state else CONSISTENT | {COMPUTING}
        self.done = False
        self._lock = threading.Lock()

    def __call__(self, why: str) -> None:
        with self._lock:  # the main thread and the watchdog thread may both get here: one saves
            if not self.done:
                self.done = True
                self._save_if_consistent()

    def _save_if_consistent(self) -> None:
        phase = self.watchdog.phase
        if phase not in self.consistent:
            log.error("not saving after the fault: this rank was %s, its state may be mid-step; "
                      "the restart resumes from the newest periodic checkpoint", phase)
            return
        try:
            first = self.store.add("survivor_save", 1) == 1
        except Exception as error:  # the store lives in a dead process (rank 0 under srun)
            log.error("not saving after the fault: the rendezvous store does not answer (%s)", error)
            return
        if not first:
            return
        try:
            path = self.save()
        except Exception as error:  # a full disk, say: the restart falls back to the periodic checkpoint
            log.error("could not save after the fault: %s", error)
            return
        if path:
            log.warning("saved checkpoint %s of the last finished step after the fault", path)

    def end_process(self, why: str) -> None:
        """From the watchdog thread: save if possible, then end at once (the main thread is blocked)."""
        abort_process_group()  # first: on a GPU the save's copies queue behind a stuck collective
        self(why)
        processes.end_now(exits.PEER_FAILED)


def abort_process_group() -> None:
    """Abort the collectives in flight where the backend allows it (nccl), so that the process can
    end while its CUDA streams wait on a peer that is gone; gloo needs nothing."""
    try:
        import torch.distributed as dist
        from torch.distributed.distributed_c10d import _abort_process_group

        if dist.is_initialized() and dist.get_backend() == "nccl":
            _abort_process_group()
    except Exception as error:  # ending the process is what matters
        log.error("could not abort the process group: %s", error)


_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused",
              "Timed out waiting", "NCCL communicator was aborted", "ProcessGroup is aborted")


def peer_failure(error: BaseException) -> str | None:
    """What says that a collective failed because a peer went away (gloo reports it at once), or None."""
    text = str(error)
    return next((marker for marker in _PEER_GONE if marker in text), None)


def is_peer_failure(error: BaseException) -> bool:
    return peer_failure(error) is not None


# What each signal kind sends: a dead rank, a hung rank, and the stop requests (SLURM's time-limit
# signal, preemption) at a chosen step.
_FAULT_SIGNALS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP, "usr1": signal.SIGUSR1, "term": signal.SIGTERM}


_FAULT_KINDS = ("raise", *_FAULT_SIGNALS, "slow")  # slow@RANK:MS: that rank sleeps MS ms after every step


def parse_fault(text: str | None) -> tuple[str, int, int] | None:
    """DIST_TRAIN_INJECT_FAULT=KIND@RANK:STEP -> (kind, rank, step); for slow, STEP is milliseconds."""
    if not text:
        return None
    kind, _, where = text.partition("@")
    rank, _, step = where.partition(":")
    if kind not in _FAULT_KINDS or not rank.isdigit() or not step.isdigit():
        raise UserError(f"{FAULT_VARIABLE}={text!r}: expected {'|'.join(_FAULT_KINDS)}@RANK:STEP (slow: @RANK:MS)")
    return kind, int(rank), int(step)


class FaultInjection:
    """Test-only: make one rank fail after a chosen step, as a real fault would (see FAULT_VARIABLE)."""

    def __init__(self, rank: int, environ=os.environ):
        fault = parse_fault(environ.get(FAULT_VARIABLE))
        self.kind, self.step = (fault[0], fault[2]) if fault and fault[1] == rank else (None, -1)

    def after_step(self, global_step: int) -> None:
        if self.kind == "slow":  # a step as long on a fast machine as on a loaded one, nearly
            time.sleep(self.step / 1000)
            return
        if global_step != self.step:
            return
        log.warning("injecting fault %s after step %d (%s)", self.kind, global_step, FAULT_VARIABLE)
        self.step = -1
        if self.kind == "raise":
            raise RuntimeError(f"fault injected after step {global_step}")
        if self.kind in ("kill", "stop"):
            time.sleep(0.2)  # let the log line out
        os.kill(os.getpid(), _FAULT_SIGNALS[self.kind])


class Healer:
    """What the training loop calls for fault handling: phases for the watchdog, the test-only fault
    injection, the failure record at each completed epoch, and the survivor's save."""

    def __init__(self, config, env, model, save_alone):
        self.env, self.run_dir = env, config.run_dir
        self.faults = FaultInjection(env.rank)
        self.watchdog = self.survivor = None
        if env.distributed:
            store = side_store(max(10.0, config.hang_timeout / 2))
            self.survivor = SurvivorSave(store, save_alone, None, has_running_stats(model))
            self.watchdog = Watchdog(store, env.rank, env.world_size, config.hang_timeout,
                                     on_fault=self.survivor.end_process)
            self.survivor.watchdog = self.watchdog
            track_forward(model, self.watchdog)
            if config.hang_timeout > 0:
                self.watchdog.start()

    def phase(self, phase: str, step: int | None = None) -> None:
        if self.watchdog is not None:
            self.watchdog.enter(phase, step)

    def after_step(self, global_step: int) -> None:
        self.faults.after_step(global_step)

    def epoch_done(self, next_epoch: int) -> None:
        if self.env.is_main:
            record_epoch_done(self.run_dir, next_epoch)

    def peer_failed(self, error: BaseException) -> bool:
        """In the main thread, after a collective raised: save if a survivor can; True if that was it."""
        if self.survivor is None or not is_peer_failure(error):
            return False
        log.error("a collective failed, a peer is gone: %s", str(error).strip().splitlines()[0])
        self.survivor(str(error))
        return True

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.close()
