"""The asynchronous save's writer as a process of its own, so that it takes nothing from the loop.

A thread would share the loop's GIL: torch.save runs Python for every tensor it pickles (a
resnet50 checkpoint: ~10,000 persistent_id calls), and each time the writer holds the GIL the
loop's next torch op waits for it. Measured on 2 CPU cores, that wait was 70-100 ms of a resnet50
save's ~0.35 s dd+fsync (README, Throughput). A process has its own interpreter.

How: the snapshot's tensors live in one shared memory file (memfd, not /dev/shm, whose tmpfs is
often 64 MB in containers); the process, forked once when the writer is made, maps the same file,
rebuilds the checkpoint with tensors over it and saves it with saving.save_checkpoint, exactly as
a synchronous save. It is told the checkpoint (tensors as offsets, the rest by value) and answers
with the path written or a one-line problem. It dies with its parent (PR_SET_PDEATHSIG): a
SIGKILL of the run leaves at most a temp file, which the next launch removes, and never a write
finishing behind a relaunch. It ignores the signals the run handles (SIGTERM, SIGUSR1, SIGINT,
...): SLURM and a terminal signal every process of a job, and only the run decides when to stop.
"""

from __future__ import annotations

import logging
import mmap
import os
import signal
import socket
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from dist_train import processes
from dist_train.checkpoint import map_leaves, tensors
from dist_train.preemption import HANDLED_BY_THE_RANK
from dist_train.saving import known_verdicts, learn_verdicts, wait_for_pruning, write_checkpoint

log = logging.getLogger(__name__)

_ALIGN = 64  # bytes: every tensor starts on a cache line


def available() -> bool:
    """Linux only (memfd, fork, prctl)."""
    return hasattr(os, "memfd_create") and hasattr(os, "fork") and os.uname().sysname == "Linux"


class SharedRegion:
    """Host buffers for the snapshot's tensors, all in one memfd that the writer process maps too.

    A layout (one buffer per tensor, in the order of checkpoint.tensors) is kept while the shapes
    and dtypes stay the same, as they do from one save of a run to the next; another grows the
    file. Reuse is safe: the next snapshot is taken only once the previous write is over."""

    def __init__(self, pin: bool = False):
        self.fd = os.memfd_create("dist_train-snapshot")
        self.size = 0
        self._pin = pin  # page-locked for CUDA (cudaHostRegister), so that copies off the GPU do not block
        self._pinned: torch.Tensor | None = None  # the whole mapping, while it is registered
        self._specs: list | None = None
        self._offsets: list[int] = []
        self._buffers: list[torch.Tensor] = []

    def copy_in(self, tree, later=lambda tensor: False):
        """Copy the tree's tensors into the region, but those for which later(tensor) holds: the
        tree with a Slot in place of each tensor, and the copies left to make as (buffer, source).
        Copies from a GPU are only queued on the current stream: record an event after them."""
        sources = list(tensors(tree))
        specs = [(tuple(t.shape), t.dtype) for t in sources]
        if specs != self._specs:
            self._lay_out(specs)
        left = []
        for source, buffer in zip(sources, self._buffers):
            if later(source):
                left.append((buffer, source.detach()))
            else:
                buffer.copy_(source.detach(), non_blocking=source.is_cuda)
        slots = iter(Slot(offset, shape, dtype) for offset, (shape, dtype) in zip(self._offsets, specs))
        return map_leaves(tree, lambda _: next(slots)), left

    def _lay_out(self, specs) -> None:
        self._offsets, size = layout(specs)
        if size > self.size:
            size = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages, as page-locking takes them
            os.ftruncate(self.fd, size)
            self.size = size
        self._buffers = []  # the old views go before their mapping
        self._unpin()
        region = mmap.mmap(self.fd, self.size) if self.size else None
        self._buffers = [over(region, offset, shape, dtype) for offset, (shape, dtype) in zip(self._offsets, specs)]
        self._specs = specs
        if self._pin and region is not None:
            self._pinned = page_lock(region)

    @property
    def page_locked(self) -> bool:
        return self._pinned is not None

    def close(self) -> None:
        """Unlock the memory before it is unmapped: CUDA keeps a registration past the unmapping,
        and a later mapping at the same address then fails every kernel after it (seen on an H200:
        'resource already mapped')."""
        self._buffers, self._specs = [], None
        self._unpin()
        os.close(self.fd)

    def _unpin(self) -> None:
        if self._pinned is not None:  # unlocked, then unmapped (the tensor keeps the mapping)
            base = self._pinned.data_ptr()
            on_this_gpu(lambda: torch.cuda.cudart().cudaHostUnregister(base))
            self._pinned = None


