"""Datasets, the resumable distributed sampler, and loaders.

Two properties make a mid-epoch resume exact without replaying the data pipeline:
- the sampler can start an epoch at any batch, so consumed batches are skipped, never loaded;
- augmentation randomness is seeded per sample from (seed, epoch, index), so it depends neither on
  which worker loads a sample nor on where the epoch was cut.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from dist_train.config import Config, UserError
from dist_train.distributed import DistEnv, barrier

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
_MIX = 6364136223846793005  # a 64-bit LCG multiplier: spreads (seed, epoch, index) over seeds


def train_transform():
    from torchvision import transforms as T

    return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(CIFAR10_MEAN, CIFAR10_STD)])


def eval_transform():
    from torchvision import transforms as T

    return T.Compose([T.ToTensor(), T.Normalize(CIFAR10_MEAN, CIFAR10_STD)])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A seed for one sample's augmentation, fixed by (seed, epoch, index) alone."""
    mixed = seed
    for part in (epoch, index):
        mixed = (mixed * _MIX + part + 1) % (1 << 63)
    return mixed


class SeededAugmentation(Dataset):
    """Applies `transform` to `dataset[index]` under a torch RNG seeded by (seed, epoch, index).

    Indexed by (index, epoch) pairs, as ResumableSampler yields them. The caller's RNG state is
    saved and restored around the transform, so with num_workers=0 the main process's RNG is untouched.
    """

    def __init__(self, dataset: Dataset, transform, seed: int):
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        image, target = self.dataset[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            return self.transform(image), target


class ResumableSampler(DistributedSampler):
    """DistributedSampler that yields (index, epoch) and can start an epoch at a given batch."""

    def __init__(self, dataset: Dataset, env: DistEnv, batch_size: int, seed: int):
        super().__init__(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=seed)
        self.batch_size = batch_size
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        super().set_epoch(epoch)
        self.start_batch = start_batch

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self):
        indices = list(super().__iter__())[self.start_batch * self.batch_size:]
        return iter([(index, self.epoch) for index in indices])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start_batch * self.batch_size)


def _cifar10(config: Config, train: bool):
    from torchvision.datasets import CIFAR10

    try:
        return CIFAR10(config.data_dir, train=train, download=False)
    except RuntimeError as error:
        raise _missing_cifar10(config) from error


def _missing_cifar10(config: Config) -> UserError:
    return UserError(f"CIFAR-10 not found or corrupted under {Path(config.data_dir).resolve()} "
                     f"(expected cifar-10-batches-py/ there): pass --download on a machine with "
                     f"network, point --data-dir at it, or use --dataset fake")


def check_data_dir(config: Config) -> None:
    """A missing CIFAR-10 directory, found before the run directory is created (the full check,
    which reads the files, comes when the dataset is built)."""
    if config.dataset == "cifar10" and not config.download \
            and not (Path(config.data_dir) / "cifar-10-batches-py").is_dir():
        raise _missing_cifar10(config)


def build_datasets(config: Config, env: DistEnv) -> tuple[Dataset, Dataset]:
    """(train, test) datasets; train yields augmented samples for (index, epoch) keys."""
    if config.dataset == "fake":
        from torchvision.datasets import FakeData

        # FakeData seeds each image by its index: the same images in every process and every run.
        train = FakeData(config.fake_size, (3, 32, 32), 10)
        test = FakeData(max(1, config.fake_size // 4), (3, 32, 32), 10, random_offset=config.fake_size)
    else:
        if config.download:
            if env.is_main:
                from torchvision.datasets import CIFAR10

                CIFAR10(config.data_dir, train=True, download=True)
                CIFAR10(config.data_dir, train=False, download=True)
            barrier(env)  # the other ranks wait for the download
        train, test = _cifar10(config, True), _cifar10(config, False)
    test.transform = eval_transform()
    return SeededAugmentation(train, train_transform(), config.seed), test


def _loader_generator(seed: int) -> torch.Generator:
    # A private generator for the loader's worker base seed: drawing it from the global RNG
    # would shift the global stream by where an epoch was started.
    return torch.Generator().manual_seed(seed)


def build_train_loader(dataset: Dataset, config: Config, env: DistEnv) -> DataLoader:
    sampler = ResumableSampler(dataset, env, config.batch_size, config.seed)
    return DataLoader(dataset, batch_size=config.batch_size, sampler=sampler,
                      num_workers=config.num_workers, pin_memory=env.device.type == "cuda",
                      worker_init_fn=ignore_signals_in_worker, generator=_loader_generator(config.seed))


def build_eval_loader(dataset: Dataset, config: Config, env: DistEnv) -> DataLoader:
    """Each rank takes every world_size-th test sample: no padding, so sums over ranks are exact."""
    shard = torch.utils.data.Subset(dataset, range(env.rank, len(dataset), env.world_size))
    return DataLoader(shard, batch_size=config.batch_size, num_workers=config.num_workers,
                      pin_memory=env.device.type == "cuda", worker_init_fn=ignore_signals_in_worker,
                      generator=_loader_generator(config.seed))


def ignore_signals_in_worker(_worker_id: int) -> None:
    """DataLoader workers ignore SIGUSR1/SIGTERM/SIGINT: the rank's main process alone acts on them."""
    import signal

    for signum in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):  # Ctrl-C reaches the whole group
        signal.signal(signum, signal.SIG_IGN)
