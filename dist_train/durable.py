"""Files that are either whole or absent: temp file, fsync, rename, directory fsync.

A checkpoint is written at the disk's speed: the file is unbuffered (torch.save hands over each
tensor's bytes in one piece, a buffer would only copy them once more), and the kernel is asked to
start writing each part to disk as soon as it is handed over (sync_file_range), so serialising
the next tensors overlaps the disk's work and the final fsync waits for little more than the tail.
"""

from __future__ import annotations

import ctypes
import os
import secrets
from pathlib import Path

_WRITEBACK_EVERY = 8 << 20  # bytes handed over between two writeback starts
_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writing back dirty pages, do not wait


def _sync_file_range():
    """libc's sync_file_range where there is one (Linux), else None: then only fsync writes back."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return function


_start_writeback = _sync_file_range()


def fsync_dir(directory: Path) -> None:
    """A rename is durable only once the directory entry itself is on disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    """A temp name beside `path` that no other writer uses (pid and random), hidden, ending in .tmp."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


class _Writer:
    """The file handed to a writer: starts writeback as it goes, and remembers the OSError of a
    failed write (torch.save reports a full disk as a RuntimeError about zip positions, and the
    cause, ENOSPC, EFBIG or EIO, is what to tell)."""

    def __init__(self, file):
        self.file, self.error = file, None
        self._written = self._flushed = 0

    def write(self, data) -> int:
        try:
            count = self.file.write(data)
        except OSError as error:
            self.error = error
            raise
        self._written += count
        if _start_writeback is not None and self._written - self._flushed >= _WRITEBACK_EVERY:
            # Only a hint: a failure here (say EINVAL on an odd filesystem) changes nothing, and
            # the fsync that follows every write reports real errors.
            _start_writeback(self.file.fileno(), self._flushed, self._written - self._flushed,
                             _SYNC_FILE_RANGE_WRITE)
            self._flushed = self._written
        return count

    def flush(self) -> None:
        self.file.flush()


def write_atomically(path: Path, write, fsync_file: bool = True, fsync_directory: bool = True) -> None:
    """write(file) into a temp file beside `path`, fsync it, rename it over `path`, fsync the dir.

    On any failure (a full disk, a vanished directory) the temp file is removed: a failed write
    leaves nothing behind and replaces nothing; the OSError behind it is raised. fsync_file=False
    is for a hint that may be lost in a crash, never for data that is loaded; fsync_directory=False
    for a caller that fsyncs the directory itself once after several renames."""
    tmp = temp_path(path)
    try:
        with open(tmp, "wb", buffering=0) as f:
            writer = _Writer(f)
            try:
                write(writer)
            except Exception:
                if writer.error is not None:
                    raise writer.error from None
                raise
            if fsync_file:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync_directory:
        fsync_dir(path.parent)
