"""The resumable sampler and per-sample seeded augmentation."""

from __future__ import annotations

import torch
from torchvision.datasets import FakeData

from dist_train.data import ResumableSampler, SeededAugmentation, train_transform
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
    assert not torch.equal(dataset[(5, 2)][0], first)  # a new epoch draws new crops and flips

    before = torch.get_rng_state()
    dataset[(3, 0)]
    assert torch.equal(torch.get_rng_state(), before), "the caller's RNG is left untouched"


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
    from torchvision import transforms as T

    from dist_train.data import build_digits

    train, _ = build_digits(seed=0)
    first = train[(5, 1)][0]
    torch.manual_seed(123)
    assert torch.equal(train[(5, 1)][0], first)
    assert not torch.equal(train[(5, 2)][0], first)  # a new epoch, a new shift
    steps = [type(t) for t in train.transform.transforms]
    assert T.RandomCrop in steps and T.RandomHorizontalFlip not in steps  # a mirrored 2 is no digit
