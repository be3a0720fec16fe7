"""Two checkpoints' training state compared bit for bit: what `dist-train compare` reports.

A resumed run is exact when its final checkpoint holds the same bits as an uninterrupted run's:
weights, optimizer and scheduler state, every rank's RNG state, counters and loss. The
configuration (which names its own run directory), the torch version and the wandb run id are
not training state and are not compared.
"""

from __future__ import annotations

import torch

TRAINING_STATE_KEYS = ("model_state_dict", "optimizer_state_dict", "scheduler_state_dict", "scaler_state_dict",
                       "rng_states", "epoch", "global_step", "next_epoch", "next_batch", "loss", "world_size")


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """Floats as integers of the same width: -0.0 != 0.0 and NaN == NaN, as bits are."""
    if tensor.is_floating_point():
        tensor = tensor.contiguous()
        return tensor.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()])
    return tensor


def differences(a, b, where: str = "") -> list[str]:
    """Where `a` and `b` differ (recursively through dicts, lists and tuples); empty if bit for bit equal."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return [where]
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(_bits(a), _bits(b)):
            return [where]
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        found = [f"{where}/{key}" for key in sorted(a.keys() ^ b.keys(), key=str)]
        for key in [k for k in a if k in b]:
            found += differences(a[key], b[key], f"{where}/{key}")
        return found
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [where]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    same = a == b or (a != a and b != b)  # NaN loss == NaN loss
    return [] if same and type(a) is type(b) else [where]


def compare_training_state(a: dict, b: dict) -> list[str]:
    """The differing parts of two checkpoints' training state, as 'key/sub/...' paths."""
    return [d.lstrip("/") for key in TRAINING_STATE_KEYS for d in differences(a.get(key), b.get(key), key)]


def summary(checkpoint: dict) -> str:
    """What was compared, in a few words."""
    return (f"model ({len(checkpoint['model_state_dict'])} tensors), optimizer, scheduler, RNG of "
            f"{len(checkpoint.get('rng_states') or [])} rank(s); step {checkpoint['global_step']}, "
            f"epoch {checkpoint['epoch']}, loss {checkpoint['loss']:.6f}")
