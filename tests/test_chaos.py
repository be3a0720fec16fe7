"""Chaos: a 2-rank run with loader workers, SIGKILLed as a whole 20 times at random instants (some
inside saves), with one flipped byte and one truncation of the newest checkpoint along the way,
ends bit for bit where the uninterrupted run ends."""

from __future__ import annotations

import os
import random
import re
import signal
import time
import zipfile

import pytest

from conftest import (SMALL_RUN, Launch, assert_same_training_state, newest_checkpoint, process_tree, run)

from dist_train.checkpoint import list_checkpoints

NUM_KILLS = 20
# 1,536 images: 48 steps an epoch on 2 ranks, 96 in all, so that 20 launches of a few steps each
# leave the run unfinished however fast the machine is.
CHAOS_RUN = SMALL_RUN + ["--fake-size", "1536"]
# From these kills on, damage the newest file, once there is an older one to fall back on (with
# the only checkpoint damaged, refusing to start is right: no launch could resume exactly).
FLIP_AT, TRUNCATE_AT = 6, 13


def temp_files(ckpt_dir) -> list[str]:
    try:
        return [e.name for e in os.scandir(ckpt_dir) if e.name.endswith(".tmp")]
    except FileNotFoundError:
        return []


def kill_inside_a_save(launch: Launch, ckpt_dir) -> bool:
    """Freeze the job the moment a temp file shows up, then kill it; True if one was mid-write."""
    launch.wait_for(r"step \d+ batch")
    tree = process_tree(launch.proc.pid)
    deadline = time.monotonic() + 60
    while not temp_files(ckpt_dir) and launch.proc.poll() is None and time.monotonic() < deadline:
        pass  # busy: a save of this small model lasts milliseconds
    for pid in tree:
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            pass
    inside = bool(temp_files(ckpt_dir))
    launch.kill()
    return inside


def kill_soon(launch: Launch, rng: random.Random) -> None:
    """Kill 0 to 2 steps after the launch's first step, at a random instant within a step: counted
    in steps, not seconds, so a fast machine does not finish the run between kills."""
    launch.wait_for(r"step \d+ batch")
    first = int(re.search(r"step (\d+) batch", launch.output()).group(1))
    launch.wait_for(rf"step {first + rng.randint(0, 2)} batch")
    time.sleep(rng.uniform(0, 0.02))
    launch.kill()


def flip_a_data_byte(path, rng: random.Random) -> None:
    """Flip one bit of a random byte inside a random tensor's data (not in zip padding)."""
    with zipfile.ZipFile(path) as archive:
        info = rng.choice([i for i in archive.infolist() if "/data/" in i.filename and i.file_size])
    raw = bytearray(path.read_bytes())
    header = raw[info.header_offset:info.header_offset + 30]
    start = info.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")
    raw[start + rng.randrange(info.file_size)] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def reference_chaos(session_dir) -> dict:
    run_dir = session_dir / "reference_chaos"
    run(CHAOS_RUN + ["--save-every-steps", "1", "--run-dir", str(run_dir)], nproc=2)
    return newest_checkpoint(run_dir)


def test_twenty_kills_a_flip_and_a_truncation_end_bitwise_equal(reference_chaos, session_dir):
    seed = int(os.environ.get("CHAOS_SEED", time.time_ns() % 10**6))
    print(f"chaos seed {seed} (CHAOS_SEED={seed} repeats this run's choices)")  # shown if it fails
    rng = random.Random(seed)
    run_dir = session_dir / "chaos_ws2"
    ckpt_dir = run_dir / "checkpoints"
    # Every kill is a failed launch: --max-failures must not give up on this run.
    args = CHAOS_RUN + ["--save-every-steps", "1", "--run-dir", str(run_dir), "--max-failures", "1000"]
    started, inside_saves, damaged, to_damage = time.monotonic(), 0, None, ["flip", "truncate"]
    for kill in range(NUM_KILLS):
        launch = Launch(args, session_dir / f"chaos_ws2.{kill}.log", nproc=2)
        if kill % 3 == 2:
            inside_saves += kill_inside_a_save(launch, ckpt_dir)
        else:
            kill_soon(launch, rng)
        out = launch.output()
        if damaged is not None:  # the launch after the damage skipped the file, naming it
            assert f"skipping checkpoint: {damaged}" in out, out[-3000:]
            damaged = None
        due = to_damage and kill + 1 >= (FLIP_AT if to_damage[0] == "flip" else TRUNCATE_AT)
        if due and len(list_checkpoints(ckpt_dir)) >= 2:
            damaged = list_checkpoints(ckpt_dir)[0]
            if to_damage.pop(0) == "flip":
                flip_a_data_byte(damaged, rng)
            else:
                os.truncate(damaged, damaged.stat().st_size // 2)
    out = run(args, nproc=2).stdout
    if damaged is not None:
        assert f"skipping checkpoint: {damaged}" in out
    assert "training complete: 2 epochs, 96 steps" in out
    assert_same_training_state(newest_checkpoint(run_dir), reference_chaos)
    print(f"chaos seed {seed}: {NUM_KILLS} kills ({inside_saves} inside a save), a flip and a truncation, "
          f"{time.monotonic() - started:.0f} s")
    assert inside_saves >= 1
    assert not to_damage, f"never two checkpoints to damage one of: {to_damage} not done"
