"""wandb (offline) across kills and resumes, wandb's environment variables, wandb as an optional
extra, the progress output on and off a terminal, and the log lines' format."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
import torch

from conftest import (REPO, SMALL_RUN, Launch, alive, launch_command, newest_checkpoint, process_tree, python_env, run,
                      signal_all)
from dist_train.cli import main as cli_main
from dist_train.config import UserError, parse_config
from dist_train.tracking import run_name
from wandb_records import read_run


def test_wandb_keeps_one_run_across_kills_and_logs_no_step_twice(killed_ws1):
    run_dir, outputs = killed_ws1
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == len(outputs) == 4  # one offline file per launch
    runs = [read_run(f) for f in files]
    run_id = json.loads((run_dir / "wandb.json").read_text())["run_id"]
    # Every launch re-opened the same run. A killed launch keeps only what wandb wrote before the
    # kill (it flushes every second), possibly nothing.
    assert all(f"wandb run {run_id} (offline mode)" in out for out in outputs)
    written = [r for r in runs if r["run_id"] is not None]
    assert runs[-1] in written and {r["run_id"] for r in written} == {run_id}
    assert newest_checkpoint(run_dir)["wandb_run_id"] == run_id
    assert runs[-1]["config"]["batch_size"] == 16 and runs[-1]["config"]["model"] == "net"

    for kind in ("train", "eval", "checkpoint"):
        steps = [row["_step"] for r in runs for row in r["history"] if f"{kind}/" + _first_key(kind) in row]
        assert len(steps) == len(set(steps)), f"{kind} steps logged twice: {steps}"
        assert steps == sorted(steps), f"{kind} steps out of order: {steps}"
    last = runs[-1]["history"]
    final = [row for row in last if row["_step"] == 48]
    merged = {k: v for row in final for k, v in row.items()}
    assert {"train/loss", "train/lr", "train/samples_per_sec", "eval/loss", "eval/accuracy",
            "checkpoint/step"} <= set(merged)
    # The last launch resumed from the checkpoint of step 35 and logged only what was not yet logged:
    # not step 36, which the killed launch logged before it printed step 37. Step 37 itself is
    # logged again only if the kill came between its progress line and its wandb log (which
    # follows the line): then the killed launch never logged it.
    assert min(row["_step"] for row in last) >= 37


def test_a_run_started_from_another_runs_checkpoint_logs_to_a_wandb_run_of_its_own(killed_ws1, tmp_path):
    """--resume FILE of another run directory took FILE's wandb run id, so the new run (a fork:
    say another lr from step 40 with --allow-config-change) logged into the first run's history,
    steps it already had; both may even run at once. A run's own checkpoints keep their run."""
    source_dir, _ = killed_ws1
    first_id = json.loads((source_dir / "wandb.json").read_text())["run_id"]
    start = sorted((source_dir / "checkpoints").glob("step_*.pt"))[0]
    fork = tmp_path / "fork"
    out = run(SMALL_RUN + ["--run-dir", str(fork), "--resume", str(start), "--wandb-project", "dist-train-tests",
                           "--wandb-mode", "offline"]).stdout
    fork_id = json.loads((fork / "wandb.json").read_text())["run_id"]
    assert fork_id != first_id and f"its wandb run {first_id} is not continued" in out, out[-3000:]
    assert newest_checkpoint(fork)["wandb_run_id"] == fork_id
    assert {read_run(f)["run_id"] for f in (fork / "wandb").glob("offline-run-*/run-*.wandb")} == {fork_id}


