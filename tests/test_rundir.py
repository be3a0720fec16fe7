"""The run directory, in-process: one lock holder, stale temp files cleaned only under the lock,
temp names unique per writer."""

from __future__ import annotations

import os
import socket
from types import SimpleNamespace

import pytest

from dist_train.durable import temp_path
from dist_train.errors import UserError
from dist_train.rundir import RunDirLock, prepare_run_dir


def test_a_second_holder_is_refused_with_the_first_ones_pid_and_host(tmp_path):
    first = RunDirLock(tmp_path)
    with pytest.raises(UserError, match=f"is in use by PID {os.getpid()} on host {socket.gethostname()}"):
        RunDirLock(tmp_path)  # flock conflicts between open files, even within one process
    first.release()
    RunDirLock(tmp_path).release()  # released: the next one takes it


@pytest.mark.parametrize("kind", ["link to a file", "dangling link", "FIFO", "directory", "socket"])
def test_a_lock_file_that_is_not_a_regular_file_is_refused_untouched(tmp_path, kind):
    """RUN/.lock is truncated and given the holder's PID: as a link (a run directory copied with
    `cp -rs`, or planted) it truncated the file it pointed to, or created one where the link led."""
    victim = tmp_path / "victim.txt"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = run_dir / ".lock"
    if kind == "link to a file":
        victim.write_text("precious\n")
        lock.symlink_to(victim)
    elif kind == "dangling link":
        lock.symlink_to(victim)
    elif kind == "FIFO":
        os.mkfifo(lock)
    elif kind == "socket":  # opening one fails (ENXIO): it was a traceback
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(lock))
        server.close()
    else:
        lock.mkdir()
    with pytest.raises(UserError, match=rf"^run directory {run_dir}: {lock} is not a regular file"):
        RunDirLock(run_dir)
    assert (victim.read_text() == "precious\n") if kind == "link to a file" else not victim.exists()


