"""What dist_train's exactness costs in throughput, against bare references, in one run.

    python bench/throughput.py               # ~4-5 minutes on 2 CPU cores
    python bench/throughput.py --resnet18    # adds resnet18 whole-process runs (slow on CPU)

(a) Whole processes under torchrun, 1 and 2 ranks: the template (both --data-path values) against
    bench/bare_ddp.py, a hand-written DDP loop doing the same work on the same data: CIFAR10 files
    generated here, RandomCrop(32, 4) + flip + normalize, batch 64, one loader worker, one epoch,
    no evaluation, one save at the end. Throughput ratio = bare wall / template wall.
(b) Loaders in one process, no workers, one thread: the template's train loader and the device
    path against a bare torchvision loader (the same transforms, shuffle) over the same data; on
    CIFAR10 (PIL images from memory) and on FakeData. Ratio = template samples/s / bare samples/s.

Every ratio is taken against the reference measured in the same round; the rounds interleave the
variants; each line gives the median and the min-max over the rounds. Absolute times on a shared
machine drift; ratios taken side by side do not.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import torch  # noqa: E402

from cifar_files import write_cifar10  # noqa: E402
from with_generated_cifar import accept_generated_files  # noqa: E402


def summary(values: list[float], center: float | None = None) -> str:
    center = statistics.median(values) if center is None else center
    return f"{center:6.3f} ({min(values):.3f}-{max(values):.3f})"


FIGURES: list[dict] = []  # every figure of this run, for --json (bench/all.py builds its table from them)


def record(figure: str, what: str, values: list[float], target: str = "", center: float | None = None) -> str:
    """Keep a figure (its ratios over the rounds) and return its summary for printing.
    target: '>= x' or '<= x', the issue's target for this figure, if it has one. center: the
    figure, where it is not the median of the rounds' values (bench/saves.py (d))."""
    center = statistics.median(values) if center is None else center
    FIGURES.append({"figure": figure, "what": what, "median": center, "min": min(values),
                    "max": max(values), "rounds": len(values), "target": target})
    return summary(values, center)


def write_figures(path: str | None) -> None:
    if path:
        import json
        Path(path).write_text(json.dumps({"machine": describe_machine(), "figures": FIGURES}, indent=1))


def describe_machine() -> str:
    import torchvision

    cores = len(os.sched_getaffinity(0))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = os.getloadavg()[0]
    return (f"{platform.node()}: {cores} cores, {gpu}, Python {platform.python_version()}, "
            f"torch {torch.__version__}, torchvision {torchvision.__version__}; load average {load:.1f}")


# (b) loaders ---------------------------------------------------------------------------------------

def count_samples(loader) -> float:
    """samples/s of one pass."""
    start, count = time.perf_counter(), 0
    for inputs, _ in loader:
        count += len(inputs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


def loader_variants(data_dir: Path, fake_size: int, batch_size: int) -> dict:
    """name -> a function building a fresh loader, all over `batch_size` batches, no workers."""
    from torch.utils.data import DataLoader
    from torchvision import transforms as T
    from torchvision.datasets import CIFAR10, FakeData

    from dist_train import data
    from dist_train.config import Config
    from dist_train.distributed import DistEnv

    accept_generated_files(str(data_dir))
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(data.CIFAR10_MEAN, data.CIFAR10_STD)])
    cpu = DistEnv(0, 0, 1, torch.device("cpu"))
    device = DistEnv(0, 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))

    def bare(dataset):
        return lambda: DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                  generator=torch.Generator().manual_seed(0))

    def template(dataset: str, data_path: str, env: DistEnv):
        config = Config(dataset=dataset, data_dir=str(data_dir), fake_size=fake_size, batch_size=batch_size,
                        num_workers=0, data_path=data_path)
        train, _ = data.build_datasets(config, env)
        return lambda: data.build_train_loader(train, config, env)

    return {
        "cifar10 bare": bare(CIFAR10(str(data_dir), train=True, transform=transform)),
        "cifar10 loader": template("cifar10", "loader", cpu),
        "cifar10 device": template("cifar10", "device", device),
        "fake bare": bare(FakeData(fake_size, (3, 32, 32), 10, transform=transform)),
        "fake loader": template("fake", "loader", cpu),
        "fake device": template("fake", "device", device),
    }


