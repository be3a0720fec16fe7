"""Configuration: every field's class on resume, config-file values checked as flags are,
the recorded environment, and nothing on disk before the configuration is known to be good."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO, newest_checkpoint, python_env, run

from dist_train import exits
from dist_train.config import EXACTNESS_FIELDS, HARMLESS_FIELDS, Config, UserError, parse_config
from dist_train.distributed import why_no_cuda
from dist_train.loop import build_scheduler
from dist_train.preemption import StopFlag
from dist_train.state import Progress, Training, apply_optimizer_settings, place_schedule, rescale_progress
from dist_train.train import main

TINY = ["--dataset", "fake", "--fake-size", "64", "--batch-size", "16", "--num-workers", "0",
        "--log-every-steps", "1", "--no-eval", "--lr-schedule", "constant"]  # 4 steps an epoch


def test_every_field_is_in_exactly_one_class():
    fields = {f.name for f in dataclasses.fields(Config)}
    assert not EXACTNESS_FIELDS & HARMLESS_FIELDS
    assert EXACTNESS_FIELDS | HARMLESS_FIELDS == fields
    assert {"lr", "momentum", "weight_decay"} <= EXACTNESS_FIELDS


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("name, text, message", [
    ("c.toml", 'amp = "fp32"', "argument --amp: invalid choice: 'fp32'"),
    ("c.toml", 'lr_schedule = "linear"', "argument --lr-schedule: invalid choice: 'linear'"),
    ("c.toml", "lr = nan", "--lr must be a finite number, got nan"),
    ("c.toml", "momentum = inf", "--momentum must be a finite number, got inf"),
    ("c.toml", "epochs = 1.5", "argument --epochs: invalid int value: '1.5'"),
    ("c.toml", 'eval = "no"', "eval must be true or false"),
    ("c.yaml", "batch_size: [16, 32]", "batch_size must be a single value, not a list"),
    ("c.yaml", "amp: off", "quote words like off"),
    # Whatever the file holds, one line: a list, a scalar or a number as a key was a traceback
    ("c.yaml", "- lr\n- 0.1\n", "must map flag names to values, not a list"),
    ("c.yaml", "lr 0.1\n", "must map flag names to values, not a str"),
    ("c.yaml", "1: 2\n", "a key must be a flag name, got 1"),
    # A key given twice: YAML kept the last one silently, and so did both formats for the two
    # spellings of one flag (batch-size and batch_size)
    ("c.yaml", "lr: 0.1\nepochs: 3\nlr: 0.2\n", "lr is given twice"),
    ("c.yaml", "batch-size: 8\nbatch_size: 16\n", "batch_size is given twice"),
    ("c.toml", "batch-size = 8\nbatch_size = 16\n", "batch_size is given twice"),
])
def test_config_file_values_meet_the_same_checks_as_flags(tmp_path, name, text, message):
    with pytest.raises(UserError) as error:
        parse_config(["--config", write(tmp_path, name, text)])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_good_config_file_is_applied_and_flags_override_it(tmp_path):
    path = write(tmp_path, "c.yaml", "amp: bf16\nlr: 0.5\neval: false\nresume: null\nbatch-size: 8\n")
    config = parse_config(["--config", path, "--lr", "0.25"])
    assert (config.amp, config.lr, config.eval, config.resume, config.batch_size) == ("bf16", 0.25, False, None, 8)


@pytest.mark.parametrize("flag", ["--lr", "--momentum", "--weight-decay"])
def test_non_finite_flags_are_refused(flag):
    for value in ("nan", "inf"):
        with pytest.raises(UserError, match="must be a finite number"):
            parse_config([flag, value])


NAMING_FLAGS = ["--run-dir", "--data-dir", "--resume", "--config", "--sweep-file", "--wandb-project",
                "--wandb-entity", "--wandb-name", "--wandb-dir"]


@pytest.mark.parametrize("flag", NAMING_FLAGS)
@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_name_is_refused_not_taken_as_the_default(tmp_path, flag, value):
    """`--run-dir "$RUN"` with RUN unset: the run directory was runs/default (another run's, whose
    checkpoints it resumed), an empty --resume resumed the newest checkpoint instead of the file,
    an empty --wandb-project or --config was silently no project, no file. From a config file too."""
    with pytest.raises(UserError, match=f"argument {flag}: is empty"):
        parse_config([flag, value])
    config_file = tmp_path / "c.toml"
    config_file.write_text(f'{flag[2:].replace("-", "_")} = "{value}"\n')
    if flag != "--config":
        with pytest.raises(UserError, match=f"argument {flag}: is empty"):
            parse_config(["--config", str(config_file)])
    assert parse_config([]).run_dir == "runs/default"  # left out: the default, as before


@pytest.mark.parametrize("flag, name, what", [("--config", "c.toml", "config file"),
                                             ("--sweep-file", "sweep.txt", "sweep file")])
def test_a_config_or_sweep_file_that_is_not_a_regular_file_is_refused_unread(tmp_path, flag, name, what):
    """A FIFO (or /dev/stdin) would block for ever, /dev/zero would fill the memory; in a
    subprocess, so that a read that never ends fails the test instead of hanging the suite."""
    fifo = tmp_path / name
    os.mkfifo(fifo)
    probe = ("import sys\n"
             "from dist_train.config import UserError, parse_config\n"
             "try:\n"
             "    parse_config(sys.argv[1:], {'SLURM_ARRAY_TASK_ID': '0'})\n"
             "except UserError as error:\n"
             "    print(error)\n")
    out = subprocess.run([sys.executable, "-c", probe, flag, str(fifo)], env=python_env(), cwd=REPO,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert out == f"{what} {fifo}: not a regular file\n"


@pytest.mark.parametrize("flag, name, what", [("--config", "c.toml", "config file"),
                                             ("--sweep-file", "sweep.txt", "sweep file")])
def test_a_config_or_sweep_file_too_large_to_be_one_is_refused_unread(tmp_path, flag, name, what):
    """A regular file of gigabytes (a data file or a log passed by mistake) was read whole into
    memory, then parsed."""
    path = tmp_path / name
    with open(path, "wb") as f:
        f.truncate(17 << 20)  # sparse: no disk used
    with pytest.raises(UserError) as error:
        parse_config([flag, str(path)], {"SLURM_ARRAY_TASK_ID": "0"})
    assert str(error.value) == f"{what} {path}: 17.8 MB, over the 16.8 MB a {what} may have"


def test_a_sweep_line_may_name_a_config_file_and_nothing_is_silently_dropped(tmp_path):
    """Before, `--config FILE` on a sweep line was parsed and thrown away (the run trained with
    the defaults), and `--sweep-file` there was recorded but never read."""
    write(tmp_path, "base.toml", "lr = 0.1\nmomentum = 0.5\nepochs = 7\n")
    write(tmp_path, "task.toml", "lr = 0.3\nmomentum = 0.6\n")
    sweep = write(tmp_path, "sweep.txt", f"--config {tmp_path / 'task.toml'}\n"
                                         f"--config {tmp_path / 'task.toml'} --momentum 0.7\n"
                                         "--sweep-file other.txt\n--seed 3 --lr\n"
                                         f"--config {tmp_path / 'nested.toml'}\n")
    write(tmp_path, "nested.toml", 'sweep_file = "other.txt"\n')
    argv = ["--config", str(tmp_path / "base.toml"), "--sweep-file", sweep]
    task = {"SLURM_ARRAY_TASK_ID": "0"}
    config = parse_config(argv, task)  # the line's file over the command line's file
    assert (config.lr, config.momentum, config.epochs) == (0.3, 0.6, 7)
    config = parse_config(argv + ["--lr", "0.2", "--momentum", "0.1"], {"SLURM_ARRAY_TASK_ID": "1"})
    assert (config.lr, config.momentum) == (0.2, 0.7)  # command line over files, the line over all
    from_file = ["--config", write(tmp_path, "with_sweep.toml", f'sweep_file = "{sweep}"\n')]
    for index, message, flags in (("2", "a sweep line cannot name another sweep file", argv),
                                  ("3", "argument --lr: expected one argument", argv),
                                  ("4", "a sweep line cannot name another sweep file", from_file)):
        with pytest.raises(UserError) as caught:
            parse_config(flags, {"SLURM_ARRAY_TASK_ID": index})
        assert str(caught.value) == f"sweep file {sweep}, line of array task {index}: {message}"


def test_a_sweep_line_that_asks_for_help_or_does_not_split_is_an_error_not_a_finished_task(tmp_path):
    """`--help` on a sweep line printed the help and exited 0: the array task ended COMPLETED
    without training. An unclosed quote was a traceback (exit 1)."""
    sweep = write(tmp_path, "sweep.txt", "--help\n-h\n--he\n--lr 'unclosed\n")
    for index, message in (("0", "unrecognized arguments: --help"), ("1", "unrecognized arguments: -h"),
                           ("2", "unrecognized arguments: --he"), ("3", "No closing quotation")):
        with pytest.raises(UserError) as caught:
            parse_config(["--sweep-file", sweep], {"SLURM_ARRAY_TASK_ID": index})
        assert str(caught.value) == f"sweep file {sweep}, line of array task {index}: {message}"


def test_a_fake_dataset_larger_than_the_memory_is_refused_before_it_is_generated():
    """--fake-size images are generated at start-up and held in memory (3,072 bytes each, plus a
    quarter for the test split): 10**8 was an allocator traceback, 10**7 a slow march to the OOM killer."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    too_many = memory // 3072 + 1
    with pytest.raises(UserError, match=rf"^--fake-size {too_many} needs [0-9.]+ GB in memory"):
        parse_config(["--dataset", "fake", "--fake-size", str(too_many)])
    assert parse_config(["--dataset", "fake", "--fake-size", "100000"]).fake_size == 100000


