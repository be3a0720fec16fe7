"""The dist-train command, the config file and the config-change check, and bad input: one line,
a non-zero exit, no traceback, nothing already saved harmed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, SMALL_RUN, newest_checkpoint, python_env
from dist_train.cli import main as cli_main
from dist_train.config import parse_config


def run_cli(args, capsys) -> tuple[int, str, str]:
    code = cli_main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def snapshot(run_dir) -> dict:
    """Every file's bytes, but the lock's: a launch that gets as far as locking writes its PID there."""
    return {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}


def test_inspect_a_run_directory_and_json(reference_ws1, capsys):
    code, out, _ = run_cli(["inspect", str(reference_ws1)], capsys)
    assert code == 0
    assert "step_000000048.pt" in out and "validates: ok" in out and "num_parameters: 62006" in out
    code, out, _ = run_cli(["inspect", str(reference_ws1 / "checkpoints" / "step_000000040.pt"), "--json"], capsys)
    info = json.loads(out)
    assert (info["format_version"], info["global_step"], info["world_size"], info["epoch"]) == (2, 40, 1, 1)
    assert info["loads"] is True and info["config"]["batch_size"] == 16 and info["size_bytes"] > 0


def test_list_shows_newest_first_and_the_resume_choice(reference_ws1, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(reference_ws1 / "checkpoints", run_dir / "checkpoints")
    (run_dir / "checkpoints" / "step_000000048.pt").write_bytes(b"truncated")
    code, out, _ = run_cli(["list", str(run_dir)], capsys)
    lines = out.splitlines()
    assert code == 0 and [line.split()[0] for line in lines] == [
        "step_000000048.pt", "step_000000045.pt", "step_000000040.pt"]
    assert "BROKEN" in lines[0] and "<- latest" in lines[0]
    assert lines[1].endswith("<- resume")
    # the checkpoints directory itself, as inspect takes it
    assert run_cli(["list", str(run_dir / "checkpoints")], capsys)[1] == out


def test_list_survives_a_file_pruned_while_it_lists(reference_ws1, tmp_path, capsys, monkeypatch):
    """A run prunes while `dist-train list` (under `watch`, say) reads its directory: the file
    gone between the listing and its reading was a traceback (FileNotFoundError of its size)."""
    import dist_train.checkpoint as checkpoint

    run_dir = tmp_path / "run"
    shutil.copytree(reference_ws1 / "checkpoints", run_dir / "checkpoints")
    real_load = checkpoint.load_checkpoint

    def pruned_meanwhile(path, *args, **kwargs):
        if path.name == "step_000000040.pt":
            path.unlink()
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "load_checkpoint", pruned_meanwhile)
    code, out, _ = run_cli(["list", str(run_dir)], capsys)
    lines = out.splitlines()
    assert code == 0 and [line.split()[0] for line in lines] == [
        "step_000000048.pt", "step_000000045.pt", "step_000000040.pt"]
    assert lines[2].split()[1:] == ["gone", "(pruned", "meanwhile)"], lines


@pytest.mark.parametrize("suffix,dtype", [(".safetensors", "bfloat16"), (".pt", None)])
def test_export_model_weights_for_inference(reference_ws1, tmp_path, capsys, suffix, dtype):
    out_file = tmp_path / f"weights{suffix}"
    args = ["export", str(reference_ws1), "--out", str(out_file)] + (["--dtype", dtype] if dtype else [])
    assert run_cli(args, capsys)[0] == 0
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        weights = load_file(out_file)
    else:
        weights = torch.load(out_file, weights_only=True)
    source = newest_checkpoint(reference_ws1)["model_state_dict"]
    assert weights.keys() == source.keys()
    want = torch.bfloat16 if dtype else torch.float32
    assert all(w.dtype == want and torch.equal(w, source[k].to(want)) for k, w in weights.items())


def test_export_never_writes_over_a_checkpoint_and_fails_in_one_line(reference_ws1, tmp_path, capsys):
    """--out on the checkpoint itself once replaced the run's only good file with bare weights."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference_ws1 / "checkpoints", run_dir / "checkpoints")
    newest = run_dir / "checkpoints" / "step_000000048.pt"
    (tmp_path / "model.pt").symlink_to(newest)  # the same file under another name
    before = newest.read_bytes()
    for out, message in ((newest, "is the checkpoint being exported"),
                         (tmp_path / "model.pt", "is the checkpoint being exported"),
                         (run_dir / "checkpoints" / "step_000000099.pt", "is named like a checkpoint"),
                         (tmp_path / "afile" / "w.safetensors", "could not write"),
                         (tmp_path / "afile" / "w.pt", "could not write")):
        (tmp_path / "afile").write_text("")
        code, _, err = run_cli(["export", str(run_dir), "--out", str(out)], capsys)
        assert code == 2 and err.startswith(f"error: --out {out}") and message in err, err
        assert len(err.strip().splitlines()) == 1, err
    assert newest.read_bytes() == before
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        ".lock", "latest", "step_000000040.pt", "step_000000045.pt", "step_000000048.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "model.pt", "run"]  # no temp file left


