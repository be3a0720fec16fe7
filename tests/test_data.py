"""The resumable sampler, seeded augmentation, and the two data paths (DataLoader and on-device)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from torchvision import transforms as T
from torchvision.datasets import FakeData

from dist_train.augment import Normalize
from dist_train.config import Config
from dist_train.data import (CIFAR10_MEAN, CIFAR10_STD, ResumableSampler, SeededAugmentation, build_datasets,
                             build_train_loader, train_transform)
from dist_train.device_data import stack_images
from dist_train.distributed import DistEnv


def env(rank: int, world_size: int) -> DistEnv:
    return DistEnv(rank, rank, world_size, torch.device("cpu"))


def test_starting_at_a_batch_skips_exactly_the_consumed_indices():
    dataset = list(range(50))
    full = ResumableSampler(dataset, env(1, 2), batch_size=4, seed=3)
    full.set_epoch(2)
    resumed = ResumableSampler(dataset, env(1, 2), batch_size=4, seed=3)
    resumed.set_epoch(2, start_batch=3)
    assert list(resumed) == list(full)[12:]
    assert len(resumed) == len(full) - 12 and full.batches_per_epoch == 7  # 25 samples per rank
    assert all(epoch == 2 for _, epoch in resumed)


def test_ranks_split_every_sample_and_epochs_reshuffle():
    dataset = list(range(40))
    orders = {}
    for epoch in (0, 1):
        per_rank = []
        for rank in (0, 1):
            sampler = ResumableSampler(dataset, env(rank, 2), batch_size=4, seed=0)
            sampler.set_epoch(epoch)
            per_rank.append([i for i, _ in sampler])
        assert sorted(per_rank[0] + per_rank[1]) == dataset
        orders[epoch] = per_rank[0]
    assert orders[0] != orders[1]


def test_augmentation_depends_on_seed_epoch_and_index_only():
    dataset = SeededAugmentation(FakeData(8, (3, 32, 32), 10), train_transform(), seed=0)
    first = dataset[(5, 1)][0]
    torch.manual_seed(123)
    dataset[(2, 1)]  # other samples in between, a different global RNG: no effect
    assert torch.equal(dataset[(5, 1)][0], first)
    epochs = [dataset[(5, epoch)][0] for epoch in range(2, 6)]
    assert not all(torch.equal(other, first) for other in epochs)  # new epochs draw new crops and flips
    assert not torch.equal(SeededAugmentation(dataset.dataset, train_transform(), seed=1)[(5, 1)][0], first)


def test_crops_and_flips_are_uniform():
    top, left, flip = train_transform().choices(0, 0, np.arange(9000, dtype=np.uint64))
    for values, count in ((top, 9), (left, 9), (flip, 2)):
        frequencies = np.bincount(values.astype(np.int64), minlength=count) / len(values)
        assert len(frequencies) == count and np.all(np.abs(frequencies - 1 / count) < 0.02)


def test_augmentation_is_torchvisions_crop_flip_and_normalize_to_the_bit():
    """The same crop and flip done by torchvision on the PIL image, then ToTensor + Normalize."""
    images, _ = stack_images(FakeData(32, (3, 32, 32), 10))
    augmentation = train_transform()
    normalize = T.Compose([T.ToTensor(), T.Normalize(CIFAR10_MEAN, CIFAR10_STD)])
    flips = set()
    for index, image in enumerate(images):
        top, left, flip = augmentation.choices(7, 3, index)
        expected = TF.crop(TF.pad(TF.to_pil_image(image), 4), top, left, 32, 32)
        expected = normalize(TF.hflip(expected) if flip else expected)
        assert torch.equal(augmentation.sample(TF.to_pil_image(image), 7, 3, index), expected)
        assert torch.equal(augmentation.normalize(image), normalize(TF.to_pil_image(image)))
        flips.add(flip)
    assert flips == {0, 1}


def test_batched_augmentation_equals_per_sample_augmentation():
    images = torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    indices = torch.randperm(10_000, generator=torch.Generator().manual_seed(1))[:300].tolist()
    augmentation = train_transform()
    batch = augmentation.batch(images, augmentation.params(11, 4, indices))
    for row, (image, index) in enumerate(zip(images, indices)):
        assert torch.equal(batch[row], augmentation.sample(image, 11, 4, index))


def test_normalize_table_equals_the_cpu_arithmetic_for_every_value():
    """Off the CPU, normalisation is a table lookup; it must give the CPU's bits for all 256 values."""
    normalize = Normalize(CIFAR10_MEAN, CIFAR10_STD)
    pixels = torch.arange(256, dtype=torch.uint8).repeat(3 * 64).view(1, 3, 128, 128)
    assert torch.equal(normalize.lookup(pixels), normalize.batch(pixels))


def fake_config(**overrides) -> Config:
    return Config(dataset="fake", fake_size=100, batch_size=8, num_workers=0, seed=5, **overrides)


def batches(data_path: str, rank: int, world_size: int, epoch: int, start_batch: int) -> list:
    config = fake_config(data_path=data_path)
    train, _ = build_datasets(config, env(rank, world_size))
    loader = build_train_loader(train, config, env(rank, world_size))
    loader.sampler.set_epoch(epoch, start_batch)
    return list(loader)


