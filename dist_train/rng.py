"""Every rank's random streams: seeding per step, and their state in a checkpoint.

Python's and numpy's generators are seeded once per rank and drawn from by nothing in the
training; torch's are reseeded at every step from (seed, rank, step), so that any rank can write
the streams of every other rank (healing.py). Capture and restore carry all of them through a
checkpoint as tensors and plain values (weights_only loads them).
"""

from __future__ import annotations

import random

import numpy as np
import torch

from dist_train.distributed import DistEnv


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of one rank's torch generators for one step."""
    return ((seed * 1_000_003 + rank) * 1_000_000_007 + step) % (1 << 63)


def seed_step(seed: int, rank: int, step: int, device: torch.device) -> None:
    """Every step starts from torch generators fixed by (seed, rank, step) alone (dropout and the
    like draw from them), so that any rank can write a checkpoint that continues every rank's
    streams exactly (see healing.py). The generators are seeded directly: torch.manual_seed costs
    about 1 ms, as it visits every device type; this costs microseconds."""
    torch.default_generator.manual_seed(step_seed(seed, rank, step))
    if device.type == "cuda":
        torch.cuda.default_generators[device.index].manual_seed(step_seed(seed, rank, step))


def rng_state_at_step(seed: int, rank: int, step: int) -> dict:
    """The RNG states a rank has at a step boundary, computed by any rank, for a checkpoint written
    without the others (healing.py): python's and numpy's as seed_everything(seed + rank) left them
    (the training draws nothing from them), torch's as seed_step will set it (CUDA's likewise
    reseeded, so left out)."""
    return _as_checkpoint_values(random.Random(seed + rank).getstate(),
                                 np.random.RandomState((seed + rank) % (1 << 32)).get_state(),
                                 torch.Generator().manual_seed(step_seed(seed, rank, step)).get_state(), None)


def capture_rng_state(device: torch.device) -> dict:
    """This process's python, numpy, torch CPU and CUDA RNG states as tensors and plain values."""
    return _as_checkpoint_values(random.getstate(), np.random.get_state(), torch.get_rng_state(),
                                 torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _as_checkpoint_values(python: tuple, numpy: tuple, torch_state: torch.Tensor, cuda) -> dict:
    """python's and numpy's generator states as tensors and plain values (weights_only loads them)."""
    version, py_state, gauss = python
    _, np_keys, np_pos, np_has_gauss, np_gauss = numpy
    return {
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch_state,
        "cuda": cuda,
    }


def rng_state_problem(state) -> str | None:
    """What keeps `state` from being one rank's capture_rng_state() (to follow "rng_states of rank
    N"), or None. The lengths are those of the generators: a state of another length fails in
    setstate, after the weights loaded."""
    if not isinstance(state, dict):
        return f" is not an RNG state ({type(state).__name__})"
    for key in ("python", "numpy", "torch", "cuda"):
        if key not in state:
            return f" is not an RNG state (no {key})"
    py, npy = state["python"], state["numpy"]
    if not (isinstance(py, dict) and isinstance(py.get("version"), int) and _int64_vector(py.get("state"), 625)
            and (py.get("gauss") is None or isinstance(py.get("gauss"), float))):
        return ": python is not a random module state"
    if not (isinstance(npy, dict) and _int64_vector(npy.get("keys"), 624) and type(npy.get("pos")) is int
            and type(npy.get("has_gauss")) is int and isinstance(npy.get("gauss"), float)):
        return ": numpy is not a Mersenne Twister state"
    torch_state = state["torch"]
    if not (isinstance(torch_state, torch.Tensor) and torch_state.dtype == torch.uint8
            and torch_state.shape == torch.get_rng_state().shape):
        return ": torch is not a CPU generator state"
    cuda = state["cuda"]
    if cuda is not None and not (isinstance(cuda, torch.Tensor) and cuda.dtype == torch.uint8 and cuda.dim() == 1):
        return ": cuda is not a CUDA generator state"
    return None


def _int64_vector(value, length: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.int64 and value.shape == (length,)


def restore_rng_state(state: dict, device: torch.device) -> None:
    """The inverse of capture_rng_state; its tensors may sit on any device."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].cpu().numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["gauss"]))
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def restore_rng_of_rank(checkpoint: dict, env: DistEnv) -> None:
    """This rank's RNG streams as saved; a rank the checkpoint did not have keeps its fresh seed."""
    states = checkpoint["rng_states"]
    if env.rank < len(states):
        restore_rng_state(states[env.rank], env.device)