def test_a_fake_dataset_counts_every_process_of_the_node():
    """Each rank on a node holds its own copy: four ranks of a size one process could hold would
    run the node out of memory. torchrun says how many share it (LOCAL_WORLD_SIZE), srun where
    asked per node (SLURM_NTASKS_PER_NODE)."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    size = memory // 2 // (3072 * 5 // 4) // 3  # a third of the limit for one process
    flags = ["--dataset", "fake", "--fake-size", str(size)]
    assert parse_config(flags, {}).fake_size == size
    assert parse_config(flags, {"LOCAL_WORLD_SIZE": "2"}).fake_size == size
    for environ in ({"LOCAL_WORLD_SIZE": "4"}, {"SLURM_NTASKS_PER_NODE": "4"}):
        with pytest.raises(UserError, match=r"GB in memory in every process .* for the 4 processes on this node"):
            parse_config(flags, environ)
    with pytest.raises(UserError, match=r"^LOCAL_WORLD_SIZE='x' in the environment is not a whole number >= 1"):
        parse_config(flags, {"LOCAL_WORLD_SIZE": "x"})


@pytest.mark.parametrize("seconds", ["0.01", "1", "4.9"])
def test_a_hang_timeout_shorter_than_a_heartbeat_or_a_save_is_refused(seconds):
    """--hang-timeout 0.01 on two healthy ranks: 'rank 1 does not respond: no heartbeat for 0 s',
    a survivor's save and exit 76 within a second (a timeout in minutes, say 1, is the same
    mistake: the heartbeat alone comes every 0.2-5 s, a save or an evaluation takes longer)."""
    with pytest.raises(UserError, match=r"^--hang-timeout must be 0 \(off\) or at least 5 seconds"):
        parse_config(["--hang-timeout", seconds])
    assert parse_config(["--hang-timeout", "0"]).hang_timeout == 0
    assert parse_config(["--hang-timeout", "5"]).hang_timeout == 5


@pytest.mark.parametrize("seconds", ["0.5", "4.9", "-1", "nan"])
def test_a_wandb_timeout_too_short_to_finish_a_run_is_refused(seconds):
    """Finishing an offline wandb run alone takes 1-3 s here: a shorter timeout would give up a
    healthy wandb at every launch's end."""
    with pytest.raises(UserError, match=r"^--wandb-timeout must (be|not be negative)"):
        parse_config(["--wandb-timeout", seconds])
    assert parse_config(["--wandb-timeout", "0"]).wandb_timeout == 0
    assert parse_config([]).wandb_timeout == 120