def test_a_copied_run_directory_logs_to_a_wandb_run_of_its_own_a_moved_one_goes_on(killed_ws1, tmp_path):
    """`cp -r runs/a runs/b` to try another lr from a's last step: b's wandb.json and checkpoints
    named a's wandb run, so b logged into a's history (a may still be running). A copy gets a run
    of its own; a moved directory (nothing left where it was) keeps its run."""
    source_dir, _ = killed_ws1
    first_id = json.loads((source_dir / "wandb.json").read_text())["run_id"]
    wandb_args = ["--wandb-project", "dist-train-tests", "--wandb-mode", "offline", "--allow-config-change"]
    copy = tmp_path / "copy"
    shutil.copytree(source_dir, copy, ignore=shutil.ignore_patterns("wandb", ".lock"))
    out = run(SMALL_RUN + ["--run-dir", str(copy), "--epochs", "3", *wandb_args]).stdout
    copy_id = json.loads((copy / "wandb.json").read_text())["run_id"]
    assert copy_id != first_id and f"is a copy of {source_dir}" in out, out[-3000:]
    assert newest_checkpoint(copy)["wandb_run_id"] == copy_id

    moved = tmp_path / "moved"
    copy.rename(moved)
    out = run(SMALL_RUN + ["--run-dir", str(moved), "--epochs", "4", *wandb_args]).stdout
    assert f"wandb run {copy_id} (offline mode)" in out and "is a copy of" not in out, out[-3000:]

    # Only the checkpoints copied: the checkpoint names the run directory it was trained in.
    bare = tmp_path / "bare"
    shutil.copytree(source_dir / "checkpoints", bare / "checkpoints", ignore=shutil.ignore_patterns(".lock"))
    out = run(SMALL_RUN + ["--run-dir", str(bare), "--epochs", "3", *wandb_args]).stdout
    bare_id = json.loads((bare / "wandb.json").read_text())["run_id"]
    assert bare_id not in (first_id, copy_id) and f"is a copy of {source_dir}" in out, out[-3000:]


def _first_key(kind: str) -> str:
    return {"train": "loss", "eval": "loss", "checkpoint": "step"}[kind]


def test_array_tasks_get_names_that_say_which_task(monkeypatch):
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    assert run_name("sweep", "runs/7_3") == "sweep"
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert run_name("sweep", "runs/7_3") == "sweep-task3"
    assert run_name(None, "runs/7_3") == "7_3-task3"


def test_plain_progress_lines_where_output_is_not_a_terminal(killed_ws1):
    out = killed_ws1[1][-1]
    assert "\r" not in out
    lines = [line for line in out.splitlines() if " batch " in line and "samples/s" in line]
    assert len(lines) >= 10 and all(" eta " in line and "[rank 0]" in line for line in lines)


def test_a_progress_bar_on_a_terminal(tmp_path):
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a real terminal's size
    args = ["--dataset", "fake", "--fake-size", "64", "--batch-size", "16", "--epochs", "1",
            "--num-workers", "0", "--no-eval", "--run-dir", str(tmp_path / "run")]
    proc = subprocess.Popen(launch_command(args), env=python_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=secondary)
    os.close(secondary)
    chunks = []
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert proc.wait(timeout=120) == 0
    text = b"".join(chunks).decode(errors="replace")
    assert "\r" in text and "epoch 0" in text and "4/4" in text and "loss=" in text, text[-2000:]


def test_wandb_is_not_imported_when_off(tmp_path):
    code = ("import atexit, runpy, sys\n"  # the launcher ends the process itself, atexit handlers run
            f"sys.argv = ['train.py', '--dataset', 'fake', '--fake-size', '32', '--batch-size', '16', "
            f"'--epochs', '1', '--num-workers', '0', '--no-eval', '--run-dir', '{tmp_path / 'run'}']\n"
            "atexit.register(lambda: print('wandb imported:', 'wandb' in sys.modules))\n"
            "runpy.run_path('launch/train.py', run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", code], env=python_env(), cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert "training complete" in result.stderr, result.stderr[-2000:]
    assert "wandb imported: False" in result.stdout


WANDB_ENVIRON = {"WANDB_PROJECT": "from-env", "WANDB_ENTITY": "team-env", "WANDB_MODE": "offline",
                 "WANDB_DIR": "/somewhere/else"}


def wandb_settings(config) -> tuple:
    return config.wandb_project, config.wandb_entity, config.wandb_mode, config.wandb_dir


