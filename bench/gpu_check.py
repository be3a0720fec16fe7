"""The GPU proof, one command: kill-and-resume is bit for bit on every visible GPU, in every precision.

    python bench/gpu_check.py                          # all visible GPUs (and 1), resnet18
    DEVICE=cpu MODEL=net python bench/gpu_check.py     # the same checks on CPU (1 and 2 ranks, gloo)
    LOGS=DIR python bench/gpu_check.py                 # keep the runs' logs and checkpoints in DIR
    PRECISIONS=fp32,fp16 python bench/gpu_check.py     # only these cases (fp32, loader, bf16, fp16)

First the asynchronous writer alone: GPU tensors changed by kernels right after submit() must be
saved as they were at submit(), and its shared memory must be page-locked. Then, for each world
size (1, and the number of visible GPUs) and each precision (fp32, bf16, fp16 with
a GradScaler; fp16 on CUDA only), and in fp32 with the DataLoader path too (whose result must also
equal the default device path's): an uninterrupted torchrun run; a second run SIGKILLed whole
(agent, ranks, loader workers) mid-run and relaunched; the resumed run must start at a step
strictly between 0 and the end (the kill landed mid-run) and end with a checkpoint equal bit for
bit to the uninterrupted one: model, optimizer, scheduler, scaler, every rank's RNG states,
counters and loss. It then checks that a checkpoint written on the GPU loads on a machine
without CUDA with the recipe's plain torch.load, and prints steps/s with and without
--deterministic and the peak GPU memory of a fresh start and of a resume. Exit status 0 only
when every check passes.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEVICE = os.environ.get("DEVICE", "cuda")
MODEL = os.environ.get("MODEL", "resnet18")
TRAIN_ARGS = ["--device", DEVICE, "--model", MODEL, "--dataset", "fake", "--fake-size", "2048",
              "--batch-size", "32", "--epochs", "2", "--num-workers", "2", "--save-every-steps", "10",
              "--log-every-steps", "1", "--no-eval"]
COMPARED = ("model_state_dict", "optimizer_state_dict", "scheduler_state_dict", "scaler_state_dict",
            "rng_states", "global_step", "epoch", "next_epoch", "next_batch", "loss")


def torchrun(nproc: int, run_dir: Path, extra=()) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(REPO / "launch" / "train.py"), *TRAIN_ARGS, *extra, "--run-dir", str(run_dir)]


def launch(cmd: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=REPO, env=env,
                            start_new_session=True)


def run_to_end(cmd: list[str], log: Path) -> str:
    proc = launch(cmd, log)
    if proc.wait() != 0:
        raise CheckFailed(f"{log.name}: exit {proc.returncode}\n{log.read_text()[-3000:]}")
    return log.read_text()


class CheckFailed(Exception):
    pass


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    return tree


def kill_whole_tree(proc: subprocess.Popen) -> None:
    """SIGSTOP then SIGKILL the agent, its ranks and their loader workers (torchrun puts ranks in
    sessions of their own, so a process-group kill would miss them)."""
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for pid in descendants(proc.pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    proc.wait()


def kill_midway_and_resume(nproc: int, run_dir: Path, extra, work: Path, total_steps: int) -> str:
    log = work / f"{run_dir.name}.killed.log"
    proc = launch(torchrun(nproc, run_dir, extra), log)
    kill_at = total_steps // 2 + 3  # past a periodic save, not on one
    while not re.search(rf"step {kill_at} batch", log.read_text()):
        if proc.poll() is not None:
            raise CheckFailed(f"{log.name}: exited {proc.returncode} before step {kill_at}\n{log.read_text()[-3000:]}")
        time.sleep(0.02)
    kill_whole_tree(proc)
    out = run_to_end(torchrun(nproc, run_dir, extra), work / f"{run_dir.name}.resumed.log")
    found = re.search(r"resuming from \S+ \(epoch \d+, step (\d+)\)", out)
    if not found or not 0 < int(found.group(1)) < total_steps:
        raise CheckFailed(f"{run_dir.name}: the resumed run did not start mid-run ({found and found.group(0)})")
    return out


def newest(run_dir: Path) -> tuple[Path, dict]:
    path = sorted((run_dir / "checkpoints").glob("step_*.pt"))[-1]
    return path, torch.load(path, map_location="cpu", weights_only=True)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Floats as bytes, so that -0.0 != 0.0 and NaN == NaN, as bits are."""
    return t.contiguous().reshape(-1).view(torch.uint8) if t.is_floating_point() else t


