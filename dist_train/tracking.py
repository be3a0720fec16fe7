"""Logging with the rank in every line, progress output, and wandb on the main rank.

wandb is imported only when a project is given (--wandb-project or $WANDB_PROJECT; config.py
resolves each wandb flag from its environment variable when the flag is not given). One wandb run follows a training across kills,
requeues and torchrun restarts: its id is kept in RUN_DIR/wandb.json (and in every checkpoint),
and a resumed process re-opens that run. Steps between the last checkpoint and a kill are
trained again after a resume (bit for bit the same values) but not logged again: wandb.json also
records, per kind of metric, the highest step sent, and it is written before each send, so a
point is never logged twice. A SIGKILL can lose the points wandb had not yet written (about the
last second: see _flush_often); they are not sent again.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import sys
import threading
import time
import uuid
from pathlib import Path

from dist_train.config import uses_wandb
from dist_train.errors import UserError, first_line
from dist_train.processes import children, kill
from dist_train.rundir import read_run_record, write_run_file

log = logging.getLogger(__name__)


def setup_logging(rank: int, level: str = "INFO") -> None:
    """INFO and up on the main rank; other ranks only warn. The rank is in every line, and the date:
    a requeued job appends to one log file for days."""
    fmt = f"%(asctime)s [rank {rank}] %(levelname)s %(message)s"
    numeric = logging.getLevelName(level.upper())
    logging.basicConfig(stream=sys.stderr, format=fmt, datefmt="%Y-%m-%d %H:%M:%S", force=True,
                        level=numeric if rank == 0 else max(logging.WARNING, numeric))
    # A log that cannot be written (stderr gone with a closed terminal, or wandb's debug.log on a
    # full disk) must not print a traceback per record: Python's advice for production.
    logging.raiseExceptions = False


class NullTracker:
    """What every rank but the main one gets, and the main rank when wandb is off."""

    run_id = None

    def log(self, kind: str, metrics: dict, step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbTracker:
    def __init__(self, config, run_id: str | None, another_training: str | None = None,
                 trained_in: str | None = None):
        import wandb

        run_dir = Path(config.run_dir)
        wandb_dir = config.wandb_dir or str(run_dir)  # --wandb-dir, else $WANDB_DIR, else the run's
        self._state_path = run_dir / "wandb.json"
        self._home = str(run_dir.resolve())
        state = self._read_state()
        # A copy (`cp -r`) names the original's wandb run in its wandb.json and its checkpoints:
        # going on in it would write two trainings into one history, the original's maybe at once.
        ours = state.get("run_id") or run_id
        origin = copied_from(run_dir, state.get("home"), ours) or copied_from(run_dir, trained_in, ours)
        if origin:
            log.warning("%s is a copy of %s, whose wandb run %s goes on there; this run logs to a wandb run "
                        "of its own", run_dir, origin, ours)
            state, run_id = {}, None
        if another_training and state.get("run_id"):
            # Going on in it would drop this training's steps up to its last one as sent already.
            log.warning("wandb run %s logged another training (%s); this run starts afresh in a wandb run "
                        "of its own", state["run_id"], another_training)
            state = {}
        self.run_id = state.get("run_id") or run_id or uuid.uuid4().hex[:12]
        self._logged = state.get("logged", {})
        self._write_state()  # the id is on disk before the run exists anywhere
        self._timeout = config.wandb_timeout
        try:
            self.run = _start_wandb(wandb, config.wandb_mode, project=config.wandb_project,
                                    entity=config.wandb_entity, name=run_name(config.wandb_name, config.run_dir),
                                    id=self.run_id, resume="allow", dir=wandb_dir, config=config.to_dict(),
                                    settings=_flush_often(wandb))
        except UserError:
            raise
        except Exception as error:  # its service process did not start (slow to, killed, missing)
            log.warning("wandb could not start (%s: %s); this launch trains without metrics, a relaunch "
                        "tries again", type(error).__name__, first_line(error))
            self.run = None
            _kill_wandb_core()  # one that started too late to be waited for
            _teardown(wandb)
            return
        used = Path(self.run.settings.root_dir)  # wandb falls back to the temp directory on its own
        if used.resolve() != Path(wandb_dir).resolve():
            log.warning("wandb could not use %s and writes under %s", wandb_dir, used / "wandb")
        mode = getattr(self.run.settings, "mode", config.wandb_mode)  # offline after a server out of reach
        log.info("wandb run %s (%s mode) in project %s, files under %s", self.run_id, mode,
                 config.wandb_project, used / "wandb")
        self._errors = WandbErrors(getattr(self.run.settings, "log_internal", None))
        self._sender = Sender()

    def log(self, kind: str, metrics: dict, step: int) -> None:
        """Send `metrics` at `step` unless a step at or past it was already sent for this kind."""
        if self.run is None or step <= self._logged.get(kind, -1):
            return
        if self._failed(f"by step {step}", "this launch sends no more metrics, the training goes on"):
            return
        self._logged[kind] = step
        self._write_state()
        self._sender.put(f"at step {step}", self.run.log, {f"{kind}/{key}": value for key, value in metrics.items()},
                         step=step)
        if kind == "checkpoint":  # now and then, not at every step
            self._errors.check(f"by step {step}")

    def finish(self) -> None:
        if self.run is None:
            return
        consequence = "its records of this launch may be incomplete"
        if self._failed("by the end of the launch", consequence):
            return
        self._sender.put("at the end of the launch", self.run.finish)
        if not self._sender.close(self._timeout):
            self._give_up_waiting("at the end of the launch", consequence)
        elif not self._failed("at the end of the launch", consequence):
            self._errors.check("by the end of the launch")

    def _failed(self, when: str, consequence: str) -> bool:
        """Whether wandb stopped working (then said once): a call raised, or one has been waiting
        for an answer longer than --wandb-timeout."""
        if self._sender.error is not None:
            what, error = self._sender.error
            self._give_up(what, error, consequence)
            return True
        if self._timeout and self._sender.waiting_for() > self._timeout:
            self._give_up_waiting(when, consequence)
            return True
        return False

    def _give_up(self, when: str, error: Exception, consequence: str) -> None:
        """Metrics are not worth a training: say so once, and send nothing more from this launch.
        A relaunch opens the same wandb run again (wandb.json) and sends the steps it trains."""
        import wandb

        log.warning("wandb stopped working %s (%s: %s); %s", when, type(error).__name__, first_line(error),
                    consequence)
        self.run = None
        _teardown(wandb)  # wandb's own exit handler would print the same failure again

    def _give_up_waiting(self, when: str, consequence: str) -> None:
        """A wandb-core that is alive but does not answer (stopped, deadlocked: wandb issues 3223,
        5601) would hold the call for ever, and wandb's teardown at exit after it. It is killed,
        which ends the waiting call with an error; its run file keeps what it had written (it
        flushes every second), for `wandb sync` to upload."""
        import wandb

        stopped = _kill_wandb_core()
        log.warning("wandb has not answered for %.0f s %s (--wandb-timeout %g); %s; %s", self._sender.waiting_for(),
                    when, self._timeout, "its service process was stopped" if stopped else
                    "its service process was not found", consequence)
        self.run = None
        _teardown(wandb)

    def _read_state(self) -> dict:
        return read_wandb_record(self._state_path)

    def _write_state(self) -> None:
        # Not fsynced: it is written at every logged step, and a process kill, unlike a power
        # loss, keeps the page cache. Without it a resume would send steps again (or open another
        # run), so a write that fails ends the run (write_run_file).
        write_run_file(self._state_path, json.dumps({"run_id": self.run_id, "logged": self._logged,
                                                     "home": self._home}), durable=False)


def _start_wandb(wandb, mode: str, **arguments):
    """wandb.init in the mode asked for. No login (or a key the server refuses) is the user's to
    fix: one line, exit 2. A server out of reach (a node without internet, an outage when a
    requeued job restarts; wandb gives up after its init_timeout, 90 s by default) is not worth the
    training: this launch records offline, into the same run, for `wandb sync` to upload later."""
    try:
        return wandb.init(mode=mode, **arguments)
    except (wandb.errors.UsageError, wandb.errors.AuthenticationError) as error:
        raise UserError(f"wandb could not start ({first_line(error)}): log in (`wandb login`, or set "
                        f"WANDB_API_KEY), or pass --wandb-mode offline") from None
    except wandb.errors.CommError as error:
        if mode != "online":
            raise
        log.warning("wandb could not reach its server (%s); this launch records offline: `wandb sync` "
                    "its directory to upload it", first_line(error))
        _teardown(wandb)  # the failed run keeps its id in use in wandb's service process
        return wandb.init(mode="offline", **arguments)


def _teardown(wandb, wait: float = 10.0) -> None:
    """wandb.teardown(), which also unhooks wandb's exit handler; after a failure it fails too.
    On a thread, waited for `wait` s: teardown waits for wandb-core to exit, and one that does not
    (not found to be killed) must not hold this process. Its exit handler is unhooked first thing."""

    def teardown() -> None:
        try:
            wandb.teardown()
        except Exception:
            pass

    thread = threading.Thread(target=teardown, name="wandb-teardown", daemon=True)
    thread.start()
    thread.join(wait)


class Sender:
    """wandb's calls, made in order on a thread of their own. A wandb-core that stops answering
    blocks the call that waits on it (its socket buffer full, or an answer awaited): that call
    must not be the training's. The training thread queues calls and asks how long the one in
    progress has waited. After a call raises, the rest are dropped (the first error is kept)."""

    def __init__(self):
        self.error: tuple[str, Exception] | None = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._since: float | None = None  # when the call in progress started
        self._thread = threading.Thread(target=self._run, name="wandb-sender", daemon=True)
        self._thread.start()

    def put(self, what: str, call, *args, **kwargs) -> None:
        self._queue.put((what, call, args, kwargs))

    def waiting_for(self) -> float:
        """Seconds the call in progress has run; 0 when none runs."""
        since = self._since
        return 0.0 if since is None else time.monotonic() - since

    def close(self, timeout: float) -> bool:
        """Run what is queued; False as soon as one call has waited longer than `timeout` (0: none)."""
        self._queue.put(None)
        while self._thread.is_alive():
            self._thread.join(0.1)
            if timeout and self.waiting_for() > timeout:
                return False
        return True

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            what, call, args, kwargs = item
            if self.error is not None:
                continue
            self._since = time.monotonic()
            try:
                call(*args, **kwargs)
            except Exception as error:  # wandb's service process died, its socket broke: metrics only
                self.error = (what, error)
            finally:
                self._since = None


def _kill_wandb_core() -> bool:
    """SIGKILL this process's own wandb-core (a child); whether there was one."""
    cores = [pid for pid, command in children() if os.path.basename(command).startswith(b"wandb-core")]
    kill(cores)
    return bool(cores)


