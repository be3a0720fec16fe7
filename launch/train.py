"""Train a model with DDP, saving general checkpoints that resume bit for bit.

    python launch/train.py --dataset fake                          # one process
    torchrun --nproc_per_node=4 launch/train.py --dataset fake     # one rank per process

Relaunching the same command resumes from the newest valid checkpoint in RUN_DIR/checkpoints/.
The steps follow PyTorch's recipe "Saving and loading a general checkpoint".
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout, installed or not

import torch  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from dist_train import data, distributed  # noqa: E402
from dist_train.checkpoint import CheckpointError, remove_stale_temp_files  # noqa: E402
from dist_train.config import Config, UserError, parse_config  # noqa: E402
from dist_train.loop import build_scheduler, evaluate, train_steps  # noqa: E402
from dist_train.models import build_model  # noqa: E402
from dist_train.preemption import NONE, REQUEUE, StopAgreement, StopFlag, requeue_slurm_job, restart_count  # noqa: E402
from dist_train.state import (Progress, Training, apply_checkpoint, choose_resume_checkpoint,  # noqa: E402
                              restore_rng_state, save_training_state, seed_everything)
from dist_train.tracking import setup_logging  # noqa: E402

log = logging.getLogger("dist_train.train")


def build_training(config: Config, env: distributed.DistEnv, steps_per_epoch: int) -> Training:
    """Model (DDP-wrapped when world size > 1), SGD with momentum as in the recipe, LR schedule, scaler."""
    model = build_model(config.model).to(env.device)
    if env.distributed:
        model = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    scheduler = build_scheduler(optimizer, config.lr_schedule, config.epochs * steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda") if config.amp == "fp16" else None
    return Training(model, optimizer, scheduler, scaler)


def train(config: Config) -> int:
    stop_flag = StopFlag().install()  # SIGUSR1/SIGTERM from here on: save at the next step, then exit
    env = distributed.setup(config.device, config.deterministic)
    try:
        setup_logging(env.rank)
        if config.amp == "fp16" and env.device.type != "cuda":
            raise UserError("--amp fp16 needs CUDA (its GradScaler); use --amp bf16 on CPU")
        if "SLURM_JOB_ID" in os.environ:
            log.info("SLURM job %s, restart count %d", os.environ["SLURM_JOB_ID"], restart_count())
        ckpt_dir = Path(config.run_dir) / "checkpoints"
        if env.is_main:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temp_files(ckpt_dir)
        seed_everything(config.seed)  # the same initial weights on every rank
        train_set, test_set = data.build_datasets(config, env)
        train_loader = data.build_train_loader(train_set, config, env)
        test_loader = data.build_eval_loader(test_set, config, env)
        sampler = train_loader.sampler
        training = build_training(config, env, sampler.batches_per_epoch)
        seed_everything(config.seed + env.rank)  # per-rank streams (dropout etc.) from here on

        progress = Progress()
        checkpoint = choose_resume_checkpoint(ckpt_dir, config.resume, env)
        if checkpoint is not None:
            progress = apply_checkpoint(checkpoint, training)
            restore_rng_state(checkpoint["rng_states"][env.rank], env.device)
            del checkpoint
        if progress.next_epoch >= config.epochs:
            log.info("run in %s is complete (%d epochs, step %d); nothing to do",
                     config.run_dir, config.epochs, progress.global_step)
            return 0

        def save(loss: float, why: str) -> None:
            path = save_training_state(ckpt_dir, config.keep, training, progress, loss, config.to_dict(), env)
            if path:
                log.info("saved checkpoint %s (epoch %d, step %d, %s)", path, progress.epoch,
                         progress.global_step, why)

        agreement = StopAgreement(env, config.stop_check_every_steps)
        try:
            request = run_epochs(config, env, training, progress, train_loader, test_loader,
                                 stop_flag, agreement, save)
        finally:
            agreement.close()
        if request == NONE:
            log.info("training complete: %d epochs, %d steps", config.epochs, progress.global_step)
        elif request == REQUEUE and env.is_main:
            requeue_slurm_job(config.max_requeues)
        return 0
    finally:
        stop_flag.ignore_from_now_on()
        distributed.teardown(env)


def run_epochs(config, env, training, progress, train_loader, test_loader, stop_flag, agreement, save) -> int:
    """The epoch loop; returns the stop request all ranks agreed on (NONE when training finished)."""
    sampler = train_loader.sampler
    for epoch in range(progress.next_epoch, config.epochs):
        sampler.set_epoch(epoch, start_batch=progress.next_batch)
        batch = progress.next_batch
        loss = float("nan")
        for loss_tensor in train_steps(training.model, train_loader, training.optimizer,
                                       training.scheduler, training.scaler, env, config.amp):
            batch += 1
            progress.epoch, progress.global_step = epoch, progress.global_step + 1
            end_of_epoch = batch == sampler.batches_per_epoch
            progress.next_epoch, progress.next_batch = (epoch + 1, 0) if end_of_epoch else (epoch, batch)
            if progress.global_step % config.log_every_steps == 0 or end_of_epoch:
                loss = loss_tensor.item()
                log.info("epoch %d step %d batch %d/%d loss %.4f", epoch, progress.global_step,
                         batch, sampler.batches_per_epoch, loss)
            request = agreement.poll(stop_flag.request)
            if request != NONE:
                save(loss_tensor.item(), f"stop requested by {stop_flag.signal_name or 'another rank'}")
                return request
            if config.save_every_steps and progress.global_step % config.save_every_steps == 0 \
                    and not end_of_epoch:
                save(loss_tensor.item(), "periodic")
        if config.eval:
            eval_loss, accuracy = evaluate(training.model, test_loader, env, config.amp)
            log.info("epoch %d eval loss %.4f accuracy %.4f", epoch, eval_loss, accuracy)
        save(loss, "end of epoch")  # and so at the end of training
    return NONE


def main(argv: list[str] | None = None) -> int:
    try:
        return train(parse_config(argv))
    except (UserError, CheckpointError) as error:
        if distributed.discover_ranks()[0] == 0:
            print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