def test_wandb_environment_variables_apply_where_no_flag_is_given(tmp_path):
    assert wandb_settings(parse_config([], {})) == (None, None, "online", None)
    assert wandb_settings(parse_config([], WANDB_ENVIRON)) == ("from-env", "team-env", "offline", "/somewhere/else")
    flags = ["--wandb-project", "p", "--wandb-entity", "e", "--wandb-mode", "disabled", "--wandb-dir", "d"]
    assert wandb_settings(parse_config(flags, WANDB_ENVIRON)) == ("p", "e", "disabled", "d")
    assert parse_config(["--wandb-mode", "online"], WANDB_ENVIRON).wandb_mode == "online"
    (tmp_path / "c.toml").write_text('wandb-mode = "disabled"\n')  # a config file is given too
    assert parse_config(["--config", str(tmp_path / "c.toml")], WANDB_ENVIRON).wandb_mode == "disabled"
    assert parse_config([], {"WANDB_MODE": "dryrun"}).wandb_mode == "offline"  # wandb's older name
    with pytest.raises(UserError, match="WANDB_MODE=sometimes: use one of online, offline, disabled"):
        parse_config([], {"WANDB_MODE": "sometimes"})


def test_log_level_in_any_case(tmp_path):
    assert parse_config(["--log-level", "info"], {}).log_level == "INFO"
    (tmp_path / "c.yaml").write_text("log_level: debug\n")
    assert parse_config(["--config", str(tmp_path / "c.yaml")], {}).log_level == "DEBUG"


def test_wandb_from_the_environment_offline_and_dated_log_lines(tmp_path):
    run_dir, wandb_dir = tmp_path / "run", tmp_path / "wandb-files"
    args = ["--dataset", "fake", "--fake-size", "32", "--batch-size", "16", "--epochs", "1", "--num-workers", "0",
            "--run-dir", str(run_dir), "--log-level", "info", "--log-every-steps", "1"]
    environ = WANDB_ENVIRON | {"WANDB_DIR": str(wandb_dir)}
    out = run(args, env_extra=environ).stdout
    run_id = json.loads((run_dir / "wandb.json").read_text())["run_id"]
    assert f"wandb run {run_id} (offline mode) in project from-env, files under {wandb_dir / 'wandb'}" in out
    [run_file] = wandb_dir.glob("wandb/offline-run-*/run-*.wandb")
    record = read_run(run_file)
    assert (record["run_id"], record["project"], record["entity"]) == (run_id, "from-env", "team-env")
    assert not (run_dir / "wandb").exists()
    log_lines = [line for line in out.splitlines() if "[rank 0]" in line]
    assert len(log_lines) >= 4
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[rank 0\] ", line) for line in log_lines), log_lines


def test_a_missing_wandb_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys, restore_signals):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an environment without wandb imports
    code = cli_main(["train", "--dataset", "fake", "--run-dir", str(tmp_path / "run"), "--wandb-project", "p"])
    err = capsys.readouterr().err
    assert code == 2 and err == ("error: --wandb-project needs wandb, which is not installed: "
                                 "pip install 'dist_train[wandb]'\n")
    assert not (tmp_path / "run").exists()


def test_a_wandb_dir_that_cannot_be_made_is_one_line_before_the_run_dir(tmp_path, capsys, restore_signals):
    (tmp_path / "afile").write_text("")
    code = cli_main(["train", "--dataset", "fake", "--run-dir", str(tmp_path / "run"), "--wandb-project", "p",
                     "--wandb-mode", "offline", "--wandb-dir", str(tmp_path / "afile" / "w")])
    assert code == 2 and capsys.readouterr().err == (
        f"error: wandb directory {tmp_path / 'afile' / 'w'} (--wandb-dir or WANDB_DIR) cannot be made: "
        f"{tmp_path / 'afile'} is not a directory\n")
    assert not (tmp_path / "run").exists()


