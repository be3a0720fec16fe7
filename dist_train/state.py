"""What a resume needs beyond weights: counters, the checkpoint dict, and where to resume from (RNG streams: rng.py)."""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dist_train.checkpoint import CheckpointError, FORMAT_VERSION, find_latest_valid, load_checkpoint, map_leaves
from dist_train.saving import write_checkpoint
from dist_train.errors import DivergedError, SaveFailedError, UserError, first_line
from dist_train.distributed import DistEnv, all_reduce_sum, broadcast_from_main, gather_to_main
from dist_train.models import strip_wrapper_prefixes, unwrap
from dist_train.rng import capture_rng_state

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """Where training stands. `epoch` is the epoch last trained in (the recipe's key)."""

    epoch: int = 0
    next_epoch: int = 0  # the epoch training continues in
    next_batch: int = 0  # the batch of next_epoch training continues at (0: its start)
    global_step: int = 0  # optimizer steps taken so far
    last_loss: object = field(default=float("nan"), compare=False)  # the last step's loss (a tensor:
    #                                                     reading it every step would sync the GPU)


@dataclass
class Training:
    """The objects whose state a checkpoint holds."""

    model: torch.nn.Module  # possibly DDP-wrapped
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None = None


def to_cpu(tree):
    """Every tensor in a nest of dicts, lists and tuples, on the CPU (no copy where it already is).

    A checkpoint holds CPU tensors only: a file whose storages are tagged cuda:N does not load on
    a machine without CUDA with the recipe's plain torch.load."""
    return map_leaves(tree, lambda tensor: tensor.detach().cpu())


def capture_environment(device: torch.device) -> dict:
    """What a bit-exact resume needs beyond the configuration: CPU kernels give other bits with
    another thread count, and kernels differ between devices, determinism modes and torch versions.
    And the code itself (code_digest): every rank must run the same, a resume is told when it changed."""
    return {"num_threads": torch.get_num_threads(), "device_type": device.type,
            "deterministic": torch.are_deterministic_algorithms_enabled(),
            "torch_version": str(torch.__version__), "code_digest": code_digest()}


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """A digest of dist_train's own .py files, read once. A template is edited between launches:
    a resume by other code is bit for bit only where the edit leaves training alone, which no
    check can tell, so a changed digest is a warning at the resume (train.resume); across ranks at
    start it is a difference like any other (a node with a stale copy of the code)."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(f"{path.relative_to(root).as_posix()}\0".encode() + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def build_checkpoint(training: Training, progress: Progress, loss: float, rng_states: list[dict],
                     config: dict, world_size: int, wandb_run_id: str | None = None,
                     environment: dict | None = None, to_host=to_cpu) -> dict:
    """The general checkpoint of the recipe, plus everything an exact continuation needs.
    to_host: how tensors reach the host (to_cpu; an asynchronous save keeps them where they are,
    its writer copies them)."""
    scaler = training.scaler
    return {
        # The recipe's keys: its own loading code works on this dict unchanged.
        "model_state_dict": to_host(strip_wrapper_prefixes(unwrap(training.model).state_dict())),
        "optimizer_state_dict": to_host(training.optimizer.state_dict()),
        "epoch": progress.epoch,
        "loss": loss,
        # Exact continuation.
        "format_version": FORMAT_VERSION,
        "global_step": progress.global_step,
        "next_epoch": progress.next_epoch,
        "next_batch": progress.next_batch,
        "scheduler_state_dict": to_host(training.scheduler.state_dict()),
        "scaler_state_dict": to_host(scaler.state_dict()) if scaler is not None else None,
        "rng_states": to_cpu(rng_states),  # one per rank, in rank order
        "world_size": world_size,
        "config": config,
        "torch_version": str(torch.__version__),  # TorchVersion is not a plain str
        "wandb_run_id": wandb_run_id,
        "environment": environment or capture_environment(torch.device("cpu")),
    }


def apply_checkpoint(checkpoint: dict, training: Training) -> Progress:
    """Load model, optimizer, scheduler and scaler state (consuming the checkpoint's model weights);
    return where training continues."""
    model = unwrap(training.model)
    # Taken out of the checkpoint, so that once copied into the model its tensors are freed: on a
    # GPU the resume then holds one extra copy of the weights, never of the optimizer state
    # (optimizer.load_state_dict keeps the loaded tensors when they already sit on the device).
    state = strip_wrapper_prefixes(checkpoint.pop("model_state_dict"))
    check_model_fits(state, model)
    check_optimizer_fits(checkpoint["optimizer_state_dict"], training.optimizer)
    check_scheduler_fits(checkpoint["scheduler_state_dict"], training.scheduler)
    model.load_state_dict(state)
    try:
        training.optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as error:
        raise UserError(f"the checkpoint's optimizer state does not load into {type(training.optimizer).__name__}: "
                        f"{first_line(error)}") from None
    try:
        training.scheduler.load_state_dict(checkpoint["scheduler_state_dict"])
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
        raise UserError(f"the checkpoint's learning-rate schedule does not load into "
                        f"{type(training.scheduler).__name__}: {first_line(error)}") from None
    if training.scaler is not None and checkpoint.get("scaler_state_dict"):
        training.scaler.load_state_dict(checkpoint["scaler_state_dict"])
    return Progress(checkpoint["epoch"], checkpoint["next_epoch"], checkpoint["next_batch"],
                    checkpoint["global_step"])


def check_model_fits(state: dict, model: torch.nn.Module) -> None:
    """UserError naming the keys or shapes where the weights are not this model's (the code
    changed since the save: load_state_dict's own error is a traceback)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise UserError(f"the checkpoint holds another architecture than {type(model).__name__}: "
                        f"missing keys {_few(missing)}, unexpected keys {_few(unexpected)}")
    resized = [f"{key} is {_shape(state[key])} in the checkpoint, {_shape(own[key])} here" for key in own
               if isinstance(state[key], torch.Tensor) and state[key].shape != own[key].shape]
    if resized:
        raise UserError(f"the checkpoint holds another architecture than {type(model).__name__}: "
                        f"{_few(resized, 3)}")


