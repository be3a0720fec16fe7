"""The three launches, evaluation, the recipe's own loading code, the real CIFAR10 class, and the
demo's training on real digits."""

from __future__ import annotations

import shutil

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim

from cifar_files import write_cifar10
from conftest import REPO, SMALL_RUN, assert_same_training_state, newest_checkpoint, run

EVALUATE = REPO / "launch" / "evaluate.py"
WITH_CIFAR = REPO / "tests" / "with_generated_cifar.py"


class RecipeNet(nn.Module):
    """Copied from the recipe "Saving and loading a general checkpoint", not from dist_train."""

    def __init__(self):
        super(RecipeNet, self).__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 5 * 5)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        x = self.fc3(x)
        return x


def test_the_recipes_loading_code_reads_a_checkpoint(reference_ws2):
    PATH = sorted((reference_ws2 / "checkpoints").glob("step_*.pt"))[-1]
    # The recipe's loading steps, unchanged.
    model = RecipeNet()
    optimizer = optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    checkpoint = torch.load(PATH)  # torch >= 2.6 loads with weights_only=True by default
    model.load_state_dict(checkpoint['model_state_dict'])
    optimizer.load_state_dict(checkpoint['optimizer_state_dict'])
    epoch = checkpoint['epoch']
    loss = checkpoint['loss']
    model.eval()

    assert epoch == 1 and isinstance(loss, float)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert all(not k.startswith(("module.", "_orig_mod.")) for k in checkpoint["model_state_dict"])


def test_bf16_autocast_trains_with_fp32_weights(tmp_path):
    run_dir = tmp_path / "bf16"
    out = run(["--dataset", "fake", "--fake-size", "64", "--batch-size", "16", "--epochs", "1",
               "--num-workers", "0", "--amp", "bf16", "--run-dir", str(run_dir)]).stdout
    assert "training complete: 1 epochs, 4 steps" in out
    final = newest_checkpoint(run_dir)
    assert final["config"]["amp"] == "bf16" and final["scaler_state_dict"] is None
    assert all(t.dtype == torch.float32 for t in final["model_state_dict"].values())


def test_relaunching_a_finished_run_says_complete(reference_ws1):
    out = run(SMALL_RUN + ["--run-dir", str(reference_ws1)]).stdout
    assert "is complete" in out and "saved checkpoint" not in out


def test_resume_from_an_explicit_checkpoint_continues_exactly(reference_ws1, session_dir):
    older = session_dir / "explicit_start.pt"  # a copy: it is removed below
    shutil.copyfile(reference_ws1 / "checkpoints" / "step_000000040.pt", older)
    run_dir = session_dir / "explicit_resume"
    command = SMALL_RUN + ["--run-dir", str(run_dir), "--resume", str(older)]
    out = run(command).stdout
    assert f"resuming from {older}" in out
    assert_same_training_state(newest_checkpoint(run_dir), newest_checkpoint(reference_ws1))
    # A relaunch of the same command (a SLURM requeue reruns it) continues the run directory's own
    # checkpoints, which started from that file: it went back to the file and trained again. The
    # file may be gone by then (pruned by its own run).
    older.unlink()
    out = run(command).stdout
    assert "is complete" in out and "saved checkpoint" not in out, out
    # Another file while the run directory has checkpoints of its own: which one to follow is
    # the user's call, not a silent pick; nothing is touched.
    other = reference_ws1 / "checkpoints" / "step_000000045.pt"
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    result = run(SMALL_RUN + ["--run-dir", str(run_dir), "--resume", str(other)], check=False)
    errors = [line for line in result.stdout.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "has checkpoints of its own" in errors[0], result.stdout
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before


def test_evaluate_reports_loss_and_accuracy(reference_ws2):
    ckpt = sorted((reference_ws2 / "checkpoints").glob("step_*.pt"))[-1]
    out = run([str(ckpt)], script=EVALUATE).stdout
    assert "test loss" in out and "accuracy" in out and "(96 images)" in out


def test_real_cifar10_class_trains_and_evaluates_on_generated_files(tmp_path):
    data_dir = write_cifar10(tmp_path / "data", per_batch=16, test_size=32)
    run_dir = tmp_path / "run"
    args = ["--dataset", "cifar10", "--data-dir", str(data_dir), "--batch-size", "16", "--epochs", "1",
            "--num-workers", "2", "--run-dir", str(run_dir)]
    out = run([str(REPO / "launch" / "train.py"), *args], script=WITH_CIFAR).stdout
    assert "training complete: 1 epochs, 5 steps" in out  # 80 images / 16
    ckpt = sorted((run_dir / "checkpoints").glob("step_*.pt"))[-1]
    out = run([str(EVALUATE), str(ckpt), "--data-dir", str(data_dir)], script=WITH_CIFAR).stdout
    assert "(32 images)" in out


def test_missing_cifar10_is_one_clear_line(tmp_path):
    result = run(["--dataset", "cifar10", "--data-dir", str(tmp_path / "nowhere"), "--run-dir",
                  str(tmp_path / "run")], check=False)
    assert result.returncode == 2
    assert result.stdout.strip().splitlines()[-1].startswith("error: CIFAR-10 not found")
    assert "Traceback" not in result.stdout


def test_the_demo_training_learns_real_digits(tmp_path):
    """What scripts/demo.sh promises: the recipe's Net on scikit-learn's digits, with the demo's
    settings and thread count, ends above 0.90 test accuracy; evaluate takes the run directory."""
    run_dir = tmp_path / "demo"
    out = run(["--config", str(REPO / "scripts" / "demo.toml"), "--run-dir", str(run_dir)],
              env_extra={"OMP_NUM_THREADS": "1"}).stdout
    accuracies = [float(line.rsplit(" ", 1)[1]) for line in out.splitlines() if " eval loss " in line]
    assert len(accuracies) == 8 and accuracies[-1] >= 0.90, out[-3000:]
    evaluated = run([str(run_dir)], script=EVALUATE).stdout
    assert "step_000000360.pt: test loss" in evaluated and f"accuracy {accuracies[-1]:.4f} (360 images)" in evaluated
