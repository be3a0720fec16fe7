"""Asynchronous saves: a snapshot on the main thread, the write in one background thread.

The snapshot copies every tensor of the checkpoint into host buffers (pinned on CUDA) that are
reused from one save to the next, so that training may change the weights while the file is
written. The background thread writes, fsyncs, renames, moves `latest` and prunes, exactly as a
synchronous save does (saving.save_checkpoint): a SIGKILL at any instant leaves the previous
checkpoint as it was. At most one write is in flight: the next save waits for it, and so does
every way out of the run (a stop, the end of training, a survivor's save, an error).
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

import torch

log = logging.getLogger(__name__)


class Snapshot:
    """Copies of a checkpoint's tensors in host buffers kept for the next save (same key, shape
    and dtype: the same buffer). Reuse is safe: a new snapshot is taken only once the previous
    write is over (BackgroundWriter.wait)."""

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


class BackgroundWriter:
    """One write at a time in a background thread; its failure is kept for the main thread."""

    def __init__(self):
        self.snapshot = Snapshot()
        self._thread: threading.Thread | None = None
        self._problem: str | None = None

    def submit(self, job: Callable[[], str | None]) -> None:
        """Run job() (which returns a one-line problem, or None) in the background; the previous
        write must be waited for first."""
        assert self._thread is None, "wait() for the write in flight first"
        # Not a daemon: should the run end by an unexpected exception, the interpreter still
        # finishes the write before it exits (a half-written temp file is harmless, but wasted).
        self._thread = threading.Thread(target=self._run, args=(job,), name="checkpoint-writer")
        self._thread.start()

    def _run(self, job) -> None:
        try:
            self._problem = job()
        except BaseException as error:  # reported at the next step, as a synchronous failure would be
            self._problem = f"could not save a checkpoint: {error}"

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
