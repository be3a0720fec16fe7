"""The training script: DDP, general checkpoints that resume bit for bit, signals, requeue.

`launch/train.py` and `dist-train train` run `main` (see launch/train.py for the launches).
Relaunching the same command resumes from the newest valid checkpoint in RUN_DIR/checkpoints/.
The steps follow PyTorch's recipe "Saving and loading a general checkpoint".
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_train import data, distributed, exits, healing
from dist_train.async_save import ThreadWriter, make_writer
from dist_train.checkpoint import list_checkpoints, load_checkpoint
from dist_train.saving import save_checkpoint, wait_for_pruning
from dist_train.config import (Config, config_differences, environment_differences, parse_config, rank_differences,
                               rank_settings)
from dist_train.errors import RUN_ERRORS, GaveUp, SaveFailedError, UserError
from dist_train.loop import build_scheduler, evaluate, train_steps
from dist_train.models import build_model, check_model_takes, one_image_problem, unwrap
from dist_train.preemption import (INTERRUPT, NONE, REQUEUE, TERMINATE, SaveClock, StopAgreement, StopFlag,
                                   requeue_slurm_job, restart_count)
from dist_train.rundir import check_config_file, last_launch_config, prepare_run_dir, write_config_file
from dist_train.rng import restore_rng_of_rank, rng_state_at_step, seed_everything, seed_step
from dist_train.state import (Progress, Training, apply_checkpoint, apply_optimizer_settings, build_checkpoint,
                              capture_environment, choose_resume_checkpoint, code_digest, overflow_skipped,
                              place_schedule, rescale_progress, save_training_state, to_cpu, weights_are_finite)
from dist_train.watchdog import AGREEING, EVALUATING, SAVING, SYNCING
from dist_train.tracking import NullTracker, ProgressReport, build_tracker, check_wandb_dir, setup_logging

log = logging.getLogger("dist_train.train")


def build_training(config: Config, env: distributed.DistEnv, steps_per_epoch: int,
                   input_shape: torch.Size) -> Training:
    """Model (DDP-wrapped when world size > 1), SGD with momentum as in the recipe, LR schedule, scaler."""
    model = build_model(config.model).to(env.device)
    if env.distributed:
        model = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
        settle_gradient_buckets(model, env, input_shape)
    # Named: the checkpoint's optimizer state then says which parameter each entry is (torch's
    # param_names), so a resume by code whose layers were reordered is refused, not misapplied.
    optimizer = torch.optim.SGD(unwrap(model).named_parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    scheduler = build_scheduler(optimizer, config.lr_schedule, config.epochs * steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda") if config.amp == "fp16" else None
    return Training(model, optimizer, scheduler, scaler)


def settle_gradient_buckets(model: DDP, env, input_shape: torch.Size) -> None:
    """Two throw-away steps on zeros, so that DDP lays out its gradient buckets now.

    DDP reorders its buckets after the first backward; the all-reduce then sums each element
    in an order that depends on the layout. Were the first real step of a fresh run, or the
    first step after a resume, made with the initial layout, runs with more than two ranks
    would not resume bit for bit. The model state is put back afterwards."""
    state = {k: v.clone() for k, v in model.module.state_dict().items()}
    inputs = torch.zeros(2, *input_shape, device=env.device)
    for _ in range(2):
        model(inputs).float().sum().backward()
    model.zero_grad(set_to_none=True)
    model.module.load_state_dict(state)


def resume(config: Config, env, training: Training, ckpt_dir: Path,
           batches_per_epoch: int) -> tuple[Progress, str | None, str | None]:
    """Load the checkpoint to resume from, if any: (where training continues, its wandb run id,
    the run directory it was trained in)."""
    checkpoint = choose_resume_checkpoint(ckpt_dir, config.resume, env, config.read_once)
    if checkpoint is None:
        return Progress(), None, None
    changes = config_differences(checkpoint["config"], checkpoint["world_size"], config, env.world_size)
    if "environment" in checkpoint:
        changes += environment_differences(checkpoint["environment"], capture_environment(env.device))
    else:
        log.info("the checkpoint is of format %d: thread count, device type, determinism and torch "
                 "version were not recorded, so not checked", checkpoint["format_version"])
    if changes and not config.allow_config_change:
        raise UserError("this run's settings differ from its checkpoint's, so the resume would not be "
                        f"exact: {'; '.join(changes)}. Relaunch with the same settings, or pass "
                        "--allow-config-change")
    for change in changes:
        log.warning("resuming with a changed setting (--allow-config-change): %s", change)
    saved_code = checkpoint.get("environment", {}).get("code_digest")
    if env.is_main and saved_code and saved_code != code_digest():
        log.warning("dist_train's code changed since the checkpoint was written (digest %s -> %s): the resume "
                    "is bit for bit only where the change leaves what is trained alone", saved_code, code_digest())
    progress = apply_checkpoint(checkpoint, training)
    # load_state_dict restored the saved lr, momentum and weight decay: the configured ones win.
    apply_optimizer_settings(training, config.lr, config.momentum, config.weight_decay)
    saved_batch = checkpoint["config"].get("batch_size")
    saved_step_images = checkpoint["world_size"] * (saved_batch if type(saved_batch) is int and saved_batch > 0
                                                    else config.batch_size)
    # Another world size, batch size or dataset size (--allow-config-change) moves the place in
    # the epoch, and the number of steps an epoch takes: the schedule follows the run's place.
    # Unchanged, both are what the checkpoint holds.
    progress = rescale_progress(progress, saved_step_images, env.world_size * config.batch_size, batches_per_epoch)
    place = progress.next_epoch * batches_per_epoch + progress.next_batch
    if place != training.scheduler.last_epoch:
        log.info("the learning-rate schedule goes on from step %d of %d (the checkpoint's step %d, in steps "
                 "of another size)", place, config.epochs * batches_per_epoch, progress.global_step)
        place_schedule(training, place)
    restore_rng_of_rank(checkpoint, env)  # last: everything above may draw random numbers
    return progress, checkpoint.get("wandb_run_id"), checkpoint["config"].get("run_dir")


def check_batch_sizes(config: Config, per_rank: int) -> None:
    """A batch of one image (--batch-size 1, or the last batch of each epoch) crashes a model with
    BatchNorm at that step, every epoch, every relaunch: refused at start, with a batch size that
    works."""
    batch = config.batch_size
    if min(batch, per_rank) != 1 and per_rank % batch != 1:
        return
    reason = one_image_problem(config.model, data.IMAGE_SHAPE)
    if reason is None:
        return
    if per_rank == 1:
        raise UserError(f"the training data holds 1 image per rank, and {config.model} cannot train on batches "
                        f"of one image ({reason}); use more data or fewer ranks")
    if batch == 1:
        raise UserError(f"--batch-size 1: {config.model} cannot train on batches of one image ({reason}); "
                        "use --batch-size 2 or more")
    # the nearest smaller one that works, else a larger one (per_rank itself always does)
    other = next(b for b in [*range(batch - 1, 1, -1), *range(batch + 1, per_rank + 1)] if per_rank % b != 1)
    raise UserError(f"the last batch of every epoch holds 1 image per rank ({per_rank} per rank, --batch-size "
                    f"{batch}), and {config.model} cannot train on one image ({reason}); use --batch-size "
                    f"{other}, say")


def run_has_checkpoints(config: Config) -> bool:
    return bool(list_checkpoints(Path(config.run_dir) / "checkpoints"))


def check_before_touching_disk(config: Config, is_main: bool) -> None:
    """What can be checked without the run directory: the device, the --resume file, the data
    directory, the wandb directory."""
    distributed.this_ranks_device(config.device)
    check_model_takes(config.model, data.IMAGE_SHAPE)
    if is_main and config.resume and (os.path.lexists(config.resume) or not run_has_checkpoints(config)):
        # verified; read again, onto devices, later. Gone is no error for a run that has its own
        # checkpoints: they may have started from it (state.choose_explicit decides, under the lock).
        load_checkpoint(Path(config.resume), mmap=True)
    if is_main:
        check_wandb_dir(config)
        check_config_file(config.run_dir)
    data.check_data_dir(config)


def train(config: Config, stop_flag: StopFlag) -> int:
    is_main = distributed.discover_ranks()[0] == 0
    check_before_touching_disk(config, is_main)
    ckpt_dir, lock = prepare_run_dir(config, is_main)  # the main rank holds the lock until the end
    writer = ThreadWriter()  # ranks other than the main one never write
    try:
        if is_main and config.async_save:  # before any thread, process group or CUDA context: it may fork
            writer = make_writer(distributed.device_type(config.device))
        os.register_at_fork(before=lambda: settle_before_fork(writer))
        return train_in_run_dir(config, stop_flag, ckpt_dir, writer)
    finally:
        writer.close()  # the write in flight completes before the lock goes
        if lock is not None:
            lock.release()


def settle_before_fork(writer) -> None:
    """Before this process forks (a DataLoader starting its workers: at each evaluation, and each
    epoch with --data-path loader), the short-lived threads of the last save end first. A thread
    that starts or ends while another one forks can leave the child deadlocked inside os.fork
    (CPython 3.11 up to 3.11.7, gh-112275; seen here once, at an evaluation right after an
    epoch's save), and the epoch-end save's pruner and snapshot copier end just then. The
    writer's own write is not waited for (CUDA's writer thread, the writer process)."""
    wait_for_pruning()
    settle = getattr(writer, "settle", None)  # the deferred snapshot copies of the writer process
    if settle is not None:
        settle()


def train_in_run_dir(config: Config, stop_flag: StopFlag, ckpt_dir: Path, writer) -> int:
    env = distributed.setup(config.device, config.deterministic)
    tracker = None
    try:
        setup_logging(env.rank, config.log_level)
        log.info("%s", distributed.describe_placement(env))
        if "SLURM_JOB_ID" in os.environ:
            log.info("SLURM job %s, restart count %d", os.environ["SLURM_JOB_ID"], restart_count())
        check_ranks_agree(config, env)
        seed_everything(config.seed)  # the same initial weights on every rank
        train_set, test_set = data.build_datasets(config, env)
        train_loader = data.build_train_loader(train_set, config, env)
        check_batch_sizes(config, train_loader.sampler.num_samples)
        test_loader = data.build_eval_loader(test_set, config, env)
        input_shape = train_set[(0, 0)][0].shape  # one sample (seeded, so no RNG is drawn)
        training = build_training(config, env, train_loader.sampler.batches_per_epoch, input_shape)
        writer.defer(training.optimizer)  # its tensors are copied for a snapshot until its next step
        seed_everything(config.seed + env.rank)  # per-rank streams (dropout etc.) from here on
        progress, wandb_run_id, trained_in = resume(config, env, training, ckpt_dir,
                                                    train_loader.sampler.batches_per_epoch)
        log_peak_gpu_memory(env, "after start-up" if progress.global_step == 0 else "after the resume")
        if progress.next_epoch >= config.epochs:
            log.info("run in %s is complete (%d epochs, step %d); nothing to do",
                     config.run_dir, config.epochs, progress.global_step)
            return exits.COMPLETE

        tracker = start_tracker(config, env, wandb_run_id, progress, trained_in)
        count_this_launch(config, env, progress)
        if env.is_main:
            write_config_file(config)  # only now: a refused resume leaves the old one in place

        # A save the loop waits for copies off the GPU into the writer's pinned buffers, reused
        # from one save to the next (no write is in flight then), rather than into fresh pageable
        # memory tensor by tensor, each copy a sync (README, Throughput). On the CPU: no copy.
        host_copy = writer.snapshot if env.device.type == "cuda" else to_cpu

        def save(loss: float, why: str, blocking: bool = False) -> None:
            """blocking: written before it returns (a stop, the end of training), else in the
            background when --async-save."""
            epoch, step = progress.epoch, progress.global_step

            def announce(path: Path) -> None:  # when asynchronous: once the writer is done
                log.info("saved checkpoint %s (epoch %d, step %d, %s)", path, epoch, step, why)

            background = writer if config.async_save and not blocking else None
            if blocking:
                problem = writer.wait() if env.is_main else None
                if problem:  # the write in flight failed: say so rather than hide it behind this save
                    log.error("%s", problem)
            save_training_state(ckpt_dir, config.keep, training, progress, loss, config.to_dict(),
                                env, tracker.run_id, background, announce, host_copy)
            if env.is_main:
                tracker.log("checkpoint", {"step": step, "epoch": epoch}, step)

        def save_alone() -> Path | None:
            """A survivor's checkpoint of the last finished step, written without the other ranks."""
            loss = float(progress.last_loss)
            if not ((math.isfinite(loss) or overflow_skipped(training.scaler))
                    and weights_are_finite(unwrap(training.model))):
                log.error("not saving after the fault: the loss or the weights are not finite")
                return None
            problem = writer.wait()  # the write in flight (main rank) first: one writer at a time
            if problem:
                log.error("%s", problem)
            rng_states = [rng_state_at_step(config.seed, r, progress.global_step) for r in range(env.world_size)]
            checkpoint = build_checkpoint(training, progress, loss, rng_states, config.to_dict(), env.world_size,
                                          tracker.run_id, capture_environment(env.device))
            return save_checkpoint(checkpoint, ckpt_dir, config.keep)

        healer = healing.Healer(config, env, unwrap(training.model), save_alone)
        agreement = StopAgreement(env, config.stop_check_every_steps)
        try:
            request = run_epochs(config, env, training, progress, train_loader, test_loader,
                                 stop_flag, agreement, save, tracker, healer, writer)
            agreement.close()
        except RuntimeError as error:
            if not healer.peer_failed(error):
                raise
            return exits.PEER_FAILED
        finally:
            healer.close()
        if env.is_main:
            healing.end_launch_cleanly(config.run_dir)
        if request == NONE:
            log.info("training complete: %d epochs, %d steps", config.epochs, progress.global_step)
            log_peak_gpu_memory(env, "of the whole run")
            return exits.COMPLETE
        if request == TERMINATE:
            return exits.TERMINATED
        if request == INTERRUPT:
            return exits.INTERRUPTED
        # REQUEUE: the main rank asks SLURM; every rank exits with what came of it.
        requeued = requeue_slurm_job(config.max_requeues) if env.is_main else None
        return exits.COMPLETE if distributed.broadcast_from_main(requeued, env) else exits.STOPPED
    finally:
        writer.close()  # whatever ended the run, the write in flight completes
        stop_flag.ignore_from_now_on()
        if tracker is not None:
            tracker.finish()
        distributed.teardown(env)


