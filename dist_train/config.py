"""The training configuration: one frozen dataclass, its command-line parser and its validation."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import re
import shlex
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dist_train.errors import CheckpointError, UserError, environment_int  # noqa: F401  (re-exported)


WANDB_MODES = ("online", "offline", "disabled")


def _opt(default, help, **kwargs):
    return field(default=default, metadata={"help": help, **kwargs})


def named(value: str) -> str:
    """The type of the flags that name a path or a wandb name. Empty is an error, not "left out":
    `--run-dir "$RUN"` with RUN unset would otherwise train in runs/default (another run's), and
    an empty --resume, --config or --wandb-project would silently mean none."""
    if not value.strip():
        raise argparse.ArgumentTypeError("is empty (an unset shell variable?)")
    return value


@dataclass(frozen=True)
class Config:
    """Everything a run is configured by; stored in every checkpoint."""

    run_dir: str | None = _opt(None, "run directory, checkpoints in RUN_DIR/checkpoints/; default runs/default, "
                                     "or runs/ARRAYJOB_TASK for a SLURM array task, runs/JOBID for a SLURM job",
                               type=named)
    model: str = _opt("net", "'net' (the recipe's CIFAR-10 Net) or a torchvision classification model")
    dataset: str = _opt("cifar10", "training data: cifar10; digits (scikit-learn's 8x8 digits at 32x32, "
                                   "offline); fake (random images for tests)", choices=("cifar10", "digits", "fake"))
    data_dir: str = _opt("data", "where CIFAR-10 lives (DATA_DIR/cifar-10-batches-py)", type=named)
    download: bool = _opt(False, "download CIFAR-10 into --data-dir if missing (main rank only)")
    fake_size: int = _opt(2048, "number of training images of --dataset fake (test split: a quarter)")
    epochs: int = _opt(2, "number of passes over the training data")
    batch_size: int = _opt(64, "batch size per rank")
    lr: float = _opt(0.01, "peak learning rate of SGD")
    lr_schedule: str = _opt("cosine", "per-step learning-rate schedule", choices=("cosine", "constant"))
    momentum: float = _opt(0.9, "SGD momentum")
    weight_decay: float = _opt(0.0, "SGD weight decay")
    seed: int = _opt(0, "seed of the model init, shuffling, augmentation and every rank's RNG (0 to 2**32 - 1)")
    num_workers: int = _opt(2, "DataLoader worker processes per rank (--data-path loader, and evaluation)")
    data_path: str = _opt("device", "device: the training set as uint8 tensors on the device, augmented "
                                    "there in batches; loader: a DataLoader with --num-workers workers "
                                    "(the same batches, bit for bit)", choices=("device", "loader"))
    save_every_steps: int = _opt(200, "save every N optimizer steps (0: only at epoch ends)")
    save_every_minutes: float = _opt(0.0, "also save every M minutes of wall time, at a step all ranks "
                                          "agree on through the stop agreement (0: off)")
    async_save: bool = _opt(True, "write checkpoints in the background (a writer process on CPU, a thread on "
                                  "CUDA) from a copy taken at the step (training goes on meanwhile; one write "
                                  "in flight at a time)")
    read_once: bool = _opt(True, "on resume with several ranks, the main rank alone reads the checkpoint "
                                 "and broadcasts it (else every rank reads the shared file)")
    keep: int = _opt(3, "number of newest checkpoints kept")
    resume: str | None = _opt(None, "resume from this checkpoint file instead of the newest valid one", type=named)
    amp: str = _opt("off", "mixed precision: bf16 autocast, or fp16 with a GradScaler (CUDA)",
                    choices=("off", "bf16", "fp16"))
    device: str = _opt("auto", "auto: cuda:LOCAL_RANK when CUDA is available, else cpu",
                       choices=("auto", "cpu", "cuda"))
    deterministic: bool = _opt(True, "deterministic CUDA kernels, needed for bit-exact resume on GPU")
    eval: bool = _opt(True, "evaluate on the test split after each epoch")
    log_every_steps: int = _opt(50, "log the training loss every N steps")
    stop_check_every_steps: int = _opt(10, "ranks agree on a pending SIGUSR1/SIGTERM every N steps, or "
                                           "every 5 s of steps if sooner (a collective; it overlaps training)")
    log_level: str = _opt("INFO", "logging level of the main rank (other ranks log warnings and errors), "
                                  "in any case", choices=("DEBUG", "INFO", "WARNING", "ERROR"), type=str.upper)
    wandb_project: str | None = _opt(None, "log to this wandb project (main rank only); off when unset",
                                     type=named, env="WANDB_PROJECT")
    wandb_entity: str | None = _opt(None, "wandb entity (team or user)", type=named, env="WANDB_ENTITY")
    wandb_name: str | None = _opt(None, "wandb run name; array tasks get -taskN appended", type=named)
    wandb_mode: str = _opt("online", "wandb mode", choices=WANDB_MODES, env="WANDB_MODE")
    wandb_dir: str | None = _opt(None, "wandb writes its files under WANDB_DIR/wandb/; unset: the run directory",
                                 type=named, env="WANDB_DIR")
    wandb_timeout: float = _opt(120.0, "a wandb call (a log, the finish at the end) unanswered this many "
                                       "seconds is given up: wandb's service process is stopped and the "
                                       "training goes on without metrics (0: wait for ever; else at least 5)")
    allow_config_change: bool = _opt(False, "resume even if a setting exactness depends on (model, data, batch "
                                            "size, seed, epochs, lr, momentum, weight decay, world size, "
                                            "threads, device, torch version) differs from the checkpoint's; "
                                            "the new values are used (no longer exact)")
    max_requeues: int = _opt(20, "SIGUSR1 requeues the SLURM job at most this many times")
    hang_timeout: float = _opt(60.0, "a rank silent or stuck in one phase (a step, a save, a batch) this "
                                     "many seconds ends the run for a restart (0: off; else at least 5); "
                                     "above the longest step, evaluation and save")
    max_failures: int = _opt(3, "give up after this many failed launches in a row without a completed "
                                "epoch (counted in RUN_DIR/failures.json)")
    sweep_file: str | None = _opt(None, "one line of flags per SLURM array task, picked by "
                                        "SLURM_ARRAY_TASK_ID (0: the first line); they override the others",
                                  type=named)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse whose errors are a UserError (one line, exit 2), not a usage dump."""

    def error(self, message):
        raise UserError(message)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default in --help, but not 'None': a flag without one says in its help what
    happens then (--run-dir: runs/default, or one per SLURM job)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser(prog: str | None = None, add_help: bool = True) -> argparse.ArgumentParser:
    """An argparse parser generated from the Config fields, one flag per field."""
    parser = OneLineErrorParser(
        prog=prog, add_help=add_help,
        description="Train with DDP; relaunching the same command resumes bit-exactly.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--config", type=named, help="a TOML or YAML file of flag values (as key = value, with "
                                         "underscores); flags on the command line override it")
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        meta = dict(f.metadata)
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=meta["help"])
        elif "env" in meta:
            # Absent unless given (on the command line or in a config file): then the environment
            # variable the ecosystem uses applies, then the default (see with_environment).
            env = meta.pop("env")
            meta["help"] += f" (default: ${env}, else {'unset' if f.default is None else f.default})"
            parser.add_argument(flag, default=argparse.SUPPRESS, **meta)
        else:
            meta.setdefault("type", type(f.default))
            parser.add_argument(flag, default=f.default, **meta)
    return parser


