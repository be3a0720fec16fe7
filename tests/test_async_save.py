"""The asynchronous save's writer process: the same file as a synchronous save, from a snapshot;
it dies with the run, ignores the signals a job gets, holds no lock, and a dead one is a failed save."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import Launch, assert_bitwise_equal, newest_checkpoint, process_tree
from test_run_faults import TINY, error_lines

from dist_train import exits
from dist_train import async_save, writer_process
from dist_train.async_save import ProcessWriter
from dist_train.checkpoint import list_checkpoints
from dist_train.rundir import RunDirLock
from dist_train.saving import save_checkpoint


def a_checkpoint(step: int, width: int = 1000) -> dict:
    """Tensors of several dtypes and sizes (an empty one, a 0-dim one), nested as a checkpoint's."""
    return {"model_state_dict": {"w": torch.randn(width, 300), "b": torch.zeros(width, dtype=torch.bfloat16),
                                 "count": torch.tensor(7, dtype=torch.int64), "none": torch.empty(0, 3)},
            "optimizer_state_dict": {"state": {0: {"momentum_buffer": torch.randn(width, 300)}},
                                     "param_groups": [{"lr": 0.1, "params": [0]}]},
            "rng_states": [{"cpu": torch.get_rng_state()}], "global_step": step, "format_version": 1}


@pytest.mark.parametrize("quiet", [True, False])
def test_the_writer_process_writes_what_a_synchronous_save_writes_from_a_snapshot(tmp_path, quiet):
    """The synchronous save's file, although the tensors change as soon as submit() returns: the
    same records, each tensor's bytes the same, the same checkpoint loaded (the pickle itself may
    memoise a string differently, and torch draws a serialisation id per file). Then a larger
    checkpoint (the shared memory grows) and a smaller one. quiet: one thread writes (CPU
    training), or two, as a synchronous save does (a GPU's loop, with cores to spare)."""
    sync_dir, async_dir = tmp_path / "sync", tmp_path / "async"
    sync_dir.mkdir()
    async_dir.mkdir()
    writer = ProcessWriter(quiet=quiet)
    try:
        for step, width in ((1, 1000), (2, 3000), (3, 10)):
            checkpoint = a_checkpoint(step, width)
            expected = save_checkpoint(checkpoint, sync_dir, keep=5)
            saved = []
            writer.submit(checkpoint, async_dir, 5, saved.append)
            for tensor in (checkpoint["model_state_dict"]["w"], checkpoint["optimizer_state_dict"]["state"][0]
                           ["momentum_buffer"]):
                tensor.add_(1.0)  # training goes on while the file is written
            assert writer.wait() is None
            assert saved == [async_dir / f"step_{step:09d}.pt"]
            assert records(saved[0]) == records(expected)
            assert_bitwise_equal(torch.load(saved[0], weights_only=True), torch.load(expected, weights_only=True))
    finally:
        writer.close()
    assert sorted(p.name for p in async_dir.iterdir()) == sorted(p.name for p in sync_dir.iterdir())


def test_an_optimizers_tensors_are_copied_in_the_background_until_its_next_step(tmp_path, monkeypatch):
    """defer(optimizer): its parameters and momentum are copied off the main thread, and its next
    step() waits for those copies; the buffers (BatchNorm's statistics, which the next forward
    changes) are copied before submit() returns. Here the background copies are held back until
    the next step is under way, and the file must still hold the state of the save's step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(300, 200), torch.nn.BatchNorm1d(200))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad()
        model(torch.randn(16, 300)).square().mean().backward()  # the forward updates the statistics
        optimizer.step()

    step()
    release, held = threading.Event(), []
    copy_all = async_save.copy_all

    def held_back(pairs) -> None:
        held.append(len(pairs))
        release.wait()
        copy_all(pairs)

    monkeypatch.setattr(async_save, "copy_all", held_back)
    (tmp_path / "sync").mkdir()
    (tmp_path / "async").mkdir()
    writer = ProcessWriter()
    try:
        writer.defer(optimizer)
        checkpoint = {"model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict(),
                      "global_step": 1}
        expected = save_checkpoint(checkpoint, tmp_path / "sync", keep=1)
        writer.submit(checkpoint, tmp_path / "async", 1)
        threading.Timer(0.5, release.set).start()
        step()
        waited = release.is_set()
        assert writer.wait() is None
    finally:
        release.set()
        writer.close()
    saved = torch.load(expected, weights_only=True)
    assert_bitwise_equal(torch.load(tmp_path / "async" / expected.name, weights_only=True), saved)
    assert not torch.equal(model[0].weight.detach(), saved["model_state_dict"]["0.weight"])  # it stepped
    assert waited  # the step waited for the copies
    assert held == [8]  # 2 weights, 2 biases, their 4 momentum buffers; not the 3 BatchNorm buffers


def records(path: Path) -> dict[str, bytes]:
    """A checkpoint's zip records, less the pickle and the per-file serialisation id."""
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()
                if not name.endswith(("data.pkl", "serialization_id"))}