def check_ranks_agree(config: Config, env) -> None:
    """Collective: every rank parsed its own command line, config file and environment; one that
    differs from the main rank (another copy of the config file on its node, another thread count
    or torch version) is refused on every rank, before anything is trained or written."""
    settings = distributed.gather_to_main(rank_settings(config, capture_environment(env.device)), env)
    problem = None
    if env.is_main:
        differing = [(rank, found) for rank, other in enumerate(settings[1:], start=1)
                     if (found := rank_differences(settings[0], other, rank))]
        if differing:
            rank, found = differing[0]
            more = f" (and {len(differing) - 1} more ranks)" if len(differing) > 1 else ""
            problem = (f"rank {rank} of {env.world_size} does not run with the main rank's settings{more}: "
                       f"{'; '.join(found)}. Every rank needs the same flags, config file, thread count "
                       "(OMP_NUM_THREADS) and torch")
    problem = distributed.broadcast_from_main(problem, env)
    if problem:
        raise UserError(problem)


def start_tracker(config: Config, env, wandb_run_id: str | None, progress: Progress, trained_in: str | None = None):
    """Collective: the main rank's tracker (wandb), or on every rank the UserError that stopped it
    (no wandb login): the other ranks would otherwise wait for the main one at the first step."""
    tracker, problem = NullTracker(), None
    try:
        tracker = build_tracker(config, env.is_main, wandb_run_id, another_training(config, env, progress),
                                trained_in)
    except UserError as error:
        problem = str(error)
    problem = distributed.broadcast_from_main(problem, env)
    if problem:
        raise UserError(problem)
    return tracker


