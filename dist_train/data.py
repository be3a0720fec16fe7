"""Datasets, the resumable distributed sampler, and loaders.

Two properties make a mid-epoch resume exact without replaying the data pipeline:
- the sampler can start an epoch at any batch, so consumed batches are skipped, never loaded;
- augmentation is a function of (seed, epoch, index) alone (dist_train/augment.py), so it depends
  neither on which worker or path loads a sample nor on where the epoch was cut.
Loading a batch never touches a global RNG.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from dist_train import processes
from dist_train.augment import CropFlipNormalize, Normalize
from dist_train.config import Config, UserError
from dist_train.distributed import DistEnv, barrier

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def train_transform() -> CropFlipNormalize:
    """RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize: seeded per sample."""
    return CropFlipNormalize(CIFAR10_MEAN, CIFAR10_STD, padding=4, flip=True)


def eval_transform() -> Normalize:
    return Normalize(CIFAR10_MEAN, CIFAR10_STD)


IMAGE_SHAPE = (3, 32, 32)  # every dataset's images as the model sees them (CIFAR-10's; digits upscaled)


class SeededAugmentation(Dataset):
    """Applies `augmentation` (a CropFlipNormalize) to `dataset[index]` as drawn for (seed, epoch, index).

    Indexed by (index, epoch) pairs, as ResumableSampler yields them. `dataset` yields (image, target)
    with PIL images (CIFAR10) or CHW uint8 tensors."""

    def __init__(self, dataset: Dataset, augmentation: CropFlipNormalize, seed: int):
        self.dataset, self.augmentation, self.seed = dataset, augmentation, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        image, target = self.dataset[index]
        return self.augmentation.sample(image, self.seed, epoch, index), target


class InMemoryImages(Dataset):
    """CHW uint8 images and integer targets held as two tensors; yields (image, int target)."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, transform=None):
        self.images, self.targets, self.transform = images, targets, transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = self.images[index]
        return (self.transform(image) if self.transform else image), int(self.targets[index])


def fake_data(size: int, random_offset: int = 0, image_size=IMAGE_SHAPE, num_classes: int = 10) -> InMemoryImages:
    """torchvision's FakeData(size, image_size, num_classes, random_offset), image for image and bit
    for bit, about 7x faster (4,000 images: 0.36 s against 2.6 s): FakeData reseeds the global RNG
    for each image (torch.manual_seed, about a millisecond, as it visits every device type), where
    a private generator seeded the same way draws the same numbers; the float image becomes uint8
    as FakeData's ToPILImage makes it."""
    images = torch.empty((size, *image_size), dtype=torch.uint8)
    targets = torch.empty(size, dtype=torch.long)
    for index in range(size):
        generator = torch.Generator().manual_seed(index + random_offset)
        images[index] = torch.randn(*image_size, generator=generator).mul(255).byte()
        targets[index] = torch.randint(0, num_classes, size=(1,), dtype=torch.long, generator=generator)[0]
    return InMemoryImages(images, targets)


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


