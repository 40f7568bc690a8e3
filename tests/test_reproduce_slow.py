"""Slow checks of scripts/reproduce.py: the whole tiny experiment killed and rerun, and every README
experiment at toy budgets (``--quick``) within 20 minutes on 2 cores, labelled as toy."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from fgmf_marl.experiments import tables
from fgmf_marl.jobs import reproduce
from test_reproduce import ROOT, TINY, _args, _numbers, kill_and_rerun

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def test_the_whole_tiny_experiment_killed_and_rerun_equals_a_clean_run(tmp_path: Path) -> None:
    assert reproduce.entry(_args(tmp_path / "clean")) == 0
    kill_and_rerun(TINY, tmp_path / "killed")
    assert _numbers(tmp_path / "killed" / "root") == _numbers(tmp_path / "clean" / "root")


@pytest.mark.parametrize("name", ["default_job", "defense_table", "robust_team", "fgmf_ablation", "budget_adversary",
                                  "explanations", "pistonball"])
def test_quick_runs_each_experiment_within_20_minutes_labelled_as_toy(tmp_path: Path, name: str) -> None:
    start = time.perf_counter()
    args = _args(tmp_path, ROOT / "experiments" / f"{name}.yaml")
    assert reproduce.entry([*args, "--quick"]) == 0
    assert time.perf_counter() - start < 20 * 60
    text = (tmp_path / "RESULTS.md").read_text()
    assert f"<!-- reproduce:begin {name}-quick -->" in text and text.count(tables.QUICK_LABEL) >= 3
    assert "missing" not in text
