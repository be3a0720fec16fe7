"""Files that are either whole or absent: temp file, fsync, rename, directory fsync.

A checkpoint is written at the disk's speed. torch.save hands over each tensor's bytes in one
piece, as a view of the tensor's own memory, after computing their CRC32. Given the memory that
stays unchanged during the write (`stable`: the checkpoint's tensors), a second thread writes those
views without copying them while torch.save computes the next tensor's CRC32: the two halves of
the work (checksums, copying into the page cache) run on two cores instead of one after the other.
Small pieces (zip headers, the pickle) are copied and batched. The kernel is asked to start writing
each part to disk as soon as it is written (sync_file_range), so the final fsync waits for little
more than the tail. Not so for a save in the background (early_writeback=False), whose time the
loop does not wait for: on a VM the disk's writes cost CPU time on the host, and while both the
writer and the training were busy they were taken from the training (steal time, README
Throughput); written back at the fsync, they run while the writer's core is idle.
"""

from __future__ import annotations

import bisect
import ctypes
import os
import queue
import re
import secrets
import threading
from pathlib import Path

import numpy

_WRITEBACK_EVERY = 8 << 20  # bytes handed over between two writeback starts
_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writing back dirty pages, do not wait
_VIEW_MIN = 1 << 20  # pieces this large in stable memory are written from where they lie
_BATCH = 1 << 20  # smaller pieces are copied and written together once this many bytes are pending
# No write() hands the kernel more than this. A larger one fills the page cache with 2 MB folios,
# and on a VM whose balloon reports free memory to the host (free page reporting) each such block
# is a fault on the host at first touch: 90 MB written in 8 MB calls took 150-220 ms a few
# seconds after the last free, in 1 MB calls 22-34 ms (probe of 2026-12-03; 2 MB and up slow).
_WRITE_MAX = 1 << 20


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


_TEMP_NAME = re.compile(r"^\.(.+)\.\d+\.[0-9a-f]+\.tmp$")


def temp_target(name: str) -> str | None:
    """The name that a file named by temp_path was to become; None for any other name."""
    match = _TEMP_NAME.match(name)
    return match.group(1) if match else None


class _Writer:
    """The file handed to a writer: batches small pieces, starts writeback as it goes, and
    remembers the OSError of a failed write (torch.save reports a full disk as a RuntimeError
    about zip positions, and the cause, ENOSPC, EFBIG or EIO, is what to tell).

    Pieces under _VIEW_MIN (zip headers, names, small tensors) are copied into one buffer and
    written once _BATCH bytes are pending: a syscall each would cost more than the copy. With
    `stable` memory ranges ((start, end) addresses that stay alive and unchanged until close()),
    writes go through a queue to a second thread; a large piece inside those ranges is queued as
    the view it came as, any other piece is copied first (its memory may be reused as soon as
    write() returns). close() writes what is pending, waits for the queue, raises the first error.
    early_writeback: start writing each _WRITEBACK_EVERY bytes to disk as they are handed over."""

    def __init__(self, file, stable=None, early_writeback: bool = True):
        self.file, self.error = file, None
        self._early_writeback = early_writeback and _start_writeback is not None
        self._written = self._flushed = 0
        self._pending = bytearray()
        self._queue = None
        if stable is not None:
            ranges = sorted(stable)
            self._starts, self._ends = [s for s, _ in ranges], [e for _, e in ranges]
            self._queue = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._drain, name="checkpoint-file-writer")
            self._thread.start()

    def write(self, data) -> int:
        if self.error is not None:  # stop the serialiser at once: the file is lost anyway
            raise self.error
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        if view.nbytes < _VIEW_MIN:
            self._pending += view
            if len(self._pending) >= _BATCH:
                self._put_pending()
        else:
            self._put_pending()
            if self._queue is None:
                self._write(view)
            else:
                self._queue.put(view if self._is_stable(view) else memoryview(bytes(view)))
        return view.nbytes

    def _is_stable(self, view: memoryview) -> bool:
        start = numpy.frombuffer(view, numpy.uint8).ctypes.data
        i = bisect.bisect_right(self._starts, start) - 1
        return i >= 0 and start + view.nbytes <= self._ends[i]

    def _put_pending(self) -> None:
        if self._pending:
            pending, self._pending = memoryview(self._pending), bytearray()
            if self._queue is None:
                self._write(pending)
            else:
                self._queue.put(pending)

    def _drain(self) -> None:
        while (view := self._queue.get()) is not None:
            if self.error is None:  # after an error the rest is only drained
                try:
                    self._write(view)
                except BaseException as error:  # kept for close(), which raises it
                    self.error = self.error or error

    def _write(self, view: memoryview) -> None:
        count = view.nbytes
        try:
            while view:  # a raw file may write less than asked (a signal, a nearly full disk)
                view = view[self.file.write(view[:_WRITE_MAX]):]
        except OSError as error:
            self.error = error
            raise
        self._written += count
        if self._early_writeback and self._written - self._flushed >= _WRITEBACK_EVERY:
            # Only a hint: a failure here (say EINVAL on an odd filesystem) changes nothing, and
            # the fsync that follows every write reports real errors.
            _start_writeback(self.file.fileno(), self._flushed, self._written - self._flushed,
                             _SYNC_FILE_RANGE_WRITE)
            self._flushed = self._written

    def flush(self) -> None:
        pass  # close() writes what is pending

    def close(self) -> None:
        """Everything handed over written (or dropped after an error); then the first error."""
        try:
            if self.error is None:
                self._put_pending()
        finally:
            if self._queue is not None:
                self._queue.put(None)
                self._thread.join()
                self._queue = None
        if self.error is not None:
            raise self.error


def write_atomically(path: Path, write, fsync_file: bool = True, fsync_directory: bool = True,
                     stable=None, early_writeback: bool = True) -> None:
    """write(file) into a temp file beside `path`, fsync it, rename it over `path`, fsync the dir.

    On any failure (a full disk, a vanished directory) the temp file is removed: a failed write
    leaves nothing behind and replaces nothing; the OSError behind it is raised. fsync_file=False
    is for a hint that may be lost in a crash, never for data that is loaded; fsync_directory=False
    for a caller that fsyncs the directory itself once after several renames. `stable`: memory
    ranges (start, end) that stay alive and unchanged until this returns; early_writeback: start
    the disk's writes as the file is written, not only at the fsync (see _Writer)."""
    tmp = temp_path(path)
    try:
        with open(tmp, "wb", buffering=0) as f:
            writer = _Writer(f, stable, early_writeback)
            try:
                try:
                    write(writer)
                finally:
                    writer.close()  # always: no view of `stable` memory outlives this call
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