def test_a_wandb_record_that_cannot_be_written_is_one_line_and_exit_4(tmp_path, capsys, restore_signals):
    """RUN_DIR/wandb.json (the run id, and the last step sent) replaced by a directory; the same
    path is taken by a full disk at any logged step."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "wandb.json").mkdir()
    code = cli_main(["train", "--dataset", "fake", "--fake-size", "32", "--num-workers", "0", "--run-dir",
                     str(tmp_path / "run"), "--wandb-project", "p", "--wandb-mode", "offline"])
    err = capsys.readouterr().err  # after the log's start-up lines
    assert code == 4 and err.endswith(f"\nerror: could not write {tmp_path / 'run' / 'wandb.json'}: Is a directory\n")
    assert "Traceback" not in err
    assert [p.name for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("text", ['[1]', '{"run_id": 5, "logged": {}}', '{"run_id": "a/b", "logged": {}}',
                                  '{"run_id": "abc", "logged": {"train": "9"}}', '{"run_id": "abc", "logged": []}'])
def test_a_damaged_wandb_record_is_ignored_with_a_warning(tmp_path, text, caplog):
    """RUN_DIR/wandb.json edited by hand: the checkpoint's run id (or a new one) is used, and
    nothing crashes in the middle of a training at the first logged step."""
    from dist_train.tracking import read_wandb_record

    (tmp_path / "wandb.json").write_text(text)
    assert read_wandb_record(tmp_path / "wandb.json") == {}
    assert "ignoring" in caplog.text and "wandb.json" in caplog.text
    (tmp_path / "wandb.json").write_text('{"run_id": "abc123", "logged": {"train": 9}}')
    assert read_wandb_record(tmp_path / "wandb.json") == {"run_id": "abc123", "logged": {"train": 9}}


def test_where_wandb_falls_back_to_another_directory_the_log_says_where(tmp_path):
    """A directory the checks cannot see as unusable (root may write anywhere but into /proc):
    wandb then writes under the temp directory, and the log must not name the asked-for one."""
    asked = "/proc/dist-train-no-such-dir"
    out = run(["--dataset", "fake", "--fake-size", "32", "--batch-size", "16", "--epochs", "1", "--num-workers", "0",
               "--no-eval", "--run-dir", str(tmp_path / "run"), "--wandb-project", "p", "--wandb-mode", "offline",
               "--wandb-dir", asked], env_extra={"TMPDIR": str(tmp_path)}).stdout
    warning = re.search(r"WARNING wandb could not use (\S+) and writes under (\S+)", out)
    assert warning and warning[1] == asked and warning[2].startswith(str(tmp_path)), out
    assert list(Path(warning[2]).glob("offline-run-*/run-*.wandb"))


def test_a_run_trained_with_wandb_evaluates_without_it(reference_ws1, tmp_path, monkeypatch, capsys):
    checkpoint = newest_checkpoint(reference_ws1)
    checkpoint["config"] |= {"wandb_project": "p", "wandb_mode": "online"}
    torch.save(checkpoint, tmp_path / "step_000000048.pt")
    monkeypatch.setitem(sys.modules, "wandb", None)
    code = cli_main(["evaluate", str(tmp_path / "step_000000048.pt")])
    assert code == 0 and "accuracy" in capsys.readouterr().out


def wandb_core_processes(launch: Launch) -> list[int]:
    """The PIDs of the launch's wandb service process (wandb-core, started by wandb.init)."""
    core = [pid for pid in process_tree(launch.proc.pid) if b"wandb-core" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert core, "no wandb-core process found"
    return core


def test_a_dead_wandb_service_stops_the_metrics_not_the_training(tmp_path):
    """wandb's service process (wandb-core) dies mid-run (OOM killer, a crash): the training goes
    on to the end and exits 0, with one warning; no traceback, not even wandb's at exit."""
    run_dir = tmp_path / "run"
    args = ["--device", "cpu", "--dataset", "fake", "--fake-size", "2048", "--batch-size", "16", "--epochs", "2",
            "--num-workers", "0", "--log-every-steps", "1", "--no-eval", "--run-dir", str(run_dir),
            "--wandb-project", "dist-train-tests", "--wandb-mode", "offline"]  # 256 steps
    launch = Launch(args, tmp_path / "train.log")
    launch.wait_for(r"wandb run \w+ \(offline mode\)")
    core = wandb_core_processes(launch)
    for pid in core:
        os.kill(pid, signal.SIGKILL)
    assert launch.wait(timeout=300) == 0, launch.output()[-3000:]
    out = launch.output()
    assert "training complete: 2 epochs, 256 steps" in out
    assert "Traceback" not in out and "Exception ignored" not in out, out[-3000:]
    assert len(re.findall(r"WARNING wandb stopped working", out)) == 1, out[-3000:]
    assert newest_checkpoint(run_dir)["global_step"] == 256


@pytest.mark.parametrize("steps, pace, when, consequence", [
    (256, None, "at the end of the launch", "its records of this launch may be incomplete"),
    # Twice the steps, 30 ms after each: the training outlasts the timeout after the socket has
    # filled (~250 records), and a log call finds it
    (512, "slow@0:30", r"by step \d+", "this launch sends no more metrics, the training goes on")])
def test_a_stuck_wandb_service_is_given_up_after_the_timeout_and_the_training_ends(tmp_path, steps, pace, when,
                                                                                     consequence):
    """wandb's service process alive but not answering (stopped here; deadlocked or starved in the
    field): its socket fills and a log call blocks for ever, before the final save (seen: 255 of
    256 steps, then nothing for 240 s). The training must go on to its end and exit 0; the
    service process is killed so that nothing waits for it at exit, with one warning."""
    run_dir = tmp_path / "run"
    args = ["--device", "cpu", "--dataset", "fake", "--fake-size", str(steps * 8), "--batch-size", "16",
            "--epochs", "2", "--num-workers", "0", "--log-every-steps", "1", "--no-eval", "--run-dir", str(run_dir),
            "--wandb-project", "dist-train-tests", "--wandb-mode", "offline", "--wandb-timeout", "5"]
    launch = Launch(args, tmp_path / "train.log", env_extra={"DIST_TRAIN_INJECT_FAULT": pace} if pace else None)
    launch.wait_for(r"wandb run \w+ \(offline mode\)")
    core = wandb_core_processes(launch)
    signal_all(core, signal.SIGSTOP)
    try:
        assert launch.wait(timeout=300) == 0, launch.output()[-3000:]
        left = [pid for pid in core if alive(pid)]  # the run's, not the cleanup's, doing
    finally:
        signal_all(core, signal.SIGKILL)  # a run that hung leaves them stopped
    assert not left, "the run left its stopped wandb-core behind"
    out = launch.output()
    assert f"training complete: 2 epochs, {steps} steps" in out
    assert "Traceback" not in out and "Exception ignored" not in out, out[-3000:]
    warnings = re.findall(r"WARNING wandb .*", out)
    assert len(warnings) == 1 and re.search(rf"wandb has not answered for \d+ s {when} \(--wandb-timeout 5\); its "
                                            rf"service process was stopped; {consequence}", warnings[0]), out[-3000:]
    assert newest_checkpoint(run_dir)["global_step"] == steps


def test_a_wandb_service_that_does_not_start_in_time_costs_the_metrics_not_the_training(tmp_path):
    """wandb-core slower to start than wandb waits for (30 s by default: a loaded node, a binary on
    a slow shared filesystem; here 1 ms) was a traceback before the first step, a crash counted
    towards --max-failures at every relaunch. Now one warning; the launch trains without metrics."""
    run_dir = tmp_path / "run"
    out = run(["--dataset", "fake", "--fake-size", "64", "--batch-size", "16", "--epochs", "1", "--num-workers", "0",
               "--no-eval", "--run-dir", str(run_dir), "--wandb-project", "p", "--wandb-mode", "offline"],
              env_extra={"WANDB_X_SERVICE_WAIT": "0.001"}).stdout
    assert "Traceback" not in out, out[-3000:]
    assert len(re.findall(r"WARNING wandb could not start \(\w+: .*\); this launch trains without metrics", out)) == 1
    assert "training complete: 1 epochs, 4 steps" in out
    assert newest_checkpoint(run_dir)["wandb_run_id"] == json.loads((run_dir / "wandb.json").read_text())["run_id"]


def test_wandb_files_that_cannot_be_written_are_reported_once(tmp_path):
    """wandb-core that cannot write its run file (here a file size limit: EFBIG, as a full disk
    gives ENOSPC) only says so in its own internal log and goes on; the training tells the user,
    once, and goes on too."""
    run_dir = tmp_path / "run"
    args = ["--device", "cpu", "--dataset", "fake", "--fake-size", "1024", "--batch-size", "16", "--epochs", "2",
            "--num-workers", "0", "--log-every-steps", "1", "--no-eval", "--save-every-steps", "10",
            "--run-dir", str(run_dir), "--wandb-project", "dist-train-tests", "--wandb-mode", "offline"]
    launch = Launch(args, tmp_path / "train.log")
    launch.wait_for(r"wandb run \w+ \(offline mode\)")
    core = wandb_core_processes(launch)
    # The limit holds for every file wandb-core writes, its internal log too: leave that log room
    # for its error lines, and the run file none (it grows by whole blocks as records come).
    files = [f for f in (run_dir / "wandb").rglob("*") if f.is_file() and not f.is_symlink()]
    limit = max(f.stat().st_size for f in files) + 4096  # the run file grows ~100 bytes a step
    for pid in core:  # Go ignores SIGXFSZ: its writes past the limit fail with EFBIG
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, limit))
    assert launch.wait(timeout=300) == 0, launch.output()[-3000:]
    out = launch.output()
    assert "training complete: 2 epochs, 128 steps" in out and "Traceback" not in out
    warnings = re.findall(r"WARNING wandb could not write its run file .*", out)
    assert len(warnings) == 1 and "file too large" in warnings[0], out[-3000:]


