"""The wheel, installed outside the checkout: its console commands run the jobs from site-packages.

Offline by construction: the wheel is built without build isolation (setuptools from the dev extra),
installed with ``--no-deps --no-index`` into a fresh venv whose dependencies are this environment's
site-packages (one ``.pth`` line each: plain paths, so this environment's editable install of the
checkout is *not* picked up), and every command runs from a temporary folder with no ``PYTHONPATH``.
Why: the scripts only ever ran from a checkout, where a file the package reads at run time but the
wheel lacks, or a path derived from the repository layout, goes unnoticed.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from test_reproduce import ROOT, TINY, _numbers

#: what the wheel is built from: pyproject's metadata and readme, and the packages it finds
SOURCES = ("pyproject.toml", "README.md", "fgmf_marl")
#: the console commands this test does not otherwise run: each must at least start
HELP_ONLY = ("explain", "reproduce", "adversary", "certify")
#: toy training (tests/test_train.py's FAST), with its only checkpoint the last
TINY_TRAIN = ["--timesteps", "384", "--no-progress", "env.n_envs=4", "ppo.n_steps=32", "ppo.batch_size=128",
              "ppo.n_epochs=1", "eval_episodes=2", "checkpoint_every=384"]


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the wheel built from a copy of the checkout (the checkout stays free of build/)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(work / "dist"), str(source)], check=True)
    (wheel,) = (work / "dist").glob("fgmf_marl-*.whl")
    env = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(env / "bin" / "python"), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True)
    site = _run(env, "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=work).strip()
    deps = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (Path(site) / "fgmf_test_deps.pth").write_text("".join(f"{p}\n" for p in deps), encoding="utf-8")
    return env


def _run(env: Path, command: str, *args: str, cwd: Path) -> str:
    """Run ``env/bin/command args`` in ``cwd`` with no PYTHONPATH (nor RAY_ADDRESS); its stdout, or a failure
    showing its output."""
    child_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "RAY_ADDRESS")}
    # RAY_ENABLE_...=0: fgmf-reproduce's local Ray cluster on 127.0.0.1, not on the host's routable address
    child_env.update(OMP_NUM_THREADS="1", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    proc = subprocess.run([str(env / "bin" / command), *args], cwd=cwd, env=child_env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{command} {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_installed_commands_train_evaluate_and_verify_outside_the_checkout(venv: Path, tmp_path: Path) -> None:
    imported = _run(venv, "python", "-c", "import fgmf_marl.agents, fgmf_marl.envs; "
                    "from fgmf_marl.experiments.cache import code_version; "
                    "print(fgmf_marl.agents.__file__, fgmf_marl.envs.__file__, code_version())", cwd=tmp_path).split()
    assert all(Path(f).is_relative_to(venv) for f in imported[:2]), imported
    assert imported[2] == "unknown"      # no checkout around the installed package: no git version to claim
    site = Path(imported[0]).parents[2]
    assert sorted(p.name for p in site.iterdir() if (p / "__init__.py").is_file()) == ["fgmf_marl"]  # no generic top-level names
    for command in HELP_ONLY:
        assert _run(venv, f"fgmf-{command}", "--help", cwd=tmp_path).startswith(f"usage: fgmf-{command} ")
    _run(venv, "fgmf-train", *TINY_TRAIN, "--run-dir", "run", cwd=tmp_path)
    assert json.loads((tmp_path / "run" / "eval" / "summary.json").read_text())["episodes"] == 2
    _run(venv, "fgmf-evaluate", "run", "--attacks", "pgd:steps=2", "--eps", "2", "--episodes", "2", "--n-envs", "2",
         "--log-explanations", "logs", "--log-every", "10", "--out", "out", "--no-progress", cwd=tmp_path)
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert {r["attack"] for r in rows} == {"none", "pgd[steps=2]"}
    assert "2 of 2 logs OK" in _run(venv, "fgmf-replay", "verify", "logs", cwd=tmp_path)


@pytest.mark.slow
def test_installed_reproduce_runs_its_tasks_from_site_packages(venv: Path, tmp_path: Path) -> None:
    """The tasks' subprocesses import the installed package: the tiny experiment completes, versioned 'unknown'."""
    shutil.copy2(TINY, tmp_path / TINY.name)
    _run(venv, "fgmf-reproduce", TINY.name, "--results-root", "root", "--results", "RESULTS.md", "--figures", "fig",
         "--max-parallel", "2", "--no-progress", cwd=tmp_path)
    records = [json.loads(p.read_text()) for p in (tmp_path / "root" / "tasks").glob("*/task.json")]
    assert len(records) == 4 and {(r["status"], r["code_version"]) for r in records} == {("done", "unknown")}
    assert len(_numbers(tmp_path / "root")) == 4
