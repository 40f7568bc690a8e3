"""The worst case over attacks (per seed, then over seeds and checkpoints) and the ``strong`` preset's expansion."""
from __future__ import annotations

import numpy as np
import pytest

from fgmf_marl.attacks.registry import expand_presets, make_attack
from fgmf_marl.config import ConfigError
from fgmf_marl.teams.cells import Cell, worst_across_checkpoints, worst_rows
from fgmf_marl.teams.report import worst_markdown
from fgmf_marl.stats import bootstrap_ci

STRONG = ["pgd:steps=20,restarts=5", "pgd:targeted=true,target_action=least_likely,steps=20", "mad", "critic", "square"]


def _cell(ckpt: str, attack: str, eps: float, seed: int, norm: list[float] | None, team: list[float]) -> Cell:
    n = len(team)
    return Cell(ckpt, attack, eps, seed, np.array(team), None if norm is None else np.array(norm), np.full(n, 10),
                0.0, 10 * n, np.zeros(n))


def _grid(ckpt: str, table: dict[str, dict[int, list[float]]], eps: float = 4.0) -> list[Cell]:
    cells = [_cell(ckpt, "none", 0.0, s, [0.0, 0.0], [0.0, 0.0]) for s in (0, 1, 2)]   # clean: never the minimum
    return cells + [_cell(ckpt, a, eps, s, v, [10 * x for x in v]) for a, by_seed in table.items()
                    for s, v in by_seed.items()]


# per seed, mean normalised return of each attack: pgd 0.5/0.3/0.6, mad 0.4/0.5/0.2 -> minima 0.4 (mad), 0.3 (pgd), 0.2 (mad)
TABLE = {"pgd": {0: [0.4, 0.6], 1: [0.3, 0.3], 2: [0.6, 0.6]}, "mad": {0: [0.4, 0.4], 1: [0.5, 0.5], 2: [0.1, 0.3]}}


def test_worst_is_the_per_seed_minimum_then_mean_and_std_over_seeds():
    (row,) = worst_rows(_grid("a", TABLE))
    assert row["attack"] == "worst" and row["eps255"] == 4.0 and row["metric"] == "normalised"
    assert row["normalised_mean"] == pytest.approx(0.3)
    assert row["normalised_std"] == pytest.approx(np.std([0.4, 0.3, 0.2]))
    assert row["seeds"] == 3 and row["episodes"] == 6
    assert [(m["seed"], m["attack"]) for m in row["per_seed"]] == [(0, "mad"), (1, "pgd"), (2, "mad")]
    assert [m["value"] for m in row["per_seed"]] == pytest.approx([0.4, 0.3, 0.2])
    text = worst_markdown([row], [])
    assert ("| a | worst | 4 | 0.300 ± 0.082 | 0.300 [" in text
            and "| 3 | 6 | seed 0: mad 0.400; seed 1: pgd 0.300; seed 2: mad 0.200 | pgd 3; mad 3 |" in text)
    assert "across checkpoints" not in text
    # per episode (paired by env seed): s0 min(0.4,0.4), min(0.6,0.4); s1 0.3, 0.3; s2 min(0.6,0.1), min(0.6,0.3)
    assert row["episode_worst_values"] == pytest.approx([0.4, 0.4, 0.3, 0.3, 0.1, 0.3])
    assert row["episode_values"] == pytest.approx([0.4, 0.4, 0.3, 0.3, 0.1, 0.3])
    assert row["episode_worst_attacks"] == {"pgd": 3, "mad": 3}


def test_the_per_episode_worst_case_is_stricter_than_the_weakest_attacks_mean():
    """Two attacks that each fail on a different episode: each mean is 0.5, yet no episode survives both."""
    cells = [_cell("a", "pgd", 4.0, 0, [0.0, 1.0], [0.0, 10.0]), _cell("a", "mad", 4.0, 0, [1.0, 0.0], [10.0, 0.0])]
    (row,) = worst_rows(cells)
    assert row["normalised_mean"] == 0.5
    assert row["episode_worst_mean"] == 0.0 and row["episode_worst_values"] == [0.0, 0.0]
    assert row["episode_worst_ci95"] == (0.0, 0.0)
    assert row["episode_worst_attacks"] == {"pgd": 1, "mad": 1}


def test_worst_uses_the_team_return_where_the_env_has_no_oracle():
    cells = [_cell("a", "pgd", 8.0, 0, None, [3.0, 5.0]), _cell("a", "mad", 8.0, 0, None, [2.0, 2.0])]
    (row,) = worst_rows(cells)
    assert row["metric"] == "team_return" and row["team_return_mean"] == 2.0 and row["team_return_std"] == 0.0
    assert "worst team return" in worst_markdown([row], [])