@pytest.mark.parametrize("workers", ["65", "100000"])
def test_a_loader_worker_count_no_node_has_cores_for_is_refused(workers):
    """Each worker is a forked copy of its rank, made at every evaluation: --num-workers 100000
    (a typo) would fork until the node ran out of processes or memory, after the epoch's save."""
    with pytest.raises(UserError, match=r"^--num-workers must be at most 64 \(loader processes per rank\), got"):
        parse_config(["--num-workers", workers])
    assert parse_config(["--num-workers", "64"]).num_workers == 64


@pytest.mark.parametrize("seed", ["-1", "4294967296", "99999999999999999999"])
def test_a_seed_torch_would_alias_or_overflow_on_is_refused(seed):
    """torch's CPU generator keeps a seed's low 32 bits (0, 2**32 and 2**63 give the same initial
    weights) and takes -1 as 2**64 - 1; a larger one made an OverflowError at the first seeding."""
    with pytest.raises(UserError, match=r"^--seed must be an integer from 0 to 4294967295, got"):
        parse_config(["--seed", seed])
    assert parse_config(["--seed", "4294967295"]).seed == 4294967295


@pytest.mark.parametrize("environ", [{"SLURM_JOB_ID": "../../etc"}, {"SLURM_JOB_ID": "12,13"},
                                     {"SLURM_JOB_ID": "7", "SLURM_ARRAY_JOB_ID": "5", "SLURM_ARRAY_TASK_ID": "a/b"},
                                     {"SLURM_ARRAY_JOB_ID": "--help", "SLURM_ARRAY_TASK_ID": "0"},
                                     {"SLURM_JOB_ID": "\u0663"}])  # a digit to str.isdigit, not to SLURM
