"""Helpers to launch real training processes and compare what they saved."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "launch" / "train.py"

# A small run shared by the end-to-end tests (on the CPU, also on a machine with GPUs): 384 fake images, 16 per batch -> 24 steps an epoch
# on one rank, 12 on two; augmentation on, 2 loader workers, a checkpoint every 5 steps.
SMALL_RUN = ["--device", "cpu", "--dataset", "fake", "--fake-size", "384", "--batch-size", "16", "--epochs", "2",
             "--num-workers", "2", "--save-every-steps", "5", "--log-every-steps", "1", "--keep", "3"]


def python_env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def launch_command(args: list[str], nproc: int = 1, script: Path = TRAIN, torchrun_flags=()) -> list[str]:
    """python SCRIPT ARGS for one process, torchrun for more."""
    if nproc == 1:
        return [sys.executable, str(script), *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), *torchrun_flags, str(script), *args]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: list[str], nproc: int = 1, timeout: float = 300, script: Path = TRAIN,
        check: bool = True, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """Run a launch to completion; output in .stdout (stderr merged)."""
    result = subprocess.run(launch_command(args, nproc, script), env=python_env() | (env_extra or {}), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}:\n{result.stdout[-4000:]}")
    return result


def signal_all(pids, sig) -> None:
    """Send `sig` to each of `pids` that still exists."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def alive(pid: int) -> bool:
    """Running or stopped; a zombie (dead, not yet reaped) or a reaped process is not."""
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def process_tree(root: int) -> list[int]:
    """root and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


class Launch:
    """A training launched in its own session, so that the whole process group can be SIGKILLed."""

    def __init__(self, args: list[str], log_path: Path, nproc: int = 1, script: Path = TRAIN, torchrun_flags=(),
                 env_extra: dict | None = None):
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(launch_command(args, nproc, script, torchrun_flags),
                                     env=python_env() | (env_extra or {}), cwd=REPO,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log_path.read_text()

    def wait_for(self, pattern: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, self.output()):
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"exited {self.proc.returncode} before {pattern!r}:\n{self.output()[-3000:]}")
            time.sleep(0.02)
        raise AssertionError(f"no {pattern!r} within {timeout}s:\n{self.output()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL every process of the launch (agent, ranks, loader workers) at one instant.

        torchrun starts its workers in sessions of their own, so a process-group kill would miss
        them: stop the whole tree first (nothing runs on), then kill it."""
        tree = process_tree(self.proc.pid)
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            signal_all(tree, sig)
            if sig == signal.SIGSTOP:
                tree = process_tree(self.proc.pid)  # children forked while we stopped the tree
        self.proc.wait(timeout=30)
        self._log.close()

    def wait(self, timeout: float = 300) -> int:
        code = self.proc.wait(timeout=timeout)
        self._log.close()
        return code


def kill_and_resume(args: list[str], run_dir: Path, kill_after_steps: list[int], nproc: int) -> list[str]:
    """Launch, SIGKILL once each listed step was logged, relaunch; finally run to the end.

    Each kill also waits for a checkpoint to be announced: an asynchronous save still in flight at
    the kill is lost (rightly), and under load the writer can lag the step log by a few steps, so
    the relaunch would start afresh (seen once in CI), which is not what these tests are about."""
    outputs = []
    for i, step in enumerate(kill_after_steps):
        launch = Launch(args, run_dir.parent / f"{run_dir.name}.{i}.log", nproc)
        launch.wait_for(rf"step {step} batch")
        launch.wait_for(r"saved checkpoint")
        launch.kill()
        outputs.append(launch.output())
    outputs.append(run(args, nproc).stdout)
    return outputs


def newest_checkpoint(run_dir: Path) -> dict:
    from dist_train.checkpoint import list_checkpoints

    paths = list_checkpoints(run_dir / "checkpoints")
    assert paths, f"no checkpoint in {run_dir}"
    return torch.load(paths[0], weights_only=True)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Floats as integers of the same width, so -0.0 != 0.0 and NaN == NaN, as bits are."""
    if t.is_floating_point():
        return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t


def assert_bitwise_equal(a, b, where: str = "") -> None:
    """Tensors equal bit for bit (NaN-safe), recursively through dicts, lists and tuples."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(_bits(a), _bits(b)), f"tensors differ at {where}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"keys differ at {where}"
        for key in a:
            assert_bitwise_equal(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{a!r} != {b!r} at {where}"


def assert_same_training_state(resumed: dict, reference: dict) -> None:
    for key in ("model_state_dict", "optimizer_state_dict", "scheduler_state_dict", "rng_states",
                "global_step", "epoch", "next_epoch", "next_batch", "loss"):
        assert_bitwise_equal(resumed[key], reference[key], key)


@pytest.fixture
def restore_signals():
    """In-process code installs (then ignores) SIGUSR1/SIGTERM/SIGINT handlers: give pytest its own back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def reference_ws1(session_dir) -> Path:
    run_dir = session_dir / "reference_ws1"
    out = run(SMALL_RUN + ["--run-dir", str(run_dir), "--data-path", "device"]).stdout
    assert "training complete: 2 epochs, 48 steps" in out
    return run_dir


@pytest.fixture(scope="session")
def reference_ws2(session_dir) -> Path:
    run_dir = session_dir / "reference_ws2"
    out = run(SMALL_RUN + ["--run-dir", str(run_dir), "--data-path", "device"], nproc=2).stdout
    assert "training complete: 2 epochs, 24 steps" in out
    return run_dir


@pytest.fixture(scope="session")
def killed_ws1(session_dir) -> tuple[Path, list[str]]:
    """SMALL_RUN on one process, SIGKILLed mid-epoch 0, right after the epoch 0 boundary and mid-epoch 1,
    relaunched each time, with wandb logging offline (it must not change the training); the data on
    the device."""
    run_dir = session_dir / "killed_ws1"
    args = SMALL_RUN + ["--run-dir", str(run_dir), "--wandb-project", "dist-train-tests", "--wandb-mode", "offline",
                        "--data-path", "device"]
    return run_dir, kill_and_resume(args, run_dir, kill_after_steps=[8, 25, 37], nproc=1)
