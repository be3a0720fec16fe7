"""The dist-train command: train, evaluate, inspect, export, list, compare.

`dist-train train` and `dist-train evaluate` run the same code as launch/train.py and
launch/evaluate.py (dist_train/train.py, dist_train/evaluate.py), so an installed package needs no
checkout; `torchrun -m dist_train train` works as `torchrun launch/train.py` does.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from dist_train import __version__
from dist_train.config import CheckpointError, OneLineErrorParser, UserError, named
from dist_train.preemption import StopFlag, die_with_launcher
from dist_train.processes import leave

# torch is imported below the signal flag: `dist-train train` installs the flag first, as
# launch/train.py does, so that a signal during the seconds of `import torch` is kept.
DTYPES = ("bfloat16", "float16", "float32")


def run_training(argv: list[str]) -> int:
    stop_flag = StopFlag().install()
    die_with_launcher()
    from dist_train.train import main

    return main(argv, stop_flag)


def run_evaluation(argv: list[str]) -> int:
    from dist_train.evaluate import main

    return main(argv)


def describe(path: Path, checkpoint: dict) -> dict:
    from dist_train.models import build_model

    config = checkpoint.get("config", {})
    state = checkpoint["model_state_dict"]
    num_parameters = None
    try:  # validation: the stored model config builds a model that takes these weights exactly
        model = build_model(config.get("model", "net"))
        model.load_state_dict(state)
        num_parameters = sum(p.numel() for p in model.parameters())
        validation = "ok"
    except (UserError, RuntimeError) as error:
        validation = f"failed: {str(error).splitlines()[0]}"
    return {"path": str(path), "format_version": checkpoint["format_version"], "epoch": checkpoint["epoch"],
            "next_epoch": checkpoint["next_epoch"], "next_batch": checkpoint["next_batch"],
            "global_step": checkpoint["global_step"], "loss": _finite_or_name(checkpoint["loss"]),
            "world_size": checkpoint["world_size"], "num_parameters": num_parameters,
            "size_bytes": path.stat().st_size, "loads": True, "validates": validation,
            "wandb_run_id": checkpoint.get("wandb_run_id"), "config": config}


def _finite_or_name(value: float):
    """JSON has no inf or nan (json.dumps would write Infinity, which strict parsers refuse): an
    fp16 overflow's checkpoint holds an infinite loss."""
    return value if math.isfinite(value) else str(value)


def inspect_command(args) -> int:
    from dist_train.checkpoint import resolve_checkpoint

    path, checkpoint = resolve_checkpoint(args.target)
    info = describe(path, checkpoint)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    for key, value in info.items():
        if key != "config":
            print(f"{key:>15}: {value}")
    print("         config: " + ", ".join(f"{k}={v}" for k, v in sorted(info["config"].items())))
    return 0 if info["validates"] == "ok" else 1


def export_command(args) -> int:
    import torch

    from dist_train.checkpoint import resolve_checkpoint, step_in_name
    from dist_train.durable import write_atomically
    from dist_train.models import strip_wrapper_prefixes

    out = Path(args.out)
    if out.suffix not in (".safetensors", ".pt"):
        raise UserError(f"--out {out}: use a .safetensors or .pt file name")
    path, checkpoint = resolve_checkpoint(args.checkpoint)
    if out.exists() and os.path.samefile(out, path):
        raise UserError(f"--out {out} is the checkpoint being exported; name another file")
    if step_in_name(out) is not None:
        raise UserError(f"--out {out} is named like a checkpoint (step_N.pt), which a run would take for "
                        "one; name it otherwise")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
             for k, v in strip_wrapper_prefixes(checkpoint["model_state_dict"]).items()}
    if out.suffix == ".safetensors":
        from safetensors.torch import save

        data = save(state, metadata={"source": str(path), "model": str(checkpoint["config"].get("model"))})
        write = lambda f: f.write(data)  # noqa: E731
    else:
        write = lambda f: torch.save(state, f)  # noqa: E731
    try:  # whole or absent: a failed write leaves no half file, and replaces nothing
        write_atomically(out, write)
    except OSError as error:
        raise UserError(f"--out {out}: could not write it ({error.strerror or error})") from None
    print(f"exported {len(state)} tensors of {path} to {out} ({out.stat().st_size} bytes)")
    return 0


