"""Every figure of bench/, in one run, and one table of them with the targets they are held to.

    python bench/all.py              # about 25 minutes on 2 idle CPU cores
    python bench/all.py --quick      # one round each, for a look (the ranges mean nothing then)

Runs bench/throughput.py ((a) Net and resnet18, 1 and 2 ranks; (b) loaders) and bench/saves.py
((c), (d) for resnet18 and resnet50; (e); (f); (g)) one after the other, with their own output as
they go, then prints a markdown table of every figure: median (min-max) over interleaved rounds,
each a ratio to a reference measured in the same round, and whether it meets its target. On a
machine with a GPU the same command adds the device path's samples/s and peak memory, and the
saves train on the GPU (the asynchronous snapshot then copies into page-locked shared memory).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def meets(value: float, target: str) -> str:
    if not target:
        return ""
    op, bound = target.split()
    ok = value >= float(bound) if op == ">=" else value <= float(bound)
    return "yes" if ok else "**no**"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round of everything, small sizes")
    args = parser.parse_args()
    quick = ["--rounds", "1", "--loader-rounds", "1", "--images", "2048", "--resnet18-images", "256"] if args.quick else []
    with tempfile.TemporaryDirectory() as tmp:
        runs = [("throughput", [REPO / "bench" / "throughput.py", "--resnet18", *quick]),
                ("saves", [REPO / "bench" / "saves.py", "--model", "resnet18", "resnet50",
                           *(["--rounds", "1", "--resume-rounds", "1"] if args.quick else [])])]
        results = []
        for name, command in runs:
            out = Path(tmp) / f"{name}.json"
            code = subprocess.call([sys.executable, *map(str, command), "--json", str(out)], cwd=REPO,
                                   env=dict(os.environ, PYTHONPATH=str(REPO)))
            if code != 0:
                print(f"error: bench/{name}.py failed (exit {code})")
                return 1
            results.append(json.loads(out.read_text()))
    print(f"\n{results[0]['machine']}\n")
    print("| figure | what (ratio to the reference of the same round) | median (min-max) | rounds | target | met |")
    print("|---|---|---|---|---|---|")
    for figure in (f for result in results for f in result["figures"]):
        spread = f"{figure['median']:.3f}" if figure["rounds"] == 1 else \
            f"{figure['median']:.3f} ({figure['min']:.3f}-{figure['max']:.3f})"
        print(f"| ({figure['figure']}) | {figure['what']} | {spread} | {figure['rounds']} | {figure['target']} | "
              f"{meets(figure['median'], figure['target'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
