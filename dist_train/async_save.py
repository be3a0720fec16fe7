"""Asynchronous saves: a snapshot into host buffers, the write in the background.

submit() copies every tensor of the checkpoint into host buffers that are reused from one save to
the next, so that training may change the weights while the file is written. (On CPU the process writer
copies the optimizer's parameters and state on a thread instead, while the next step's forward
and backward run; that step's optimizer.step() waits for the copies: see ProcessWriter.defer.)
The background writes, fsyncs, renames, moves `latest` and prunes, exactly as a synchronous save
does (saving.save_checkpoint): a SIGKILL at any instant leaves the previous checkpoint as it was.
At most one write is in flight: the next save waits for it, and so does every way out of the run
(a stop, the end of training, a survivor's save, an error).

Two writers, one interface (defer, submit, failed, wait, close):
- ProcessWriter (Linux, CPU or CUDA training): a writer process of its own (writer_process.py),
  since a thread's Python would hold the loop's GIL for 70-100 ms per resnet50 save on 2 cores,
  and on a GPU it slows a loop bound by kernel launches. On CUDA its shared memory is
  page-locked, the copies off the GPU are queued on the stream, and a thread waits for them
  (without the GIL) before it tells the process to write.
- ThreadWriter (where fork/memfd are missing): a thread, the snapshot in pinned buffers, copied
  from the GPU without blocking.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from pathlib import Path
from typing import Callable

import torch

from dist_train import saving, writer_process
from dist_train.saving import write_checkpoint

log = logging.getLogger(__name__)


def make_writer(device_type: str) -> "ThreadWriter | ProcessWriter":
    """The writer for training on this device type (make it before any process group: it may fork)."""
    if device_type in ("cpu", "cuda") and writer_process.available():
        try:
            return ProcessWriter(device_type)
        except OSError as error:  # no fork (a process limit), no memfd (a sandbox's seccomp filter)
            log.warning("checkpoints are written in a thread: no writer process (%s)", error)
    return ThreadWriter()


class Snapshot:
    """Copies of a checkpoint's tensors in host buffers kept for the next save (same place in the
    checkpoint, shape and dtype: the same buffer)."""

    def __init__(self):
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._from_cuda = False

    def __call__(self, tree):
        self._from_cuda = False
        copy = self._copy(tree, ())
        if self._from_cuda:
            torch.cuda.synchronize()  # the copies were queued non-blocking; the thread reads them
        return copy

    def _copy(self, tree, key: tuple):
        if isinstance(tree, torch.Tensor):
            return self._copy_tensor(tree.detach(), key)
        if isinstance(tree, dict):
            return {k: self._copy(v, key + (k,)) for k, v in tree.items()}
        if isinstance(tree, (list, tuple)):
            return type(tree)(self._copy(v, key + (i,)) for i, v in enumerate(tree))
        return tree

    def _copy_tensor(self, tensor: torch.Tensor, key: tuple) -> torch.Tensor:
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.is_cuda)
            self._buffers[key] = buffer
        self._from_cuda |= tensor.is_cuda
        return buffer.copy_(tensor, non_blocking=tensor.is_cuda)


class ThreadWriter:
    """One write at a time in a background thread; its failure is kept for the main thread."""

    def __init__(self):
        self.snapshot = Snapshot()
        self._thread: threading.Thread | None = None
        self._problem: str | None = None

    def defer(self, optimizer: torch.optim.Optimizer) -> None:
        """Nothing to defer: the whole snapshot is taken in submit() (on CUDA, copies queued ahead
        of the next step's kernels, and synchronized)."""

    def submit(self, checkpoint: dict, ckpt_dir: Path, keep: int, on_saved: Callable[[Path], None] | None = None):
        """Snapshot `checkpoint` (its tensors may change once this returns) and write it in the
        background; on_saved(path) is called from the writer thread. wait() for the previous first."""
        assert self._thread is None, "wait() for the write in flight first"
        args = (self.snapshot(checkpoint), ckpt_dir, keep, on_saved)
        # Not a daemon: should the run end by an unexpected exception, the interpreter still
        # finishes the write before it exits (a half-written temp file is harmless, but wasted).
        self._thread = threading.Thread(target=self._run, args=args, name="checkpoint-writer")
        self._thread.start()

    def _run(self, checkpoint: dict, ckpt_dir: Path, keep: int, on_saved) -> None:
        try:
            self._problem = write_checkpoint(checkpoint, ckpt_dir, keep, on_saved, background=True)[1]
        except BaseException as error:  # reported at the next step, as a synchronous failure would be
            self._problem = f"could not save a checkpoint: {error}"

    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def failed(self) -> bool:
        """The last write is over and failed (never blocks)."""
        return self._thread is not None and not self._thread.is_alive() and self._problem is not None

    def wait(self) -> str | None:
        """Wait for the write in flight; its problem (once), or None."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        problem, self._problem = self._problem, None
        return problem

    def close(self) -> None:
        """At the end of the run, whatever ended it: the write in flight completes first."""
        problem = self.wait()
        if problem:
            log.error("%s", problem)


class ProcessWriter:
    """One write at a time in the writer process; the answer is collected by the main thread
    (on_saved runs there, at the first failed() or wait() after the write)."""

    def __init__(self, device_type: str = "cpu", quiet: bool | None = None):
        self._cuda = device_type == "cuda"
        self.region = writer_process.SharedRegion(pin=self._cuda)
        self._process = writer_process.WriterProcess(self.region.fd)
        self.snapshot = Snapshot()  # a synchronous save's copies off the GPU (train.py's host_copy)
        # quiet: the write keeps to one thread, as saving.save_checkpoint(background=True), where
        # the loop needs the cores (the default for CPU training, or a GPU's loop with fewer than 4
        # cores). Else it writes as fast as a save the loop waits for: on an H200 with 16 cores one
        # thread took ~3x dd+fsync for resnet18, and a save 17 steps later waited for it.
        self._quiet = not (self._cuda and len(os.sched_getaffinity(0)) >= 4) if quiet is None else quiet
        self._on_saved = None
        self._in_flight = False
        self._problem: str | None = None
        self._thread: ThreadWriter | None = None  # once the snapshot found no room in shared memory
        self._optimizers = []  # whose tensors change only in their step()
        self._copier: threading.Thread | None = None  # the snapshot's copies deferred until a step
        self._copier_error: BaseException | None = None

    def defer(self, optimizer: torch.optim.Optimizer) -> None:
        """The tensors of `optimizer` (its parameters, their state) change only in its step(): a
        snapshot copies them on a thread of its own while the next step's forward and backward run,
        and that step() first waits for the copies. The rest of a checkpoint (buffers such as
        BatchNorm's statistics, which a forward changes) is copied before submit() returns.
        On CUDA nothing is deferred: every copy is queued on the stream ahead of the next step."""
        if self._cuda:
            return
        self._optimizers.append(optimizer)
        optimizer.register_step_pre_hook(lambda *_: self.settle())

    def _changes_in_step(self):
        """Whether a tensor shares its storage with a parameter or state of a deferred optimizer."""
        strided = lambda tensor: tensor.layout == torch.strided  # noqa: E731 (sparse ones have no storage)
        storages = {tensor.untyped_storage().data_ptr() for optimizer in self._optimizers
                    for tensor in optimizer_tensors(optimizer) if strided(tensor)}
        return lambda tensor: strided(tensor) and tensor.untyped_storage().data_ptr() in storages

    def submit(self, checkpoint: dict, ckpt_dir: Path, keep: int, on_saved: Callable[[Path], None] | None = None):
        """As ThreadWriter.submit."""
        assert not self._in_flight, "wait() for the write in flight first"
        if self._thread is None:
            try:
                skeleton, left = self.region.copy_in(checkpoint, self._changes_in_step())
            except OSError as error:  # the memfd cannot grow: a file size limit (ulimit -f), no memory
                log.warning("checkpoints are written in a thread from now on: no room for the snapshot "
                            "in shared memory (%s)", error.strerror or error)
                self._thread = ThreadWriter()
        if self._thread is not None:
            return self._thread.submit(checkpoint, ckpt_dir, keep, on_saved)
        self._on_saved, self._in_flight = on_saved, True
        job = (self.region.size, skeleton, str(ckpt_dir), keep, saving.known_verdicts(ckpt_dir), self._quiet)
        if self._cuda:  # the copies are queued on the stream: the thread waits for them, GIL released
            copied = torch.cuda.Event()
            copied.record()
            finish = copied.synchronize
        else:
            finish = (lambda: copy_all(left)) if left else None
        if finish is not None:
            self._copier = threading.Thread(target=self._copy_and_send, args=(finish, job), name="checkpoint-snapshot")
            self._copier.start()
        else:
            try:
                self._process.send(job)
            except OSError as error:
                self._finish(None, _gone(error))

    def _copy_and_send(self, finish, job) -> None:
        try:
            finish()
            self._process.send(job)
        except BaseException as error:  # reported by settle(), on the main thread
            self._copier_error = error

    def settle(self) -> None:
        """Wait for the snapshot's deferred copies (not for the write)."""
        if self._copier is None:
            return
        self._copier.join()
        self._copier = None
        error, self._copier_error = self._copier_error, None
        if error is not None:
            self._finish(None, _gone(error) if isinstance(error, OSError) else f"could not save a checkpoint: {error}")

    def _collect(self) -> None:
        try:
            path, problem, verdicts = self._process.receive()
        except (EOFError, OSError) as error:
            path, problem, verdicts = None, _gone(error), {}
        saving.learn_verdicts(verdicts)  # pruning need not read the file it wrote
        self._finish(path, problem)

    def _finish(self, path: str | None, problem: str | None) -> None:
        self._in_flight, self._problem = False, problem
        if path is not None and self._on_saved is not None:
            self._on_saved(Path(path))

    def busy(self) -> bool:
        if self._thread is not None:
            return self._thread.busy()
        if self._copier is not None and self._copier.is_alive():
            return True
        self.settle()
        if self._in_flight and self._process.ready():
            self._collect()
        return self._in_flight

    def failed(self) -> bool:
        """The last write is over and failed (never blocks)."""
        if self._thread is not None:
            return self._thread.failed()
        return not self.busy() and self._problem is not None

    def wait(self) -> str | None:
        """Wait for the write in flight; its problem (once), or None."""
        if self._thread is not None:
            return self._thread.wait()
        self.settle()
        if self._in_flight:
            self._collect()
        problem, self._problem = self._problem, None
        return problem

    def close(self) -> None:
        """At the end of the run, whatever ended it: the write in flight completes first, then the
        writer process exits."""
        if self._process is None:
            return
        problem = self.wait()
        self._process.stop()
        self._process = None
        self.region.close()
        if problem:
            log.error("%s", problem)


def _gone(error: BaseException) -> str:
    """The writer process died (killed by hand, by the OOM killer): a failed save."""
    return f"could not save a checkpoint: the writer process is gone ({str(error) or 'it died'})"


def copy_all(pairs) -> None:
    """buffer <- source for each pair, off the main thread."""
    for buffer, source in pairs:
        if source.is_contiguous():  # a plain memcpy: copy_ would start an OpenMP team of its own
            ctypes.memmove(buffer.data_ptr(), source.data_ptr(), source.numel() * source.element_size())
        else:
            buffer.copy_(source)


def optimizer_tensors(optimizer: torch.optim.Optimizer):
    """Its parameters and the tensors of their state (momentum buffers, step counts)."""
    for group in optimizer.param_groups:
        yield from group["params"]
    for state in optimizer.state.values():
        yield from (value for value in state.values() if isinstance(value, torch.Tensor))