def test_stale_temp_files_are_removed_in_the_run_dir_and_checkpoints_under_the_lock(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    stale = [run_dir / ".config.json.1.ab.tmp", run_dir / "checkpoints" / ".step_000000005.pt.2.cd.tmp",
             run_dir / ".wandb.json.7.0123abcd.tmp", run_dir / "checkpoints" / ".latest.8.89abcdef.tmp"]
    # A run directory may be a directory of other things too ($HOME, a project, a careless /run):
    # other programs' temp files, even named alike, are theirs.
    foreign = [run_dir / ".notes.tmp", run_dir / ".report.pdf.123.abcdef12.tmp", run_dir / "checkpoints" / ".x.tmp"]
    for path in stale + foreign:
        path.write_bytes(b"partial")
    config = SimpleNamespace(run_dir=str(run_dir))
    ckpt_dir, lock = prepare_run_dir(config, is_main=True)
    try:
        assert ckpt_dir == run_dir / "checkpoints" and not any(p.exists() for p in stale)
        assert all(p.exists() for p in foreign)
        (run_dir / ".config.json.3.ef.tmp").write_bytes(b"live")  # a writer's temp file...
        with pytest.raises(UserError, match="in use"):
            prepare_run_dir(config, is_main=True)  # ...is not touched by a second launch
        assert (run_dir / ".config.json.3.ef.tmp").exists()
    finally:
        lock.release()


def test_two_run_directories_that_share_one_checkpoints_directory_are_refused(tmp_path):
    """RUN/checkpoints may be a link (to a larger disk); a job script that makes the same link for
    two runs gave them one checkpoints directory under two locks: the second run resumed from the
    first one's files, each pruned the other's, and the second one's start removed the first one's
    live temp file (its save then failed). The checkpoints directory has a lock of its own."""
    shared = tmp_path / "scratch" / "checkpoints"
    shared.mkdir(parents=True)
    first, second = SimpleNamespace(run_dir=str(tmp_path / "a")), SimpleNamespace(run_dir=str(tmp_path / "b"))
    for config in (first, second):
        os.makedirs(config.run_dir)
        os.symlink(shared, os.path.join(config.run_dir, "checkpoints"))
    _, lock = prepare_run_dir(first, is_main=True)
    try:
        live = shared / ".step_000000005.pt.2.cd.tmp"  # the first run's save in flight
        live.write_bytes(b"live")
        with pytest.raises(UserError, match=rf"^checkpoints directory {tmp_path / 'b' / 'checkpoints'} \(the "
                                            rf"directory {shared}\) is in use by PID {os.getpid()} on host "):
            prepare_run_dir(second, is_main=True)
        assert live.exists()
        RunDirLock(second.run_dir).release()  # the second run's own lock was given back
    finally:
        lock.release()
    prepare_run_dir(second, is_main=True)[1].release()  # once the first run is over


@pytest.mark.parametrize("target", ["gone", "file"])
def test_a_checkpoints_link_to_nothing_or_to_a_file_is_named_as_such(tmp_path, target):
    """RUN/checkpoints linked to a scratch directory that a purge removed: the run said "not
    writable: File exists". It must not start afresh either (creating the target would hide that
    the checkpoints are gone): one line naming the link and where it leads."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    scratch = tmp_path / "scratch" / "ckpt"
    if target == "file":
        scratch.parent.mkdir()
        scratch.write_text("")
    (run_dir / "checkpoints").symlink_to(scratch)
    expected = "which does not exist" if target == "gone" else "which is not a directory"
    with pytest.raises(UserError, match=rf"^{run_dir / 'checkpoints'} is a link to {scratch}, {expected}"):
        prepare_run_dir(SimpleNamespace(run_dir=str(run_dir)), is_main=True)
    assert scratch.exists() == (target == "file") and not scratch.is_dir()
    RunDirLock(run_dir).release()  # the run directory's lock was given back


def test_temp_names_differ_between_writers(tmp_path):
    target = tmp_path / "step_000000005.pt"
    names = {temp_path(target) for _ in range(100)}
    assert len(names) == 100 and all(n.name.startswith(".step_000000005.pt.") and n.name.endswith(".tmp")
                                     for n in names)
    assert all(f".{os.getpid()}." in n.name for n in names)


_RECORD_PROBE = """
import logging, os, sys
from pathlib import Path
from dist_train import healing
from dist_train.errors import UserError
from dist_train.rundir import check_config_file
from dist_train.tracking import read_wandb_record
logging.basicConfig(stream=sys.stdout, format="%(message)s")
run_dir = Path(sys.argv[1])
print("wandb", read_wandb_record(run_dir / "wandb.json"))
print("failures counted", healing.count_launch(run_dir, next_epoch=0, max_failures=3))
try:
    check_config_file(run_dir)
except UserError as error:
    print("config refused")
"""


@pytest.mark.parametrize("kind", ["fifo", "link to /dev/zero", "2 MB"])
def test_run_directory_records_that_cannot_be_records_are_not_read(tmp_path, kind):
    """wandb.json, failures.json and config.json are read at every start: a FIFO in their place
    blocked the start for ever, a link to /dev/zero filled the memory. Each is read only where it is
    a regular file of at most 1 MB (a run's are a few hundred bytes), else taken for no record
    (wandb.json, failures.json: with a warning) or refused (config.json: another program's file).
    In a subprocess, so that a read that never ends fails the test instead of hanging the suite."""
    import subprocess
    import sys

    from conftest import REPO, python_env

    for name in ("wandb.json", "failures.json", "config.json"):
        path = tmp_path / name
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "2 MB":
            path.write_text('{"run_id": "abc", "logged": {}, "epoch": 0, "failures": 1, "pad": "'
                            + "x" * (2 << 20) + '"}')
        else:
            path.symlink_to("/dev/zero")
    out = subprocess.run([sys.executable, "-c", _RECORD_PROBE, str(tmp_path)], env=python_env(), cwd=REPO,
                         capture_output=True, text=True, timeout=60).stdout
    assert out.splitlines() == [f"ignoring {tmp_path / 'wandb.json'}: not a record of a wandb run", "wandb {}",
                                f"ignoring {tmp_path / 'failures.json'}: not a record of failures",
                                "failures counted 0", "config refused"], out[:3000]
