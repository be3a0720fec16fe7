"""What saving and resuming cost, as ratios to references measured side by side in one run.

    python bench/saves.py              # several minutes on 2 CPU cores
    python bench/saves.py --model resnet18 resnet50 --rounds 30   # 8 minutes there (2026-12-03)

(c) A synchronous save (saving.save_checkpoint: temp file, fsync, rename, `latest`, prune;
    the pruned file's unlink runs in the background) against `dd ... conv=fsync` of the same
    number of bytes.
(d) The loop time an asynchronous save costs (its submit(), the slowdown of the steps that run
    while the writer writes, any wait at the end), against dd+fsync of the same bytes; the writer
    the template picks (a process on Linux, CPU or CUDA), and a thread writer too, in the same
    rounds, for comparison. Each step after a save is compared with the same step of a
    control stretch without a save, in the same round; medians per step over the rounds, and the
    figure's standard error (bootstrap over the rounds): a step's time varies by ~20% here, so
    two runs of 30 rounds may land ~0.1 dd+fsync apart.
(e) Time to the first logged step of a whole process: resumed from a checkpoint / fresh.
(f) Bytes read (/proc/self/io rchar) per resume per rank, 4 ranks (gloo), --read-once on and off.
(g) The stop agreement's cost per step (bench/agreement_overhead.py under torchrun, 2 ranks).
Interleaved rounds; medians with min-max.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.throughput import describe_machine, record, write_figures  # noqa: E402
from dist_train.async_save import ThreadWriter, make_writer  # noqa: E402
from dist_train.saving import save_checkpoint, wait_for_pruning  # noqa: E402
from dist_train.models import build_model  # noqa: E402
from dist_train.state import to_cpu  # noqa: E402


def dd_fsync(path: Path, num_bytes: int) -> float:
    """dd into a new file, as a save writes one: overwriting the last round's file would charge dd
    with freeing its blocks (~60 ms per 90 MB on ext4 here), flattering every ratio to it."""
    path.unlink(missing_ok=True)
    start = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={-(-num_bytes // (1 << 20))}",
                    "conv=fsync"], check=True, capture_output=True)
    return time.perf_counter() - start


def training_state(model_name: str):
    """On the GPU where there is one (the snapshot then copies into pinned buffers), else the CPU."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(model_name).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    inputs, targets = torch.randn(8, 3, 32, 32, device=device), torch.randint(0, 10, (8,), device=device)

    def step() -> None:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()  # time the work, not its queueing

    step()
    return model, optimizer, step