def bench_loaders(data_dir: Path, fake_size: int, rounds: int) -> None:
    torch.set_num_threads(1)  # the bare loader's work is single-threaded: compare like with like
    variants = loader_variants(data_dir, fake_size, batch_size=64)
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, build in variants.items():
            rates[name].append(count_samples(build()))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"\n(b) train loaders, 1 process, no workers, 1 thread, batch 64, {rounds} interleaved rounds: "
          f"samples/s ratio to the bare torchvision loader on the same data, median (min-max)")
    for dataset in ("cifar10", "fake"):
        reference = rates[f"{dataset} bare"]
        for path in ("loader", "device"):
            ratios = [rate / ref for rate, ref in zip(rates[f"{dataset} {path}"], reference)]
            where = f" ({device})" if path == "device" else ""
            figure = record("b", f"train loader, {dataset}, --data-path {path}{where} / bare torchvision loader",
                            ratios, ">= 0.95")
            print(f"  {dataset:8} template {path + where:14} / bare: {figure}")
        ratios = [d / loader for d, loader in zip(rates[f"{dataset} device"], rates[f"{dataset} loader"])]
        print(f"  {dataset:8} device path / loader path:  "
              f"{record('b', f'train loader, {dataset}, device path / loader path', ratios)}")
    if torch.cuda.is_available():
        print(f"  cifar10 device path: {record('b', 'cifar10 device path, samples/s', rates['cifar10 device'])} "
              f"samples/s, peak GPU memory {torch.cuda.max_memory_allocated() / 1e6:.0f} MB")


# (a) whole processes -------------------------------------------------------------------------------

def torchrun(script: str, args: list[str], nproc: int) -> float:
    """Wall seconds of one whole launch."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(port), str(REPO / "tests" / "with_generated_cifar.py"), script, *args]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    start = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"error: {script} failed:\n{result.stdout[-3000:]}")
    return wall


def world_sizes() -> list[int]:
    """1 and 2 ranks; on a GPU machine one rank per GPU, so 2 only where there are two GPUs."""
    return [1, 2] if not torch.cuda.is_available() else sorted({1, min(2, torch.cuda.device_count())})


def bench_processes(data_dir: Path, work: Path, model: str, rounds: int) -> None:
    common = ["--data-dir", str(data_dir), "--model", model, "--epochs", "1", "--batch-size", "64",
              "--num-workers", "1"]
    walls: dict[tuple, list[float]] = {}
    for round_ in range(rounds):
        for nproc in world_sizes():
            walls.setdefault(("bare", nproc), []).append(torchrun(
                str(REPO / "bench" / "bare_ddp.py"), common + ["--out", str(work / "bare.pt")], nproc))
            for path in ("loader", "device"):
                run_dir = work / f"{model}_{path}_{nproc}_{round_}"
                walls.setdefault((path, nproc), []).append(torchrun(
                    str(REPO / "launch" / "train.py"),
                    common + ["--dataset", "cifar10", "--data-path", path, "--run-dir", str(run_dir),
                              "--no-eval", "--save-every-steps", "0", "--log-every-steps", "100000"], nproc))
    print(f"\n(a) {model}, whole processes (torchrun), {rounds} interleaved rounds: throughput ratio "
          f"template / bare DDP loop (= bare wall / template wall), median (min-max)")
    for nproc in world_sizes():
        for path in ("loader", "device"):
            ratios = [bare / ours for bare, ours in zip(walls[("bare", nproc)], walls[(path, nproc)])]
            figure = record("a", f"{model}, {nproc} rank(s), --data-path {path}: throughput / bare DDP loop",
                            ratios, ">= 0.98")
            print(f"  {nproc} rank{'s' if nproc > 1 else ' '}  --data-path {path:6}: {figure}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8192, help="training images of the whole-process runs")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the whole-process runs")
    parser.add_argument("--loader-images", type=int, default=2048, help="images per loader pass")
    parser.add_argument("--loader-rounds", type=int, default=5, help="interleaved rounds of the loaders")
    parser.add_argument("--resnet18", action="store_true", help="also resnet18 whole-process runs")
    parser.add_argument("--resnet18-images", type=int, default=4096,
                        help="training images of those (1,024 made the start-up ~a quarter of the wall)")
    parser.add_argument("--skip-processes", action="store_true", help="only the loaders")
    parser.add_argument("--json", help="also write every figure to this file")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # each figure as soon as it is measured
    print(describe_machine())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        loader_dir = write_cifar10(work / "loader_data", per_batch=args.loader_images // 5, test_size=64)
        bench_loaders(loader_dir, args.loader_images, args.loader_rounds)
        if not args.skip_processes:
            data_dir = write_cifar10(work / "data", per_batch=args.images // 5, test_size=64)
            bench_processes(data_dir, work, "net", args.rounds)
            if args.resnet18:
                small = write_cifar10(work / "small", per_batch=args.resnet18_images // 5, test_size=64)
                bench_processes(small, work, "resnet18", args.rounds)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
    write_figures(args.json)


if __name__ == "__main__":
    main()