def another_training(config: Config, env, progress: Progress) -> str | None:
    """A run that starts afresh (no checkpoint: deleted, or none written yet) with other settings
    than its run directory's last launch trains something else than what RUN_DIR/wandb.json's
    wandb run logged: the settings that changed, else None. With the same settings its steps are
    the same to the bit, and that wandb run goes on."""
    if progress.global_step or not env.is_main:
        return None
    last = last_launch_config(config.run_dir)
    changes = config_differences(last, env.world_size, config, env.world_size) if last else []
    return "; ".join(changes) or None


def count_this_launch(config: Config, env, progress: Progress) -> None:
    """Collective: the main rank counts this launch in RUN_DIR/failures.json; every rank stops when
    --max-failures launches in a row failed without completing an epoch."""
    problem = None
    if env.is_main:
        try:
            healing.count_launch(config.run_dir, progress.next_epoch, config.max_failures)
        except healing.TooManyFailures as error:
            problem = str(error)
    problem = distributed.broadcast_from_main(problem, env)
    if problem:
        raise GaveUp(problem)


def log_peak_gpu_memory(env, when: str) -> None:
    """The most GPU memory torch's allocator has held on this rank so far (bench/gpu_check.py reads it)."""
    if env.device.type == "cuda":
        log.info("peak GPU memory %s: %.1f MB", when, torch.cuda.max_memory_allocated(env.device) / 1e6)


