"""The run directory: one writer at a time (a lock), its layout, stale temp files, config.json.

The main rank holds an exclusive flock on RUN_DIR/.lock for the whole run; its host and PID are
written inside, so that a second launch can say who holds it. The kernel drops a flock when its
holder dies (SIGKILL, a crashed node's lease on NFSv4), so a stale lock is simply taken over.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import stat
from pathlib import Path

from dist_train import processes
from dist_train.checkpoint import LATEST, is_regular_file, list_checkpoints, step_in_name
from dist_train.saving import WRITE_TEST, remove_stale_temp_files
from dist_train.durable import temp_path, write_atomically
from dist_train.errors import SaveFailedError, UserError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class RunDirLock:
    """An exclusive, non-blocking flock on DIRECTORY/.lock, held until release() or death: the run
    directory's, and its checkpoints directory's (see prepare_run_dir)."""

    def __init__(self, run_dir: str | Path, what: str = "",
                 advice: str = "wait for it to end, or use another --run-dir"):
        self.path = Path(run_dir) / LOCK_NAME
        self.checkpoints: RunDirLock | None = None  # the checkpoints directory's lock, released with this one
        what = what or f"run directory {run_dir}"
        # Not through a link (it would truncate the file it points to), nor blocking on a FIFO.
        not_regular = UserError(f"{what}: {self.path} is not a regular file (a link, FIFO or "
                                "directory); remove it")
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as error:
            if isinstance(error, IsADirectoryError) or error.errno in (errno.ELOOP, errno.ENXIO):  # ENXIO: a socket
                raise not_regular from None
            raise
        if not stat.S_ISREG(os.fstat(self._fd).st_mode):
            os.close(self._fd)
            raise not_regular
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self._fd, 256).decode(errors="replace").split()
            os.close(self._fd)
            who = f"PID {holder[0]} on host {holder[1]}" if len(holder) >= 2 else "another process"
            raise UserError(f"{what} is in use by {who}; {advice}") from None
        except OSError as error:
            # Lustre without the `flock` mount option (and some FUSE filesystems) refuse flock:
            # stop rather than run unprotected.
            os.close(self._fd)
            raise UserError(f"cannot lock {what} ({error.strerror}); on Lustre mount "
                            "with -o flock, or use a run directory on a filesystem that supports flock") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        processes.before_exit(self.release)
        processes.parent_only(self._fd)  # loader workers close their copy as they start

    def release(self) -> None:
        """Unlock, then close: forked children (loader workers) share the lock, and closing this
        descriptor alone would leave it held by any of them still alive."""
        if self.checkpoints is not None:
            self.checkpoints.release()
            self.checkpoints = None
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            processes.parent_only(self._fd, held=False)
            os.close(self._fd)
            self._fd = None


def prepare_run_dir(config, is_main: bool) -> tuple[Path, RunDirLock | None]:
    """RUN_DIR/checkpoints, created and checked by the main rank, which locks the run directory
    first; before any process group. Returns the checkpoint directory and the lock (main rank)."""
    run_dir = Path(config.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    if not is_main:
        return ckpt_dir, None
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunDirLock(run_dir)
    except FileExistsError:  # something that is not a directory has the name
        raise UserError(f"run directory {run_dir} exists and is not a directory") from None
    except OSError as error:
        raise UserError(f"run directory {run_dir} is not writable: {error.strerror}") from None
    try:
        _check_writable(ckpt_dir)
        lock.checkpoints = lock_checkpoints(ckpt_dir)
        _check_entries(ckpt_dir)
        for directory in (run_dir, ckpt_dir):  # only under the lock: no other writer is live
            remove_stale_temp_files(directory)
    except BaseException:
        lock.release()
        raise
    return ckpt_dir, lock


def lock_checkpoints(ckpt_dir: Path) -> RunDirLock:
    """RUN_DIR/checkpoints may be a link (to a larger disk), and a job script that makes the same
    link for two runs gives them one checkpoints directory: each would resume from, and prune, the
    other's files, and remove its live temp files as stale. So it has a lock of its own."""
    real = os.path.realpath(ckpt_dir)
    where = f" (the directory {real})" if real != os.path.abspath(ckpt_dir) else ""
    what = f"checkpoints directory {ckpt_dir}{where}"
    try:
        return RunDirLock(ckpt_dir, what, "another run directory's checkpoints are this directory too: give "
                                          "each run its own")
    except OSError as error:
        raise UserError(f"{what} is not writable: {error.strerror}") from None