def check_optimizer_fits(saved, optimizer: torch.optim.Optimizer) -> None:
    """UserError where the saved optimizer state is not this optimizer's for these parameters.

    torch's load_state_dict maps saved state to parameters by position and checks only the counts:
    the state of layers since reordered in the code, or of another optimizer, loads, then fails at
    the first step (a traceback at every relaunch) or, where the shapes agree, trains on with each
    parameter's momentum applied to another. The state tensors checked are a parameter's own
    shape (SGD's momentum; Adam's moments); an optimizer with factored state (Adafactor) needs
    this check adapted."""
    kind = type(optimizer).__name__
    groups = optimizer.param_groups
    saved_groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if (not isinstance(saved_groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                                      for g in saved_groups)
            or not isinstance(saved.get("state"), dict)):
        raise UserError(f"the checkpoint's optimizer state is not an optimizer's state dict ({kind})")
    sizes, saved_sizes = [len(g["params"]) for g in groups], [len(g["params"]) for g in saved_groups]
    if sizes != saved_sizes:
        raise UserError(f"the checkpoint's optimizer state does not fit: {len(saved_sizes)} parameter groups of "
                        f"{', '.join(map(str, saved_sizes))} parameters, {kind} has {len(sizes)} of "
                        f"{', '.join(map(str, sizes))}")
    if differ := _another_kind(saved_groups[0], groups[0]):
        raise UserError(f"the checkpoint's optimizer state is another optimizer's (its settings {differ[0]}; "
                        f"{kind} has {differ[1]})")
    names = [name for g in groups for name in g.get("param_names", [None] * len(g["params"]))]
    for group, saved_group in zip(groups, saved_groups):
        if "param_names" in group and "param_names" in saved_group and group["param_names"] != saved_group["param_names"]:
            place, (there, here) = next((i, pair) for i, pair in enumerate(zip(saved_group["param_names"],
                                                                                group["param_names"])) if pair[0] != pair[1])
            raise UserError(f"the checkpoint's optimizer state is for other parameters: at place {place} it holds "
                            f"{there}'s, here it is {here} (layers renamed or reordered in the code?)")
    params = [p for g in groups for p in g["params"]]
    places = {saved_id: place for place, saved_id in enumerate(i for g in saved_groups for i in g["params"])}
    for saved_id, values in saved["state"].items():
        place = places.get(saved_id)
        if place is None or not isinstance(values, dict):
            continue  # torch keeps state of no parameter as it is
        param = params[place]
        for key, value in values.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                named = f" ({names[place]})" if names[place] else ""
                raise UserError(f"the checkpoint's optimizer state does not fit: {key} of parameter {place}{named} "
                                f"is {_shape(value)}, the parameter {_shape(param)} (layers reordered in the code?)")


def check_scheduler_fits(saved, scheduler) -> None:
    """UserError where the saved schedule is another kind than this one (its state names other settings)."""
    kind = type(scheduler).__name__
    if not isinstance(saved, dict):
        raise UserError(f"the checkpoint's learning-rate schedule is not a scheduler's state dict ({kind})")
    if differ := _another_kind(saved, scheduler.state_dict()):
        raise UserError(f"the checkpoint's learning-rate schedule is another kind (its state {differ[0]}; "
                        f"{kind} has {differ[1]})")