def differences(a, b, where="") -> list[str]:
    """Where two saved states differ (paths of keys), bit for bit."""
    if isinstance(a, torch.Tensor):
        same = isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))
        return [] if same else [where]
    if isinstance(a, dict):
        if a.keys() != b.keys():
            return [f"{where} (keys)"]
        return [d for k in a for d in differences(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return [f"{where} (length)"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b or (a != a and b != b) else [where]


def samples_per_second(log: str) -> float:
    """The last samples/s of the second epoch's progress lines (start-up excluded)."""
    rates = re.findall(r"epoch 1 step \d+ batch \d+/\d+ .* samples/s (\d+)", log)
    return float(rates[-1]) if rates else float("nan")


def peak_memory(log: str, when: str) -> str:
    found = re.search(rf"peak GPU memory {when}: ([\d.]+) MB", log)
    return f"{found.group(1)} MB" if found else "n/a"


def loads_without_cuda(path: Path) -> bool:
    """The recipe's plain torch.load in a process that sees no GPU."""
    code = "import sys, torch; torch.load(sys.argv[1]); print('ok')"
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                         env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    return out.returncode == 0 and "ok" in out.stdout


def check(nproc: int, precision: str, work: Path) -> tuple[bool, str, str]:
    """precision: fp32, bf16, fp16, or loader (fp32 with --data-path loader instead of the device path)."""
    extra = {"fp32": [], "loader": ["--data-path", "loader"]}.get(precision, ["--amp", precision])
    name = f"ws{nproc}-{precision}"
    reference = run_to_end(torchrun(nproc, work / f"{name}-ref", extra), work / f"{name}-ref.log")
    total_steps = int(re.search(r"training complete: \d+ epochs, (\d+) steps", reference).group(1))
    resumed = kill_midway_and_resume(nproc, work / f"{name}-cut", extra, work, total_steps)
    (path, ref), (_, cut) = newest(work / f"{name}-ref"), newest(work / f"{name}-cut")
    diffs = [d for key in COMPARED for d in differences(ref.get(key), cut.get(key), key)]
    if not loads_without_cuda(path):
        diffs.append("the checkpoint does not load with torch.load(PATH) where CUDA is not visible")
    if precision == "loader":  # both data paths train to the same bits
        _, device_path = newest(work / f"ws{nproc}-fp32-ref")
        diffs += [f"loader vs device path: {d}" for key in COMPARED
                  for d in differences(device_path.get(key), ref.get(key), key)]
    return not diffs, "; ".join(diffs[:5]) or "bitwise equal", \
        f"{samples_per_second(reference):.0f} samples/s, peak {peak_memory(reference, 'after start-up')} " \
        f"fresh / {peak_memory(resumed, 'after the resume')} resumed / {peak_memory(reference, 'of the whole run')} run"


def check_async_snapshot(work: Path) -> tuple[bool, str]:
    """The template's asynchronous writer (a process on Linux) saves the GPU tensors as they were
    at submit(), though kernels change them right after it, and its copies off the GPU do not
    block: the snapshot's memory is page-locked."""
    sys.path.insert(0, str(REPO))
    from dist_train.async_save import ProcessWriter, make_writer

    writer = make_writer(DEVICE)  # as train.py makes it, before the model
    kind = type(writer).__name__
    tensors = {f"t{i}": torch.randn(1 << 20, device=DEVICE) for i in range(64)}  # 256 MB
    expected = {name: t.cpu() for name, t in tensors.items()}
    ckpt_dir = work / "snapshot"
    ckpt_dir.mkdir()
    problems, written = [], []
    for attempt in range(3):  # the first lays the memory out and page-locks it
        torch.cuda.synchronize()
        start = time.perf_counter()
        writer.submit({"tensors": tensors, "global_step": attempt}, ckpt_dir, 2, written.append)
        submitted = time.perf_counter() - start
        for t in tensors.values():  # queued behind the copies, as the next step's kernels are
            t.mul_(2)
        problem = writer.wait()
        if problem or len(written) != attempt + 1:
            problems.append(f"attempt {attempt}: {problem or 'no file'}")
            break
        saved = torch.load(written[-1], weights_only=True)
        problems += [f"attempt {attempt}: {name} differs" for name in expected
                     if not torch.equal(saved["tensors"][name], expected[name])]
        expected = {name: t.cpu() for name, t in tensors.items()}
    pinned = isinstance(writer, ProcessWriter) and writer.region.page_locked
    writer.close()
    detail = "; ".join(problems[:3]) or "exact"
    return not problems and pinned, f"{kind}, page-locked {pinned}, {detail}; last submit() {submitted * 1e3:.1f} ms"


def main() -> int:
    visible = torch.cuda.device_count() if DEVICE == "cuda" else 2
    if DEVICE == "cuda" and visible == 0:
        print("GPU CHECK FAIL: no CUDA device visible (DEVICE=cpu checks the script on CPU)")
        return 1
    print(f"torch {torch.__version__}, device {DEVICE}, "
          f"{torch.cuda.get_device_name(0) if DEVICE == 'cuda' else 'cpu'}, {visible} visible, model {MODEL}")
    precisions = ["fp32", "loader", "bf16"] + (["fp16"] if DEVICE == "cuda" else [])
    if os.environ.get("PRECISIONS"):  # a subset, e.g. PRECISIONS=fp32,fp16 where device time is short
        precisions = [p for p in precisions if p in os.environ["PRECISIONS"].split(",")]
    ok, started = True, time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(os.environ.get("LOGS") or tmp)  # LOGS=DIR keeps the runs' logs and checkpoints
        work.mkdir(parents=True, exist_ok=True)
        if DEVICE == "cuda":
            passed, detail = check_async_snapshot(work)
            ok &= passed
            print(f"{'PASS' if passed else 'FAIL'} asynchronous snapshot off the GPU: {detail}", flush=True)
        for nproc in sorted({1, visible}):
            for precision in precisions:
                try:
                    passed, detail, figures = check(nproc, precision, work)
                except CheckFailed as error:
                    passed, detail, figures = False, str(error), ""
                ok &= passed
                print(f"{'PASS' if passed else 'FAIL'} {nproc} rank(s) {precision}: {detail}; {figures}", flush=True)
        loose = run_to_end(torchrun(visible, work / "nondeterministic", ["--no-deterministic"]), work / "nd.log")
        strict = (work / f"ws{visible}-fp32-ref.log").read_text()
        print(f"{visible} rank(s) fp32 samples/s: deterministic {samples_per_second(strict):.0f}, "
              f"--no-deterministic {samples_per_second(loose):.0f}")
    print(f"elapsed {time.monotonic() - started:.0f} s")
    print("GPU CHECK PASS" if ok else "GPU CHECK FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
