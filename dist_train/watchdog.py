"""Hung or dead ranks found within --hang-timeout seconds, through a heartbeat per rank.

Every rank runs a daemon thread that, every few seconds, publishes a beat under its own key of
the rendezvous store (a counter, its step, what it is doing and for how long) and reads every
other rank's beat. Two faults are told apart:
- a rank whose counter has not changed for `timeout` seconds does not respond: its process is
  stopped (SIGSTOP), dead, or its host is gone;
- a rank that has been doing one thing (loading a batch, a forward/backward and its all-reduce,
  a save) for more than `timeout` seconds hangs; where several do, the ones that are not waiting
  for their peers are named first.
Then every surviving rank logs which rank and what it was doing, and calls `on_fault` from the
watchdog thread, since its main thread is blocked in a collective: the training saves what it
can there, and ends the process with exits.PEER_FAILED, which torchrun --max-restarts and the
sbatch scripts restart. So --hang-timeout must exceed the longest step, evaluation and save.

Silence is measured on each rank's own monotonic clock, from when it saw a counter change, so
clocks that differ between hosts do not matter. That clock runs on while the process does not
(the whole job stopped: `scontrol suspend`, gang scheduling, SIGSTOP): a watchdog that wakes
much later than it asked to counts that time as stopped, subtracts it from how long its rank has
been in its phase, and gives every peer a fresh `timeout` to beat again.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

# What a rank can be doing. In the WAITING phases a rank may be blocked by a peer (a collective);
# in the CONSISTENT ones its model, optimizer, scheduler and scaler hold exactly the state after
# its last finished step. COMPUTING (the model's forward, backward and DDP's gradient all-reduce)
# is consistent only for models without running statistics: BatchNorm updates its buffers in
# the forward. SYNCING is DDP's buffer broadcast before the forward.
STARTING, LOADING, SYNCING, COMPUTING, STEPPING, AGREEING, SAVING, EVALUATING = (
    "starting", "loading a batch", "starting a step", "in forward/backward", "applying the optimizer step",
    "agreeing on a stop", "saving a checkpoint", "evaluating")
WAITING = frozenset({SYNCING, COMPUTING, AGREEING, SAVING, EVALUATING})
CONSISTENT = frozenset({SYNCING, AGREEING, SAVING, EVALUATING})


@dataclass
class Beat:
    count: int
    step: int
    phase: str
    phase_since: float  # seconds the rank had been in `phase` when it beat


@dataclass
class Seen:
    """One peer as this rank saw it: the last beat and when (local monotonic clock) its count changed."""

    beat: Beat | None = None
    count_changed: float = 0.0


class Watchdog:
    def __init__(self, store, rank: int, world_size: int, timeout: float, on_fault, interval: float | None = None):
        self.store, self.rank, self.world_size, self.timeout = store, rank, world_size, timeout
        self.interval = interval or max(0.2, min(5.0, timeout / 6))
        self.on_fault = on_fault  # called once, from the watchdog thread, with a description
        self.step, self.phase, self._phase_start = 0, STARTING, time.monotonic()
        self._stopped = 0.0  # seconds this process was found not running, in all
        self._stopped_at_phase_start = 0.0
        self._count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dist_train-watchdog", daemon=True)

    # -- what the main thread reports: plain attribute writes, no locks, no I/O ---------------
    def enter(self, phase: str, step: int | None = None) -> None:
        if step is not None:
            self.step = step
        self._stopped_at_phase_start = self._stopped
        self.phase, self._phase_start = phase, time.monotonic()

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()

    # -- the thread -------------------------------------------------------------------------
    def _run(self) -> None:
        seen = [Seen() for _ in range(self.world_size)]
        start = time.monotonic()
        for s in seen:
            s.count_changed = start
        asleep = time.monotonic()
        while not self._stop.wait(self.interval):
            woke = time.monotonic()
            late = woke - asleep - self.interval
            if late > max(2.0, self.interval):  # this process did not run: the job was stopped
                self._stopped += late
                log.info("this process did not run for %.0f s (the job stopped and continued?); "
                         "that time is not counted against any rank", late)
                for s in seen:
                    s.count_changed = max(s.count_changed, woke)
            try:
                self._beat()
                fault = self._check(seen, self._read(), time.monotonic())
            except Exception as error:  # the store itself is gone: rank 0's host (the store's) died
                fault = f"the rendezvous store does not answer ({type(error).__name__}: {error})"
            if fault and not self._stop.is_set():
                log.error("%s", fault)
                self.on_fault(fault)
                return
            asleep = time.monotonic()

    def _beat(self) -> None:
        self._count += 1
        in_phase = time.monotonic() - self._phase_start - (self._stopped - self._stopped_at_phase_start)
        beat = Beat(self._count, self.step, self.phase, round(max(0.0, in_phase), 1))
        self.store.set(f"heartbeat/{self.rank}", json.dumps(beat.__dict__))

    def _read(self) -> list[Beat | None]:
        keys = [f"heartbeat/{r}" for r in range(self.world_size)]
        present = [self.store.check([key]) for key in keys]
        return [Beat(**json.loads(self.store.get(key))) if ok else None for key, ok in zip(keys, present)]

    def _check(self, seen: list[Seen], beats: list[Beat | None], now: float) -> str | None:
        """A description of the fault, or None."""
        for s, beat in zip(seen, beats):
            if beat is None:
                continue
            if s.beat is None or beat.count != s.beat.count:
                s.count_changed = now
            s.beat = beat
        return find_fault(seen, now, self.timeout)


def find_fault(seen: list[Seen], now: float, timeout: float) -> str | None:
    """Which ranks do not respond or hang, as one line; None while the run is healthy."""
    silent = [r for r, s in enumerate(seen) if now - s.count_changed > timeout]
    if silent:
        return "; ".join(f"rank {r} does not respond: no heartbeat for {now - seen[r].count_changed:.0f} s"
                         + (f", last seen at step {seen[r].beat.step} {seen[r].beat.phase}" if seen[r].beat
                            else ", never seen") for r in silent)
    stuck = [r for r, s in enumerate(seen) if s.beat and s.beat.phase_since > timeout]
    if not stuck:
        return None
    hung = [r for r in stuck if seen[r].beat.phase not in WAITING] or stuck
    return "; ".join(f"rank {r} hangs: step {seen[r].beat.step}, {seen[r].beat.phase} for "
                     f"{seen[r].beat.phase_since:.0f} s" for r in hung)