def _another_kind(saved: dict, own: dict) -> tuple[str, str] | None:
    """The keys only `saved` has and those only `own` has, where both sides have some: the state
    of another kind of object (a torch version that adds a setting adds to one side only)."""
    theirs, ours = set(saved) - set(own), set(own) - set(saved)
    return (", ".join(sorted(theirs)), ", ".join(sorted(ours))) if theirs and ours else None


def _shape(tensor: torch.Tensor) -> str:
    return str(list(tensor.shape))


def apply_optimizer_settings(training: Training, lr: float, momentum: float, weight_decay: float) -> None:
    """Make the optimizer use these values after load_state_dict restored the saved ones (a resume
    with --allow-config-change): the peak LR goes to the scheduler's base_lrs, and the current LR
    is the new peak times the schedule's factor at this step."""
    scheduler = training.scheduler
    for i, group in enumerate(training.optimizer.param_groups):
        if group.get("initial_lr", group["lr"]) != lr:
            factor = scheduler.lr_lambdas[i](scheduler.last_epoch)
            group["initial_lr"], group["lr"] = lr, lr * factor
            scheduler.base_lrs[i] = lr
        group["momentum"], group["weight_decay"] = momentum, weight_decay
    scheduler._last_lr = [group["lr"] for group in training.optimizer.param_groups]


def _few(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit]) or "none"
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _as_is(tree):
    return tree


MIN_LOSS_SCALE = 1.0


def overflow_skipped(scaler) -> bool:
    """Whether a non-finite loss is an fp16 overflow that the GradScaler handles (it skips the
    step, weights and momentum untouched, and halves its scale), not divergence: so while its
    scale has not fallen below 1, 17 halvings from 65,536 without growth between, where overflow
    has become the rule. Every rank has the same scale (DDP's gradients are the same everywhere)."""
    return scaler is not None and scaler.is_enabled() and scaler.get_scale() >= MIN_LOSS_SCALE


def weights_are_finite(model: torch.nn.Module) -> bool:
    """One reduction and one device sync for the whole model (a save syncs anyway)."""
    checks = [torch.isfinite(p).all() for p in model.parameters() if p.is_floating_point()]
    return bool(torch.stack(checks).all()) if checks else True


def save_training_state(ckpt_dir: Path, keep: int, training: Training, progress: Progress,
                        last_loss: float, config: dict, env: DistEnv, wandb_run_id: str | None = None,
                        writer=None, on_saved=None, host_copy=to_cpu) -> Path | None:
    """Collective: every rank sends its RNG state, the main rank alone writes. Returns the path on
    the main rank once written; with a `writer` (async_save), the write goes to the background
    (after the previous one), on_saved(path) is called once it is done, and None is returned.
    host_copy: how a save without a writer takes its tensors to the host (to_cpu, or on CUDA the
    writer's Snapshot: pinned buffers reused from one save to the next).

    Nothing is written when the loss or the weights are not finite (DivergedError on every rank):
    a diverged checkpoint would push the last good ones out. A non-finite loss that an fp16
    GradScaler skipped is saved (overflow_skipped). A failed write (disk full, vanished
    directory) raises SaveFailedError on every rank, older checkpoints untouched; a failed
    background write, at the next save or the next stop agreement (train.py)."""
    # One all-reduce both averages the loss and tells every rank whether any rank diverged.
    nonfinite = 0.0 if weights_are_finite(unwrap(training.model)) else 1.0
    loss_sum, nonfinite = all_reduce_sum([last_loss, nonfinite], env)
    if nonfinite or not math.isfinite(loss_sum):
        if nonfinite or not overflow_skipped(training.scaler):
            what = f"the loss ({loss_sum / env.world_size})" if not math.isfinite(loss_sum) else "the weights"
            raise DivergedError(f"training diverged: {what} became non-finite by step {progress.global_step} "
                                f"(epoch {progress.epoch}); nothing was saved from that step on, the older "
                                "checkpoints are kept. Lower --lr, or resume with other settings")
        log.warning("the loss of step %d is not finite (%s): an fp16 overflow, a step the GradScaler skipped "
                    "(its scale is now %g); saving", progress.global_step, loss_sum / env.world_size,
                    training.scaler.get_scale())
    rng_states = gather_to_main(capture_rng_state(env.device), env)
    path, problem = None, None
    if env.is_main:
        problem = writer.wait() if writer is not None else None  # at most one write in flight
        if problem is None:
            checkpoint = build_checkpoint(training, progress, loss_sum / env.world_size, rng_states,
                                          config, env.world_size, wandb_run_id, capture_environment(env.device),
                                          to_host=_as_is)
            if writer is not None:  # it takes the snapshot
                writer.submit(checkpoint, ckpt_dir, keep, on_saved)
            else:
                path, problem = write_checkpoint(host_copy(checkpoint), ckpt_dir, keep, on_saved)
    # No rank runs ahead (or reads, or prunes) while the main rank writes; all learn how it went.
    problem = broadcast_from_main(problem, env)
    if problem:
        raise SaveFailedError(problem)
    return path


