"""This process's children, and ending the process at once without leaving them behind.

A rank forks children: its DataLoader workers, the checkpoint writer process, wandb-core. A
forked child shares the rank's open file descriptions, the run directory's flock among them, and
a child that never answers (a loader worker deadlocked inside os.fork itself, as CPython 3.11
up to 3.11.7 can when another thread starts or ends at that instant, gh-112275; one stuck in
I/O) outlives its rank: it would hold the run directory for ever.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import signal
import sys
import threading

_BEFORE_EXIT: list = []  # callbacks for end_now: what must not outlive the process (the lock)
_FINALIZING_IS_UNSAFE = False  # a process group ran here (leave)
_PARENT_ONLY: set[int] = set()  # descriptors a forked child closes at once (the lock's)


def parent_only(fd: int, held: bool = True) -> None:
    """Have children that call die_with_parent close `fd` (held=False: no longer)."""
    (_PARENT_ONLY.add if held else _PARENT_ONLY.discard)(fd)


def die_with_parent(parent_pid: int) -> None:
    """In a child forked by `parent_pid`: close the parent's own descriptors (the run directory's
    lock: closing a copy leaves the parent's flock as it is), and have the kernel SIGKILL this
    process when the parent dies (PR_SET_PDEATHSIG, Linux; it follows the thread that forked,
    here always the main thread). A child whose parent died before that exits at once."""
    for fd in _PARENT_ONLY:
        try:
            os.close(fd)
        except OSError:
            pass
    _PARENT_ONLY.clear()
    kill_on_parent_death()
    if os.getppid() != parent_pid:
        os._exit(0)


def kill_on_parent_death() -> bool:
    """Have the kernel SIGKILL this process when the thread that forked it ends (PR_SET_PDEATHSIG,
    Linux); False where that could not be armed. The parent may have died already: check after."""
    if not sys.platform.startswith("linux"):
        return False
    return ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0) == 0


def children() -> list[tuple[int, bytes]]:
    """(PID, command) of this process's children, from /proc (Linux; elsewhere none)."""
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return []
    found = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                parent = int(f.read().rsplit(b")", 1)[1].split()[1])
            if parent != os.getpid():
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                found.append((pid, f.read().split(b"\0")[0]))
        except (OSError, ValueError, IndexError):
            continue
    return found


def kill(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def before_exit(callback) -> None:
    """Have end_now call `callback()` first."""
    _BEFORE_EXIT.append(callback)


def end_now(code: int) -> None:
    """os._exit(code) (no unwinding: the main thread may be blocked), after the callbacks (the run
    directory's lock is dropped for the children too) and with every child killed."""
    for callback in _BEFORE_EXIT:
        try:
            callback()
        except Exception:
            pass
    kill(pid for pid, _ in children())
    logging.shutdown()
    os._exit(code)


def finalizing_is_unsafe() -> None:
    """A process group ran in this process: its threads may still free tensors (leave)."""
    global _FINALIZING_IS_UNSAFE
    _FINALIZING_IS_UNSAFE = True


def leave(code: int) -> None:
    """sys.exit(code); after a process group, the same without finalizing the interpreter: Python
    threads joined, atexit handlers run, output flushed, then os._exit. A gloo worker thread that
    releases a tensor of the last collective after destroy_process_group needs the GIL, and one
    that asks for it while the interpreter finalizes is ended inside C++ code that may not unwind:
    "terminate called without an active exception", SIGABRT, exit 134 after a complete run (core
    dump: THPVariable_dealloc -> take_gil -> PyThread_exit_thread -> std::terminate). The entry
    points end with this; main() itself returns, for callers in the same process. A single
    process exits as usual (SystemExit, which a caller running the script in-process can catch)."""
    if not _FINALIZING_IS_UNSAFE:
        sys.exit(code)
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # what Py_FinalizeEx runs before it finalizes (logging's flush among them)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe, a closed stream: nothing more can be said
            pass
    os._exit(code)
