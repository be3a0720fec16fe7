"""The on-disk format, read side: names, the `latest` marker, digests, loading, the newest valid file.

saving.py writes what this module reads; the training script decides when.
A checkpoint is a dict of tensors and plain values that loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import zipfile
from pathlib import Path

import torch

from dist_train.errors import CheckpointError, NewerFormatError, UnreadableError, UserError, first_line
from dist_train.rng import rng_state_problem

log = logging.getLogger(__name__)

# 2: every file's zip entries carry CRC32s that are verified on every load, and `environment`
# records what exactness depends on beyond the configuration. 1: the same keys without `environment`.
FORMAT_VERSION = 2
RECIPE_KEYS = ("model_state_dict", "optimizer_state_dict", "epoch", "loss")
REQUIRED_KEYS = RECIPE_KEYS + ("format_version", "global_step", "next_epoch", "next_batch", "world_size")
LATEST = "latest"
_NAME = re.compile(r"^step_(\d+)\.pt$")
_CHUNK = 1 << 24


def checkpoint_path(ckpt_dir: Path, global_step: int) -> Path:
    return Path(ckpt_dir) / f"step_{global_step:09d}.pt"


def step_in_name(path: Path) -> int | None:
    match = _NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def is_regular_file(path: Path) -> bool:
    """A regular file (after symlinks); a FIFO, socket or directory is never opened."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def map_leaves(tree, fn, leaf=torch.Tensor):
    """The nest of dicts, lists and tuples with fn(x) in place of every x of type `leaf`."""
    if isinstance(tree, leaf):
        return fn(tree)
    if isinstance(tree, dict):
        return {key: map_leaves(value, fn, leaf) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(map_leaves(value, fn, leaf) for value in tree)
    return tree


def tensors(tree):
    """Every tensor in a nest of dicts, lists and tuples."""
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from tensors(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from tensors(value)


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Regular files named step_<N>.pt, newest (highest step) first; temp files, FIFOs and
    directories with such names are not candidates."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [(step, p) for p in ckpt_dir.iterdir() if (step := step_in_name(p)) is not None]
    return [p for _, p in sorted(found, reverse=True) if is_regular_file(p)]


def read_latest_marker(ckpt_dir: Path) -> Path | None:
    marker = Path(ckpt_dir) / LATEST
    if not is_regular_file(marker):
        return None
    try:
        with open(marker) as f:
            name = f.read(256).strip()  # a name; not a whole file that is something else
    except (OSError, UnicodeDecodeError):
        return None
    return Path(ckpt_dir) / name if _NAME.match(name) else None


def verify_digest(path: Path) -> None:
    """Check the CRC32 of every entry of the file's zip archive (torch.load never does).

    torch.save writes a CRC32 per entry (data.pkl, each tensor's bytes); any flipped byte inside
    an entry, a truncation or a damaged directory fails here. Reads the whole file once."""
    bad = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError)
    try:
        archive = zipfile.ZipFile(path)
    except bad as error:  # no readable zip directory: truncated, or not a torch.save file at all
        raise CheckpointError(f"{path}: not a loadable checkpoint ({first_line(error)})") from None
    except PermissionError as error:
        raise UnreadableError(f"{path}: cannot be read ({error.strerror or error}); a resume from an older "
                              f"checkpoint would train its steps again and replace it: give this user read "
                              f"access to it, or move it out of {path.parent}") from None
    except OSError as error:
        raise CheckpointError(f"{path}: cannot be read ({error.strerror or error})") from None
    with archive:
        try:
            for info in archive.infolist():
                with archive.open(info) as entry:
                    while entry.read(_CHUNK):
                        pass
        except bad as error:
            raise CheckpointError(f"{path}: broken file, digest check failed "
                                  f"({first_line(error)})") from None
        except OSError as error:
            raise CheckpointError(f"{path}: cannot be read ({error.strerror or error})") from None


def load_checkpoint(path: Path, map_location="cpu", mmap: bool = False) -> dict:
    """Verify the digest, torch.load with weights_only=True, then check that it is a checkpoint
    this code can read. mmap=True reads the metadata without copying the tensors in."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not is_regular_file(path):
        raise CheckpointError(f"{path}: not a regular file")
    verify_digest(path)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as error:  # torch raises many types for truncated or foreign files
        raise CheckpointError(f"{path}: not a loadable checkpoint ({_reason(error)})") from None
    check_contents(path, checkpoint)
    return checkpoint


def check_contents(path: Path, checkpoint) -> None:
    """A dist_train checkpoint of a format this code reads, whose step agrees with its name."""
    if not isinstance(checkpoint, dict) or "model_state_dict" not in checkpoint:
        raise CheckpointError(f"{path}: not a dist_train checkpoint (no model_state_dict)")
    version = checkpoint.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError(f"{path}: no format_version; not a dist_train checkpoint")
    if version > FORMAT_VERSION:
        raise NewerFormatError(f"{path}: format version {version} is newer than this code reads "
                               f"({FORMAT_VERSION}); update dist_train")
    missing = [k for k in REQUIRED_KEYS if k not in checkpoint]
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {', '.join(missing)}")
    for key, least in (("epoch", 0), ("global_step", 0), ("next_epoch", 0), ("next_batch", 0), ("world_size", 1)):
        if type(checkpoint[key]) is not int or checkpoint[key] < least:  # not bool, not float
            raise CheckpointError(f"{path}: not a dist_train checkpoint, {key} is {checkpoint[key]!r}")
    if type(checkpoint["loss"]) not in (float, int):
        raise CheckpointError(f"{path}: not a dist_train checkpoint, loss is {checkpoint['loss']!r}")
    if not isinstance(checkpoint.get("environment", {}), dict):
        raise CheckpointError(f"{path}: not a dist_train checkpoint, environment is "
                              f"{type(checkpoint['environment']).__name__}")
    for key, kind in (("config", dict), ("rng_states", list)):
        if not isinstance(checkpoint.get(key), kind):
            raise CheckpointError(f"{path}: not a dist_train checkpoint, {key} is {type(checkpoint.get(key)).__name__}")
    states = checkpoint["rng_states"]
    if len(states) != checkpoint["world_size"]:  # one per rank; none: the resume would not be exact
        raise CheckpointError(f"{path}: not a dist_train checkpoint, rng_states holds {len(states)} rank states "
                              f"for world size {checkpoint['world_size']}")
    for rank, state in enumerate(states):
        if problem := rng_state_problem(state):
            raise CheckpointError(f"{path}: not a dist_train checkpoint, rng_states of rank {rank}{problem}")
    step = step_in_name(path)
    if step is not None and step != checkpoint["global_step"]:
        # Resuming from it would retrain from the wrong step, and a requeue chain would loop.
        raise CheckpointError(f"{path}: broken file, its name says step {step} but it holds "
                              f"step {checkpoint['global_step']}")


def _reason(error: Exception) -> str:
    """The one informative line of a torch.load error."""
    text = str(error)
    if "WeightsUnpickler error:" in text:  # weights_only refused an object: name it
        return text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()[0].split(". ")[0]
    return first_line(error)


def find_latest_valid(ckpt_dir: Path, map_location="cpu") -> tuple[Path, dict] | None:
    """The newest checkpoint that loads, skipping (and reporting) broken ones; None if there are none.

    Raises CheckpointError when checkpoint files exist but none of them loads: a silent fresh
    start over existing checkpoints would throw the run away. A file of a newer format stops
    the search (NewerFormatError): resuming from an older file would later overwrite it; so does a
    file this process may not read (UnreadableError), which nothing says is broken.
    """
    candidates = list_checkpoints(ckpt_dir)
    marker = read_latest_marker(ckpt_dir)
    if marker is not None and candidates and marker != candidates[0]:
        # A crash between the rename and the marker update: the newer file is complete all the same.
        log.info("latest marker names %s; a newer complete file %s exists", marker.name, candidates[0].name)
    errors = []
    for path in candidates:
        try:
            return path, load_checkpoint(path, map_location)
        except (NewerFormatError, UnreadableError):
            raise
        except CheckpointError as error:
            log.warning("skipping checkpoint: %s", error)
            errors.append(str(error))
    if errors:
        raise CheckpointError(f"no checkpoint in {ckpt_dir} loads: " + "; ".join(errors))
    return None


def checkpoint_dir(path: Path) -> Path:
    """The checkpoints of a run directory, or of the checkpoints directory itself."""
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def resolve_checkpoint(target: str, map_location="cpu") -> tuple[Path, dict]:
    """A checkpoint file, or for a run directory the checkpoint a resume would take."""
    path = Path(target)
    if path.is_dir():
        ckpt_dir = checkpoint_dir(path)
        found = find_latest_valid(ckpt_dir, map_location)
        if found is None:
            raise UserError(f"{target}: no checkpoint in {ckpt_dir}")
        return found
    return path, load_checkpoint(path, map_location)