def with_environment(values: dict, environ) -> dict:
    """Fields not given as flags take their environment variable (WANDB_MODE for --wandb-mode...)."""
    values = dict(values)
    for f in dataclasses.fields(Config):
        env = f.metadata.get("env")
        if env is None or f.name in values:
            continue
        value = environ.get(env) or f.default
        if f.name == "wandb_mode":
            value = {"dryrun": "offline", "run": "online"}.get(value, value)  # wandb's older names
            if value not in WANDB_MODES:
                raise UserError(f"{env}={value}: use one of {', '.join(WANDB_MODES)}")
        values[f.name] = value
    return values


def parse_config(argv: list[str] | None = None, environ=os.environ) -> Config:
    """Flags (over a config file's values, under the sweep line of this array task) -> a validated
    Config; UserError on bad values. File values are turned into flags, so they meet the same
    types, choices and checks as the command line. A sweep line may name a config file of its own:
    its values go over the command line's file and under every flag."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    check_slurm_ids(environ)
    files = config_file_flags(parser, args.config) if args.config else []
    if files:
        args = parser.parse_args(files + argv)  # later flags win: the command line's
    if args.sweep_file:
        line = sweep_overrides(args.sweep_file, environ)
        where = f"sweep file {args.sweep_file}, line of array task {environ['SLURM_ARRAY_TASK_ID']}"
        try:  # without -h/--help: the help and exit 0 would end an array task as COMPLETED
            line_args = build_parser(add_help=False).parse_args(line)
        except UserError as error:
            raise UserError(f"{where}: {error}") from None
        if line_args.sweep_file:
            raise UserError(f"{where}: a sweep line cannot name another sweep file")
        if line_args.config:  # its values over the command line's file, under every flag
            files += config_file_flags(parser, line_args.config)
        sweep_file, args = args.sweep_file, parser.parse_args(files + argv + line)
        if args.sweep_file != sweep_file:  # named by the line's config file
            raise UserError(f"{where}: a sweep line cannot name another sweep file")
    values = with_environment(vars(args), environ)
    values.pop("config")
    config = Config(**values)
    if config.run_dir is None:
        config = dataclasses.replace(config, run_dir=default_run_dir(environ))
    validate(config, environ)
    return config


def config_file_flags(parser, path: str) -> list[str]:
    """A config file's values as flags, checked as the command line's are."""
    file_argv = config_file_argv(read_config_file(path), path)
    try:
        parser.parse_args(file_argv)
    except UserError as error:
        raise UserError(f"config file {path}: {error}") from None
    return file_argv


def read_config_file(path: str) -> dict:
    """Flag values from a TOML (.toml) or YAML (.yaml/.yml) file; unknown keys are an error."""
    if not path.endswith((".toml", ".yaml", ".yml")):
        raise UserError(f"config file {path}: use a .toml, .yaml or .yml file")
    text = read_text_file(path, "config file")
    try:
        if path.endswith(".toml"):
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            values = tomllib.loads(text)
        else:
            values = _load_yaml(text)
    except _GivenTwice as twice:
        raise UserError(f"config file {path}: {twice.args[0]} is given twice") from None
    except Exception as error:
        raise UserError(f"config file {path} does not parse: {str(error).splitlines()[0]}") from None
    if values is None:  # an empty YAML file
        values = {}
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must map flag names to values, not a {type(values).__name__}")
    named = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise UserError(f"config file {path}: a key must be a flag name, got {key!r}")
        name = key.replace("-", "_")
        if name in named:  # batch-size and batch_size: the same flag
            raise UserError(f"config file {path}: {name} is given twice")
        named[name] = value
    values = named
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"config file {path}: unknown keys {', '.join(unknown)}")
    return values


class _GivenTwice(Exception):
    pass


def _load_yaml(text: str):
    """yaml.safe_load, but a key given twice in one mapping is an error (YAML keeps the last)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<': merged keys may be overridden
                continue
            key = loader.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                raise _GivenTwice(key)
            seen.add(key if isinstance(key, str) else id(key_node))
        return yaml.SafeLoader.construct_mapping(loader, node, deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return yaml.load(text, Loader=Loader)


MAX_TEXT_FILE = 16 << 20  # bytes; a sweep of 100,000 lines is a few MB


def read_text_file(path: str, what: str) -> str:
    """A regular file's text; anything else (a FIFO or /dev/stdin would block for ever, /dev/zero
    fill the memory) is refused unopened."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise UserError(f"{what} {path}: not a regular file")
        if info.st_size > MAX_TEXT_FILE:  # a data file or a log given by mistake: not read into memory
            raise UserError(f"{what} {path}: {info.st_size / 1e6:.1f} MB, over the {MAX_TEXT_FILE / 1e6:.1f} MB "
                            f"a {what} may have")
        return Path(path).read_text()
    except OSError as error:
        raise UserError(f"cannot read {what} {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} {path}: not UTF-8 text") from None


def config_file_argv(values: dict, path: str) -> list[str]:
    """A config file's values as the flags that would set them, for the same parser to check."""
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    argv = []
    for key, value in values.items():
        flag, default = "--" + key.replace("_", "-"), defaults[key]
        if isinstance(value, (list, dict)):
            raise UserError(f"config file {path}: {key} must be a single value, not a {type(value).__name__}")
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise UserError(f"config file {path}: {key} must be true or false, got {value!r}")
            argv.append(flag if value else "--no-" + flag[2:])
        elif value is None:
            if default is not None:
                raise UserError(f"config file {path}: {key} needs a value")
        elif isinstance(value, bool):  # YAML reads unquoted off/on/yes/no as booleans
            kind = "str" if default is None else type(default).__name__
            raise UserError(f"config file {path}: {key} must be a {kind}, got {value!r} "
                            "(in YAML, quote words like off, on, yes, no)")
        else:
            argv += [flag, str(value)]  # str() of a float round-trips exactly
    return argv


# Every field is in exactly one class (tests/test_config.py checks it).
# Exactness: a resume that changes one is not bit for bit the uninterrupted run; refused unless
# --allow-config-change, and then applied (the optimizer's values too) and logged.
EXACTNESS_FIELDS = frozenset({"model", "dataset", "fake_size", "batch_size", "seed", "epochs", "lr",
                              "lr_schedule", "momentum", "weight_decay", "amp", "deterministic"})
# Harmless: the trained bits do not depend on them (augmentation is seeded per sample, whichever
# worker loads it; evaluation and saves draw no random numbers; both data paths yield the same
# batches to the bit, so a resume may switch paths); applied on resume as given.
# `device` is here because what matters is the device type it resolves to, which the checkpoint's
# environment records and checks; `data_dir` may move, the data in it must not.
HARMLESS_FIELDS = frozenset({"run_dir", "data_dir", "download", "num_workers", "save_every_steps", "keep",
                             "save_every_minutes", "async_save", "read_once",
                             "resume", "device", "eval", "log_every_steps", "stop_check_every_steps",
                             "log_level", "wandb_project", "wandb_entity", "wandb_name", "wandb_mode",
                             "allow_config_change", "max_requeues", "sweep_file", "data_path", "wandb_dir",
                             "hang_timeout", "max_failures", "wandb_timeout"})
ENVIRONMENT_NAMES = {"num_threads": "thread count (torch.get_num_threads)", "device_type": "device type",
                     "deterministic": "deterministic algorithms", "torch_version": "torch version"}


def config_differences(saved: dict, saved_world_size: int, config: Config, world_size: int) -> list[str]:
    """'name: saved -> now' for each setting that would break an exact resume. A setting the saved
    config lacks (written before it existed, or edited) is taken as its default, which is what the
    code did before the setting existed."""
    now, defaults = config.to_dict(), Config().to_dict()
    changes = [f"{key}: {saved[key]!r} -> {now[key]!r}" if key in saved else
               f"{key}: not recorded (the default, {defaults[key]!r}) -> {now[key]!r}"
               for key in sorted(EXACTNESS_FIELDS) if saved.get(key, defaults[key]) != now[key]]
    if saved_world_size != world_size:
        changes.append(f"world size: {saved_world_size} -> {world_size}")
    return changes


def environment_differences(saved: dict, now: dict) -> list[str]:
    """'what: saved -> now' for each recorded part of the environment that changed."""
    return [f"{ENVIRONMENT_NAMES.get(key, key)}: {saved[key]!r} -> {now.get(key)!r}"
            for key in ENVIRONMENT_NAMES if key in saved and saved[key] != now.get(key)]


# What may differ from one rank to another: a node's own copy of the data, its cores, wandb's
# variables in its environment (the main rank alone logs). Every other setting, and the recorded
# environment, must be the main rank's on every rank (train.check_ranks_agree): a rank with another
# lr trains its replica with it, silently (DDP averages gradients, not weights), and the checkpoint
# records the main rank's settings and environment for all.
PER_NODE_FIELDS = frozenset({"data_dir", "download", "num_workers", "wandb_project", "wandb_entity",
                             "wandb_mode", "wandb_dir"})


def rank_settings(config: Config, environment: dict) -> dict:
    """What every rank must share with the main rank (see PER_NODE_FIELDS)."""
    shared = {key: value for key, value in config.to_dict().items() if key not in PER_NODE_FIELDS}
    return {"config": shared, "environment": environment}


def rank_differences(main: dict, other: dict, rank: int) -> list[str]:
    """'what: X on rank 0, Y on rank N' for each setting of rank_settings that differs."""
    def name(part: str, key: str) -> str:  # `deterministic` is a flag and a recorded part of the environment
        return ENVIRONMENT_NAMES.get(key, key) if part == "environment" else key

    return [f"{name(part, key)}: {main[part][key]!r} on rank 0, {other[part].get(key)!r} on rank {rank}"
            for part in ("config", "environment") for key in main[part] if main[part][key] != other[part].get(key)]


SLURM_IDS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID")


def check_slurm_ids(environ) -> None:
    """SLURM sets its job and task ids as whole numbers. They name the default run directory and
    the job given to `scontrol requeue`: '../x' would put the run outside runs/, '12,13' would
    requeue job 13 as well. So anything else is refused, whether or not --run-dir is given."""
    for name in SLURM_IDS:
        value = environ.get(name)
        if value and not re.fullmatch(r"[0-9]+", value):
            raise UserError(f"{name}={value!r} in the environment is not a whole number, as SLURM sets it: it "
                            "names the run directory and the job to requeue; unset it outside a SLURM job")


def default_run_dir(environ) -> str:
    """Found again by a requeued job: runs/ARRAYJOB_TASK, runs/JOBID, or runs/default."""
    if environ.get("SLURM_ARRAY_JOB_ID") and environ.get("SLURM_ARRAY_TASK_ID"):
        return f"runs/{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    if environ.get("SLURM_JOB_ID"):
        return f"runs/{environ['SLURM_JOB_ID']}"
    return "runs/default"


def sweep_overrides(path: str, environ) -> list[str]:
    """The flags on line SLURM_ARRAY_TASK_ID of a sweep file (blank and # lines are skipped)."""
    if "SLURM_ARRAY_TASK_ID" not in environ:
        raise UserError("--sweep-file needs a SLURM array task (SLURM_ARRAY_TASK_ID is not set)")
    lines = [line for line in read_text_file(path, "sweep file").splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    task = environment_int(environ, "SLURM_ARRAY_TASK_ID")
    if task >= len(lines):
        raise UserError(f"sweep file {path} has {len(lines)} configurations, array task {task} has none")
    try:
        return shlex.split(lines[task])
    except ValueError as error:  # an unclosed quote
        raise UserError(f"sweep file {path}, line of array task {task}: {error}") from None


MAX_SEED = (1 << 32) - 1


def uses_wandb(config: Config) -> bool:
    return bool(config.wandb_project) and config.wandb_mode != "disabled"


MIN_HANG_TIMEOUT = 5.0  # seconds; the heartbeat alone comes every 0.2-5 s (watchdog.py)
MIN_WANDB_TIMEOUT = 5.0
MAX_NUM_WORKERS = 64  # per rank: a node's cores, times a few; 1000 is a typo that forks 1000 processes


def check_fake_size(fake_size: int, environ) -> None:
    """The images of --dataset fake, in every process of this node, within half its memory."""
    here = environment_int(environ, "LOCAL_WORLD_SIZE", 0, 1) or environment_int(environ, "SLURM_NTASKS_PER_NODE", 1, 1)
    each, memory = fake_size * 5 // 4 * 3072, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if each * here > memory // 2:
        on_node = f", {each * here / 1e9:.1f} GB for the {here} processes on this node" if here > 1 else ""
        raise UserError(f"--fake-size {fake_size} needs {each / 1e9:.1f} GB in memory in every process (3,072 "
                        f"bytes an image){on_node}; this machine has {memory / 1e9:.1f} GB")


def validate(config: Config, environ=os.environ) -> None:
    """Reject values that cannot train, before any process group exists."""
    for name in ("lr", "momentum", "weight_decay", "hang_timeout", "save_every_minutes", "wandb_timeout"):
        if not math.isfinite(getattr(config, name)):
            raise UserError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(config, name)}")
    positive = ("epochs", "batch_size", "lr", "keep", "fake_size", "log_every_steps", "stop_check_every_steps")
    for name in positive:
        if getattr(config, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(config, name)}")
    for name in ("num_workers", "save_every_steps", "weight_decay", "momentum", "max_requeues",
                 "hang_timeout", "max_failures", "save_every_minutes", "wandb_timeout"):
        if getattr(config, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must not be negative, got {getattr(config, name)}")
    if config.dataset == "fake":  # generated at start-up and held in memory, by every process
        check_fake_size(config.fake_size, environ)
    if 0 < config.hang_timeout < MIN_HANG_TIMEOUT:  # a healthy run would be ended as hung at once
        raise UserError(f"--hang-timeout must be 0 (off) or at least {MIN_HANG_TIMEOUT:.0f} seconds, got "
                        f"{config.hang_timeout}: it must outlast the longest step, evaluation and save")
    if 0 < config.wandb_timeout < MIN_WANDB_TIMEOUT:  # finishing an offline run alone takes 1-3 s here
        raise UserError(f"--wandb-timeout must be 0 (wait for ever) or at least {MIN_WANDB_TIMEOUT:.0f} seconds, "
                        f"got {config.wandb_timeout}")
    if config.num_workers > MAX_NUM_WORKERS:  # each a forked copy of the rank, at every evaluation
        raise UserError(f"--num-workers must be at most {MAX_NUM_WORKERS} (loader processes per rank), "
                        f"got {config.num_workers}")
    if not 0 <= config.seed <= MAX_SEED:  # torch keeps a seed's low 32 bits on the CPU: no aliases
        raise UserError(f"--seed must be an integer from 0 to {MAX_SEED}, got {config.seed}")
    from dist_train.models import check_model_name

    check_model_name(config.model)
    if uses_wandb(config) and importlib.util.find_spec("wandb") is None:
        raise UserError("--wandb-project needs wandb, which is not installed: pip install 'dist_train[wandb]'")
    if config.amp == "fp16":
        from dist_train.distributed import device_type

        if device_type(config.device) != "cuda":
            raise UserError("--amp fp16 needs CUDA (its GradScaler); use --amp bf16 on CPU")