@pytest.fixture
def full_filesystem(tmp_path):
    """A 40 kB tmpfs, filled up (mounting needs root, as CI runs the suite)."""
    mount = tmp_path / "full"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40k", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        reason = f"cannot mount a tmpfs here ({done.stderr.strip()}); CI runs the suite as root"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        with open(mount / "filler", "wb", buffering=0) as f:
            try:
                while f.write(b"x" * 4096):
                    pass
            except OSError:  # full
                pass
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_wandb_on_a_full_disk_is_one_warning_not_a_traceback_per_log_record(tmp_path, full_filesystem):
    """wandb's own Python logger writes debug.log beside its files: on a full disk each of its
    records was a 'Logging error' traceback (96 in a 4-step run); the run ends with one warning."""
    args = ["--device", "cpu", "--dataset", "fake", "--fake-size", "64", "--batch-size", "16", "--epochs", "1",
            "--num-workers", "0", "--run-dir", str(tmp_path / "run"), "--wandb-project", "dist-train-tests",
            "--wandb-mode", "offline", "--wandb-dir", str(full_filesystem)]
    out = run(args).stdout
    assert "training complete: 1 epochs, 4 steps" in out
    assert "Logging error" not in out and "Traceback" not in out, out[-3000:]
    assert len(re.findall(r"WARNING wandb (stopped working|could not write)", out)) == 1, out[-3000:]


