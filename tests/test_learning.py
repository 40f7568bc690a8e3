"""Learnability regression (slow): the default job must keep learning on the native env.

Guards the env and PPO defaults that made the coverage task learnable from pixels (egocentric
view, potential-based shaping, per-agent credit, short horizons, a value coefficient that leaves
the shared CNN to the policy): before them the normalised return stayed at ~0.0 after 100k
agent-steps. 200k agent-steps of the defaults (seed 0) must clear 0.4, well below what such runs
score and well above what SB3's ``vf_coef=0.5`` scored (docs/experiments/ppo-defaults.md, "PPO
defaults and the default job").
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from fgmf_marl.jobs.train import entry as cli
from fgmf_marl.runs import RunDir


@pytest.mark.slow
def test_default_job_learns_within_200k_agent_steps(tmp_path: Path) -> None:
    root = tmp_path / "run"
    assert cli(["--timesteps", "200000", "--run-dir", str(root), "--no-progress"]) == 0
    summary = json.loads((RunDir(root).eval / "summary.json").read_text())
    assert summary["normalised_mean"] > 0.4, summary