def download_cifar10(data_dir: str) -> None:
    from torchvision.datasets import CIFAR10

    try:
        CIFAR10(data_dir, train=True, download=True)
        CIFAR10(data_dir, train=False, download=True)
    except (OSError, RuntimeError) as error:  # no network (URLError), a full disk, a bad archive
        reason = str(getattr(error, "reason", None) or error).strip().splitlines()[0]
        raise UserError(f"could not download CIFAR-10 into {data_dir}: {reason}; download it where there "
                        "is network and point --data-dir at it, or use --dataset fake") from None


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
    if config.dataset == "digits":
        return build_digits(config.seed)
    if config.dataset == "fake":
        # FakeData's images, seeded by their index: the same in every process and every run.
        train = fake_data(config.fake_size)
        test = fake_data(max(1, config.fake_size // 4), random_offset=config.fake_size)
    else:
        if config.download:
            if env.is_main:
                download_cifar10(config.data_dir)
            barrier(env)  # the other ranks wait for the download
        train, test = _cifar10(config, True), _cifar10(config, False)
    test.transform = eval_transform()
    return SeededAugmentation(train, train_transform(), config.seed), test


DIGITS_TEST_SIZE = 360  # a fifth of the 1,797 images, the same ones in every run (stratified, seed 0)


def build_digits(seed: int) -> tuple[Dataset, Dataset]:
    """scikit-learn's handwritten digits (shipped inside its wheel: no download), upscaled to the
    32x32 RGB images that CIFAR-10 models take, with a fixed train/test split.

    Augmentation: the random crop (padding 4, i.e. one original pixel) of CIFAR-10 but no
    horizontal flip, which would turn a 2 into a mirror image no one writes."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise UserError("--dataset digits needs scikit-learn: pip install 'dist_train[digits]'") from None
    digits = load_digits()
    pixels = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0  # values 0..16
    # Bilinear upscaling once, here; the result is fixed, so every rank and run sees the same images.
    upscaled = torch.nn.functional.interpolate(pixels, size=(32, 32), mode="bilinear", align_corners=False)
    images = (upscaled.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    targets = torch.from_numpy(digits.target).long()
    train_idx, test_idx = train_test_split(range(len(images)), test_size=DIGITS_TEST_SIZE, random_state=0,
                                           stratify=digits.target)
    train_pixels = images[train_idx].double() / 255
    mean, std = float(train_pixels.mean()), float(train_pixels.std(correction=0))
    train = InMemoryImages(images[train_idx], targets[train_idx])
    test = InMemoryImages(images[test_idx], targets[test_idx], Normalize((mean,) * 3, (std,) * 3))
    augment = CropFlipNormalize((mean,) * 3, (std,) * 3, padding=4, flip=False)
    return SeededAugmentation(train, augment, seed), test


def _loader_generator(seed: int) -> torch.Generator:
    # A private generator for the loader's worker base seed: drawing it from the global RNG
    # would shift the global stream by where an epoch was started.
    return torch.Generator().manual_seed(seed)


def build_train_loader(dataset: SeededAugmentation, config: Config, env: DistEnv):
    """Batches of (inputs, targets) in the sampler's order: a DataLoader (--data-path loader), or
    the whole set on the device, augmented there in batches (--data-path device); the same bits."""
    sampler = ResumableSampler(dataset, env, config.batch_size, config.seed)
    if config.data_path == "device":
        from dist_train.device_data import DeviceBatches

        return DeviceBatches(dataset, sampler, config.batch_size, env.device)
    return DataLoader(dataset, batch_size=config.batch_size, sampler=sampler,
                      num_workers=config.num_workers, pin_memory=env.device.type == "cuda",
                      worker_init_fn=_worker_init(), generator=_loader_generator(config.seed))


def build_eval_loader(dataset: Dataset, config: Config, env: DistEnv) -> DataLoader:
    """Each rank takes every world_size-th test sample: no padding, so sums over ranks are exact."""
    shard = torch.utils.data.Subset(dataset, range(env.rank, len(dataset), env.world_size))
    return DataLoader(shard, batch_size=config.batch_size, num_workers=config.num_workers,
                      pin_memory=env.device.type == "cuda", worker_init_fn=_worker_init(),
                      generator=_loader_generator(config.seed))


def _worker_init():
    """The worker_init_fn of this rank's loaders (made here, in the rank: its PID is the parent's)."""
    return functools.partial(init_loader_worker, os.getpid())


def init_loader_worker(rank_pid: int, _worker_id: int) -> None:
    """A DataLoader worker dies with its rank and drops its copy of the run directory's lock (a
    worker left behind by a SIGKILLed rank held the run directory: the relaunch exited 2, "in use
    by PID n"), and ignores the signals the rank handles: the rank's main process alone acts on them."""
    import signal

    from dist_train.preemption import HANDLED_BY_THE_RANK

    if os.getppid() == rank_pid:  # forked by the rank; a spawned or forkserver child inherits no lock
        processes.die_with_parent(rank_pid)
    for signum in HANDLED_BY_THE_RANK:  # SLURM signals every process; Ctrl-C, a hang-up: the whole group
        signal.signal(signum, signal.SIG_IGN)
