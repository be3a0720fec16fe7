"""The CUDA path, tested on CPU wherever CPU can show it: the device each rank takes, RNG states
restored from tensors on another device, GPU-written checkpoints read on a CPU-only machine,
deterministic mode as an error, and the exit codes a scheduler reads."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, SMALL_RUN, Launch, assert_bitwise_equal, launch_command, newest_checkpoint, python_env
from dist_train import cli, exits
from dist_train.config import UserError
from dist_train.distributed import (RankError, nondeterministic_op, pick_device, use_deterministic_kernels,
                                   why_no_cuda)
from dist_train.evaluate import main as evaluate_main
from dist_train.models import GlobalAvgPool, build_model
from dist_train.rng import capture_rng_state, restore_rng_state
from dist_train.state import to_cpu

CPU = torch.device("cpu")


def cuda(index: int) -> torch.device:
    return torch.device("cuda", index)


@pytest.mark.parametrize("choice, local_rank, visible, node_gpus, expected", [
    ("auto", 3, 0, None, CPU),  # no CUDA: the CPU
    ("cpu", 1, 4, None, CPU),  # asked for
    ("auto", 3, 4, None, cuda(3)),  # torchrun on a 4-GPU box: cuda:LOCAL_RANK
    ("cuda", 3, 4, 4, cuda(3)),  # srun, every task sees the node's 4 GPUs
    ("auto", 3, 1, 4, cuda(0)),  # srun --gpus-per-task=1: each task sees its own GPU as cuda:0
    ("auto", 3, 2, 8, cuda(1)),  # srun --gpus-per-task=2: the second GPU of this task's pair
])
def test_device_choice_follows_what_the_rank_can_see(choice, local_rank, visible, node_gpus, expected):
    assert pick_device(choice, local_rank, visible, node_gpus) == expected


def test_more_ranks_than_gpus_or_no_cuda_is_one_clear_error():
    with pytest.raises(RankError, match="local rank 4 has no GPU of its own.*sees 4 GPU"):
        pick_device("auto", 4, 4, None)  # torchrun --nproc_per_node=8 on a 4-GPU box
    with pytest.raises(RankError, match="at most 4 ranks per node"):
        pick_device("cuda", 5, 4, 4)  # srun with 8 tasks on 4 GPUs, no binding
    with pytest.raises(UserError, match="CUDA is not available"):
        pick_device("cuda", 0, 0)


def test_gpus_slurm_gave_that_torch_cannot_see_are_an_error_not_a_cpu_run():
    """A CPU-only torch wheel (or a driver too old for its CUDA) on a GPU node: --device auto
    trained on the CPU, silently, for the whole allocation."""
    with pytest.raises(RankError, match=r"SLURM gave this node 4 GPU\(s\) but torch sees none \(a CPU-only "
                                        r"build\); training would run on the CPU: .*or pass --device cpu"):
        pick_device("auto", 0, 0, 4, why_no_cuda="a CPU-only build")
    assert pick_device("cpu", 0, 0, 4) == CPU  # asked for


def test_why_torch_sees_no_gpu(monkeypatch):
    """The reason in the line: a CPU-only wheel (no such wheel here: its torch.version.cuda is
    None), GPUs hidden by an empty CUDA_VISIBLE_DEVICES, else no driver for this CUDA build."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", " ")
    assert why_no_cuda() == "CUDA_VISIBLE_DEVICES is empty"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert why_no_cuda().endswith("no driver, or one too old for that CUDA")
    monkeypatch.setattr(torch.version, "cuda", None)
    assert why_no_cuda() == f"torch {torch.__version__} is a CPU-only build"


