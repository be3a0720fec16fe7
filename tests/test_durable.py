"""Files that are whole or absent, written by a second thread from the tensors' own memory."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import REPO, python_env
from dist_train import durable
from dist_train.saving import memory_ranges, save_checkpoint
from dist_train.durable import write_atomically


def test_a_pipelined_save_writes_the_same_bytes_as_torch_save(tmp_path):
    """Large tensors (written from their memory), small ones and the pickle (copied, batched), a
    view into a larger storage: byte for byte what torch.save writes into memory."""
    base = torch.randn(700_000)
    checkpoint = {"large": torch.randn(3, 500_000), "small": [torch.arange(10), torch.ones(300_000)],
                  "view": base[100:200], "names": [f"entry {i}" for i in range(50_000)], "step": 7}
    expected = io.BytesIO()
    torch.save(checkpoint, expected)
    for stable in (memory_ranges(checkpoint), [], None):
        path = tmp_path / f"{stable is None}-{bool(stable)}.pt"
        write_atomically(path, lambda f: torch.save(checkpoint, f), stable=stable)
        assert path.read_bytes() == expected.getvalue()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_memory_outside_the_stable_ranges_is_copied_before_write_returns(tmp_path):
    """torch.save hands over some pieces from buffers it reuses or frees at once (the pickle, a
    GPU tensor's host copy): those must be in the file as they were when handed over."""
    kept = torch.full((4 << 20,), 7, dtype=torch.uint8)  # stable: written from where it lies
    reused = bytearray(b"a" * (3 << 20))

    def write(f):
        f.write(memoryview(kept.numpy()))
        f.write(reused)
        reused[:] = b"b" * len(reused)  # as soon as write() returns, the buffer is someone else's
        f.write(reused)

    path = tmp_path / "mixed"
    write_atomically(path, write, stable=memory_ranges(kept))
    data = path.read_bytes()
    assert data == bytes(kept.numpy()) + b"a" * (3 << 20) + b"b" * (3 << 20)


def test_a_write_that_fails_in_the_writer_thread_raises_its_oserror_and_leaves_nothing(tmp_path):
    """The file size limit cuts the write midway (a short write, then EFBIG, as a full disk gives
    ENOSPC): save_checkpoint raises the OSError itself, no temp file stays, the older file stays."""
    script = textwrap.dedent(f"""
        import resource, signal, sys
        from pathlib import Path
        import torch
        sys.path.insert(0, {str(REPO)!r})
        from dist_train.saving import save_checkpoint
        ckpt_dir = Path({str(tmp_path)!r})
        def checkpoint(step, numel):
            return {{"model_state_dict": {{"w": torch.randn(numel)}}, "global_step": step}}
        save_checkpoint(checkpoint(1, 1000), ckpt_dir, keep=2)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (3_000_000, 3_000_000))
        try:
            save_checkpoint(checkpoint(2, 2_000_000), ckpt_dir, keep=2)  # 8 MB: in pieces past 1 MB
        except OSError as error:
            print("raised", error.strerror)
    """)
    out = subprocess.run([sys.executable, "-c", script], env=python_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip() == "raised File too large", out.stdout + out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000000001.pt"]


def test_a_save_in_the_background_leaves_the_disks_writes_to_the_fsync(tmp_path, monkeypatch):
    """A save the loop waits for starts writing each 8 MB to disk as it goes; an asynchronous
    writer's (background=True) does not: on a VM those writes cost the host CPU time that was
    taken from the training while the writer was busy too (README, Throughput)."""
    if durable._start_writeback is None:
        pytest.skip("no sync_file_range on this platform")
    started = []
    real = durable._start_writeback
    monkeypatch.setattr(durable, "_start_writeback", lambda fd, offset, count, flags:
                        (started.append((offset, count)), real(fd, offset, count, flags))[1])
    checkpoint = {"model_state_dict": {"w": torch.randn(6_000_000)}, "global_step": 1}  # 24 MB
    for background in (False, True):
        started.clear()
        path = save_checkpoint(checkpoint, tmp_path, keep=2, background=background)
        assert torch.equal(torch.load(path, weights_only=True)["model_state_dict"]["w"],
                           checkpoint["model_state_dict"]["w"])
        assert (started == []) == background, started
        checkpoint["global_step"] += 1


def test_no_write_hands_the_kernel_more_than_a_megabyte(tmp_path, monkeypatch):
    """Larger writes fill the page cache with 2 MB folios, and on a VM whose balloon reports free
    memory to the host each one faults on the host at first touch: 90 MB in 8 MB writes took
    150-220 ms a few seconds after the last free, in 1 MB writes 22-34 ms (durable._WRITE_MAX)."""
    sizes = []

    class Recording(io.FileIO):
        def write(self, data):
            if "step_" in str(self.name):  # not the `latest` marker's
                sizes.append(memoryview(data).nbytes)
            return super().write(data)

    monkeypatch.setattr(durable, "open", lambda path, mode, buffering: Recording(path, "wb"), raising=False)
    checkpoint = {"model_state_dict": {"w": torch.randn(6_000_000)}, "global_step": 1}  # one 24 MB tensor
    for background in (False, True):
        sizes.clear()
        path = save_checkpoint(checkpoint, tmp_path, keep=2, background=background)
        assert torch.equal(torch.load(path, weights_only=True)["model_state_dict"]["w"],
                           checkpoint["model_state_dict"]["w"])
        assert sum(sizes) == path.stat().st_size and max(sizes) <= 1 << 20, (background, max(sizes))
        checkpoint["global_step"] += 1
