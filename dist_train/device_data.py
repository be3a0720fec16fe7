"""The on-device data path: the whole training set as uint8 tensors on the device, cropped, flipped
and normalised there a batch at a time. No loader workers, no host-to-device copy per step.

It yields exactly the batches the DataLoader path yields (same sampler order, same per-sample
augmentation, same float bits), so --data-path changes speed, never results.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

from dist_train.augment import as_uint8_chw


def stack_images(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C, H, W) uint8 images and (N,) int64 targets of an un-augmented dataset."""
    images, targets = getattr(dataset, "images", None), getattr(dataset, "targets", None)
    if isinstance(images, torch.Tensor) and isinstance(targets, torch.Tensor):  # InMemoryImages
        return images, targets
    data = getattr(dataset, "data", None)
    if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 4:  # CIFAR10: NHWC
        return torch.from_numpy(data).permute(0, 3, 1, 2).contiguous(), torch.tensor(list(targets))
    pairs = [dataset[i] for i in range(len(dataset))]
    return (torch.stack([as_uint8_chw(image) for image, _ in pairs]),
            torch.tensor([int(target) for _, target in pairs]))


class DeviceBatches:
    """Iterates one epoch of (inputs, targets) batches as set by `sampler.set_epoch`, like a DataLoader.

    `dataset` is a SeededAugmentation; its images go to `device` once, here."""

    def __init__(self, dataset, sampler, batch_size: int, device: torch.device):
        images, targets = stack_images(dataset.dataset)
        self.images, self.targets = images.to(device), targets.to(device)
        self.augmentation, self.seed = dataset.augmentation, dataset.seed
        self.sampler, self.batch_size, self.device = sampler, batch_size, device

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self):
        indices = np.array([index for index, _ in self.sampler], dtype=np.int64)
        # One host-to-device copy per epoch for the order and every sample's crop and flip.
        params = self.augmentation.params(self.seed, self.sampler.epoch, indices).to(self.device)
        order = torch.from_numpy(indices).to(self.device)
        for start in range(0, len(indices), self.batch_size):
            batch = order[start:start + self.batch_size]
            inputs = self.augmentation.batch(self.images[batch], params[start:start + self.batch_size])
            yield inputs, self.targets[batch]