class WandbErrors:
    """wandb's service process (wandb-core) that cannot write its run file (a full disk, a file
    size limit, a lost permission) logs an ERROR line in its own debug-internal.log and goes on:
    nothing reaches the training, and in offline mode that file is the only copy of the run. The
    new lines of that log are read at each check; the first such error is told once. Other ERROR
    lines (an online upload that wandb retries) are not this warning's business."""

    def __init__(self, path: str | None):
        self.path, self._offset, self._told = Path(path) if path else None, 0, False

    def check(self, when: str) -> None:
        if self._told or self.path is None:
            return
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except OSError:
            return
        complete = chunk.rfind(b"\n") + 1  # a line being written is read whole next time
        self._offset += complete
        for line in chunk[:complete].decode(errors="replace").splitlines():
            message = _write_error(line)
            if message is not None:
                self._told = True
                log.warning("wandb could not write its run file %s (%s); in offline mode, where that file "
                            "is the only copy, those records are lost (details: %s)", when, message, self.path)
                return


def _write_error(line: str) -> str | None:
    """The message of an ERROR line of wandb's internal log (JSON lines; text in older wandb) about
    writing the run file (wandb-core: "writer: failed to save record: transactionlog: ...")."""
    if '"level":"ERROR"' in line:
        try:
            message = str(json.loads(line).get("msg", line))
        except ValueError:
            message = line
    elif " ERROR " in line:
        message = line.split(" ERROR ", 1)[1].strip()
    else:
        return None
    return message if "failed to save record" in message or "transactionlog" in message else None