def test_a_slurm_job_id_that_is_not_a_number_is_refused(environ):
    """SLURM's job and task ids name the default run directory (runs/JOB) and the job that
    `scontrol requeue` is given: '../../etc' put the run outside runs/, '12,13' would requeue
    job 13 too. SLURM sets them as whole numbers; anything else is refused, --run-dir or not."""
    bad = next(name for name, value in environ.items() if not value.isascii() or not value.isdigit())
    for flags in ([], ["--run-dir", "runs/mine"]):
        with pytest.raises(UserError, match=rf"^{bad}=.* in the environment is not a whole number, as SLURM sets it"):
            parse_config(flags, environ)
    assert parse_config([], {"SLURM_ARRAY_JOB_ID": "5", "SLURM_ARRAY_TASK_ID": "12"}).run_dir == "runs/5_12"
    assert parse_config([], {"SLURM_JOB_ID": "123", "SLURM_ARRAY_TASK_ID": ""}).run_dir == "runs/123"


@pytest.mark.parametrize("extra", [["--lr", "nan"], ["--resume", "missing.pt"], ["--config", "missing.toml"]])
def test_nothing_is_created_before_the_configuration_is_known_to_be_good(tmp_path, extra, capsys):
    run_dir = tmp_path / "run"
    assert main(["--dataset", "fake", "--run-dir", str(run_dir), *extra], StopFlag()) == exits.USER_ERROR
    assert capsys.readouterr().err.startswith("error: ")
    assert not run_dir.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for CUDA where there is none")
def test_a_device_that_is_not_here_is_refused_before_the_run_directory(tmp_path, capsys):
    """--device cuda without CUDA (and a rank without a GPU of its own, the same code) made the run
    directory, its lock and checkpoints/ before saying so."""
    run_dir = tmp_path / "run"
    assert main(["--dataset", "fake", "--device", "cuda", "--run-dir", str(run_dir)], StopFlag()) == exits.USER_ERROR
    assert capsys.readouterr().err == (f"error: --device cuda was asked for but CUDA is not available here "
                                       f"({why_no_cuda()}); use --device cpu\n")
    assert not run_dir.exists()


@pytest.mark.parametrize("text", ['{"model_type": "bert", "hidden_size": 768}', "not json", "[1, 2]"])
def test_another_programs_config_json_in_the_run_directory_is_never_overwritten(tmp_path, text, capsys):
    """`--run-dir .` in a project or model directory: its config.json was replaced by the run's."""
    run_dir = tmp_path / "project"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(text)
    assert main(["--dataset", "fake", "--run-dir", str(run_dir)], StopFlag()) == exits.USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run_dir / 'config.json'} is not a dist_train configuration") and err.count("\n") == 1
    assert (run_dir / "config.json").read_text() == text and sorted(p.name for p in run_dir.iterdir()) == ["config.json"]


