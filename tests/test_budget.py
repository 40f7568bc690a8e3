"""Attack budgets: no attacker exceeds its budget (property test, measured by the episode loop), the
heuristics choose whom and when as documented, and evaluate.py's budget grid end to end."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fgmf_marl.agents.policy_view import PolicyView
from fgmf_marl.attacks import FGSM, PGD
from fgmf_marl.attacks.budget import (SELECTORS, Budget, BudgetedAttack, FixedSelector, RandomSelector,
                                      TimedSelector, ValueSelector, make_selector, step_scores)
from fgmf_marl.envs.batched import CoverageVecEnv
from fgmf_marl.envs.native import CoverageConfig
from fgmf_marl.jobs.evaluate import entry as eval_cli
from fgmf_marl.jobs.train import entry as train_cli
from fgmf_marl.rollout import rollout
from fgmf_marl.teams.report import _budget_axes, _budget_key
from helpers import coverage_view

CFG = CoverageConfig(max_steps=8)
N_AGENTS = 3
EPS = 8 / 255

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def victim() -> PolicyView:
    return coverage_view(CFG)


def _budgeted(selector: str, k: int | None, p: float | None, **kw) -> BudgetedAttack:
    return BudgetedAttack(FGSM(EPS), make_selector(selector), Budget(k, p), n_agents=N_AGENTS, horizon=CFG.max_steps, **kw)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(selector=st.sampled_from(sorted(SELECTORS)), k=st.one_of(st.none(), st.integers(0, N_AGENTS)),
       p=st.one_of(st.none(), st.sampled_from([0.0, 0.125, 0.25, 0.5, 1.0])), seed=st.integers(0, 3))
def test_no_budgeted_attack_exceeds_its_budget_as_the_episode_loop_measures_it(victim, selector, k, p, seed) -> None:
    attack = _budgeted(selector, k, p, seed=seed)
    if attack.needs_calibration:
        venv = CoverageVecEnv(CFG, n_envs=2, seed=100 + seed)
        batches: list[torch.Tensor] = []
        rollout(victim, venv, 2, step_hook=lambda r: batches.append(r.clean_obs))
        attack = attack.calibrated(victim, batches)
    venv = CoverageVecEnv(CFG, n_envs=2, seed=seed)
    result = rollout(victim, venv, 4, perturb=attack.as_perturb(victim, n_agents=N_AGENTS))
    allowed_steps = Budget(k, p).step_count(CFG.max_steps)
    assert (result.episode_attacked_steps <= allowed_steps).all()
    assert (result.episode_max_attacked_agents <= (N_AGENTS if k is None else k)).all()
    assert (result.episode_attacked_agent_steps <= result.episode_attacked_steps * (N_AGENTS if k is None else k)).all()


def test_an_unlimited_budget_is_the_attack_itself(victim) -> None:
    obs = torch.rand(2 * N_AGENTS, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    for selector in SELECTORS:
        assert torch.equal(_budgeted(selector, None, None).perturb(victim, obs), FGSM(EPS).perturb(victim, obs))


def test_fixed_attacks_agents_0_to_k_minus_1_and_timed_the_largest_preference_gaps(victim) -> None:
    obs = torch.rand(4 * N_AGENTS, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    changed = (_budgeted("fixed", 2, None).perturb(victim, obs) != obs).flatten(1).any(1).reshape(4, N_AGENTS)
    assert changed[:, :2].all() and not changed[:, 2].any()
    with torch.no_grad():
        probs = torch.softmax(victim(obs), -1)
    gap = (probs.amax(-1) - probs.amin(-1)).reshape(4, N_AGENTS)
    changed = (_budgeted("timed", 1, None).perturb(victim, obs) != obs).flatten(1).any(1).reshape(4, N_AGENTS)
    assert torch.equal(changed.float().argmax(1), gap.argmax(1)) and (changed.sum(1) == 1).all()
    # fixed:agent=J starts the set at agent J, wrapping around: J = 2, k = 2 attacks agents 2 and 0
    changed = (_budgeted("fixed:agent=2", 2, None).perturb(victim, obs) != obs).flatten(1).any(1).reshape(4, N_AGENTS)
    assert changed[:, [0, 2]].all() and not changed[:, 1].any()
    changed = (_budgeted("fixed:agent=1", 1, None).perturb(victim, obs) != obs).flatten(1).any(1).reshape(4, N_AGENTS)
    assert changed[:, 1].all() and changed.sum() == 4
    with pytest.raises(ValueError, match="fixed:agent=3 but the env has 3 agents"):
        _budgeted("fixed:agent=3", 1, None).perturb(victim, obs)


def test_value_picks_the_largest_value_drop_and_reuses_that_perturbation(victim) -> None:
    obs = torch.rand(4 * N_AGENTS, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    pgd = PGD(EPS, steps=2)
    torch.manual_seed(0)   # PGD's random start
    full = pgd.perturb(victim, obs)
    with torch.no_grad():
        drop = (victim.value(obs) - victim.value(full)).reshape(4, N_AGENTS)
    attack = BudgetedAttack(pgd, ValueSelector(), Budget(1, None), n_agents=N_AGENTS, horizon=8)
    torch.manual_seed(0)
    seen = attack.perturb(victim, obs)
    changed = (seen != obs).flatten(1).any(1).reshape(4, N_AGENTS)
    assert torch.equal(changed.float().argmax(1), drop.argmax(1))
    rows = changed.reshape(-1)
    assert torch.equal(seen[rows], full[rows])   # the chosen rows keep the perturbation the drop was measured on


def test_calibrated_timing_spends_about_its_budget_on_the_steps_with_the_largest_scores(victim) -> None:
    venv = CoverageVecEnv(CFG, n_envs=4, seed=7)
    batches: list[torch.Tensor] = []
    rollout(victim, venv, 8, step_hook=lambda r: batches.append(r.clean_obs))
    attack = _budgeted("timed", 1, 0.25).calibrated(victim, batches)
    scores = np.concatenate([step_scores(attack, victim, b) for b in batches])
    assert attack.threshold == pytest.approx(np.quantile(scores, 0.75))
    assert (scores >= attack.threshold).mean() == pytest.approx(0.25, abs=0.05)
    result = rollout(victim, CoverageVecEnv(CFG, n_envs=4, seed=7), 8, perturb=attack.as_perturb(victim, n_agents=3))
    assert (result.episode_attacked_steps == 2).all()    # floor(0.25 x 8): pacing spends what the threshold left


def test_random_timing_needs_no_calibration_and_attacks_a_share_p_of_steps(victim) -> None:
    attack = _budgeted("random", None, 0.5)
    assert not attack.needs_calibration and attack.threshold == 0.5
    many = BudgetedAttack(FGSM(EPS), RandomSelector(), Budget(None, 0.5), n_agents=N_AGENTS, horizon=10_000)
    perturb = many.as_perturb(victim, n_agents=N_AGENTS)
    obs = torch.rand(8 * N_AGENTS, 3, 48, 48, generator=torch.Generator().manual_seed(3))
    attacked = [float((perturb(obs) != obs).flatten(1).any(1).float().mean()) for _ in range(25)]
    assert np.mean(attacked) == pytest.approx(0.5, abs=0.1)


def test_budgets_and_selectors_reject_bad_values() -> None:
    with pytest.raises(ValueError, match="budget steps=1.5 must be a fraction"):
        Budget(None, 1.5)
    with pytest.raises(ValueError, match="budget agents=-1 must be an integer >= 0"):
        Budget(-1)
    with pytest.raises(ValueError, match="unknown budget selector 'best'; accepted: random, fixed, timed, value"):
        make_selector("best")
    assert Budget(1, 0.25).label() == "k=1,p=0.25" and Budget().label() == "all" and Budget(2).label() == "k=2"
    assert Budget(None, 0.25).step_count(40) == 10 and Budget(None, 0.1).step_count(40) == 4
    assert isinstance(make_selector("fixed"), FixedSelector) and isinstance(make_selector("timed"), TimedSelector)
    assert make_selector("fixed:agent=2").agent == 2 and make_selector("fixed").agent == 0
    for bad in ("fixed:agent=x", "fixed:first=1", "timed:agent=1"):
        with pytest.raises(ValueError, match="the only option is fixed:agent=J"):
            make_selector(bad)


# ------------------------------------------------------------------ evaluate.py
FAST_TRAIN = ["env.n_envs=2", "ppo.n_steps=32", "ppo.batch_size=64", "ppo.n_epochs=1", "eval_episodes=2",
              "checkpoint_every=10000", "env.native.max_steps=8"]


def test_evaluate_budget_grid_reports_spending_worst_per_budget_and_a_heatmap(tmp_path: Path) -> None:
    run = tmp_path / "victim"
    assert train_cli(["--timesteps", "128", "--run-dir", str(run), "--no-progress", *FAST_TRAIN]) == 0
    out = tmp_path / "eval"
    assert eval_cli([str(run), "--out", str(out), "--episodes", "2", "--n-envs", "2", "--no-progress",
                     "--attacks", "fgsm", "--eps", "8", "--budget-agents", "1,3", "--budget-steps", "0.25,1",
                     "--budget-selectors", "random,timed"]) == 0
    data = json.loads((out / "results.json").read_text())
    budgeted = [r for r in data["rows"] if r["selector"]]
    assert {r["attack"] for r in budgeted} == {f"fgsm@{s}[k={k},p={p}]" for s in ("random", "timed")
                                               for k in (1, 3) for p in ("0.25", "1")}
    for r in budgeted:
        k, p = (float(x.split("=")[1]) for x in r["budget"].split(","))
        assert r["attacked_agents_max"] <= k and r["attacked_steps_max"] <= int(p * 8)
    assert {w["budget"] for w in data["worst"]} == {"all", "k=1,p=0.25", "k=1,p=1", "k=3,p=0.25", "k=3,p=1"}
    text = (out / "results.md").read_text()
    assert "## Budgeted attackers" in text and "**" in text
    assert (out / "budget_victim_eps8.png").stat().st_size > 1000
    # a fixed agent the team does not have is refused before anything runs
    assert eval_cli([str(run), "--out", str(tmp_path / "bad"), "--attacks", "fgsm", "--budget-agents", "1",
                     "--budget-selectors", "fixed:agent=3", "--no-progress"]) == 2
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--budget-steps", "1.5", "budget_steps value 1.5 is out of range; accepted: fractions in [0, 1]"),
    ("--budget-agents", "x", "budget agents 'x' is not a comma-separated list of integers"),
    ("--budget-selectors", "best", "unknown budget selector 'best'; accepted: random, fixed, timed, value"),
    ("--budget-selectors", "fixed:agent=-1", "budget selector 'fixed:agent=-1': the only option is fixed:agent=J"),
])
def test_bad_budget_flags_are_one_line_errors_before_anything_runs(tmp_path: Path, capsys, flag, value, message) -> None:
    assert eval_cli([str(tmp_path / "missing"), "--out", str(tmp_path / "o"), flag, value, "--budget-agents", "1"]
                    if flag != "--budget-agents" else [str(tmp_path / "missing"), flag, value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "o").exists()


def test_heatmap_axes_read_every_budget_label_back() -> None:
    """Every (k, p) cell of the heatmap finds its row, p = 1 and a missing k or p included."""
    assert _budget_key("k=1,p=1") == ("1", "1") and _budget_key("k=2") == ("2", "1")
    assert _budget_key("p=0.25") == ("all", "0.25") and _budget_key("all") == ("all", "1")
    rows = [{"selector": "timed", "budget": b} for b in ("k=1,p=0.25", "k=1,p=1", "p=0.5", "k=3")]
    assert _budget_axes(rows) == (["1", "3", "all"], ["0.25", "0.5", "1"])