def list_command(args) -> int:
    from dist_train.checkpoint import checkpoint_dir, list_checkpoints, load_checkpoint, read_latest_marker
    from dist_train.errors import NewerFormatError, UnreadableError

    ckpt_dir = checkpoint_dir(Path(args.run_dir))
    paths = list_checkpoints(ckpt_dir)
    if not paths:
        raise UserError(f"{args.run_dir}: no checkpoints in {ckpt_dir}")
    marker = read_latest_marker(ckpt_dir)
    resume_choice = None
    for path in paths:  # newest first
        try:
            size = path.stat().st_size
            checkpoint = load_checkpoint(path)
            status = f"epoch {checkpoint['epoch']} step {checkpoint['global_step']} loss {checkpoint['loss']:.4f}"
            resume_choice = path if resume_choice is None else resume_choice
        except (NewerFormatError, UnreadableError) as error:  # a resume stops here: no older file is taken
            kind = "UNREADABLE" if isinstance(error, UnreadableError) else "NEWER FORMAT"
            status = f"{kind} ({str(error).split(': ', 1)[-1]})"
            resume_choice = False if resume_choice is None else resume_choice
        except CheckpointError as error:
            status = f"BROKEN ({str(error).split(': ', 1)[-1]})"
        except FileNotFoundError:
            status = None
        if not path.exists():  # a running training pruned it since the listing
            print(f"{path.name}  gone (pruned meanwhile)")
            continue
        tags = [t for t, on in (("resume", path == resume_choice), ("latest", path == marker)) if on]
        print(f"{path.name}  {size:>11} bytes  {status}  {' '.join(f'<- {t}' for t in tags)}".rstrip())
    return 0


def compare_command(args) -> int:
    from dist_train.checkpoint import resolve_checkpoint
    from dist_train.compare import compare_training_state, summary

    (path_a, a), (path_b, b) = resolve_checkpoint(args.a), resolve_checkpoint(args.b)
    print(f"A: {path_a}\nB: {path_b}")
    differing = compare_training_state(a, b)
    if not differing:
        print(f"same training state, bit for bit: {summary(a)}")
        return 0
    shown = ", ".join(differing[:8]) + (f" and {len(differing) - 8} more" if len(differing) > 8 else "")
    print(f"DIFFERENT training state: {shown}")
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="dist-train", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"dist_train {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("train", help="train (the flags of launch/train.py; --help lists them)", add_help=False)
    commands.add_parser("evaluate", help="test loss and accuracy of a run directory or checkpoint "
                        "(launch/evaluate.py)", add_help=False)
    inspect = commands.add_parser("inspect", help="what a checkpoint holds, and whether it loads and validates")
    inspect.add_argument("target", type=named, help="a checkpoint file, or a run directory (the checkpoint resume would take)")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    export = commands.add_parser("export", help="model weights only, for inference")
    export.add_argument("checkpoint", type=named, help="a checkpoint file or a run directory")
    export.add_argument("--out", required=True, type=named, help="FILE.safetensors or FILE.pt (a plain state_dict)")
    export.add_argument("--dtype", choices=DTYPES, help="cast floating-point tensors")
    listing = commands.add_parser("list", help="a run's checkpoints, newest first")
    listing.add_argument("run_dir", type=named)
    compare = commands.add_parser("compare", help="whether two checkpoints hold the same training state, bit "
                                                  "for bit (exit 0) or not (exit 1)")
    compare.add_argument("a", type=named, help="a checkpoint file, or a run directory (the checkpoint resume would take)")
    compare.add_argument("b", type=named, help="likewise")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] == "train":
            return run_training(argv[1:])
        if argv and argv[0] == "evaluate":
            return run_evaluation(argv[1:])
        args = build_parser().parse_args(argv)
        commands = {"inspect": inspect_command, "export": export_command, "list": list_command,
                    "compare": compare_command}
        return commands[args.command](args)
    except (UserError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def entry() -> None:
    """The dist-train command (and python -m dist_train): main(), then an exit that does not
    finalize the interpreter, where gloo's threads could still abort it (processes.leave)."""
    leave(main())