def _wandb_online_env(tmp_path, **extra) -> dict:
    env = python_env() | {"HOME": str(tmp_path / "home"), "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config")}
    env.pop("WANDB_API_KEY", None)
    env.pop("WANDB_MODE", None)
    return env | extra


ONLINE = ["--device", "cpu", "--dataset", "fake", "--fake-size", "64", "--batch-size", "16", "--epochs", "1",
          "--num-workers", "0", "--wandb-project", "dist-train-tests", "--wandb-mode", "online"]


def test_wandb_online_without_a_login_is_one_line_and_exit_2(tmp_path):
    result = subprocess.run(launch_command(ONLINE + ["--run-dir", str(tmp_path / "run")]), cwd=REPO,
                            env=_wandb_online_env(tmp_path), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=300)
    assert result.returncode == 2, result.stdout[-3000:]
    assert "Traceback" not in result.stdout, result.stdout[-3000:]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("error:")]
    assert "wandb could not start" in line and "--wandb-mode offline" in line


def test_a_wandb_server_out_of_reach_at_start_records_offline_and_trains(tmp_path):
    """A cluster node without internet, or a server down when a requeued job restarts: the
    launch records offline (to sync later) rather than crash or lose its metrics."""
    env = _wandb_online_env(tmp_path, WANDB_API_KEY="0" * 40, WANDB_BASE_URL="http://127.0.0.1:9",
                            WANDB_INIT_TIMEOUT="5")
    run_dir = tmp_path / "run"
    result = subprocess.run(launch_command(ONLINE + ["--run-dir", str(run_dir)]), cwd=REPO, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    out = result.stdout
    assert "training complete: 1 epochs, 4 steps" in out and "Traceback" not in out, out[-3000:]
    assert re.search(r"WARNING wandb could not reach its server .*records offline", out), out[-3000:]
    assert re.search(r"INFO wandb run \w+ \(offline mode\)", out), out[-3000:]
    (offline,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    assert read_run(offline)["run_id"] == json.loads((run_dir / "wandb.json").read_text())["run_id"]


def test_a_fresh_start_with_other_settings_logs_to_a_wandb_run_of_its_own(tmp_path):
    """Checkpoints deleted (or none written yet) and the run launched again: with the same settings
    its steps are the same to the bit, so the wandb run goes on without sending them twice. With
    other settings the wandb run went on too: the new training's steps up to the old last one were
    dropped as sent already (here all 4), and the run's history mixed two trainings."""
    run_dir = tmp_path / "run"
    args = ["--device", "cpu", "--dataset", "fake", "--fake-size", "64", "--batch-size", "16", "--epochs", "1",
            "--num-workers", "0", "--no-eval", "--log-every-steps", "1", "--run-dir", str(run_dir),
            "--wandb-project", "dist-train-tests", "--wandb-mode", "offline"]  # 4 steps

    def launch(*extra) -> tuple[str, str, list]:
        for path in (run_dir / "checkpoints").glob("step_*.pt"):
            path.unlink()  # deleted to start afresh
        out = run(args + list(extra)).stdout
        run_id = json.loads((run_dir / "wandb.json").read_text())["run_id"]
        newest = read_run(sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-*.wandb"))[-1])  # by time
        return out, run_id, [row["_step"] for row in newest["history"] if "train/loss" in row]

    _, first, steps = launch()
    assert steps == [1, 2, 3, 4]
    out, again, steps = launch()
    assert again == first and steps == [] and "afresh" not in out  # the same steps: not sent twice
    out, other, steps = launch("--lr", "0.05")
    assert other != first and steps == [1, 2, 3, 4], out[-3000:]
    assert f"wandb run {first} logged another training (lr: 0.01 -> 0.05)" in out, out[-3000:]


def test_samples_per_second_counts_the_images_trained_not_full_batches(monkeypatch):
    """An epoch of 100 images per rank in batches of 64: the second batch holds 36. A batch size
    larger than the data (one step) printed 578,734,438,934 samples/s for 64 images."""
    from dist_train import tracking

    clock = iter([0.0, 1.0, 2.0, 10.0, 11.0])
    monkeypatch.setattr(tracking.time, "perf_counter", lambda: next(clock))
    report = tracking.ProgressReport(True, 1, world_size=2, batch_size=64, use_bar=False)
    report.start_epoch(0, 0, 2, samples_per_rank=100)
    assert report.step(1, 1, None, 0.1) == 128  # 64 images on each of 2 ranks in 1 s
    assert report.step(2, 2, None, 0.1) == 100  # 200 in 2 s
    huge = tracking.ProgressReport(True, 1, world_size=1, batch_size=99_999_999_999, use_bar=False)
    huge.start_epoch(0, 0, 1, samples_per_rank=64)
    assert huge.step(1, 1, None, 0.1) == 64