def bench_saves(work: Path, model_name: str, rounds: int, steps: int) -> None:
    # The writers are made first, as the template makes its own (before the model): a writer
    # process forked later shares the model's pages copy-on-write, and in one A/B run the steps
    # were then ~20% slower (resnet50: 626-644 ms against 519-558 ms), not once it came first.
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    writers = {"template": make_writer(device_type)}  # as the template picks: a process on Linux
    if not isinstance(writers["template"], ThreadWriter):
        writers["thread"] = ThreadWriter()  # for comparison, in the same rounds
    model, optimizer, step = training_state(model_name)
    writers["template"].defer(optimizer)  # as the template does: copied until the next step

    # A sync save copies to the host as train.py has it: on CUDA into the writer's pinned buffers,
    # reused from one save to the next; on the CPU not at all.
    sync_copy = writers["template"].snapshot if device_type == "cuda" else to_cpu

    def checkpoint(n: int, to_host=sync_copy) -> dict:
        return to_host({"model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict(),
                        "global_step": n})

    def as_is(tree):  # an asynchronous save: the writer takes the snapshot
        return tree

    def step_times(count: int) -> list[float]:
        times = []
        for _ in range(count):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return times

    ckpt_dir = work / "ckpt"
    ckpt_dir.mkdir()
    size = save_checkpoint(checkpoint(0), ckpt_dir, 2).stat().st_size
    save_checkpoint(checkpoint(1), ckpt_dir, 2)  # two files: from now on every save prunes one
    # Enough steps after an async save that they outlast its background work (the write, then
    # the pruned file's unlink), as a save interval does in training: what is measured is then the
    # steps' slowdown, not a wait at the end (which is counted all the same). No more steps than
    # that: a step the save does not touch adds only noise. Calibrated on the second async save
    # of each writer (the first one maps the memory it writes from).
    step_time, n, needed = statistics.median(step_times(steps)), 1, []
    for writer in [*writers.values()] * 2:
        n += 1
        start = time.perf_counter()
        writer.submit(checkpoint(n, as_is), ckpt_dir, 2)
        while writer.busy():
            step()
        assert writer.wait() is None
        wait_for_pruning()
        needed.append(math.ceil(1.25 * (time.perf_counter() - start) / step_time))
    steps = max(steps, *needed[len(writers):])
    # A round: a sync save, dd, then in turn for each writer an async save and the steps after
    # it, and for comparison the same number of steps with no save (the control); each follows
    # a settling stretch of as many steps. Each step is timed, and what an async save costs is its
    # submit(), plus for each step after it the median over the rounds of that step's time less
    # the control's step at the same place, plus the wait at the end. Medians per step: on this
    # shared host a step now and then takes twice as long for reasons of its own (one such step
    # is 0.5 dd), which made the median of whole stretches swing by 0.1 dd from run to run.
    sync, dds, timed = [], [], {name: {"submit": [], "steps": [], "wait": []} for name in [*writers, None]}
    for i in range(rounds):
        n += 1
        start = time.perf_counter()
        save_checkpoint(checkpoint(n), ckpt_dir, 2)  # the copy to the host counted in
        sync.append(time.perf_counter() - start)
        wait_for_pruning()  # the unlink of the pruned file, in the background, before dd starts
        dd = dd_fsync(work / "dd", size)
        dds.append(dd)
        sync[-1] /= dd
        names = [*writers, None]
        for name in names[i % len(names):] + names[:i % len(names)]:
            step_times(steps)  # settling
            n += 1
            start = time.perf_counter()
            if name is not None:
                writers[name].submit(checkpoint(n, as_is), ckpt_dir, 2)  # as state.save_training_state does
            submitted = time.perf_counter()
            during = step_times(steps)
            waited = time.perf_counter()
            if name is not None:
                assert writers[name].wait() is None
                wait_for_pruning()  # the thread writer's unlink is charged to it, not to the next save
            waited = time.perf_counter() - waited
            timed[name]["submit"].append((submitted - start) / dd)
            timed[name]["steps"].append([t / dd for t in during])
            timed[name]["wait"].append(waited / dd)
    for writer in writers.values():
        writer.close()
    print(f"\n{model_name} + momentum checkpoint, {size / 1e6:.1f} MB, {rounds} interleaved rounds; "
          f"dd+fsync {statistics.median(dds):.3f} s ({min(dds):.3f}-{max(dds):.3f})")
    what = f"{model_name} + momentum ({size / 1e6:.0f} MB)"
    print(f"  (c) sync save (write, fsync, rename, latest, prune) / dd+fsync: "
          f"{record('c', f'{what}: sync save / dd+fsync', sync, '<= 1.1')}")
    kind = "process" if "thread" in writers else "thread"
    rounds_lost, lost, parts = lost_per_save(timed["template"], timed[None])
    figure = record("d", f"{what}: loop time lost per async save / dd+fsync", rounds_lost, "<= 0.2", lost)
    print(f"  (d) loop time lost per async save ({kind} writer; {steps} steps after it, {step_time * 1e3:.1f} ms "
          f"each) / dd+fsync: {figure}\n      of which {parts}")
    if "thread" in writers:
        rounds_lost, lost, parts = lost_per_save(timed["thread"], timed[None])
        figure = record("d", f"{what}: the same with a thread writer (for comparison)", rounds_lost, center=lost)
        print(f"      the same with a thread writer, in the same rounds: {figure}\n      of which {parts}")


def lost_per_save(timed: dict, control: dict) -> tuple[list[float], float, str]:
    """Each round's loss (submit + the steps' excess over the control's + the wait), the figure
    (the median submit, plus each step's median excess, plus the median wait), and its parts,
    with the figure's standard error."""
    excess = [[t - c for t, c in zip(steps, control_steps)] for steps, control_steps in zip(timed["steps"], control["steps"])]
    rounds = [s + sum(e) + w for s, e, w in zip(timed["submit"], excess, timed["wait"])]
    parts = loss_parts(timed, control, range(len(rounds)))
    return rounds, sum(parts), ("submit " + " + steps ".join(f"{part:.3f}" for part in parts[:-1])
                                + f" + wait {parts[-1]:.3f}; standard error {standard_error(timed, control):.3f}")


def loss_parts(timed: dict, control: dict, chosen) -> list[float]:
    """The median submit, each step's median time less the control's at the same place, the
    median wait, over the rounds `chosen` (indices, repeats allowed)."""
    pick = lambda values: [values[i] for i in chosen]  # noqa: E731
    steps, control_steps = pick(timed["steps"]), pick(control["steps"])
    return [statistics.median(pick(timed["submit"])),
            *(statistics.median(t) - statistics.median(c) for t, c in zip(zip(*steps), zip(*control_steps))),
            statistics.median(pick(timed["wait"]))]


def standard_error(timed: dict, control: dict, resamples: int = 1000) -> float:
    """(d)'s standard error, by the bootstrap: the figure again over rounds drawn with
    replacement (each with its control). On a shared host a step's time varies by ~20%, and a
    round's loss is a difference of step times; this says how far apart two runs may land."""
    rng, count = random.Random(0), len(timed["submit"])
    figures = [sum(loss_parts(timed, control, [rng.randrange(count) for _ in range(count)]))
               for _ in range(resamples)]
    return statistics.stdev(figures)