def _check_writable(ckpt_dir: Path) -> None:
    if ckpt_dir.is_symlink() and not ckpt_dir.is_dir():
        # A scratch directory the link led to was purged, say: making it anew would start the run
        # afresh and hide that its checkpoints are gone.
        target = os.path.realpath(ckpt_dir)
        what = "which does not exist" if not os.path.lexists(target) else "which is not a directory"
        raise UserError(f"{ckpt_dir} is a link to {target}, {what}: restore the directory to resume from its "
                        "checkpoints, or create it (or remove the link) to start afresh")
    try:
        ckpt_dir.mkdir(exist_ok=True)
        probe = temp_path(ckpt_dir / WRITE_TEST)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UserError(f"run directory {ckpt_dir.parent} is not writable: {error.strerror}") from None


def _check_entries(ckpt_dir: Path) -> None:
    """`latest` must be replaceable by a file; entries named like checkpoints that are not regular
    files (a FIFO, a directory) are never opened, and said so once."""
    latest = ckpt_dir / LATEST
    if latest.is_dir():
        raise UserError(f"{latest} is a directory, not the marker file; move it away")
    for path in sorted(ckpt_dir.iterdir()):
        if step_in_name(path) is not None and not is_regular_file(path):
            log.warning("ignoring %s: not a regular file", path)


_OUR_CONFIG_KEYS = frozenset({"model", "dataset", "batch_size", "epochs", "run_dir"})
_RECORD_LIMIT = 1 << 20  # a run's records are a few hundred bytes


def _load_record(path: Path):
    """The JSON value of a record of the run directory (config.json, wandb.json, failures.json),
    or None where there is none or it cannot be one: not a regular file (a FIFO would block the
    start, a link to /dev/zero fill the memory), over 1 MB, or not JSON."""
    if not is_regular_file(path):
        return None
    try:
        with open(path, "rb") as f:
            text = f.read(_RECORD_LIMIT + 1)
        return json.loads(text) if len(text) <= _RECORD_LIMIT else None
    except (OSError, ValueError):
        return None


def read_run_record(path: Path, is_record, what: str) -> dict:
    """RUN_DIR/wandb.json or failures.json, files anyone can edit: {} where there is none, and
    {} with a warning where what is there is not a record of `what` (is_record(value) is false)."""
    if not os.path.lexists(path):
        return {}
    record = _load_record(path)
    if not (isinstance(record, dict) and is_record(record)):
        log.warning("ignoring %s: not a record of %s", path, what)
        return {}
    return record


def last_launch_config(run_dir) -> dict | None:
    """The configuration RUN_DIR/config.json records (the last launch's), or None where there is
    none or the file is not a run's."""
    record = _load_record(Path(run_dir) / "config.json")
    return record if isinstance(record, dict) and _OUR_CONFIG_KEYS <= record.keys() else None


def check_config_file(run_dir) -> None:
    """RUN_DIR/config.json, where there is one, must be a run's: a run directory may be a project
    or model directory too (`--run-dir .`), whose config.json a run would replace. A regular file
    that is not one beside checkpoints of the run's own is the run's, damaged (a flipped byte, a
    truncation): it is written again at this launch rather than refused at every relaunch."""
    path = Path(run_dir) / "config.json"
    if os.path.lexists(path) and last_launch_config(run_dir) is None:
        if is_regular_file(path) and list_checkpoints(Path(run_dir) / "checkpoints"):
            log.warning("%s is damaged (not a dist_train configuration) but the run directory has checkpoints "
                        "of its own; it is written again at this launch", path)
            return
        raise UserError(f"{path} is not a dist_train configuration (another program's file?) and a run "
                        "would replace it: use another --run-dir, or move the file away")


def write_config_file(config) -> None:
    """The effective configuration, as RUN_DIR/config.json."""
    write_run_file(Path(config.run_dir) / "config.json", json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")


def write_run_file(path: Path, text: str, durable: bool = True) -> None:
    """A file of the run directory, replaced whole. A write that fails (a full disk, a directory in
    its place) is a SaveFailedError: the run ends as after a failed save, its checkpoints untouched.
    durable=False for a record rewritten often, which a power loss (not a kill) may roll back."""
    try:
        write_atomically(path, lambda f: f.write(text.encode()), fsync_file=durable, fsync_directory=durable)
    except OSError as error:
        raise SaveFailedError(f"could not write {path}: {error.strerror or error}") from None
