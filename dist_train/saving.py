"""The on-disk format, write side: the atomic save, the `latest` marker, pruning.

A save writes a temp file, fsyncs it, renames it, moves `latest`, fsyncs the directory once, then
prunes; what this process already knows of each file spares pruning from reading it again.
"""

from __future__ import annotations

import errno
import os
import resource
import threading
from pathlib import Path

import torch

from dist_train.checkpoint import (FORMAT_VERSION, LATEST, NewerFormatError, CheckpointError, checkpoint_path,
                                   list_checkpoints, load_checkpoint, step_in_name, tensors)
from dist_train.durable import fsync_dir, temp_path, temp_target, write_atomically


def save_checkpoint(checkpoint: dict, ckpt_dir: Path, keep: int, background: bool = False) -> Path:
    """Write atomically, then move the `latest` marker to it, then prune to the newest `keep`.

    The directory must exist (prepare_run_dir makes it): a run directory that vanished mid-run
    is an error, not something to quietly recreate. A save the loop waits for serialises (the
    CRC32s) on this thread while a second one writes, and starts the disk's writes as it goes.
    background=True (an asynchronous writer's: the loop runs meanwhile) keeps to one thread, as a
    second would take the core the training runs on, and leaves the disk's writes to the fsync,
    when that thread has nothing else to do (README, Throughput: both cost the loop time)."""
    ckpt_dir = Path(ckpt_dir)
    path = checkpoint_path(ckpt_dir, checkpoint["global_step"])
    if path.exists() and _is_newer_format(path):
        raise NewerFormatError(f"{path}: written by a newer dist_train; not overwriting it")
    # The checkpoint's CPU tensors stay unchanged until the save returns (the caller waits, or
    # wrote them in a snapshot): their bytes are written from where they lie, see durable._Writer.
    write_atomically(path, lambda f: torch.save(checkpoint, f), fsync_directory=False,
                     stable=None if background else memory_ranges(checkpoint), early_writeback=not background)
    _remember(path, FORMAT_VERSION)  # written and fsynced here: pruning need not read it again
    # The marker is a hint for people and tools: a resume lists the files (find_latest_valid). So
    # it is not fsynced on its own (a crash may leave it stale or empty, which reads as no
    # marker), and one directory fsync makes both renames durable: a save costs one journal
    # commit for its metadata, not four.
    write_atomically(ckpt_dir / LATEST, lambda f: f.write(path.name.encode() + b"\n"),
                     fsync_file=False, fsync_directory=False)
    fsync_dir(ckpt_dir)
    prune_checkpoints(ckpt_dir, keep, protect=path)
    return path


def write_checkpoint(checkpoint: dict, ckpt_dir: Path, keep: int, on_saved=None,
                     background: bool = False) -> tuple[Path | None, str | None]:
    """save_checkpoint, with a failure as one line: (path, None) or (None, problem)."""
    try:
        path = save_checkpoint(checkpoint, ckpt_dir, keep, background)
    except OSError as error:
        return None, save_failure(error, checkpoint, ckpt_dir, keep)
    except CheckpointError as error:  # a newer-format file where this one would go
        return None, str(error)
    if on_saved is not None:
        on_saved(path)
    return path, None


def save_failure(error: OSError, checkpoint: dict, ckpt_dir: Path, keep: int) -> str:
    """One line: what failed, and how much room the checkpoints need."""
    size = sum(t.numel() * t.element_size() for t in tensors(checkpoint))
    path = checkpoint_path(ckpt_dir, checkpoint["global_step"])
    kept = f"could not save checkpoint {path}: {error.strerror or error}; the temp file is removed and the " \
           "older checkpoints are kept."
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if error.errno == errno.EFBIG and limit != resource.RLIM_INFINITY:  # not the disk: this process's limit
        return (f"{kept} This process may not write files over {_mb(limit)} (its file size limit, ulimit -f), "
                f"and a checkpoint is ~{_mb(size)}: raise the limit")
    return (f"{kept} A save needs about {_mb(size * (keep + 1))} free "
            f"(checkpoint ~{_mb(size)} x (--keep {keep} + 1))")


def _mb(num_bytes: int) -> str:
    return f"{num_bytes / 1e6:.1f} MB"


def memory_ranges(tree) -> list[tuple[int, int]]:
    """(start, end) addresses of the storages of the CPU tensors in a nest."""
    storages = (t.untyped_storage() for t in tensors(tree) if t.device.type == "cpu")
    return [(s.data_ptr(), s.data_ptr() + s.nbytes()) for s in storages]