def read_wandb_record(path: Path) -> dict:
    """RUN_DIR/wandb.json, or {} where there is none or it is not one (a file anyone can edit):
    then the checkpoint's run id, or a new one, is used."""
    return read_run_record(path, lambda record: (
        isinstance(record.get("run_id"), str) and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", record["run_id"])
        and isinstance(record.get("logged"), dict)
        and all(isinstance(k, str) and type(v) is int for k, v in record["logged"].items())), "a wandb run")


def copied_from(run_dir: Path, home, run_id: str | None) -> str | None:
    """`home`, where RUN_DIR is a copy of it (`cp -r`): another directory, still there, whose
    wandb.json names the same wandb run. A run directory moved (nothing left where it was) or
    seen through another path (a link, another mount of the same directory) is not a copy."""
    if not run_id or not isinstance(home, str) or not home:
        return None
    try:
        if os.path.samefile(home, run_dir):
            return None
    except OSError:  # gone: moved
        return None
    other = Path(home) / "wandb.json"
    return home if read_wandb_record(other).get("run_id") == run_id else None


def _flush_often(wandb):
    """wandb writes its run file every 15 s by default, so a SIGKILL loses up to 15 s of points
    that the skip rule above would then not send again; ask for 1 s where this wandb allows it."""
    if "x_transaction_log_flush_interval" in getattr(wandb.Settings, "model_fields", {}):
        return wandb.Settings(x_transaction_log_flush_interval=1.0)
    return None


