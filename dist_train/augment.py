"""Seeded augmentation on uint8 image tensors: random crop (zero padding), horizontal flip, normalisation.

Every random choice is a pure function of (seed, epoch, sample index): a counter-based hash
(splitmix64) of the three, not a draw from any RNG. So no global RNG is forked, reseeded or
advanced (torch.manual_seed would also reseed every CUDA generator); a sample's augmentation depends
neither on the process, worker or batch that loads it nor on where an epoch was cut; and one
function serves a single sample in a DataLoader and a whole batch on the device, bit for bit alike.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

_MASK = (1 << 64) - 1


def _splitmix64(x):
    """splitmix64's output function on a Python int or a uint64 array (elementwise, the same bits):
    a bijection of 64-bit values whose outputs pass as independent."""
    z = (x + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def sample_hash(seed: int, epoch: int, index):
    """64 random-looking bits for a sample, fixed by (seed, epoch, index) alone; `index` is an int
    or a uint64 array of them."""
    return _splitmix64(_splitmix64(_splitmix64(seed & _MASK) ^ epoch) ^ index)


def as_uint8_chw(image) -> torch.Tensor:
    """A PIL image, an HWC/HW uint8 array or a CHW uint8 tensor, as a CHW uint8 tensor."""
    if isinstance(image, torch.Tensor):
        return image
    array = np.array(image, dtype=np.uint8)  # a copy: PIL's buffer is read-only
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1)


class Normalize:
    """uint8 -> float32 as torchvision's ToTensor + Normalize compute it, to the bit.

    On the CPU with torchvision's own operations. Elsewhere by looking up a table of the 256 values
    of each channel computed that way on the CPU: a CUDA division by a scalar multiplies by its
    reciprocal, which can differ in the last bit, while a lookup is exact."""

    def __init__(self, mean, std):
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self._tables: dict[torch.device, torch.Tensor] = {}

    def _on_cpu(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.to(torch.float32).div(255).sub(self.mean).div(self.std)

    def table(self, device: torch.device) -> torch.Tensor:
        """(C, 256): the normalised value of each uint8 value in each channel."""
        if device not in self._tables:
            values = torch.arange(256, dtype=torch.uint8).expand(len(self.mean), 1, 256)
            self._tables[device] = self._on_cpu(values)[:, 0].to(device)
        return self._tables[device]

    def batch(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) uint8 -> float32."""
        return self._on_cpu(pixels) if pixels.device.type == "cpu" else self.lookup(pixels)

    def lookup(self, pixels: torch.Tensor) -> torch.Tensor:
        """`batch` by the table, on any device."""
        table = self.table(pixels.device)
        row_starts = torch.arange(0, table.numel(), table.shape[1], device=pixels.device).view(1, -1, 1, 1)
        return torch.take(table, pixels.long() + row_starts)

    def __call__(self, image) -> torch.Tensor:
        """One image (PIL or CHW uint8), as an eval transform."""
        return self.batch(as_uint8_chw(image)[None])[0]


class CropFlipNormalize:
    """RandomCrop(size of the image, padding) with zero fill, RandomHorizontalFlip (optional),
    ToTensor, Normalize: torchvision's train transforms, on uint8 tensors, seeded per sample.

    `sample` augments one image (a DataLoader's path), `batch` many at once (the device path); both
    copy the same pixels and look up the same table, so they agree bit for bit."""

    def __init__(self, mean, std, padding: int = 4, flip: bool = True):
        self.normalize, self.padding, self.flip = Normalize(mean, std), padding, flip

    def choices(self, seed: int, epoch: int, index):
        """(top, left, flip) of the crop in the padded image; ints, or arrays for an index array."""
        span = 2 * self.padding + 1
        hashed = sample_hash(seed, epoch, index)
        flip = (hashed // (span * span)) % 2 if self.flip else hashed * 0
        return hashed % span, (hashed // span) % span, flip

    def sample(self, image, seed: int, epoch: int, index: int) -> torch.Tensor:
        """One image (PIL or CHW uint8) -> its augmented CHW float32 tensor for (seed, epoch, index)."""
        pixels = as_uint8_chw(image)
        height, width = pixels.shape[1:]
        top, left, flip = self.choices(seed, epoch, index)
        pad = self.padding
        crop = F.pad(pixels, (pad, pad, pad, pad))[:, top:top + height, left:left + width]
        return self.normalize.batch((crop.flip(-1) if flip else crop)[None])[0]

    def params(self, seed: int, epoch: int, indices) -> torch.Tensor:
        """(B, 3) int64: `choices` for each index, for `batch`."""
        top, left, flip = self.choices(seed, epoch, np.asarray(indices, dtype=np.int64).astype(np.uint64))
        return torch.from_numpy(np.stack([top, left, flip], axis=1).astype(np.int64))

    def batch(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) uint8 and `params` on the same device -> augmented (B, C, H, W) float32."""
        num, channels, height, width = images.shape
        device, pad = images.device, self.padding
        padded = F.pad(images, (pad, pad, pad, pad))  # zeros, as RandomCrop's default fill
        padded_height, padded_width = height + 2 * pad, width + 2 * pad
        columns = torch.arange(width, device=device)
        rows = params[:, 0:1] + torch.arange(height, device=device)  # (B, H)
        # A flipped crop reads its columns right to left.
        cols = params[:, 1:2] + torch.where(params[:, 2:3].bool(), width - 1 - columns, columns)  # (B, W)
        planes = torch.arange(num * channels, device=device).view(num, channels, 1, 1)
        flat = (planes * padded_height + rows[:, None, :, None]) * padded_width + cols[:, None, None, :]
        return self.normalize.batch(torch.take(padded, flat))