def test_a_damaged_config_json_beside_the_runs_own_checkpoints_is_rewritten_not_a_refusal(tmp_path, capsys):
    """A flipped byte or a truncation in RUN_DIR/config.json made every relaunch exit 2 as if the
    directory were another program's, and a SLURM requeue failed there for good. With checkpoints
    of its own in RUN_DIR/checkpoints/ the directory is the run's: a warning, and the file is
    written again."""
    run_dir = tmp_path / "run"
    flags = TINY + ["--run-dir", str(run_dir), "--epochs", "1"]
    assert main(flags, StopFlag()) == exits.COMPLETE
    config_json = run_dir / "config.json"
    config_json.write_bytes(config_json.read_bytes()[:40])  # cut short: not JSON
    capsys.readouterr()
    assert main(flags[:-1] + ["2", "--allow-config-change"], StopFlag()) == exits.COMPLETE
    err = capsys.readouterr().err
    assert f"{config_json} is damaged" in err and "training complete: 2 epochs" in err, err[-2000:]
    assert json.loads(config_json.read_text())["epochs"] == 2


def test_new_optimizer_settings_replace_the_loaded_ones_along_the_schedule():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = build_scheduler(optimizer, "cosine", 10)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    apply_optimizer_settings(Training(model, optimizer, scheduler), lr=0.4, momentum=0.5, weight_decay=0.01)
    factor = scheduler.lr_lambdas[0](3)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.4 * factor, 0.5, 0.01)
    scheduler.step()
    assert group["lr"] == 0.4 * scheduler.lr_lambdas[0](4)


def test_another_world_size_continues_from_the_images_consumed_at_that_point_of_the_schedule():
    """2 ranks x 16 images, 5 steps into epoch 1 (160 images), resumed on 4 ranks: 2 whole steps of
    64 are done, and the schedule goes on from step 1 x 6 + 2 of the run on 4 ranks, not from the
    17th step the checkpoint counted on 2 (a later point of a cosine schedule, past its end soon)."""
    progress = rescale_progress(Progress(1, 1, 5, 17), 2 * 16, 4 * 16, batches_per_epoch=6)
    assert (progress.next_epoch, progress.next_batch, progress.global_step) == (1, 2, 17)
    # --fake-size 256 -> 64, 8 a batch: 18 batches done of an epoch that now has 8; its last is next
    assert rescale_progress(Progress(0, 0, 18, 18), 8, 8, batches_per_epoch=8).next_batch == 7
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = build_scheduler(optimizer, "cosine", 2 * 6)
    for _ in range(17):
        optimizer.step()
        scheduler.step()
    place_schedule(Training(model, optimizer, scheduler), 1 * 6 + 2)
    assert optimizer.param_groups[0]["lr"] == scheduler.get_last_lr()[0] == 0.1 * scheduler.lr_lambdas[0](8) > 0
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == 0.1 * scheduler.lr_lambdas[0](9)


def test_a_changed_lr_is_refused_then_really_used_with_allow_config_change(tmp_path):
    run_dir = tmp_path / "run"
    args = TINY + ["--run-dir", str(run_dir), "--epochs", "1", "--lr", "0.01", "--momentum", "0.9"]
    run(args)
    changed = args + ["--lr", "0.05", "--momentum", "0.5"]
    refused = run(changed, check=False)
    assert refused.returncode == exits.USER_ERROR
    assert "lr: 0.01 -> 0.05" in refused.stdout and "momentum: 0.9 -> 0.5" in refused.stdout
    allowed = run(changed + ["--epochs", "2", "--allow-config-change"]).stdout
    assert "resuming with a changed setting (--allow-config-change): lr: 0.01 -> 0.05" in allowed
    group = newest_checkpoint(run_dir)["optimizer_state_dict"]["param_groups"][0]
    assert (group["lr"], group["momentum"]) == (0.05, 0.5)
    assert json.loads((run_dir / "config.json").read_text())["lr"] == 0.05