def run_epochs(config, env, training, progress, train_loader, test_loader, stop_flag, agreement, save,
               tracker, healer, writer) -> int:
    """The epoch loop; returns the stop request all ranks agreed on (NONE when training finished)."""
    sampler = train_loader.sampler

    def on_phase(phase: str) -> None:
        if phase == SYNCING:  # a step begins: its RNG streams come from (seed, rank, step) alone
            seed_step(config.seed, env.rank, progress.global_step, env.device)
        healer.phase(phase, progress.global_step)

    clock = SaveClock(config.save_every_minutes if env.is_main else 0)  # the main rank's clock decides
    report = ProgressReport(env.is_main, config.log_every_steps, env.world_size, config.batch_size)
    stopped_at_end = False  # a requeue asked for at the step that ends the training
    for epoch in range(progress.next_epoch, config.epochs):
        sampler.set_epoch(epoch, start_batch=progress.next_batch)
        report.start_epoch(epoch, progress.next_batch, sampler.batches_per_epoch, sampler.num_samples)
        batch, loss = progress.next_batch, float("nan")
        for loss_tensor in train_steps(training.model, train_loader, training.optimizer,
                                       training.scheduler, training.scaler, env, config.amp, on_phase):
            batch += 1
            progress.epoch, progress.global_step = epoch, progress.global_step + 1
            progress.last_loss = loss_tensor
            end_of_epoch = batch == sampler.batches_per_epoch
            progress.next_epoch, progress.next_batch = (epoch + 1, 0) if end_of_epoch else (epoch, batch)
            reporting = progress.global_step % config.log_every_steps == 0 or end_of_epoch
            loss = loss_tensor.item() if reporting else loss
            lr = training.scheduler.get_last_lr()[0]
            rate = report.step(batch, progress.global_step, loss if reporting else None, lr)
            if reporting:
                tracker.log("train", {"loss": loss, "lr": lr, "samples_per_sec": rate}, progress.global_step)
            healer.after_step(progress.global_step)
            healer.phase(AGREEING)
            agreed = agreement.poll(stop_flag.request, clock.due(), writer.failed())
            if agreed.save_failed:  # a background write failed: every rank stops here, as for a sync save
                raise SaveFailedError(writer.wait() or "the main rank could not write a checkpoint")
            if agreed.request != NONE:
                report.end_epoch()
                healer.phase(SAVING)
                save(loss_tensor.item(), f"stop requested by {stop_flag.signal_name or 'another rank'}", True)
                if not (end_of_epoch and epoch == config.epochs - 1):
                    return agreed.request
                if agreed.request != REQUEUE:  # stop now, as asked; the checkpoint holds the whole training
                    log.info("training complete: %d epochs, %d steps; the final evaluation was skipped "
                             "(dist-train evaluate %s gives it)", config.epochs, progress.global_step, config.run_dir)
                    return agreed.request
                # A requeue would only relaunch a complete run: finish here instead (the evaluation,
                # then exit 0), which is what the job would have done without the signal.
                log.info("stop requested at the last step: the training is complete, so no requeue")
                stopped_at_end = True
            periodic = config.save_every_steps and progress.global_step % config.save_every_steps == 0
            if (periodic or agreed.save_due) and not end_of_epoch:
                healer.phase(SAVING)
                save(loss_tensor.item(), "periodic" if periodic else "timed")
        if not stopped_at_end:
            report.end_epoch()
        if config.eval:
            healer.phase(EVALUATING)
            eval_loss, accuracy = evaluate(training.model, test_loader, env, config.amp)
            log.info("epoch %d eval loss %.4f accuracy %.4f", epoch, eval_loss, accuracy)
            tracker.log("eval", {"loss": eval_loss, "accuracy": accuracy}, progress.global_step)
        if not stopped_at_end:  # else saved already, the same state
            healer.phase(SAVING)
            save(loss, "end of epoch", blocking=epoch == config.epochs - 1)  # and so at the end of training
        healer.epoch_done(progress.next_epoch)
    return NONE