# What this process already knows of a file, keyed by its identity (inode, size, mtime): a file
# it wrote, or verified once, is not read again at every prune (a save would otherwise read up to
# --keep files back). A file changed since (another inode, size or mtime) is verified afresh.
_verdicts: dict[Path, tuple[tuple, str]] = {}
GOOD, BROKEN, NEWER = "good", "broken", "newer"


def _identity(path: Path) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def known_verdicts(ckpt_dir: Path) -> dict:
    """What this process knows of the files in ckpt_dir, for another process to learn."""
    return {path: known for path, known in _verdicts.items() if path.parent == Path(ckpt_dir)}


def learn_verdicts(verdicts: dict) -> None:
    """Another process's known_verdicts (the asynchronous writer's and the run's): a file one of
    them wrote is not read again by the other. A file changed since has another identity."""
    _verdicts.update(verdicts)


def _remember(path: Path, version: int) -> None:
    identity = _identity(path)
    if identity is not None:
        _verdicts[Path(path)] = (identity, NEWER if version > FORMAT_VERSION else GOOD)


def _verdict(path: Path) -> str:
    identity = _identity(path)
    known = _verdicts.get(Path(path))
    if known is not None and known[0] == identity:
        return known[1]
    try:
        load_checkpoint(path, mmap=True)
        verdict = GOOD
    except NewerFormatError:
        verdict = NEWER
    except CheckpointError:
        verdict = BROKEN
    if identity is not None:
        _verdicts[Path(path)] = (identity, verdict)
    return verdict


def _is_newer_format(path: Path) -> bool:
    return _verdict(path) == NEWER


def _is_good(path: Path) -> bool:
    return _verdict(path) == GOOD


def prune_checkpoints(ckpt_dir: Path, keep: int, protect: Path) -> list[Path]:
    """Delete all checkpoints older than the newest `keep` good ones.

    Only files that verify count toward `keep` (a broken file never takes a slot); `protect`
    (the one just written) always stays; a file of a newer format is never deleted. Every file
    this code writes holds finite weights (see state.check_finite), so the newest finite one stays.

    A doomed file is renamed to a temp name at once (no longer a checkpoint), and unlinked in a
    background thread: freeing a large file's blocks takes ext4 about as long as writing a third
    of it (65 ms for 90 MB here), which a save need not wait for. A process killed before the
    unlink leaves a temp file that the next start clears away (remove_stale_temp_files).
    """
    wait_for_pruning()
    removed, doomed, good = [], [], 0
    for path in list_checkpoints(ckpt_dir):  # newest first
        if good < keep:
            if path == protect or _is_good(path):
                good += 1
            continue
        if path != protect and not _is_newer_format(path):
            tmp = temp_path(path)
            try:
                os.replace(path, tmp)
            except FileNotFoundError:  # removed by someone else meanwhile
                continue
            doomed.append(tmp)
            removed.append(path)
            _verdicts.pop(path, None)
    if doomed:
        global _deleter
        # Not a daemon: the interpreter finishes the unlinks before it exits.
        _deleter = threading.Thread(target=_unlink_all, args=(doomed,), name="checkpoint-pruner")
        _deleter.start()
    return removed


_deleter: threading.Thread | None = None


def _unlink_all(paths: list[Path]) -> None:
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError:  # the next start removes what is left (remove_stale_temp_files)
            pass


def wait_for_pruning() -> None:
    """Until the files of the last prune are deleted."""
    if _deleter is not None:
        _deleter.join()


# The files this code writes through temp files in a run directory and its checkpoints/ (beside
# step_N.pt); only their temp files are removed: the run directory may hold other things.
WRITE_TEST = "write-test"  # rundir's probe that checkpoints/ is writable
_RUN_DIR_FILES = frozenset({"config.json", "wandb.json", "failures.json", LATEST, WRITE_TEST})


def remove_stale_temp_files(directory: Path) -> None:
    """Temp files left by a save that was killed midway are never loaded; clear them away.
    Call only while holding the run directory's lock: another writer's temp file may be live."""
    for tmp in Path(directory).glob(".*.tmp"):
        target = temp_target(tmp.name)
        ours = target is not None and (target in _RUN_DIR_FILES or step_in_name(Path(target)) is not None)
        if ours and not tmp.is_dir():
            tmp.unlink(missing_ok=True)