@pytest.mark.parametrize("deferred", [False, True])
def test_a_dead_writer_process_is_a_failed_save_and_the_older_checkpoints_stay(tmp_path, deferred):
    """deferred: the checkpoint's weights are an optimizer's, so the job is sent from the copying
    thread after its copies, and the dead writer is found there."""
    checkpoints = [a_checkpoint(1), a_checkpoint(2)]
    writer = ProcessWriter()
    try:
        if deferred:  # parameters over the checkpoints' own weights (no copy)
            writer.defer(torch.optim.SGD([torch.nn.Parameter(c["model_state_dict"]["w"]) for c in checkpoints]))
        writer.submit(checkpoints[0], tmp_path, 2)
        assert writer.wait() is None
        os.kill(writer._process.pid, signal.SIGKILL)  # as the OOM killer would
        os.waitpid(writer._process.pid, 0)
        writer.submit(checkpoints[1], tmp_path, 2)
        assert (writer._copier is not None) == deferred
        while writer.busy():
            time.sleep(0.01)
        assert writer.failed()
        problem = writer.wait()
        assert problem.startswith("could not save a checkpoint: the writer process is gone"), problem
    finally:
        writer.close()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000000001.pt"]


def test_the_writer_process_does_not_hold_the_run_directory_lock(tmp_path):
    """A flock lives as long as any copy of its descriptor: a writer that kept the one it was
    forked with would lock out every later launch once the run is over."""
    lock = RunDirLock(tmp_path)
    writer = ProcessWriter()
    try:
        lock.release()
        RunDirLock(tmp_path).release()  # raises UserError ("is in use by ...") if the writer holds it
    finally:
        writer.close()


def writer_pid(launch: Launch) -> int:
    """The launch's one child process (the run is a single process started directly)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        children = [pid for pid in process_tree(launch.proc.pid) if pid != launch.proc.pid]
        if children:
            (pid,) = children
            return pid
        time.sleep(0.05)
    raise AssertionError("no writer process")


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for a reaper."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_the_writer_process_dies_with_the_run_and_writes_nothing_after_it(tmp_path):
    """SIGKILL of the training process alone (as an OOM kill of it would be) while its writer is in
    the middle of a write: the writer dies too, and the checkpoint it was writing never appears
    (no file completes behind the dead run, or behind a relaunch)."""
    run_dir, ckpt_dir = tmp_path / "run", tmp_path / "run" / "checkpoints"
    launch = Launch(TINY + ["--model", "resnet18", "--epochs", "1000", "--save-every-steps", "1",
                            "--run-dir", str(run_dir)], tmp_path / "killed.log")
    launch.wait_for(r"saved checkpoint")
    pid = writer_pid(launch)
    before = freeze_mid_write(pid, ckpt_dir, launch)
    os.kill(launch.proc.pid, signal.SIGKILL)
    launch.wait()
    os.kill(pid, signal.SIGCONT)  # free to finish its write, were it still alive
    deadline = time.monotonic() + 10
    while alive(pid):
        assert time.monotonic() < deadline, "the writer process outlived the run"
        time.sleep(0.01)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == before


def freeze_mid_write(pid: int, ckpt_dir: Path, launch: Launch) -> list[str]:
    """SIGSTOP the writer at an instant when it is writing a checkpoint: its temp file is there
    for a step newer than every checkpoint (a temp of an older step is a pruned file being
    unlinked). Returns the directory's names at that instant."""
    deadline = time.monotonic() + 60
    while True:
        os.kill(pid, signal.SIGSTOP)
        names = sorted(p.name for p in ckpt_dir.iterdir())
        steps = [int(re.search(r"step_(\d+)", name).group(1)) for name in names if name.startswith("step_")]
        writing = [name for name in names if name.endswith(".tmp") and steps
                   and int(re.search(r"step_(\d+)", name).group(1)) > max(steps)]
        if writing:
            return names
        os.kill(pid, signal.SIGCONT)
        assert time.monotonic() < deadline and launch.proc.poll() is None, launch.output()[-2000:]
        time.sleep(0.002)


def test_a_signal_to_the_whole_job_stops_the_run_with_a_checkpoint(tmp_path):
    """SLURM and a terminal signal every process of a job: the writer process must not die of
    SIGTERM (nor act on it) while it writes, or that checkpoint would be lost. resnet18 saved at
    every step; the signal comes while the writer is held in the middle of a write."""
    run_dir = tmp_path / "run"
    args = TINY + ["--model", "resnet18", "--epochs", "1000", "--save-every-steps", "1", "--run-dir", str(run_dir)]
    launch = Launch(args, tmp_path / "term.log")
    launch.wait_for(r"saved checkpoint .*step_000000002")
    pid = writer_pid(launch)
    freeze_mid_write(pid, run_dir / "checkpoints", launch)
    os.killpg(launch.proc.pid, signal.SIGTERM)
    os.kill(pid, signal.SIGCONT)
    assert launch.wait(timeout=120) == exits.TERMINATED, launch.output()[-3000:]
    assert error_lines(launch.output()) == []
    assert "could not save" not in launch.output(), launch.output()[-3000:]
    (saved,) = re.findall(r"saved checkpoint \S+ \(epoch \d+, step (\d+), stop requested by SIGTERM\)",
                          launch.output())
    assert newest_checkpoint(run_dir)["global_step"] == int(saved)