def choose_explicit(ckpt_dir: Path, explicit: str, where) -> tuple[str, dict]:
    """--resume FILE starts a run directory; once the run has checkpoints of its own that started
    from FILE, a relaunch of the same command (a SLURM requeue reruns it) continues from them:
    going back to FILE would throw away what was trained since, at every requeue. Checkpoints of
    its own that did not start from FILE make the choice the user's: UserError."""
    own = find_latest_valid(ckpt_dir, where)
    if own is None:
        return explicit, load_checkpoint(Path(explicit), where)
    path, checkpoint = own
    started_from = checkpoint.get("config", {}).get("resume")
    if same_file(path, explicit) or (started_from and same_file(started_from, explicit)):
        if not same_file(path, explicit):
            log.info("--resume %s: this run started from it; continuing from its own newest checkpoint",
                     explicit)
        return str(path), checkpoint
    raise UserError(f"--resume {explicit}: {ckpt_dir} has checkpoints of its own (newest {path.name}, "
                    f"step {checkpoint['global_step']}) that did not start from it; to start from it use "
                    f"another --run-dir, to continue the run drop --resume")


def same_file(a, b) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def choose_resume_checkpoint(ckpt_dir: Path, explicit: str | None, env: DistEnv, read_once: bool = True) -> dict | None:
    """Collective: the main rank picks the file (explicit, else newest valid) and broadcasts its path;
    every rank has it loaded onto its own device (map_location: cuda:LOCAL_RANK or cpu), so nothing
    of one rank lands on another rank's GPU. None for a fresh start.

    read_once (with world size > 1): the main rank alone reads the file, onto the CPU, and
    broadcasts its contents; each rank then moves them to its own device. Without it every rank
    reads the shared file (at 1,024 ranks, 1,024 reads of it)."""
    read_once = read_once and env.distributed
    where = "cpu" if read_once else env.device
    choice, problem, checkpoint = None, None, None
    if env.is_main:
        try:
            if explicit:
                choice, checkpoint = choose_explicit(ckpt_dir, explicit, where)
            elif found := find_latest_valid(ckpt_dir, where):
                choice, checkpoint = str(found[0]), found[1]
        except (CheckpointError, UserError) as error:
            problem = str(error)
    choice, problem = broadcast_from_main((choice, problem), env)
    if problem:
        raise UserError(problem)
    if choice is None:
        return None
    if read_once:
        checkpoint = to_device(broadcast_from_main(checkpoint, env), env.device)
    elif checkpoint is None:  # the other ranks read the file the main rank chose
        checkpoint = load_checkpoint(Path(choice), map_location=env.device)
    log.info("resuming from %s (epoch %d, step %d)", choice, checkpoint["epoch"], checkpoint["global_step"])
    if checkpoint.get("wandb_run_id") and not same_file(Path(choice).parent, ckpt_dir):
        # Another run directory's file: this run is a fork of that one (which may go on, or run
        # at once), not the same run; its wandb history is its own.
        if env.is_main:
            log.info("%s is another run directory's: its wandb run %s is not continued", choice,
                     checkpoint["wandb_run_id"])
        checkpoint = dict(checkpoint, wandb_run_id=None)
    return checkpoint


def to_device(tree, device: torch.device):
    """Every tensor in a nest of dicts, lists and tuples, on `device` (no copy where it already is)."""
    return map_leaves(tree, lambda tensor: tensor.to(device))


def rescale_progress(progress: Progress, saved_step_images: int, step_images: int,
                     batches_per_epoch: int) -> Progress:
    """Map the place inside an epoch to another world size or batch size (step_images: the images
    of one step over all ranks, world size x batch size): the images consumed so far, rounded down
    to whole steps of the new size. None is skipped, a few may be seen twice: the sampler deals
    the epoch's permutation out to the ranks in turn, so what was consumed is a prefix of it.
    Past the end of a smaller epoch (another dataset or --fake-size), its last batch is next: the
    epoch then ends as any other, evaluated and saved."""
    progress.next_batch = progress.next_batch * saved_step_images // step_images
    progress.next_batch = min(progress.next_batch, batches_per_epoch - 1)
    return progress


def place_schedule(training: Training, step: int) -> None:
    """Put the learning-rate schedule at this step of the run, where the optimizer goes on (after
    a resume with another number of steps per epoch, the checkpoint's step count is another scale)."""
    scheduler = training.scheduler
    scheduler.last_epoch = step
    for i, group in enumerate(training.optimizer.param_groups):
        group["lr"] = scheduler.base_lrs[i] * scheduler.lr_lambdas[i](step)
    scheduler._last_lr = [group["lr"] for group in training.optimizer.param_groups]