def test_evaluate_subcommand(reference_ws1, capsys):
    code, out, _ = run_cli(["evaluate", str(reference_ws1 / "checkpoints" / "step_000000045.pt")], capsys)
    assert code == 0 and "step_000000045.pt: test loss" in out and "(96 images)" in out
    code, out, _ = run_cli(["evaluate", str(reference_ws1)], capsys)  # the checkpoint resume would take
    assert code == 0 and "step_000000048.pt: test loss" in out and "(96 images)" in out


def test_compare_two_checkpoints_training_state_bit_for_bit(reference_ws1, tmp_path, capsys):
    newest = reference_ws1 / "checkpoints" / "step_000000048.pt"
    copy = newest_checkpoint(reference_ws1)
    copy["config"]["run_dir"] = "elsewhere"  # the configuration is not training state
    torch.save(copy, tmp_path / "same.pt")
    code, out, _ = run_cli(["compare", str(reference_ws1), str(tmp_path / "same.pt")], capsys)
    assert code == 0 and f"A: {newest}" in out
    assert "same training state, bit for bit: model (10 tensors), optimizer, scheduler, RNG of 1 rank(s); " \
           "step 48, epoch 1" in out
    bias = copy["model_state_dict"]["fc3.bias"]
    bias.view(torch.int32)[3] ^= 1  # one bit of one weight
    copy["rng_states"][0]["torch"][100] ^= 1
    torch.save(copy, tmp_path / "other.pt")
    code, out, _ = run_cli(["compare", str(newest), str(tmp_path / "other.pt")], capsys)
    assert code == 1 and out.splitlines()[-1] == \
        "DIFFERENT training state: model_state_dict/fc3.bias, rng_states[0]/torch"
    code, _, _ = run_cli(["compare", str(newest), str(reference_ws1 / "checkpoints" / "step_000000045.pt")], capsys)
    assert code == 1


