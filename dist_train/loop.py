"""Training steps and evaluation: compute only, no file I/O."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from dist_train.distributed import DistEnv, all_reduce_sum
from dist_train.models import unwrap
from dist_train.watchdog import LOADING, STEPPING, SYNCING


def autocast(amp: str, device: torch.device):
    if amp == "off":
        return nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def build_scheduler(optimizer, schedule: str, total_steps: int):
    """A per-step LR schedule: cosine decay to zero over the run, or constant."""
    if schedule == "constant":
        factor = lambda step: 1.0  # noqa: E731
    else:
        factor = lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_steps(model, loader, optimizer, scheduler, scaler, env: DistEnv, amp: str,
                on_phase=lambda phase: None) -> Iterator[torch.Tensor]:
    """One optimizer step per batch of `loader`; yields each step's (detached) loss after the step.

    on_phase(phase) is told what the step is doing (the watchdog's phases)."""
    model.train()
    batches = iter(loader)
    while True:
        on_phase(LOADING)
        try:
            inputs, targets = next(batches)
        except StopIteration:
            return
        on_phase(SYNCING)  # then COMPUTING, from a forward pre-hook (see healing.track_forward)
        inputs = inputs.to(env.device, non_blocking=True)
        targets = targets.to(env.device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with autocast(amp, env.device):
            loss = F.cross_entropy(model(inputs), targets)
        if scaler is not None:
            scaler.scale(loss).backward()
            on_phase(STEPPING)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            on_phase(STEPPING)
            optimizer.step()
        scheduler.step()
        yield loss.detach()


@torch.no_grad()
def evaluate(model, loader, env: DistEnv, amp: str = "off") -> tuple[float, float]:
    """(mean loss, accuracy) over every rank's shard of the test set."""
    plain = unwrap(model)  # no DDP forward: evaluation needs no gradient sync
    was_training = plain.training
    plain.eval()
    loss_sum, correct, count = 0.0, 0.0, 0.0
    for inputs, targets in loader:
        inputs, targets = inputs.to(env.device), targets.to(env.device)
        with autocast(amp, env.device):
            logits = plain(inputs)
        loss_sum += F.cross_entropy(logits.float(), targets, reduction="sum").item()
        correct += (logits.argmax(1) == targets).sum().item()
        count += targets.numel()
    plain.train(was_training)
    loss_sum, correct, count = all_reduce_sum([loss_sum, correct, count], env)
    return loss_sum / max(count, 1), correct / max(count, 1)
