"""The on-disk format: atomic writes, the `latest` marker, finding the newest valid file, pruning.

This module decides how a checkpoint is written and read; the training script decides when.
A checkpoint is a dict of tensors and plain values that loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch

from dist_train.config import CheckpointError, UserError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
RECIPE_KEYS = ("model_state_dict", "optimizer_state_dict", "epoch", "loss")
REQUIRED_KEYS = RECIPE_KEYS + ("format_version", "global_step", "next_epoch", "next_batch", "world_size")
LATEST = "latest"
_NAME = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_path(ckpt_dir: Path, global_step: int) -> Path:
    return Path(ckpt_dir) / f"step_{global_step:09d}.pt"


def _fsync_dir(directory: Path) -> None:
    # A rename is durable only once the directory entry itself is on disk.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, write) -> None:
    """write(file) into a temp file beside `path`, fsync it, rename over `path`, fsync the dir."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_checkpoint(checkpoint: dict, ckpt_dir: Path, keep: int) -> Path:
    """Write atomically, then move the `latest` marker to it, then prune to the newest `keep`."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(ckpt_dir, checkpoint["global_step"])
    write_atomically(path, lambda f: torch.save(checkpoint, f))
    write_atomically(ckpt_dir / LATEST, lambda f: f.write(path.name.encode() + b"\n"))
    prune_checkpoints(ckpt_dir, keep, protect=path)
    return path


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoint files (temp files excluded), newest (highest step) first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def read_latest_marker(ckpt_dir: Path) -> Path | None:
    marker = Path(ckpt_dir) / LATEST
    try:
        name = marker.read_text().strip()
    except OSError:
        return None
    return Path(ckpt_dir) / name if _NAME.match(name) else None


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """torch.load with weights_only=True, then a check that it is a checkpoint this code can read."""
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as error:  # torch raises many types for truncated or foreign files
        raise CheckpointError(f"{path}: not a loadable checkpoint ({_reason(error)})") from None
    if not isinstance(checkpoint, dict) or "model_state_dict" not in checkpoint:
        raise CheckpointError(f"{path}: not a dist_train checkpoint (no model_state_dict)")
    version = checkpoint.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError(f"{path}: no format_version; not a dist_train checkpoint")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {version} is newer than this code reads "
                              f"({FORMAT_VERSION}); update dist_train")
    missing = [k for k in REQUIRED_KEYS if k not in checkpoint]
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {', '.join(missing)}")
    return checkpoint


def _reason(error: Exception) -> str:
    """The one informative line of a torch.load error."""
    text = str(error)
    if "WeightsUnpickler error:" in text:  # weights_only refused an object: name it
        return text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()[0].split(". ")[0]
    lines = text.strip().splitlines()
    return lines[0] if lines else type(error).__name__


def find_latest_valid(ckpt_dir: Path, map_location="cpu") -> tuple[Path, dict] | None:
    """The newest checkpoint that loads, skipping (and reporting) broken ones; None if there are none.

    Raises CheckpointError when checkpoint files exist but none of them loads: a silent fresh
    start over existing checkpoints would throw the run away.
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
        except CheckpointError as error:
            log.warning("skipping checkpoint: %s", error)
            errors.append(str(error))
    if errors:
        raise CheckpointError(f"no checkpoint in {ckpt_dir} loads: " + "; ".join(errors))
    return None


def resolve_checkpoint(target: str, map_location="cpu") -> tuple[Path, dict]:
    """A checkpoint file, or for a run directory the checkpoint a resume would take."""
    path = Path(target)
    if path.is_dir():
        ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        found = find_latest_valid(ckpt_dir, map_location)
        if found is None:
            raise UserError(f"{target}: no checkpoint in {ckpt_dir}")
        return found
    return path, load_checkpoint(path, map_location)


def prune_checkpoints(ckpt_dir: Path, keep: int, protect: Path) -> list[Path]:
    """Delete all but the newest `keep` checkpoints; `protect` (the one just written) always stays."""
    removed = []
    for path in list_checkpoints(ckpt_dir)[keep:]:
        if path != protect:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def remove_stale_temp_files(ckpt_dir: Path) -> None:
    """Temp files left by a save that was killed midway are never loaded; clear them away."""
    for tmp in Path(ckpt_dir).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def prepare_run_dir(config, is_main: bool) -> Path:
    """RUN_DIR/checkpoints, created and checked writable by the main rank before any process group."""
    ckpt_dir = Path(config.run_dir) / "checkpoints"
    if is_main:
        try:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            probe = ckpt_dir / f".write-test-{os.getpid()}.tmp"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise UserError(f"run directory {config.run_dir} is not writable: {error.strerror}") from None
        remove_stale_temp_files(ckpt_dir)
    return ckpt_dir


def write_config_file(config) -> None:
    """The effective configuration, as RUN_DIR/config.json."""
    text = json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n"
    write_atomically(Path(config.run_dir) / "config.json", lambda f: f.write(text.encode()))