def test_worst_across_checkpoints_is_mean_and_std_of_each_checkpoints_worst():
    other = {"pgd": {s: [0.7, 0.7] for s in (0, 1, 2)}, "mad": {s: [0.5, 0.5] for s in (0, 1, 2)}}
    worst = worst_rows(_grid("a", TABLE) + _grid("b", other) + _grid("a", TABLE, eps=8.0))
    assert [(r["checkpoint"], r["eps255"]) for r in worst] == [("a", 4.0), ("b", 4.0), ("a", 8.0)]
    across = worst_across_checkpoints(worst)
    assert [r["eps255"] for r in across] == [4.0, 8.0]
    four = across[0]
    assert four["checkpoints"] == 2 and four["normalised_mean"] == pytest.approx(0.4)
    assert four["normalised_std"] == pytest.approx(0.1) and four["per_checkpoint"] == pytest.approx({"a": 0.3, "b": 0.5})
    assert "| 4 | 0.400 ± 0.100 | 2 | a: 0.300; b: 0.500 |" in worst_markdown(worst, across)


def test_strong_preset_expands_to_the_issue_list():
    assert expand_presets(["strong"]) == STRONG


def test_strong_preset_adds_transfer_bpda_eot_adversary_only_when_they_apply():
    full = expand_presets(["strong"], surrogate="runs/vanilla", adversary="runs/adv", gated=True, random_forward=True)
    assert full == [*STRONG, "transfer:surrogate=runs/vanilla", "bpda:steps=20", "eot:steps=20", "adversary:path=runs/adv"]
    assert expand_presets(["strong"], gated=True) == [*STRONG, "bpda:steps=20"]
    assert expand_presets(["strong"], surrogate="s.zip") == [*STRONG, "transfer:surrogate=s.zip"]


def test_budgeted_preset_is_the_directors_choice_set_plus_what_applies():
    ll = "pgd:targeted=true,target_action=least_likely,steps=10"
    assert expand_presets(["budgeted"]) == ["pgd:steps=10", ll]
    assert expand_presets(["budgeted:steps=3"], adversary="runs/adv", gated=True, surrogate="runs/s") == \
        ["pgd:steps=3", ll.replace("10", "3"), "bpda:steps=3", "adversary:path=runs/adv"]


def test_strong_preset_options_and_composition():
    cheap = expand_presets(["fgsm", "strong:steps=2,restarts=1", "mad"], gated=True)
    assert cheap == ["fgsm", "pgd:steps=2,restarts=1", "pgd:targeted=true,target_action=least_likely,steps=2", "mad",
                     "critic", "square", "bpda:steps=2"]                   # the second mad is a duplicate: dropped
    with pytest.raises(ConfigError, match="preset 'strong' has no option 'stepz'; accepted: steps, restarts"):
        expand_presets(["strong:stepz=2"])
    with pytest.raises(ConfigError, match="steps=0 must be an integer >= 1"):
        expand_presets(["strong:steps=0"])


def test_target_action_is_checked_against_the_victims_actions():
    with pytest.raises(ConfigError, match=r"attack 'pgd': target_action=99 is out of range; accepted: 0\.\.4 or least_likely"):
        make_attack("pgd", 0.1, n_actions=5, targeted=True, target_action=99)
    with pytest.raises(ConfigError, match="target_action=-1 is out of range"):
        make_attack("square", 0.1, n_actions=5, targeted=True, target_action=-1)
    assert make_attack("pgd", 0.1, n_actions=5, targeted=True, target_action=4).target_action == 4
    assert make_attack("pgd", 0.1, n_actions=5, targeted=True, target_action="least_likely").targeted


def test_bootstrap_interval_lies_within_the_data_and_around_the_mean():
    values = np.array([0.9, 1.0, 1.0, 0.95])       # 4 episodes near the top: mean + std would pass 1.0
    low, high = bootstrap_ci(values)
    assert values.min() <= low <= values.mean() <= high <= values.max()
    assert values.mean() + values.std() > 1.0 and high <= 1.0      # the std band leaves the range, this does not
    assert bootstrap_ci(np.array([0.3])) == (0.3, 0.3)
    wide = bootstrap_ci(np.random.default_rng(0).normal(0, 1, 400))
    assert wide[0] < 0 < wide[1] and wide[1] - wide[0] == pytest.approx(2 * 1.96 / 20, rel=0.2)