def test_python_m_dist_train_train_relaunch_of_a_finished_run(reference_ws1):
    before = snapshot(reference_ws1)
    result = subprocess.run([sys.executable, "-m", "dist_train", "train", *SMALL_RUN, "--run-dir", str(reference_ws1)],
                            env=python_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "is complete" in result.stderr
    assert snapshot(reference_ws1) == before


def test_config_file_with_flags_overriding_it(tmp_path):
    (tmp_path / "c.toml").write_text('epochs = 7\nbatch-size = 32\nmodel = "resnet18"\n')
    (tmp_path / "c.yaml").write_text("epochs: 5\nlr: 0.5\n")
    config = parse_config(["--config", str(tmp_path / "c.toml"), "--epochs", "3"], {})
    assert (config.epochs, config.batch_size, config.model) == (3, 32, "resnet18")
    assert parse_config(["--config", str(tmp_path / "c.yaml")], {}).lr == 0.5


def test_effective_config_is_written_to_the_run_directory(reference_ws1):
    written = json.loads((reference_ws1 / "config.json").read_text())
    assert written == newest_checkpoint(reference_ws1)["config"] and written["fake_size"] == 384


def test_every_exactness_breaking_change_is_named(reference_ws1, tmp_path, capsys, restore_signals):
    run_dir = tmp_path / "run"
    shutil.copytree(reference_ws1, run_dir)
    before = snapshot(run_dir)
    code, _, err = run_cli(["train", *SMALL_RUN, "--run-dir", str(run_dir), "--epochs", "3", "--batch-size", "8",
                            "--seed", "4"], capsys)
    assert code == 2 and len([line for line in err.splitlines() if line.startswith("error:")]) == 1
    for change in ("epochs: 2 -> 3", "batch_size: 16 -> 8", "seed: 0 -> 4"):
        assert change in err
    assert "--allow-config-change" in err
    assert snapshot(run_dir) == before


def test_allow_config_change_goes_on_and_says_so(reference_ws1, tmp_path, capsys, restore_signals):
    run_dir = tmp_path / "run"
    shutil.copytree(reference_ws1, run_dir)
    code, _, err = run_cli(["train", *SMALL_RUN, "--run-dir", str(run_dir), "--epochs", "3", "--no-eval",
                            "--allow-config-change"], capsys)
    assert code == 0 and "changed setting (--allow-config-change): epochs: 2 -> 3" in err
    assert newest_checkpoint(run_dir)["global_step"] == 72


def test_a_resume_by_changed_code_says_so(reference_ws1, tmp_path, capsys, restore_signals):
    """The template is edited between launches: bits are the same only where the edit leaves
    training alone, which nothing can check; a checkpoint records a digest of dist_train's code,
    and the resume says when it differs (a warning: an edited comment changes it too)."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference_ws1, run_dir)
    newest = run_dir / "checkpoints" / "step_000000048.pt"
    checkpoint = torch.load(newest, weights_only=True)
    assert len(checkpoint["environment"]["code_digest"]) == 16
    checkpoint["environment"]["code_digest"] = "0" * 16
    torch.save(checkpoint, newest)
    code, _, err = run_cli(["train", *SMALL_RUN, "--run-dir", str(run_dir), "--epochs", "3", "--allow-config-change",
                            "--no-eval"], capsys)
    assert code == 0 and "dist_train's code changed since the checkpoint was written (digest 0000000000000000 -> " in err
    assert err.count("code changed") == 1, err


BAD_INPUTS = {
    "unknown model": (["--model", "resnet9000"], "unknown model 'resnet9000'"),
    "unknown dataset": (["--dataset", "imagenet"], "invalid choice: 'imagenet'"),
    "zero epochs": (["--epochs", "0"], "--epochs must be positive"),
    "negative batch size": (["--batch-size", "-4"], "--batch-size must be positive"),
    "zero lr": (["--lr", "0"], "--lr must be positive"),
    "fp16 without CUDA": (["--amp", "fp16", "--device", "cpu"], "--amp fp16 needs CUDA"),
    "unknown config key": (["--config", "{tmp}/bad.toml"], "unknown keys colour"),
    "unwritable run dir": (["--run-dir", "{tmp}/a-file/run"], "is not writable: Not a directory"),
    "run dir is a file": (["--run-dir", "{tmp}/a-file"], "a-file exists and is not a directory"),
    "not a checkpoint": (["--resume", "{tmp}/a-file"], "not a loadable checkpoint"),
    "newer format": (["--resume", "{tmp}/newer.pt"], "format version 99 is newer"),
    # Made for larger images, or with auxiliary outputs: a traceback at the first step (exit 1,
    # which relaunch.sh retries) before; found before the run directory is touched
    "a model for 224x224 images": (["--model", "vit_b_16"], "--model vit_b_16 cannot train on 3x32x32 images "
                                   "(Wrong image height! Expected 224 but got 32!)"),
    "a model with auxiliary outputs": (["--model", "googlenet"], "--model googlenet cannot train on 3x32x32 "
                                       "images (in training it returns GoogLeNetOutputs"),
    # BatchNorm cannot train on one value per channel: resnet18 crashed at the last batch of
    # every epoch (17 images, 16 a batch), so the run never got past its first epoch's end
    "a last batch of one image": (["--model", "resnet18", "--fake-size", "17"], "the last batch of every "
                                  "epoch holds 1 image per rank (17 per rank, --batch-size 16)"),
    "batches of one image": (["--model", "resnet18", "--batch-size", "1"], "--batch-size 1: resnet18 cannot "
                             "train on batches of one image"),
    "another architecture": (["--model", "resnet18", "--allow-config-change"],
                             "another architecture than ResNet: missing keys bn1.bias"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_harms_nothing(case, reference_ws1, tmp_path, capsys, restore_signals):
    run_dir = tmp_path / "run"
    shutil.copytree(reference_ws1, run_dir)
    (tmp_path / "a-file").write_text("not a checkpoint\n")
    (tmp_path / "bad.toml").write_text('colour = "blue"\n')
    newer = newest_checkpoint(reference_ws1) | {"format_version": 99}
    torch.save(newer, tmp_path / "newer.pt")
    before = snapshot(run_dir)
    flags, message = BAD_INPUTS[case]
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    code, out, err = run_cli(["train", *SMALL_RUN, "--run-dir", str(run_dir), *flags], capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err + out
    assert snapshot(run_dir) == before


def _reordered_momentum(checkpoint):
    """Layers reordered in the code: torch maps optimizer state to parameters by position."""
    optimizer = checkpoint["optimizer_state_dict"]
    for group in optimizer["param_groups"]:
        group.pop("param_names", None)  # as in a file without names: the shapes still tell
    state = optimizer["state"]
    state[0], state[1] = state[1], state[0]


def _renamed_parameters(checkpoint):
    names = checkpoint["optimizer_state_dict"]["param_groups"][0]["param_names"]
    names[2], names[3] = names[3], names[2]  # conv2's weight and bias, as another order would save them


def _another_optimizer(checkpoint):
    """An SGD file resumed by code that switched to AdamW."""
    for group in checkpoint["optimizer_state_dict"]["param_groups"]:
        for key in ("momentum", "dampening", "nesterov"):
            del group[key]
        group.update(betas=(0.9, 0.999), eps=1e-8, amsgrad=False)


def _another_schedule(checkpoint):
    checkpoint["scheduler_state_dict"] = {"step_size": 10, "gamma": 0.1, "base_lrs": [0.01], "last_epoch": 40,
                                          "_step_count": 41, "_last_lr": [0.01], "_is_initial": False,
                                          "_get_lr_called_within_step": False}


def _set(key, value):
    return lambda checkpoint: checkpoint.__setitem__(key, value)


# A checkpoint that verifies and loads but does not fit the code that resumes it: the template is
# copied and edited (a layer resized, layers reordered, another optimizer or schedule). Each was a
# traceback (exit 1, which relaunch.sh and torchrun retry into the same wall), some only at the
# first optimizer step after the resume; a reordering of layers of equal shapes trained on silently
# with each parameter's momentum applied to another.
UNFITTING = {
    "a layer of another size": (lambda c: c["model_state_dict"].__setitem__("fc3.bias", torch.zeros(7)),
                                "another architecture than Net: fc3.bias is [7] in the checkpoint, [10] here"),
    "momentum of another parameter": (_reordered_momentum, "the checkpoint's optimizer state does not fit: "
                                      "momentum_buffer of parameter 0 (conv1.weight) is [6], the parameter [6, 3, 5, 5]"),
    "parameters in another order": (_renamed_parameters, "the checkpoint's optimizer state is for other parameters: "
                                    "at place 2 it holds conv2.bias's, here it is conv2.weight"),
    "another optimizer": (_another_optimizer, "the checkpoint's optimizer state is another optimizer's "
                          "(its settings amsgrad, betas, eps; SGD has dampening, momentum, nesterov)"),
    "another schedule": (_another_schedule, "the checkpoint's learning-rate schedule is another kind "
                         "(its state gamma, step_size; LambdaLR has lr_lambdas)"),
    "optimizer state of other groups": (lambda c: c["optimizer_state_dict"]["param_groups"].append(
        dict(c["optimizer_state_dict"]["param_groups"][0], params=[])),
        "the checkpoint's optimizer state does not fit: 2 parameter groups of 10, 0 parameters, SGD has 1 of 10"),
}


@pytest.mark.parametrize("case", sorted(UNFITTING))
def test_a_checkpoint_that_does_not_fit_the_code_is_one_line(case, reference_ws1, tmp_path, capsys,
                                                             restore_signals):
    """The run's own newest checkpoint, after the code changed: exit 2 naming what differs, the
    file untouched (an older one would not fit either: falling back to it would train from the
    wrong place)."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference_ws1, run_dir)
    newest = run_dir / "checkpoints" / "step_000000048.pt"
    checkpoint = torch.load(newest, weights_only=True)
    edit, message = UNFITTING[case]
    edit(checkpoint)
    torch.save(checkpoint, newest)
    before = snapshot(run_dir)
    code, out, err = run_cli(["train", *SMALL_RUN, "--run-dir", str(run_dir), "--epochs", "3",
                              "--allow-config-change"], capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err + out
    assert snapshot(run_dir) == before


def test_evaluate_names_a_layer_of_another_size(reference_ws1, tmp_path, capsys):
    checkpoint = torch.load(reference_ws1 / "checkpoints" / "step_000000048.pt", weights_only=True)
    checkpoint["model_state_dict"]["fc3.bias"] = torch.zeros(7)
    torch.save(checkpoint, tmp_path / "step_000000048.pt")
    code, out, err = run_cli(["evaluate", str(tmp_path / "step_000000048.pt")], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "another architecture than Net: fc3.bias is [7] in the checkpoint, [10] here" in err


@pytest.mark.parametrize("patch, code, message", [
    ({"seed": "s"}, 0, "test loss"),  # not needed to evaluate: its type was a traceback (validate)
    ({"model": 5}, 2, "its configuration's model is 5, not one this code reads"),
    ({"dataset": "imagenet"}, 2, "its configuration's dataset is 'imagenet', not one this code reads; pass --dataset"),
    ({"fake_size": "x"}, 2, "its configuration's fake_size is 'x', not one this code reads; pass --fake-size"),
])
def test_evaluate_takes_only_what_it_needs_from_a_checkpoints_configuration(reference_ws1, tmp_path, capsys,
                                                                            patch, code, message):
    """A checkpoint written by other code (its checksums then agree) with odd configuration values."""
    checkpoint = torch.load(reference_ws1 / "checkpoints" / "step_000000048.pt", weights_only=True)
    checkpoint["config"].update(patch)
    torch.save(checkpoint, tmp_path / "step_000000048.pt")
    got, out, err = run_cli(["evaluate", str(tmp_path / "step_000000048.pt")], capsys)
    assert got == code and message in out + err and "Traceback" not in err, err


def test_inspect_and_evaluate_refuse_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello\n")
    for command in (["inspect"], ["evaluate"], ["export", "--out", str(tmp_path / "w.pt")], ["compare", str(tmp_path / "notes.txt")]):
        code, _, err = run_cli([*command, str(tmp_path / "notes.txt")], capsys)
        assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err


def test_every_command_verifies_the_digest(tmp_path, capsys):
    from test_checkpoint import entry_offsets, flip_byte, trained_checkpoint

    from dist_train.saving import save_checkpoint

    ckpt_dir = tmp_path / "run" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    path = save_checkpoint(trained_checkpoint(5), ckpt_dir, keep=3)
    flip_byte(path, entry_offsets(path, "data/0")[10])
    for command in (["inspect", str(path)], ["evaluate", str(path), "--dataset", "fake"],
                    ["export", str(path), "--out", str(tmp_path / "w.pt")]):
        code, _, err = run_cli(command, capsys)
        assert code == 2 and "digest check failed" in err and len(err.strip().splitlines()) == 1, err
    code, out, _ = run_cli(["list", str(tmp_path / "run")], capsys)
    assert code == 0 and "BROKEN" in out and "digest check failed" in out


@pytest.mark.parametrize("args", [["inspect", ""], ["list", " "], ["compare", "x", ""], ["evaluate", ""],
                                  ["evaluate", "x", "--data-dir", ""], ["export", "x", "--out", ""]])
def test_an_empty_path_is_one_line_not_the_current_directory(args, capsys):
    """`dist-train inspect "$RUN"` with RUN unset looked for a checkpoint in the current directory."""
    code, _, err = run_cli(args, capsys)
    assert code == 2 and err.count("\n") == 1 and "is empty (an unset shell variable?)" in err, err


def test_inspect_json_is_standard_json_for_an_infinite_loss(reference_ws1, tmp_path, capsys):
    """An fp16 overflow's checkpoint holds an infinite loss; json.dumps wrote Infinity."""
    checkpoint = torch.load(reference_ws1 / "checkpoints" / "step_000000040.pt", weights_only=True)
    checkpoint["loss"] = float("inf")
    torch.save(checkpoint, tmp_path / "step_000000040.pt")
    code, out, _ = run_cli(["inspect", str(tmp_path / "step_000000040.pt"), "--json"], capsys)
    assert code == 0 and json.loads(out, parse_constant=lambda name: pytest.fail(f"not JSON: {name}"))["loss"] == "inf"
