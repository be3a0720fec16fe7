"""The on-disk format, in-process: round trip, prefixes, pruning, the marker, broken files."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from conftest import assert_bitwise_equal
from dist_train.checkpoint import (CheckpointError, checkpoint_path, find_latest_valid, list_checkpoints,
                                   load_checkpoint, read_latest_marker, save_checkpoint)
from dist_train.config import UserError
from dist_train.distributed import DistEnv
from dist_train.loop import build_scheduler
from dist_train.models import Net, build_model, strip_wrapper_prefixes, unwrap
from dist_train.state import (Progress, Training, apply_checkpoint, build_checkpoint, capture_rng_state,
                              choose_resume_checkpoint, restore_rng_state)

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


def test_latest_marker_and_pruning_keep_the_newest(tmp_path):
    for step in (5, 10, 15, 20):
        save_checkpoint(trained_checkpoint(step), tmp_path, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000000020.pt", "step_000000015.pt"]
    assert read_latest_marker(tmp_path) == checkpoint_path(tmp_path, 20)
    assert not list(tmp_path.glob(".*.tmp"))


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