def test_a_gpu_job_whose_torch_sees_no_gpu_stops_before_the_run_directory(tmp_path):
    """This machine's torch (a CUDA build, no driver) in a job that SLURM gave GPUs: the real check."""
    run_dir = tmp_path / "run"
    environ = python_env() | {"SLURM_JOB_GPUS": "0,1"}
    result = subprocess.run(launch_command(["--dataset", "fake", "--run-dir", str(run_dir)]), cwd=REPO, env=environ,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    errors = [line for line in result.stdout.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stdout, result.stdout
    assert "SLURM gave this node 2 GPU(s) but torch sees none" in errors[0]
    assert f"torch {torch.__version__}" in errors[0] and not run_dir.exists()


class OnAnotherDevice(torch.Tensor):
    """Stands in for a CUDA tensor (no GPU here): numpy() refuses it as torch does for CUDA tensors,
    .cpu() gives a plain CPU tensor."""

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() first.")

    def cpu(self, *args, **kwargs):
        return self.as_subclass(torch.Tensor).clone()


def test_rng_states_restore_from_tensors_on_another_device():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    saved = capture_rng_state(CPU)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    as_if_loaded_to_gpu = {
        "python": dict(saved["python"], state=saved["python"]["state"].as_subclass(OnAnotherDevice)),
        "numpy": dict(saved["numpy"], keys=saved["numpy"]["keys"].as_subclass(OnAnotherDevice)),
        "torch": saved["torch"].as_subclass(OnAnotherDevice),
        "cuda": None,
    }
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_rng_state(as_if_loaded_to_gpu, CPU)
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(1), expected[2])


def test_a_checkpoint_holds_cpu_tensors_only():
    tree = {"a": torch.ones(2, requires_grad=True) * 2, "b": [torch.zeros(1), (torch.ones(1), 3)], "c": None}
    moved = to_cpu(tree)
    assert moved["a"].device == CPU and not moved["a"].requires_grad and moved["b"][1][1] == 3
    assert isinstance(moved["b"][1], tuple)


def test_a_synchronous_save_can_copy_into_buffers_reused_from_one_save_to_the_next(tmp_path):
    """What a synchronous save on CUDA does (train.py hands it the writer's Snapshot, pinned there):
    the same file as with to_cpu, from host buffers that the next save reuses rather than
    allocating (and faulting in) fresh memory for every tensor."""
    from dist_train.async_save import Snapshot
    from dist_train.distributed import DistEnv
    from dist_train.loop import build_scheduler
    from dist_train.state import Progress, Training, save_training_state

    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    training = Training(model, optimizer, build_scheduler(optimizer, "constant", 1))
    env, snapshot = DistEnv(0, 0, 1, CPU), Snapshot()
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    plain = save_training_state(tmp_path / "a", 2, training, Progress(global_step=1), 1.0, {}, env)
    copied = save_training_state(tmp_path / "b", 2, training, Progress(global_step=1), 1.0, {}, env,
                                 host_copy=snapshot)
    assert_bitwise_equal(torch.load(copied, weights_only=True), torch.load(plain, weights_only=True))
    buffers = {key: buffer.data_ptr() for key, buffer in snapshot._buffers.items()}
    assert ("model_state_dict", "weight") in buffers and ("optimizer_state_dict", "state", 0, "momentum_buffer") in buffers
    save_training_state(tmp_path / "b", 2, training, Progress(global_step=2), 1.0, {}, env, host_copy=snapshot)
    assert {key: buffer.data_ptr() for key, buffer in snapshot._buffers.items()} == buffers


# A checkpoint as a GPU run writes it when its tensors are not copied to the CPU: every storage
# tagged cuda:0 (made here with torch's own location-tag hook, in a child process).
TAG_AS_CUDA = """
import sys, torch
torch.serialization.register_package(0, lambda obj: "cuda:0", lambda obj, location: None)
checkpoint = torch.load(sys.argv[1], weights_only=True)
checkpoint["config"]["amp"] = "fp16"  # trained with fp16 + GradScaler on the GPU
checkpoint["config"]["device"] = "cuda"
torch.save(checkpoint, sys.argv[2])
"""


@pytest.fixture(scope="module")
def cuda_tagged(reference_ws1, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("gpu_written")
    (run_dir / "checkpoints").mkdir()
    path = run_dir / "checkpoints" / "step_000000048.pt"
    source = sorted((reference_ws1 / "checkpoints").glob("step_*.pt"))[-1]
    subprocess.run([sys.executable, "-c", TAG_AS_CUDA, str(source), str(path)], check=True, env=python_env())
    return path


def test_a_gpu_tagged_file_is_what_the_recipe_cannot_read_without_cuda(cuda_tagged):
    # Why checkpoints are written with CPU tensors: this is the failure they avoid.
    with pytest.raises(RuntimeError, match="Attempting to deserialize object on a CUDA device"):
        torch.load(cuda_tagged, weights_only=True)


def test_gpu_written_fp16_checkpoint_evaluates_inspects_exports_and_lists_on_cpu(cuda_tagged, tmp_path, capsys):
    assert evaluate_main([str(cuda_tagged), "--dataset", "fake", "--fake-size", "64"]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert cli.main(["inspect", str(cuda_tagged.parents[1])]) == 0
    assert cli.main(["export", str(cuda_tagged), "--out", str(tmp_path / "w.safetensors")]) == 0
    assert cli.main(["list", str(cuda_tagged.parents[1])]) == 0
    assert "step_000000048.pt" in capsys.readouterr().out


def test_resnets_swap_adaptive_average_pooling_for_a_deterministic_mean():
    model = build_model("resnet18")
    assert isinstance(model.avgpool, GlobalAvgPool)
    assert not any(isinstance(m, torch.nn.AdaptiveAvgPool2d) for m in model.modules())


def test_deterministic_mode_makes_a_nondeterministic_op_an_error_naming_it():
    try:
        use_deterministic_kernels(CPU)
        with pytest.raises(RuntimeError) as caught:  # put_ has no deterministic kernel, on CPU too
            torch.zeros(3).put_(torch.tensor([0, 0]), torch.tensor([1.0, 2.0]))
    finally:
        torch.use_deterministic_algorithms(False)
    assert nondeterministic_op(caught.value) == "put_"
    assert nondeterministic_op(RuntimeError("CUDA out of memory")) is None


def test_sigterm_saves_and_exits_143_not_0(tmp_path):
    launch = Launch(SMALL_RUN + ["--run-dir", str(tmp_path / "run"), "--num-workers", "0"], tmp_path / "term.log")
    launch.wait_for(r"step 3 batch")
    os.kill(launch.proc.pid, signal.SIGTERM)
    assert launch.wait(timeout=120) == exits.TERMINATED
    assert "stop requested by SIGTERM" in launch.output()
    assert newest_checkpoint(tmp_path / "run")["next_batch"] > 0  # saved mid-epoch, not finished


@pytest.mark.parametrize("slurm_env, why", [
    ({"SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "3"}, "restarted 3 times"),  # --max-requeues 3
    ({"SLURM_JOB_ID": "4242", "SLURM_CONF": "{tmp}/slurm.conf"}, "requeue 4242 failed|scontrol not found"),
])
def test_a_requeue_that_does_not_happen_exits_75(slurm_env, why, tmp_path):
    (tmp_path / "slurm.conf").write_text("ClusterName=none\n")  # scontrol fails at once on it
    args = SMALL_RUN + ["--run-dir", str(tmp_path / "run"), "--num-workers", "0", "--max-requeues", "3"]
    env = python_env() | {k: v.format(tmp=tmp_path) for k, v in slurm_env.items()}
    proc = subprocess.Popen([sys.executable, str(REPO / "launch" / "train.py"), *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "step 2 batch" in line:
            proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=120) == exits.STOPPED, "".join(lines)[-3000:]
    assert re.search(why, "".join(lines)), "".join(lines)[-3000:]

