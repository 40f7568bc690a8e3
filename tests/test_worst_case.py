"""The worst case over attacks (per seed, then over seeds and checkpoints) and the ``strong`` preset's expansion."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fgmf_marl.attacks.registry import expand_presets, make_attack
from fgmf_marl.config import ConfigError
from fgmf_marl.stats import bootstrap_ci
from fgmf_marl.teams.cells import (Cell, cell_from_record, cell_record, profile_rows, summarise, worst_across_checkpoints,
                                   worst_rows)
from fgmf_marl.teams.eval_config import EvalConfig
from fgmf_marl.teams.grid import build_attacks, cell_folder, grid_cells
from fgmf_marl.teams.report import episodes_csv, profile_markdown, results_markdown, worst_markdown

STRONG = ["pgd:steps=20,restarts=5", "pgd:targeted=true,target_action=least_likely,steps=20", "mad", "critic", "square"]


def _cell(ckpt: str, attack: str, eps: float | None, seed: int, norm: list[float] | None, team: list[float]) -> Cell:
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


# per seed, the normalised returns of two episodes: an L-inf and an L2 attack at eps 4 and 8 (their means in comments)
EPS_GRID = {("pgd", 4.0): {0: [0.4, 0.6], 1: [0.2, 0.4]},        # 0.5, 0.3
            ("pgd_l2", 4.0): {0: [0.6, 0.2], 1: [0.5, 0.5]},     # 0.4, 0.5
            ("pgd", 8.0): {0: [0.1, 0.3], 1: [0.0, 0.2]},        # 0.2, 0.1
            ("pgd_l2", 8.0): {0: [0.2, 0.0], 1: [0.3, 0.3]}}     # 0.1, 0.3


def _eps_grid(extra: dict[tuple[str, float | None], dict[int, list[float]]] | None = None) -> list[Cell]:
    """EPS_GRID's cells (and ``extra``'s) in run order: per seed the clean cell, then each (attack, eps)."""
    table = {**EPS_GRID, **(extra or {})}
    return [c for s in (0, 1) for c in [_cell("a", "none", 0.0, s, [0.9, 0.9], [9.0, 9.0])]
            + [_cell("a", attack, eps, s, v[s], [10 * x for x in v[s]]) for (attack, eps), v in table.items()]]


def _table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| a |")]


def test_a_grid_of_eps_using_attacks_keeps_its_tables_byte_for_byte():
    """The worst-case and profile tables of an eps-using grid, line by line from the closed form: per eps the
    per-seed minimum of the means, then mean ± std over seeds; per episode the minimum over attacks."""
    cells = _eps_grid()
    worst, profile = worst_rows(cells), profile_rows(cells)

    def ci(values: list[float]) -> str:
        low, high = bootstrap_ci(np.array(values))
        return f"[{low:.3f}, {high:.3f}]"

    # eps 4: minima pgd_l2 0.4 (seed 0), pgd 0.3 (seed 1); per episode min: 0.4 pgd, 0.2 pgd_l2 | 0.2 pgd, 0.4 pgd
    # eps 8: minima pgd_l2 0.1, pgd 0.1; per episode: 0.1 pgd, 0.0 pgd_l2 | 0.0 pgd, 0.2 pgd
    assert _table_lines(worst_markdown(worst, [])) == [
        (f"| a | worst | 4 | 0.350 ± 0.050 | 0.300 {ci([0.4, 0.2, 0.2, 0.4])} | 2 | 4 "
         "| seed 0: pgd_l2 0.400; seed 1: pgd 0.300 | pgd 3; pgd_l2 1 |"),
        (f"| a | worst | 8 | 0.100 ± 0.000 | 0.075 {ci([0.1, 0.0, 0.0, 0.2])} | 2 | 4 "
         "| seed 0: pgd_l2 0.100; seed 1: pgd 0.100 | pgd 3; pgd_l2 1 |")]
    assert _table_lines(profile_markdown(profile)) == [
        f"| a | 4 | L-inf | 0.400 | 0.400 {ci([0.4, 0.6, 0.2, 0.4])} | 1 |",
        f"| a | 4 | L2 | 0.450 | 0.450 {ci([0.6, 0.2, 0.5, 0.5])} | 1 |",
        f"| a | 4 | **worst over all** | 0.350 | 0.300 {ci([0.4, 0.2, 0.2, 0.4])} | 2 |",
        f"| a | 8 | L-inf | 0.150 | 0.150 {ci([0.1, 0.3, 0.0, 0.2])} | 1 |",
        f"| a | 8 | L2 | 0.200 | 0.200 {ci([0.2, 0.0, 0.3, 0.3])} | 1 |",
        f"| a | 8 | **worst over all** | 0.100 | 0.075 {ci([0.1, 0.0, 0.0, 0.2])} | 2 |"]
    assert "own budget" not in worst_markdown(worst, []) + profile_markdown(profile)
    assert [r["eps255"] for r in summarise(cells)] == [0.0, 4.0, 4.0, 8.0, 8.0]


def test_an_eps_free_attack_stands_once_and_is_the_worst_at_every_eps():
    """A blackout fault (eps None), the most damaging attack: one row of its own and one profile row, and the weakest
    attack of the worst case at both eps, as it was when it was recomputed at each eps."""
    blackout = "fault[kind=blackout]"
    values = {0: [-0.1, -0.3], 1: [-0.05, -0.25]}                      # means -0.2, -0.15: below every other episode
    cells = _eps_grid({(blackout, None): values})
    rows = summarise(cells)
    assert [(r["eps255"], r["episodes"]) for r in rows if r["attack"] == blackout] == [(None, 4)]
    assert sum(f"| a | {blackout} | own budget |" in line for line in results_markdown(rows, EvalConfig(
        checkpoints=["a"], eps=[4.0, 8.0])).splitlines()) == 1
    worst = worst_rows(cells)
    assert [r["eps255"] for r in worst] == [4.0, 8.0]
    for r in worst:
        assert [m["attack"] for m in r["per_seed"]] == [blackout, blackout]
        assert r["normalised_mean"] == pytest.approx(-0.175) and r["normalised_std"] == pytest.approx(0.025)
        assert r["episode_worst_attacks"] == {blackout: 4}
    repeated = _eps_grid({(blackout, 4.0): values, (blackout, 8.0): values})     # the fault recomputed at each eps
    assert worst == worst_rows(repeated)
    profile = profile_rows(cells)
    assert [(r["threat_model"], r["eps255"]) for r in profile] == [
        ("faults", None), ("L-inf", 4.0), ("L2", 4.0), ("all", 4.0), ("L-inf", 8.0), ("L2", 8.0), ("all", 8.0)]
    for r in (r for r in profile if r["threat_model"] == "all"):
        assert r["weakest"] == [blackout, blackout] and blackout in r["attacks"]
        assert r["episode_worst_values"] == pytest.approx([-0.1, -0.3, -0.05, -0.25])
    text = profile_markdown(profile)
    assert sum("| own budget | faults |" in line for line in text.splitlines()) == 1
    assert "enters the worst over all at every eps" in text
    csv_rows = [line.split(",") for line in episodes_csv(cells).splitlines()]
    assert csv_rows[0][2] == "eps255" and csv_rows[0][-1] == "eps_free"
    assert {(r[2], r[-1]) for r in csv_rows[1:] if r[1] == blackout} == {("", "1")}
    assert {r[-1] for r in csv_rows[1:] if r[1] != blackout} == {"0"}


def test_a_grid_of_eps_free_attacks_only_has_its_worst_case_once():
    cells = [c for c in _eps_grid({("corruption[kind=jpeg]", None): {0: [0.3, 0.5], 1: [0.2, 0.2]},
                                   ("fault[kind=frozen]", None): {0: [0.6, 0.1], 1: [0.4, 0.4]}})
             if c.attack == "none" or c.eps is None]
    (row,) = worst_rows(cells)
    assert row["eps255"] is None and row["normalised_mean"] == pytest.approx(0.275)  # min(0.4, 0.35), min(0.2, 0.4)
    assert "| a | worst | own budget |" in worst_markdown([row], worst_across_checkpoints([row]))
    assert [(r["threat_model"], r["eps255"]) for r in profile_rows(cells)] == [
        ("corruptions", None), ("faults", None), ("all", None)]


def test_grid_cells_run_an_eps_free_attacker_once_per_seed_in_its_place():
    cfg = EvalConfig(checkpoints=["x"], attacks=["pgd:steps=2", "fault:kind=blackout", "mad", "pgd_l2:radius=1"],
                     eps=[4.0, 8.0], seeds=[0, 1])
    grid = {e: build_attacks(cfg, e) for e in cfg.eps}
    cells = [(s, "none" if g is None else g.label, e) for s, g, e in grid_cells(cfg.seeds, grid)]
    per_seed = [("none", 0.0), ("pgd[steps=2]", 4.0), ("fault[kind=blackout]", None), ("mad", 4.0),
                ("pgd_l2[radius=1]", None), ("pgd[steps=2]", 8.0), ("mad", 8.0)]
    assert cells == [(s, label, e) for s in (0, 1) for label, e in per_seed]
    assert cell_folder("a", "fault[kind=blackout]", None, 1) == "a__fault-kind-blackout__eps-free__s1"


def test_a_saved_cell_reads_back_equal_and_anything_else_is_refused() -> None:
    """What ``evaluate.py --resume`` reads: the cell JSON round-trips every field exactly (dtypes, NaN, None), and a
    file that is not one (unknown or missing fields, arrays of other dtypes or non-numbers) is a ValueError."""
    cell = Cell("victim", "pgd[steps=20]", None, 3, np.array([0.1, 1 / 3]), np.array([0.25, np.nan], dtype=np.float32),
                np.array([40, 17]), float("nan"), 114, np.array([0.2, 0.0]), budget="k=1", selector="timed",
                attacked_steps=np.array([5, 7], dtype=np.int32), max_attacked_agents=np.array([1, 1]))
    back = cell_from_record(json.loads(json.dumps(cell_record(cell))))
    for name, value in vars(cell).items():
        theirs = getattr(back, name)
        if isinstance(value, np.ndarray):
            assert theirs.dtype == value.dtype and np.array_equal(theirs, value, equal_nan=True), name
        else:
            assert theirs == value or (value != value and theirs != theirs), name
    good = cell_record(cell)
    for bad in ([1, 2], {**good, "command": "rm -rf /"}, {k: v for k, v in good.items() if k != "seed"},
                {**good, "lengths": {"dtype": "object", "values": [1]}},
                {**good, "lengths": {"dtype": "int64", "values": ["__import__('os')"]}},
                {**good, "team_returns": [0.1, 0.2]}):
        with pytest.raises(ValueError):
            cell_from_record(bad)