def main(argv: list[str] | None = None, stop_flag: StopFlag | None = None) -> int:
    """Train; `stop_flag` is the one the entry point installed before importing torch."""
    stop_flag = stop_flag or StopFlag().install()
    is_main = True  # until the ranks are known: a broken launcher environment is every process's to tell
    try:
        is_main = distributed.discover_ranks()[0] == 0
        return train(parse_config(argv), stop_flag)
    except RUN_ERRORS as error:
        return fail(f"error: {error}", error.exit_code, is_main or isinstance(error, distributed.RankError))
    except RuntimeError as error:
        gone = healing.peer_failure(error)
        if gone is not None:  # in the loop a survivor saves and says so (train_in_run_dir)
            return fail(f"error: another rank went away outside the training loop, at start-up or at the end, "
                        f"where no survivor saves ({gone}); its own log says why. A relaunch resumes from the "
                        "newest checkpoint", exits.PEER_FAILED, True)
        op = distributed.nondeterministic_op(error)
        if op is None:
            raise
        return fail(f"error: {op} has no deterministic implementation, and --deterministic (the default) "
                    "refuses it because it would break the bit-exact resume; pass --no-deterministic to "
                    "train with it anyway (resumes are then not bit for bit)", exits.USER_ERROR, is_main)


def fail(line: str, exit_code: int, shown: bool) -> int:
    """The run's one line on stderr (from the main rank, or from each rank where each has its
    own), and under torchrun in the rank's error file too, where torchrun's failure summary shows
    it in place of a link to its docs; a permanent code, for slurm/relaunch.sh. The exit code to return."""
    if shown:
        print(line, file=sys.stderr)
    distributed.tell_torchrun(line)
    distributed.tell_relaunch(exit_code)
    return exit_code
