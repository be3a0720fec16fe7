"""The on-disk format, in-process: round trip, prefixes, pruning, the marker, broken files."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import re
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_bitwise_equal
from dist_train.checkpoint import (CheckpointError, NewerFormatError, checkpoint_path, find_latest_valid,
                                   list_checkpoints, load_checkpoint, read_latest_marker)
from dist_train.config import UserError
from dist_train.distributed import DistEnv
from dist_train.loop import build_scheduler
from dist_train.models import Net, build_model, strip_wrapper_prefixes, unwrap
from dist_train.saving import save_checkpoint, wait_for_pruning
from dist_train.rng import capture_rng_state, restore_rng_state
from dist_train.state import Progress, Training, apply_checkpoint, build_checkpoint, choose_resume_checkpoint

CPU = torch.device("cpu")
ENV = DistEnv(rank=0, local_rank=0, world_size=1, device=CPU)


def make_training(model=None) -> Training:
    model = model or Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return Training(model, optimizer, build_scheduler(optimizer, "cosine", 100))


def trained_checkpoint(step: int, training: Training | None = None) -> dict:
    training = training or make_training()
    loss = training.model(torch.randn(4, 3, 32, 32)).sum()
    loss.backward()
    training.optimizer.step()
    training.scheduler.step()
    progress = Progress(epoch=0, next_epoch=0, next_batch=step, global_step=step)
    return build_checkpoint(training, progress, loss.item(), [capture_rng_state(CPU)], {"model": "net"}, 1)


def test_round_trip_loads_with_weights_only_and_restores_everything(tmp_path):
    source = make_training()
    checkpoint = trained_checkpoint(7, source)
    path = save_checkpoint(checkpoint, tmp_path, keep=3)
    loaded = load_checkpoint(path)  # weights_only=True inside
    assert_bitwise_equal(loaded, checkpoint)

    target = make_training()
    progress = apply_checkpoint(loaded, target)
    assert progress == Progress(0, 0, 7, 7)
    assert_bitwise_equal(target.model.state_dict(), source.model.state_dict())
    assert_bitwise_equal(target.optimizer.state_dict(), source.optimizer.state_dict())
    assert target.scheduler.state_dict() == source.scheduler.state_dict()


def test_rng_state_round_trip_for_python_numpy_torch():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian
    np.random.standard_normal()
    state = capture_rng_state(CPU)
    expected = (random.random(), np.random.standard_normal(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_rng_state(state, CPU)
    got = (random.random(), np.random.standard_normal(), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_wrapper_prefixes_are_stripped_for_ddp_and_compile(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        plain = Net()
        wrapped = DDP(torch.compile(plain))
        keys = list(wrapped.state_dict())
        assert keys[0].startswith("module._orig_mod.")
        assert unwrap(wrapped) is plain
        assert list(strip_wrapper_prefixes(wrapped.state_dict())) == list(plain.state_dict())
        training = make_training(plain)
        training.model = wrapped
        checkpoint = build_checkpoint(training, Progress(), 0.0, [], {}, 1)
        assert list(checkpoint["model_state_dict"]) == list(plain.state_dict())
    finally:
        dist.destroy_process_group()


def test_latest_marker_and_pruning_keep_the_newest(tmp_path, monkeypatch):
    unlinked_on = []
    real_unlink = Path.unlink

    def unlink(path, missing_ok=False):
        unlinked_on.append(threading.current_thread().name)
        real_unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    for step in (5, 10, 15, 20):
        save_checkpoint(trained_checkpoint(step), tmp_path, keep=2)
        # The pruned file stops being a checkpoint before the save returns...
        assert len(list_checkpoints(tmp_path)) == min(2, step // 5)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000000020.pt", "step_000000015.pt"]
    assert read_latest_marker(tmp_path) == checkpoint_path(tmp_path, 20)
    wait_for_pruning()
    # ...and its blocks are freed in the background, by the time wait_for_pruning returns.
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_000000015.pt", "step_000000020.pt"]
    assert unlinked_on == ["checkpoint-pruner"] * 2


def test_pruning_never_removes_the_checkpoint_just_written(tmp_path):
    # A higher-numbered leftover (say from a run resumed from an older file) must not push
    # the newly written checkpoint out.
    save_checkpoint(trained_checkpoint(30), tmp_path, keep=1)
    path = save_checkpoint(trained_checkpoint(10), tmp_path, keep=1)
    assert path.exists() and read_latest_marker(tmp_path) == path


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    save_checkpoint(trained_checkpoint(5), tmp_path, keep=3)
    newest = save_checkpoint(trained_checkpoint(10), tmp_path, keep=3)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated, as by a full disk
    path, checkpoint = find_latest_valid(tmp_path)
    assert path == checkpoint_path(tmp_path, 5) and checkpoint["global_step"] == 5


def test_no_loadable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    path = save_checkpoint(trained_checkpoint(5), ckpt_dir, keep=3)
    path.write_bytes(b"garbage")
    with pytest.raises(UserError, match="no checkpoint .* loads"):
        choose_resume_checkpoint(ckpt_dir, None, ENV)
    assert path.read_bytes() == b"garbage"  # nothing is deleted or overwritten
    assert choose_resume_checkpoint(tmp_path / "empty", None, ENV) is None  # no files: fresh start


def test_files_that_are_not_checkpoints_are_refused(tmp_path):
    newer = trained_checkpoint(5)
    newer["format_version"] = 99
    torch.save(newer, tmp_path / "newer.pt")
    with pytest.raises(CheckpointError, match="format version 99 is newer"):
        load_checkpoint(tmp_path / "newer.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a dist_train checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a loadable checkpoint"):
        load_checkpoint(tmp_path / "text.pt")


def test_a_checkpoint_of_another_architecture_names_the_keys():
    checkpoint = trained_checkpoint(1, make_training(Net()))
    other = build_model("resnet18")
    optimizer = torch.optim.SGD(other.parameters(), lr=0.1)
    with pytest.raises(UserError, match="missing keys .*unexpected keys .*conv2.weight"):
        apply_checkpoint(checkpoint, Training(other, optimizer, build_scheduler(optimizer, "constant", 1)))


def flip_byte(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def entry_offsets(path, name_ending: str) -> range:
    """Where the bytes of the zip entry whose name ends with `name_ending` lie in the file."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(name_ending))
    # The local header: 30 bytes, then the name and the extra field (their lengths at 26 and 28).
    header = path.read_bytes()[info.header_offset:info.header_offset + 30]
    start = info.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")
    return range(start, start + info.file_size)