class FakeCudart:
    """torch.cuda.cudart() where there is no GPU: page-locking, as the driver would answer it,
    with each call's thread and whether its address was mapped at the time."""

    def __init__(self, refuse: bool = False):
        self.refuse, self.calls = refuse, []

    def cudaHostRegister(self, ptr, size, flags):  # noqa: N802 (CUDA's name)
        self.calls.append(("register", ptr, threading.current_thread().name, is_mapped(ptr)))
        return 1 if self.refuse else 0  # 1: cudaErrorInvalidValue

    def cudaHostUnregister(self, ptr):  # noqa: N802
        self.calls.append(("unregister", ptr, threading.current_thread().name, is_mapped(ptr)))
        return 0


def is_mapped(address: int) -> bool:
    for line in Path("/proc/self/maps").read_text().splitlines():
        start, end = (int(part, 16) for part in line.split()[0].split("-"))
        if start <= address < end:
            return True
    return False


@pytest.fixture
def fake_gpu(monkeypatch):
    """The CUDA calls of the writer's page-locking, without a GPU (the only thing mocked)."""
    def use(cudart: FakeCudart, devices: list):
        monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
        monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    return use


def test_page_locked_shared_memory_is_unlocked_before_it_is_unmapped(fake_gpu):
    """CUDA keeps a registration past munmap, and a later mapping at the same address then failed
    every kernel ('resource already mapped', on an H200): each mapping is unlocked while still
    mapped, when the region grows and when it is closed; the calls run in a thread of their own
    (a CUDA error stays that thread's) on the training thread's GPU."""
    cudart, devices = FakeCudart(), []
    fake_gpu(cudart, devices)
    region = writer_process.SharedRegion(pin=True)
    region.copy_in({"w": torch.ones(1000)})
    region.copy_in({"w": torch.ones(1 << 20)})  # grows: a new mapping
    region.close()
    assert [call[0] for call in cudart.calls] == ["register", "unregister", "register", "unregister"]
    assert cudart.calls[1][1] == cudart.calls[0][1] and cudart.calls[3][1] == cudart.calls[2][1]
    assert all(mapped for *_, mapped in cudart.calls)
    assert {thread for _, _, thread, _ in cudart.calls} == {"checkpoint-pin"}
    assert devices == [3] * 4


def test_memory_the_driver_will_not_page_lock_is_a_warning_and_the_snapshot_still_works(fake_gpu, caplog):
    cudart, devices = FakeCudart(refuse=True), []
    fake_gpu(cudart, devices)
    region = writer_process.SharedRegion(pin=True)
    skeleton, left = region.copy_in({"w": torch.arange(10.0)})
    region.close()
    assert [call[0] for call in cudart.calls] == ["register"]  # nothing registered: nothing to undo
    assert "could not be page-locked (cudaError 1)" in caplog.text
    assert skeleton["w"].shape == (10,) and left == []


def test_on_cuda_the_process_is_told_to_write_only_once_the_copies_off_the_gpu_are_done(fake_gpu, tmp_path,
                                                                                        monkeypatch):
    """The copies are queued on the stream and submit() returns at once; a thread waits for the
    event recorded after them (held back here), and only then does the process write. Nothing is
    deferred to the optimizer's step: the stream orders the copies before the next step's kernels."""
    cudart, devices = FakeCudart(), []
    fake_gpu(cudart, devices)
    copied = threading.Event()

    class HeldEvent:  # torch.cuda.Event, its copies "done" when the test says so
        def record(self):
            pass

        def synchronize(self):
            copied.wait()

    monkeypatch.setattr(torch.cuda, "Event", HeldEvent)
    model = torch.nn.Linear(30, 20)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    writer = ProcessWriter("cuda")
    try:
        writer.defer(optimizer)
        assert not optimizer._optimizer_step_pre_hooks  # no wait added to the step on CUDA
        checkpoint = a_checkpoint(1)
        writer.submit(checkpoint, tmp_path, 2)
        time.sleep(0.3)
        assert writer.busy() and not list(tmp_path.iterdir())  # not a byte before the copies are done
        copied.set()
        assert writer.wait() is None
        assert_bitwise_equal(torch.load(tmp_path / "step_000000001.pt", weights_only=True), checkpoint)
    finally:
        copied.set()
        writer.close()
    assert [call[0] for call in cudart.calls] == ["register", "unregister"]
