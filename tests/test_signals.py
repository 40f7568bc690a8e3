"""A run stopped before its first checkpoint: SIGTERM cleans up as Ctrl-C does, kill -9's leftovers are taken over;
SIGUSR1 stops a job where --resume loses nothing."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fgmf_marl import interrupts
from fgmf_marl.jobs import evaluate, train
from fgmf_marl.runs import RunDir

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
TINY = ["env.n_envs=2", "ppo.n_steps=32", "ppo.batch_size=64", "env.native.max_steps=10", "--no-progress"]


def _start_long_run(run_dir: Path) -> subprocess.Popen:
    """``train_marl.py`` with a budget it will not finish and no checkpoint before the end."""
    argv = [sys.executable, str(REPO / "scripts" / "train_marl.py"), "--timesteps", "100000", "checkpoint_every=100000",
            "--run-dir", str(run_dir), "--threads", "1", *TINY]
    return subprocess.Popen(argv, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else proc.returncode
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def test_sigterm_removes_the_run_and_kill_9_leftovers_are_taken_over(tmp_path: Path, capsys) -> None:
    termed, killed = tmp_path / "termed", tmp_path / "killed"
    procs = {termed: _start_long_run(termed), killed: _start_long_run(killed)}   # both start up at once
    for run_dir, proc in procs.items():
        _wait_for(run_dir / "config.yaml", proc)
    time.sleep(0.5)                                        # into model building / learning
    procs[termed].send_signal(signal.SIGTERM)
    procs[killed].send_signal(signal.SIGKILL)
    assert procs[termed].wait(timeout=10) == 143
    assert procs[termed].stderr.read().strip() == "train_marl.py: terminated"
    assert not termed.exists()
    assert procs[killed].wait(timeout=10) == -signal.SIGKILL
    procs[killed].stderr.close()
    assert (killed / "config.yaml").is_file() and not RunDir(killed).has_checkpoint()

    # --resume has nothing to continue from: a one-line error saying what to do instead
    assert train.entry(["--resume", "--run-dir", str(killed), "--no-progress"]) == 2
    assert "rerun without --resume" in capsys.readouterr().err
    # a rerun takes the directory over
    assert train.entry(["--timesteps", "192", "eval_episodes=2", "--run-dir", str(killed), *TINY]) == 0
    assert RunDir(killed).final_checkpoint.is_file()

    # evaluate.py --out: what a killed evaluation leaves (its config.yaml) is taken over too
    out = tmp_path / "eval"
    out.mkdir()
    (out / "config.yaml").write_text("checkpoints: [x]\n")
    assert evaluate.entry([str(killed), "--out", str(out), "--attacks", "random", "--eps", "2", "--episodes", "1",
                           "--n-envs", "1", "--no-progress"]) == 0
    assert (out / "results.md").is_file()


def test_sigusr1_stops_a_training_at_its_next_rollout_boundary_with_a_checkpoint(tmp_path: Path) -> None:
    """SIGUSR1 loses no training: the run saves a checkpoint at the next rollout boundary (no periodic one is due
    before 100,000 steps), exits 143, and --resume continues from that checkpoint, exactly (its resume state)."""
    run_dir = tmp_path / "run"
    proc = _start_long_run(run_dir)
    _wait_for(run_dir / "config.yaml", proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=60) == 143
    err = proc.stderr.read()
    assert "stopped on request at step" in err and err.strip().endswith("train_marl.py: terminated"), err[-2000:]
    checkpoint = RunDir(run_dir).latest_checkpoint()
    steps = int(checkpoint.stem[len("step_"):])
    rollout = 32 * 2 * 3                                   # ppo.n_steps x env copies x agents
    assert steps > 0 and steps % rollout == 0 and steps < 100000
    assert RunDir.resume_state_of(checkpoint).is_file()   # the native env resumes exactly
    assert (RunDir(run_dir).root / "checkpoints" / f"{checkpoint.stem}.time.json").is_file()
    assert train.entry(["--resume", "--run-dir", str(run_dir), "--timesteps", str(steps + rollout), "eval_episodes=2",
                        "--no-progress"]) == 0
    assert RunDir(run_dir).final_checkpoint.is_file()


def test_sigusr1_stops_an_evaluation_after_the_cell_in_progress(tmp_path: Path, capsys) -> None:
    """A stop requested during an evaluation ends it once its current cell is saved (exit 143, no results yet);
    --resume runs only the cells left. The request does not outlive the job that received it."""
    run_dir = tmp_path / "run"
    assert train.entry(["--timesteps", "192", "eval_episodes=2", "--run-dir", str(run_dir), *TINY]) == 0
    out = tmp_path / "eval"
    argv = [str(run_dir), "--out", str(out), "--attacks", "random", "fgsm", "--eps", "2", "--episodes", "1",
            "--n-envs", "1", "--no-progress"]
    interrupts.request_stop()
    assert evaluate.entry(argv) == 143
    assert "stopped on request after cell" in capsys.readouterr().err
    assert len(list(RunDir(out).cells.glob("*.json"))) == 1 and not (out / "results.md").exists()
    assert not interrupts.stop_requested()
    assert evaluate.entry(["--out", str(out), "--resume", "--no-progress"]) == 0
    text = (out / "results.md").read_text()
    assert "| random |" in text and "| fgsm |" in text