@pytest.mark.parametrize("entry", ["data/0", "data.pkl"])
def test_a_flipped_byte_is_a_broken_file_and_the_previous_one_is_used(tmp_path, entry, caplog):
    save_checkpoint(trained_checkpoint(5), tmp_path, keep=3)
    newest = save_checkpoint(trained_checkpoint(10), tmp_path, keep=3)
    offsets = entry_offsets(newest, entry)
    flip_byte(newest, offsets[len(offsets) // 2])
    if entry == "data/0":  # a tensor's bytes: torch alone loads the wrong values without a word
        assert torch.load(newest, weights_only=True)["global_step"] == 10
    with pytest.raises(CheckpointError, match="digest check failed"):
        load_checkpoint(newest)
    path, checkpoint = find_latest_valid(tmp_path)
    assert path == checkpoint_path(tmp_path, 5) and checkpoint["global_step"] == 5
    assert "step_000000010.pt" in caplog.text and "skipping" in caplog.text


def test_the_recipe_loads_a_checkpoint_file_unchanged(tmp_path):
    source = Net()  # the training's optimizer names its parameters (train.build_training)
    named = torch.optim.SGD(source.named_parameters(), lr=0.1, momentum=0.9)
    saved = trained_checkpoint(5, Training(source, named, build_scheduler(named, "cosine", 100)))
    assert saved["optimizer_state_dict"]["param_groups"][0]["param_names"][0] == "conv1.weight"
    path = save_checkpoint(saved, tmp_path, keep=3)
    # The recipe's loading code, line for line: no sidecar, no wrapper
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    checkpoint = torch.load(path, weights_only=True)
    model.load_state_dict(checkpoint["model_state_dict"])
    optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
    epoch = checkpoint["epoch"]
    loss = checkpoint["loss"]
    model.eval()
    assert isinstance(epoch, int) and isinstance(loss, float)
    assert all(state["momentum_buffer"] is not None for state in optimizer.state.values())
    assert checkpoint["format_version"] == 2 and "environment" in checkpoint
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()  # the recipe trains on with the loaded state


def test_a_newer_format_file_stops_the_search_and_is_never_overwritten_or_pruned(tmp_path):
    save_checkpoint(trained_checkpoint(5), tmp_path, keep=3)
    newer = trained_checkpoint(10)
    newer["format_version"] = 99
    torch.save(newer, checkpoint_path(tmp_path, 10))
    with pytest.raises(NewerFormatError, match="update dist_train"):
        find_latest_valid(tmp_path)
    before = checkpoint_path(tmp_path, 10).read_bytes()
    with pytest.raises(NewerFormatError, match="not overwriting"):
        save_checkpoint(trained_checkpoint(10), tmp_path, keep=1)
    for step in (20, 30):
        save_checkpoint(trained_checkpoint(step), tmp_path, keep=1)
    assert checkpoint_path(tmp_path, 10).read_bytes() == before
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000000030.pt", "step_000000010.pt"]


def test_only_regular_files_are_candidates(tmp_path):
    save_checkpoint(trained_checkpoint(5), tmp_path, keep=3)
    os.mkfifo(checkpoint_path(tmp_path, 20))  # opening it would block forever
    checkpoint_path(tmp_path, 30).mkdir()
    assert list_checkpoints(tmp_path) == [checkpoint_path(tmp_path, 5)]
    assert find_latest_valid(tmp_path)[0] == checkpoint_path(tmp_path, 5)
    with pytest.raises(CheckpointError, match="not a regular file"):
        load_checkpoint(checkpoint_path(tmp_path, 20))


def test_a_file_whose_step_disagrees_with_its_name_is_broken(tmp_path):
    save_checkpoint(trained_checkpoint(5), tmp_path, keep=3)
    torch.save(trained_checkpoint(7), checkpoint_path(tmp_path, 40))
    with pytest.raises(CheckpointError, match="name says step 40 but it holds step 7"):
        load_checkpoint(checkpoint_path(tmp_path, 40))
    assert find_latest_valid(tmp_path)[0] == checkpoint_path(tmp_path, 5)


@pytest.mark.parametrize("key, value", [("global_step", "5"), ("next_batch", -1), ("world_size", 0),
                                        ("epoch", 1.0), ("next_epoch", True), ("loss", "low"),
                                        ("config", None), ("rng_states", "state"), ("environment", "cpu")])
def test_a_checkpoint_whose_counters_are_not_counts_is_refused(tmp_path, key, value):
    """Written by other code (its checksums then agree): a resume would do arithmetic on them."""
    checkpoint = trained_checkpoint(5) | {key: value}
    torch.save(checkpoint, tmp_path / "other.pt")
    shown = type(value).__name__ if key in ("config", "rng_states", "environment") else repr(value)
    with pytest.raises(CheckpointError, match=f"other.pt: not a dist_train checkpoint, {key} is {shown}"):
        load_checkpoint(tmp_path / "other.pt")


def _rng_without(key):
    state = capture_rng_state(CPU)
    del state[key]
    return [state]


def _rng_with(path, value):
    state = capture_rng_state(CPU)
    *parents, last = path
    node = state
    for name in parents:
        node = node[name]
    node[last] = value
    return [state]


@pytest.mark.parametrize("states, problem", [
    ([], "rng_states holds 0 rank states for world size 1"),
    ([capture_rng_state(CPU)] * 2, "rng_states holds 2 rank states for world size 1"),
    (["state"], "rng_states of rank 0 is not an RNG state (str)"),
    (_rng_without("numpy"), "rng_states of rank 0 is not an RNG state (no numpy)"),
    (_rng_with(["torch"], torch.zeros(3, dtype=torch.uint8)), "rng_states of rank 0: torch is not a CPU generator state"),
    (_rng_with(["python", "state"], torch.zeros(3, dtype=torch.int64)), "rng_states of rank 0: python is not"),
    (_rng_with(["numpy", "keys"], torch.zeros(3, dtype=torch.int64)), "rng_states of rank 0: numpy is not"),
    (_rng_with(["cuda"], "x"), "rng_states of rank 0: cuda is not"),
])
def test_a_checkpoint_whose_rng_states_are_not_every_ranks_is_refused(tmp_path, states, problem):
    """An empty list resumed silently with fresh RNG streams (not exact); a malformed state was
    a traceback (KeyError, ValueError) after the weights had loaded."""
    checkpoint = trained_checkpoint(5) | {"rng_states": states}
    torch.save(checkpoint, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=re.escape(f"other.pt: not a dist_train checkpoint, {problem}")):
        load_checkpoint(tmp_path / "other.pt")


def _listing(run_dir) -> str:
    import contextlib
    import io

    from dist_train.cli import main as cli_main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(["list", str(run_dir)]) == 0
    return out.getvalue()


def test_list_marks_no_resume_past_a_newer_format_file(tmp_path):
    """A resume stops at a newer format's file; `list` marked the older file below it as the resume."""
    save_checkpoint(trained_checkpoint(1), tmp_path, keep=3)
    torch.save(trained_checkpoint(2) | {"format_version": 99}, checkpoint_path(tmp_path, 2))
    listing = _listing(tmp_path).splitlines()
    assert "NEWER FORMAT (format version 99" in listing[0] and "<- resume" not in "".join(listing), listing


def _as_another_user(call) -> str:
    """call() in a child process of another user (nobody) where this one is root, which reads
    every file; its outcome as text."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, never return into pytest
        code = 1
        try:
            os.close(read)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            try:
                outcome = f"returned {call()!r}"
            except Exception as error:
                outcome = f"{type(error).__name__}: {error}"
            os.write(write, outcome.encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        outcome = pipe.read()
    assert os.waitpid(pid, 0)[1] == 0
    return outcome


def test_a_checkpoint_this_user_may_not_read_stops_the_search_it_is_not_skipped():
    """Another user's file (a teammate's run, a umask of 077, a launch under sudo) was skipped as
    broken: the run resumed from an older checkpoint, trained those steps again and replaced the
    file. Nothing about the file is known to be wrong: the resume stops, naming it."""
    shared = Path(tempfile.mkdtemp())  # not under pytest's 0700 directory
    try:
        os.chmod(shared, 0o777)
        for step in (1, 2):
            save_checkpoint(trained_checkpoint(step), shared, keep=3)
        newest = checkpoint_path(shared, 2)
        os.chmod(newest, 0o600 if os.geteuid() == 0 else 0)
        outcome = _as_another_user(lambda: find_latest_valid(shared)[0].name)
        assert outcome.startswith(f"UnreadableError: {newest}: cannot be read (Permission denied)"), outcome
        assert "give this user read access to it, or move it out of" in outcome
        assert "Permission denied" in _as_another_user(lambda: load_checkpoint(newest))
        listing = _as_another_user(lambda: _listing(shared)).splitlines()
        assert "UNREADABLE (cannot be read (Permission denied)" in listing[0] and "<- resume" not in "".join(listing)
    finally:
        shutil.rmtree(shared)


def test_broken_files_never_take_a_keep_slot(tmp_path):
    for step in (5, 10):
        save_checkpoint(trained_checkpoint(step), tmp_path, keep=2)
    checkpoint_path(tmp_path, 15).write_bytes(b"broken")
    save_checkpoint(trained_checkpoint(20), tmp_path, keep=2)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert "step_000000010.pt" in names and "step_000000020.pt" in names  # two good ones kept


def test_a_failed_write_leaves_no_temp_file_and_replaces_nothing(tmp_path):
    first = save_checkpoint(trained_checkpoint(5), tmp_path, keep=3)
    broken = trained_checkpoint(10)

    def full_disk(f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    from dist_train.durable import write_atomically
    with pytest.raises(OSError):
        write_atomically(checkpoint_path(tmp_path, 10), full_disk)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", first.name]
    assert broken["global_step"] == 10


def _bytes_read() -> int:
    """read() bytes of this process so far, page cache included (/proc/self/io rchar)."""
    for line in open("/proc/self/io"):
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def test_a_save_does_not_read_back_the_files_it_keeps(tmp_path):
    """Pruning keeps the newest --keep files that verify; the ones this process wrote (or verified
    once) are known good and not read again, so a save costs the write and no more."""
    for step in (5, 10, 15):
        save_checkpoint(trained_checkpoint(step), tmp_path, keep=3)
    checkpoint = trained_checkpoint(20)
    size = checkpoint_path(tmp_path, 15).stat().st_size
    before = _bytes_read()
    save_checkpoint(checkpoint, tmp_path, keep=3)
    assert _bytes_read() - before < size // 2
    assert [p.name for p in list_checkpoints(tmp_path)] == [f"step_{s:09d}.pt" for s in (20, 15, 10)]


def test_a_fork_waits_for_the_short_threads_of_the_last_save(tmp_path, monkeypatch):
    """A thread that ends while the main thread forks can leave the child deadlocked inside
    os.fork (CPython 3.11 up to 3.11.7, gh-112275: seen here once, a loader worker of the
    evaluation that follows an epoch's save, just as that save's pruner ended). A fork, such as a
    DataLoader starting its workers, first lets the pruner end (its unlinks slowed to 1 s here)."""
    import time

    from torch.utils.data import DataLoader

    from dist_train import saving
    from dist_train.train import settle_before_fork

    unlink = saving._unlink_all
    monkeypatch.setattr(saving, "_unlink_all", lambda paths: (time.sleep(1.0), unlink(paths)))
    os.register_at_fork(before=lambda: settle_before_fork(None))  # as train() does, with its writer
    for step in (1, 2):
        save_checkpoint({"global_step": step}, tmp_path, keep=1)
    assert saving._deleter.is_alive()
    batches = iter(DataLoader(range(4), num_workers=1))  # forks its worker
    assert not saving._deleter.is_alive()
    assert [int(b) for b in batches] == [0, 1, 2, 3]


def test_an_fp16_overflow_the_grad_scaler_skipped_is_saved_a_collapsed_scale_is_divergence(tmp_path):
    """With fp16 a step whose loss overflows is one the GradScaler skips (weights and momentum
    untouched, its scale halved): refusing that save as divergence stopped the run, and every
    relaunch retrained into the same step. A scale that has halved below 1 (17 overflows from
    65,536 with no growth between) is overflow as the rule: divergence. A real GradScaler, on
    the CPU; without one a non-finite loss stays divergence."""
    from dist_train.errors import DivergedError
    from dist_train.state import save_training_state

    env = DistEnv(0, 0, 1, torch.device("cpu"))
    for name in "abc":
        (tmp_path / name).mkdir()

    def training(scaler):
        model = Net()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return Training(model, optimizer, build_scheduler(optimizer, "constant", 1), scaler)

    path = save_training_state(tmp_path / "a", 2, training(torch.amp.GradScaler("cpu")), Progress(global_step=7),
                               float("inf"), {}, env)
    assert path is not None and torch.load(path, weights_only=True)["loss"] == float("inf")
    for scaler in (torch.amp.GradScaler("cpu", init_scale=0.5), None):
        with pytest.raises(DivergedError, match="the loss"):
            save_training_state(tmp_path / "b", 2, training(scaler), Progress(global_step=7), float("nan"), {}, env)
    broken = training(torch.amp.GradScaler("cpu"))
    with torch.no_grad():
        next(broken.model.parameters())[0] = float("nan")
    with pytest.raises(DivergedError, match="the weights"):
        save_training_state(tmp_path / "c", 2, broken, Progress(global_step=7), 1.0, {}, env)
    assert not list((tmp_path / "b").iterdir()) and not list((tmp_path / "c").iterdir())