def run_name(name: str | None, run_dir: str) -> str | None:
    """Array tasks get a name that says which task they are."""
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    if task is None:
        return name
    return f"{name or Path(run_dir).name}-task{task}"


def check_wandb_dir(config) -> None:
    """Before the run directory: a --wandb-dir (or WANDB_DIR) that cannot be made. wandb itself
    would fall back to the temp directory, away from where the user looks. Nothing is created:
    the nearest existing ancestor must be a directory this process may write to."""
    if not uses_wandb(config) or not config.wandb_dir:
        return
    existing = Path(config.wandb_dir).absolute()
    while not os.path.lexists(existing):
        existing = existing.parent
    problem = ("is not a directory" if not existing.is_dir() else
               "is not writable" if not os.access(existing, os.W_OK | os.X_OK) else None)
    if problem:
        raise UserError(f"wandb directory {config.wandb_dir} (--wandb-dir or WANDB_DIR) cannot be made: "
                        f"{existing} {problem}")


def build_tracker(config, is_main: bool, checkpoint_run_id: str | None = None, another_training: str | None = None,
                  trained_in: str | None = None):
    """another_training: what changed since the training that RUN_DIR/wandb.json's run logged,
    for a run that starts afresh with other settings (it gets a wandb run of its own).
    trained_in: the run directory the resumed checkpoint was trained in."""
    if not is_main or not uses_wandb(config):
        return NullTracker()
    return WandbTracker(config, checkpoint_run_id, another_training, trained_in)


class ProgressReport:
    """A tqdm bar per epoch on a terminal; elsewhere (SLURM logs, CI) one plain line every N steps."""

    def __init__(self, is_main: bool, every: int, world_size: int, batch_size: int, use_bar: bool | None = None):
        self.is_main, self.every = is_main, every
        self.world_size, self.batch_size = world_size, batch_size
        self.use_bar = is_main and (sys.stderr.isatty() if use_bar is None else use_bar)
        self._bar = None

    def start_epoch(self, epoch: int, start_batch: int, num_batches: int, samples_per_rank: int) -> None:
        """samples_per_rank: the epoch's images on each rank; its last batch may be short."""
        self.epoch, self.num_batches, self.samples_per_rank = epoch, num_batches, samples_per_rank
        self._t0, self._batch0 = time.perf_counter(), start_batch
        if self.use_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=num_batches, initial=start_batch, desc=f"epoch {epoch}", unit="step",
                             dynamic_ncols=True)

    def step(self, batch: int, global_step: int, loss: float | None, lr: float) -> float:
        """After each step; `loss` is given on reporting steps only. Returns samples/s so far."""
        elapsed = time.perf_counter() - self._t0
        done = batch - self._batch0
        samples = self._samples_before(batch) - self._samples_before(self._batch0)
        rate = samples * self.world_size / elapsed if elapsed > 0 else 0.0
        if self._bar is not None:
            self._bar.update(1)
            if loss is not None:
                self._bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{rate:.0f}")
        elif loss is not None and self.is_main:
            eta = (self.num_batches - batch) * elapsed / done if done else 0.0
            log.info("epoch %d step %d batch %d/%d loss %.4f lr %.3g samples/s %.0f eta %s", self.epoch,
                     global_step, batch, self.num_batches, loss, lr, rate, _clock(eta))
        return rate

    def _samples_before(self, batch: int) -> int:
        return min(batch * self.batch_size, self.samples_per_rank)

    def end_epoch(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"