def page_lock(region: mmap.mmap) -> torch.Tensor | None:
    """Page-lock a mapping for CUDA, as torch's own staging of shared memory does; None where the
    driver refuses (copies off the GPU then block, and stay correct). The tensor keeps it mapped."""
    whole = torch.frombuffer(region, dtype=torch.uint8)
    error = on_this_gpu(lambda: int(torch.cuda.cudart().cudaHostRegister(whole.data_ptr(), whole.numel(), 1)))
    if error:  # 1: cudaHostRegisterPortable
        log.warning("copies off the GPU for a checkpoint block the loop: its shared memory could not be "
                    "page-locked (cudaError %d)", error)
        return None
    return whole


def on_this_gpu(call):
    """call() in a thread of its own, on this thread's GPU: a CUDA error it meets stays that
    thread's last error (each host thread has one), never one the training thread's next kernel
    launch check would raise; and no context is made on GPU 0 for a rank that trains on another."""
    device, result = torch.cuda.current_device(), [-1]

    def run() -> None:
        try:
            torch.cuda.set_device(device)
            result[0] = call()
        except Exception:  # as a refusal (-1), not a thread's traceback on stderr
            pass

    thread = threading.Thread(target=run, name="checkpoint-pin")
    thread.start()
    thread.join()
    return result[0]


@dataclass(frozen=True)
class Slot:
    """Where a tensor of the checkpoint lies in the region."""
    offset: int
    shape: tuple
    dtype: torch.dtype


def layout(specs) -> tuple[list[int], int]:
    """Offsets of tensors of these (shape, dtype) one after another, each on a cache line; the size."""
    offsets, end = [], 0
    for shape, dtype in specs:
        offsets.append(end)
        end += -(-torch.Size(shape).numel() * dtype.itemsize // _ALIGN) * _ALIGN
    return offsets, end


def over(region, offset: int, shape, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of `shape` and `dtype` over region[offset:] (no copy)."""
    count = torch.Size(shape).numel()
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(region, dtype=dtype, count=count, offset=offset).view(shape)


class WriterProcess:
    """The forked writer and the parent's end of its socket."""

    def __init__(self, region_fd: int):
        parent_end, child_end = socket.socketpair()
        parent_pid = os.getpid()
        self.pid = os.fork()
        if self.pid == 0:  # the child never returns
            parent_end.close()
            _serve(Connection(child_end.detach()), region_fd, parent_pid)
        child_end.close()
        self.conn = Connection(parent_end.detach())
        # Until the child has closed what it inherited (the run directory's lock), the parent may
        # not go on: a lock released before that would stay held.
        try:
            ready = self.conn.recv()
        except EOFError:
            ready = None
        if ready != "ready":
            self.stop()
            raise OSError(f"the writer process did not start: {ready or 'it died'}")

    def send(self, message) -> None:
        self.conn.send(message)

    def ready(self) -> bool:
        return self.conn.poll(0)

    def receive(self):
        return self.conn.recv()

    def stop(self) -> None:
        """Ask the process to exit (after the write in flight, if any) and reap it."""
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.conn.close()
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:  # reaped already
            pass


def _serve(conn: Connection, region_fd: int, parent_pid: int) -> None:
    """The writer process: one save per message until None or the parent's end closes."""
    status = 0
    try:
        for signum in HANDLED_BY_THE_RANK:  # the run's, which a launcher sends every process of a job
            signal.signal(signum, signal.SIG_IGN)
        processes.die_with_parent(parent_pid)
        _close_inherited_files(keep={0, 1, 2, conn.fileno(), region_fd})
        torch.set_num_threads(1)  # as a DataLoader worker: no OpenMP pool after a fork
        conn.send("ready")
        region, mapped = None, 0
        while True:
            try:
                message = conn.recv()
            except EOFError:
                break
            if message is None:
                break
            size, checkpoint, ckpt_dir, keep, verdicts, background = message
            learn_verdicts(verdicts)
            if size != mapped:
                region, mapped = (mmap.mmap(region_fd, size) if size else None), size
            checkpoint = map_leaves(checkpoint, lambda slot: over(region, slot.offset, slot.shape, slot.dtype), Slot)
            try:
                path, problem = write_checkpoint(checkpoint, Path(ckpt_dir), keep, background=background)
                wait_for_pruning()
            except BaseException as error:  # told to the parent, as a failed thread's would be
                path, problem = None, f"could not save a checkpoint: {error}"
            del checkpoint
            conn.send((str(path) if path is not None else None, problem, known_verdicts(Path(ckpt_dir))))
    except BaseException as error:
        status = 1
        try:  # said as a failed save (or, at start, as the reason it did not start)
            conn.send((None, f"could not save a checkpoint: the writer process failed: {error!r}", {}))
        except BaseException:
            pass
    finally:
        os._exit(status)  # never the parent's atexit handlers, finalisers or buffered output


def _close_inherited_files(keep: set[int]) -> None:
    """The run directory's lock above all: a flock lives as long as any copy of its descriptor."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:  # the descriptor listdir itself used
                pass
