"""The package installed without the checkout: a non-editable install into a folder of its own,
used from a directory outside the checkout, trains and evaluates; one version string."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from conftest import REPO

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def install_elsewhere(tmp_path):
    """pip install (not -e) of a copy of the sources, so the build leaves the checkout untouched."""
    source, target = tmp_path / "source", tmp_path / "site"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "dist_train", source / "dist_train", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(source)], check=True, timeout=300)
    shutil.rmtree(source)  # nothing may come from the sources from here on
    return target


def run_in(cwd, target, *command):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE")}
    return subprocess.run(command, cwd=cwd, env=env | {"PYTHONPATH": str(target)}, capture_output=True, text=True,
                          timeout=300)


def test_a_non_editable_install_trains_and_evaluates_outside_the_checkout(tmp_path):
    target = install_elsewhere(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run_in(elsewhere, target, sys.executable, "-c",
                   "import dist_train.train as t; print(t.__file__)")
    assert where.stdout.strip() == str(target / "dist_train" / "train.py"), where.stderr
    version = run_in(elsewhere, target, str(target / "bin" / "dist-train"), "--version")
    assert version.stdout == f"dist_train {VERSION}\n", version.stderr

    flags = ["--dataset", "fake", "--fake-size", "32", "--batch-size", "16", "--epochs", "1", "--num-workers", "0",
             "--run-dir", "run"]
    trained = run_in(elsewhere, target, str(target / "bin" / "dist-train"), "train", *flags)
    assert trained.returncode == 0 and "training complete: 1 epochs, 2 steps" in trained.stderr, trained.stderr
    evaluated = run_in(elsewhere, target, sys.executable, "-m", "dist_train", "evaluate", "run")
    assert evaluated.returncode == 0 and "step_000000002.pt: test loss" in evaluated.stdout, evaluated.stderr


def test_the_version_of_an_uninstalled_checkout(tmp_path):
    code = ("from importlib import metadata\n"
            "def not_installed(name):\n    raise metadata.PackageNotFoundError(name)\n"
            "metadata.version = not_installed\n"
            "import dist_train\nprint(dist_train.__version__)\n")
    result = run_in(tmp_path, REPO, sys.executable, "-c", code)
    assert result.stdout == "0+unknown\n", result.stderr