@pytest.mark.parametrize("rank,start_batch", [(0, 0), (1, 3)])
def test_device_path_yields_the_loader_paths_batches(rank, start_batch):
    on_device, from_loader = (batches(path, rank, 2, 1, start_batch) for path in ("device", "loader"))
    assert len(on_device) == len(from_loader) == 7 - start_batch  # 50 samples per rank, 8 a batch
    for (inputs, targets), (expected_inputs, expected_targets) in zip(on_device, from_loader):
        assert inputs.dtype == torch.float32 and torch.equal(inputs, expected_inputs)
        assert torch.equal(targets, expected_targets)


def global_rng_states():
    return torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()


@pytest.mark.parametrize("data_path", ["loader", "device"])
def test_loading_batches_never_touches_a_global_rng(data_path, monkeypatch):
    """With num_workers=0 batches are made in the training process: its RNG streams (and CUDA's,
    which torch.manual_seed would reseed) must not move."""
    config = fake_config(data_path=data_path)
    train, test = build_datasets(config, env(0, 1))  # FakeData draws its images here, once
    loader = build_train_loader(train, config, env(0, 1))
    loader.sampler.set_epoch(2, start_batch=1)

    def refuse(*args, **kwargs):
        raise AssertionError("the data path seeded or set a global RNG")

    for module, name in ((torch, "manual_seed"), (torch, "seed"), (torch, "set_rng_state"),
                         (torch.random, "manual_seed"), (torch.cuda, "manual_seed"),
                         (torch.cuda, "manual_seed_all"), (torch.cuda, "set_rng_state")):
        monkeypatch.setattr(module, name, refuse)
    before = global_rng_states()
    inputs, _ = next(iter(loader))
    test[3]
    after = global_rng_states()
    assert inputs.shape == (8, 3, 32, 32)
    assert torch.equal(before[0], after[0]) and before[1] == after[1] and np.array_equal(before[2], after[2])


def test_a_failed_download_is_one_line(tmp_path, monkeypatch):
    """No network (the URL points at a closed local port, so that a machine with network does not
    fetch 170 MB): one line naming the directory and what to do, not urllib's traceback."""
    from torchvision.datasets import CIFAR10

    from dist_train.config import UserError

    monkeypatch.setattr(CIFAR10, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    config = Config(dataset="cifar10", data_dir=str(tmp_path / "data"), download=True)
    with pytest.raises(UserError) as caught:
        build_datasets(config, env(0, 1))
    message = str(caught.value)
    assert message.startswith(f"could not download CIFAR-10 into {tmp_path / 'data'}: ") and "\n" not in message
    assert "Connection refused" in message and "--data-dir" in message


def test_digits_are_real_32x32_rgb_images_with_a_fixed_split():
    from dist_train.data import build_digits

    train, test = build_digits(seed=0)
    assert (len(train), len(test)) == (1437, 360)
    image, label = train[(7, 0)]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and 0 <= label < 10
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])  # grey, as 3 channels
    assert sorted({test[i][1] for i in range(len(test))}) == list(range(10))
    again_train, again_test = build_digits(seed=5)  # the split does not follow the training seed
    assert all(torch.equal(test[i][0], again_test[i][0]) for i in range(0, 360, 7))
    assert (train.dataset.images == again_train.dataset.images).all()


def test_digits_augmentation_is_seeded_per_sample_and_never_mirrors():
    from dist_train.data import build_digits

    train, _ = build_digits(seed=0)
    first = train[(5, 1)][0]
    torch.manual_seed(123)
    assert torch.equal(train[(5, 1)][0], first)
    assert not torch.equal(train[(5, 2)][0], first)  # a new epoch, a new shift
    assert train.augmentation.padding == 4 and not train.augmentation.flip  # a mirrored 2 is no digit


def test_fake_data_is_torchvisions_fakedata_to_the_bit():
    from dist_train.data import fake_data

    for offset in (0, 384):
        ours, (images, targets) = fake_data(20, random_offset=offset), stack_images(FakeData(20, (3, 32, 32), 10,
                                                                                         random_offset=offset))
        assert torch.equal(ours.images, images) and torch.equal(ours.targets, targets)


@pytest.mark.parametrize("context", ["fork", "forkserver"])
def test_loader_workers_start_under_fork_and_forkserver(context):
    """A worker forked by the rank dies with it (PR_SET_PDEATHSIG) and closes its copy of the lock;
    under forkserver (Python 3.14's default on Linux) its parent is the server, not the rank, and
    the parent check made every worker exit at once ("DataLoader worker exited unexpectedly")."""
    import functools
    import os

    from dist_train.data import init_loader_worker

    dataset = torch.utils.data.TensorDataset(torch.arange(64.0))
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=2, multiprocessing_context=context,
                                         worker_init_fn=functools.partial(init_loader_worker, os.getpid()))
    assert sum(batch.sum().item() for (batch,) in loader) == sum(range(64))
