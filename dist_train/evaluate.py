"""Evaluate a checkpoint: its weights in a plain model (no DDP), eval(), test loss and accuracy.

    python launch/evaluate.py runs/default                       # the checkpoint resume would take
    dist-train evaluate runs/default/checkpoints/step_000000500.pt

The model and data settings default to those stored in the checkpoint.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

from dist_train import data
from dist_train.checkpoint import CheckpointError, resolve_checkpoint
from dist_train.config import Config, OneLineErrorParser, UserError, named, validate
from dist_train.distributed import DistEnv, pick_device
from dist_train.loop import evaluate
from dist_train.models import build_model, strip_wrapper_prefixes
from dist_train.state import check_model_fits

DATASETS = next(f.metadata["choices"] for f in dataclasses.fields(Config) if f.name == "dataset")
STORED_FIELDS = ("model", "dataset", "data_dir", "fake_size")  # what evaluation takes from the checkpoint


def parse_args(argv):
    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=named, help="a run directory (its checkpoint that a resume would take) "
                                           "or a checkpoint file written by launch/train.py")
    parser.add_argument("--dataset", choices=DATASETS, help="default: the checkpoint's")
    parser.add_argument("--data-dir", type=named, help="default: the checkpoint's")
    parser.add_argument("--fake-size", type=int, help="default: the checkpoint's")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    return parser.parse_args(argv)


def evaluate_checkpoint(args) -> tuple[Path, float, float, int]:
    num_visible = torch.cuda.device_count() if args.device != "cpu" and torch.cuda.is_available() else 0
    device = pick_device(args.device, 0, num_visible)
    path, checkpoint = resolve_checkpoint(args.checkpoint, map_location=device)
    overrides = {k: v for k, v in vars(args).items()
                 if k in ("dataset", "data_dir", "fake_size", "batch_size", "num_workers") and v is not None}
    stored = {k: v for k, v in checkpoint.get("config", {}).items() if k in STORED_FIELDS and k not in overrides}
    defaults = Config()
    for key, value in stored.items():  # a file of other code: its checksums agree all the same
        if type(value) is not type(getattr(defaults, key)) or (key == "dataset" and value not in DATASETS):
            flag = f"; pass --{key.replace('_', '-')}" if key != "model" else ""
            raise CheckpointError(f"{path}: its configuration's {key} is {value!r}, not one this code reads{flag}")
    # Evaluation runs in fp32 on the device chosen here and logs nowhere: the training's AMP mode,
    # device and wandb settings do not apply (a run trained with --amp fp16 and wandb on a GPU is
    # evaluated on a CPU-only machine without wandb as well).
    config = dataclasses.replace(defaults, **stored, **overrides, amp="off", device=device.type)
    validate(config)

    model = build_model(config.model).to(device)
    state = strip_wrapper_prefixes(checkpoint["model_state_dict"])
    check_model_fits(state, model)
    model.load_state_dict(state)
    model.eval()
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=device)
    _, test_set = data.build_datasets(config, env)
    loss, accuracy = evaluate(model, data.build_eval_loader(test_set, config, env), env)
    return path, loss, accuracy, len(test_set)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        path, loss, accuracy, count = evaluate_checkpoint(args)
    except (UserError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{path}: test loss {loss:.4f} accuracy {accuracy:.4f} ({count} images)")
    return 0