def test_a_resume_with_another_batch_size_continues_at_the_same_sample_and_point_of_the_schedule(tmp_path):
    """--allow-config-change with a larger batch size: the place in the epoch is the samples consumed,
    in batches of the new size, and the learning-rate schedule goes on from the same place. It kept
    the batch count: 18 batches of 8 became 18 of 64 in an epoch of 4, an epoch without a batch
    (reported as a diverged loss, exit 3, at every relaunch), and a cosine schedule past its end."""
    run_dir = tmp_path / "run"
    args = ["--dataset", "fake", "--fake-size", "256", "--num-workers", "0", "--no-eval", "--log-every-steps", "1",
            "--epochs", "2", "--save-every-steps", "18", "--keep", "10", "--run-dir", str(run_dir)]
    run(args + ["--batch-size", "8"])  # 32 steps an epoch
    for path in (run_dir / "checkpoints").glob("step_*.pt"):
        if path.name != "step_000000018.pt":  # as if stopped there: epoch 0, 18 batches (144 images) done
            path.unlink()
    out = run(args + ["--batch-size", "64", "--allow-config-change"]).stdout  # 4 steps an epoch
    # 144 images are 2 batches of 64: the third of epoch 0 is next, at 3/8 of the cosine schedule
    lr = 0.01 * 0.5 * (1 + math.cos(math.pi * 3 / 8))
    assert re.search(rf"epoch 0 step 19 batch 3/4 loss \S+ lr {lr:.3g} ", out), out[-3000:]
    assert "the learning-rate schedule goes on from step 2 of 8 (the checkpoint's step 18" in out
    final = newest_checkpoint(run_dir)
    assert final["global_step"] == 18 + 2 + 4 and final["scheduler_state_dict"]["last_epoch"] == 2 * 4


def test_a_resume_with_another_thread_count_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    args = TINY + ["--run-dir", str(run_dir), "--epochs", "1"]
    run(args, env_extra={"OMP_NUM_THREADS": "1"})
    assert newest_checkpoint(run_dir)["environment"]["num_threads"] == 1
    refused = run(args, check=False, env_extra={"OMP_NUM_THREADS": "2"})
    assert refused.returncode == exits.USER_ERROR, refused.stdout[-2000:]
    assert "thread count (torch.get_num_threads): 1 -> 2" in refused.stdout


def test_environment_differences_name_each_change():
    from dist_train.config import environment_differences
    from dist_train.state import capture_environment

    now = capture_environment(torch.device("cpu"))
    saved = now | {"device_type": "cuda", "torch_version": "2.13.0", "deterministic": not now["deterministic"]}
    assert environment_differences(saved, now) == [
        "device type: 'cuda' -> 'cpu'",
        f"deterministic algorithms: {saved['deterministic']!r} -> {now['deterministic']!r}",
        f"torch version: '2.13.0' -> {now['torch_version']!r}"]
    assert environment_differences(now, now) == []


def test_help_shows_each_default_but_never_none():
    """A flag without a default says in its help what happens then; '(default: None)' beside
    --run-dir read as if runs went nowhere."""
    from dist_train.config import build_parser
    text = " ".join(build_parser(prog="train.py").format_help().split())
    assert "default: None" not in text
    assert "--keep KEEP number of newest checkpoints kept (default: 3)" in text
    assert "SLURM array task, runs/JOBID for a SLURM job --model" in text


def test_a_setting_the_checkpoint_does_not_record_counts_as_its_default():
    """A checkpoint whose config lacks an exactness setting (written before the setting existed,
    or edited by hand: `config: {}`) was compared on the settings it had only, so a resume with
    another lr or model went on silently. A missing setting is what the code did before it
    existed, its default: the same now is no change, another value is one."""
    from dist_train.config import config_differences
    now = parse_config(["--lr", "0.05", "--model", "resnet18"])
    saved = now.to_dict()
    for key in ("lr", "model", "momentum"):
        del saved[key]
    assert config_differences(saved, 1, now, 1) == [
        f"lr: not recorded (the default, {Config.lr!r}) -> 0.05",
        "model: not recorded (the default, 'net') -> 'resnet18'"]  # momentum: the default now too
    assert config_differences({}, 1, parse_config([]), 1) == []