def first_step_wall(args: list[str]) -> float:
    """Seconds from launch to the first logged step of a whole process (then killed: give each
    launch its own run directory, or --max-failures counts the kills)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(REPO / "launch" / "train.py"), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if re.search(r"step \d+ batch", line):
            wall = time.perf_counter() - start
            break
    else:
        sys.exit("error: no step logged:\n" + "".join(lines[-10:]))
    proc.kill()
    proc.wait()
    return wall


def bench_resume(work: Path, model_name: str, rounds: int) -> None:
    args = ["--device", "cpu", "--model", model_name, "--dataset", "fake", "--fake-size", "64", "--batch-size", "8",
            "--epochs", "2", "--num-workers", "0", "--log-every-steps", "1", "--no-eval", "--save-every-steps", "0"]
    source = work / "resume_source"
    subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), *args, "--epochs", "1", "--run-dir",
                    str(source)],
                   env=dict(os.environ, PYTHONPATH=str(REPO)), check=True, capture_output=True)
    ratios = []
    for i in range(rounds):
        fresh = first_step_wall(args + ["--run-dir", str(work / f"fresh_{i}")])
        resumed = first_step_wall(args + ["--run-dir", str(work / f"resumed_{i}"), "--allow-config-change",
                                          "--resume", str(next((source / "checkpoints").glob("step_*.pt")))])
        ratios.append(resumed / fresh)
    figure = record("e", f"{model_name}, 1 process: time to the first step, resumed / fresh", ratios, "<= 1.1")
    print(f"  (e) {model_name}, 1 process, time to the first step, resumed / fresh: {figure} "
          f"({rounds} rounds)")


def bench_reads() -> None:
    sys.path.insert(0, str(REPO / "tests"))
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", str(REPO / "tests" / "test_read_once.py")],
                         env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO, capture_output=True, text=True)
    for line, mode in zip(re.findall(r"bytes read per rank: .*", out.stdout), ("--read-once", "--no-read-once")):
        print(f"  (f) 4 ranks, {mode:15}: {line}")
        ranks, size = re.search(r"\[([\d, ]+)\] file: (\d+)", line).groups()
        ranks = [int(r) / int(size) for r in ranks.split(",")]
        record("f", f"4 ranks, {mode}: bytes read by the main rank / the file's size", ranks[:1])
        record("f", f"4 ranks, {mode}: bytes read by another rank (most) / the file's size", [max(ranks[1:])],
               "<= 0.1" if mode == "--read-once" else "")


def bench_agreement() -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               str(REPO / "bench" / "agreement_overhead.py")]
    out = subprocess.run(command, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True)
    for line in out.stdout.splitlines():
        print(f"  (g) {line.strip()}")
        found = re.search(r"(\w+): .* ratio to none ([\d.]+)", line)
        if found and found.group(1) != "none":
            name = {"async_every_10": "every 10 steps (the default)", "asynchronous": "every step",
                    "blocking": "a blocking all-reduce per step, for comparison"}.get(found.group(1), found.group(1))
            record("g", f"stop agreement, 2 ranks, Net, {name}: step time / no agreement (median of 15 rounds)",
                   [float(found.group(2))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", default=["resnet18"], help="(c), (d) for each; (e) for the first")
    parser.add_argument("--rounds", type=int, default=30,
                        help="rounds of (c), (d): a round of resnet18 takes ~2 s, of resnet50 ~4 s, and (d) is"
                             " a difference of timings, one step's noise (~20%%) against a save's few ms")
    parser.add_argument("--resume-rounds", type=int, default=9, help="rounds of (e): two whole processes each")
    parser.add_argument("--steps", type=int, default=2,
                        help="training steps around each async save, at least (more if the write lasts longer);"
                             " (d) is a difference of two timings, and its noise grows with their length")
    parser.add_argument("--figures", default="cdefg",
                        help="which figures (letters), e.g. cd where device time is short")
    parser.add_argument("--json", help="also write every figure to this file")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    torch.set_num_threads(1)
    print(describe_machine())
    if set("cd") & set(args.figures):
        for model in args.model:
            with tempfile.TemporaryDirectory() as tmp:
                bench_saves(Path(tmp), model, args.rounds, args.steps)
    if "e" in args.figures:
        with tempfile.TemporaryDirectory() as tmp:
            bench_resume(Path(tmp), args.model[0], args.resume_rounds)
    if "f" in args.figures:
        bench_reads()
    if "g" in args.figures:
        bench_agreement()
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
    write_figures(args.json)


if __name__ == "__main__":
    main()
