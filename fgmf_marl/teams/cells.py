"""A grid cell's episodes and what is computed from them: per-attack rows and the worst case over attacks.

Every interval and per-episode worst case comes from :mod:`fgmf_marl.stats`, the one home of the
statistics; these rows are what results.md/.json, the plots and the experiment tables read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from fgmf_marl import stats
from fgmf_marl.stats import bootstrap_ci


@dataclass
class Cell:
    checkpoint: str
    attack: str
    eps: float
    seed: int
    team_returns: np.ndarray
    normalised: np.ndarray | None
    lengths: np.ndarray
    flip_rate: float
    agent_steps: int
    flip_rates: np.ndarray  # per episode
    oversight_log: dict[str, Any] | None = None  # dir, head hash and episodes of the cell's oversight log
    budget: str = "all"                           # Budget.label() of a budgeted attacker
    selector: str | None = None                   # its who/when heuristic
    attacked_steps: np.ndarray | None = None      # per episode: steps where some agent was attacked (measured)
    max_attacked_agents: np.ndarray | None = None  # per episode: most agents attacked in one step (measured)


def summarise(cells: list[Cell]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, float], list[Cell]] = {}
    for c in cells:
        groups.setdefault((c.checkpoint, c.attack, c.eps), []).append(c)
    rows = []
    for (ckpt, attack, eps), cs in groups.items():
        ret = np.concatenate([c.team_returns for c in cs])
        row: dict[str, Any] = {"checkpoint": ckpt, "attack": attack, "eps255": eps, "episodes": int(ret.size),
                               "team_return_mean": float(ret.mean()), "team_return_std": float(ret.std()),
                               "team_return_ci95": bootstrap_ci(ret),
                               "flip_rate": float(sum(c.flip_rate * c.agent_steps for c in cs)
                                                  / max(sum(c.agent_steps for c in cs), 1)),
                               "flip_rate_std": float(np.concatenate([c.flip_rates for c in cs]).std())}
        if cs[0].normalised is not None:
            norm = np.concatenate([c.normalised for c in cs])
            row.update(normalised_mean=float(norm.mean()), normalised_std=float(norm.std()),
                       normalised_ci95=bootstrap_ci(norm))
        row["team_return_episodes"] = [float(v) for v in ret]
        if cs[0].normalised is not None:
            row["normalised_episodes"] = [float(v) for v in norm]
        row.update(budget=cs[0].budget, selector=cs[0].selector)
        if attack != "none" and cs[0].attacked_steps is not None:
            steps = np.concatenate([c.attacked_steps for c in cs])
            lengths = np.concatenate([c.lengths for c in cs])
            row.update(attacked_step_fraction=float((steps / np.maximum(lengths, 1)).mean()),
                       attacked_steps_max=int(steps.max(initial=0)),
                       attacked_agents_max=int(np.concatenate([c.max_attacked_agents for c in cs]).max(initial=0)))
        rows.append(row)
    return rows


def _metric(cells: Sequence[Cell]) -> str:
    """``normalised`` where the env has an oracle, else ``team_return``: the return the worst case is taken of."""
    return "normalised" if cells[0].normalised is not None else "team_return"


def _values(cell: Cell) -> np.ndarray:
    """The cell's per-episode return the worst case is taken of (oracle-normalised where the env has an oracle)."""
    return cell.team_returns if cell.normalised is None else cell.normalised


def worst_rows(cells: list[Cell]) -> list[dict[str, Any]]:
    """Per (checkpoint, eps > 0, budget): the weakest attack's mean per seed, and the per-episode worst case.

    Budget ``all`` is the worst case over every attacker of the grid, budgeted ones included (an
    attacker without limits can act as any of them): the robustness claim. Each budget (k, p) also
    gets its own row, the strongest attacker at that budget.

    Two aggregates, both over the oracle-normalised return where the env has an oracle (the team
    return otherwise): ``<metric>_mean`` is, per evaluation seed, the minimum over attackers of the
    cell's mean, then the mean over seeds (± std, ddof 0; ``per_seed`` names each seed's minimum,
    the first in grid order on a tie); ``episode_worst_mean`` scores every episode by its own worst
    attacker (episodes are paired across attackers by their env seed, ``fgmf_marl.rollout``), then
    averages: the stricter number, AutoAttack's per-sample rule. ``episode_values`` /
    ``episode_worst_values`` keep the episodes of each (seeds concatenated), so tables over training
    seeds can take IQMs and bootstrap intervals of them (``fgmf_marl.stats``).
    """
    metric = _metric(cells)
    groups: dict[tuple[str, float, str], dict[int, list[Cell]]] = {}
    for c in cells:
        if c.attack != "none":
            for budget in dict.fromkeys(("all", c.budget)):
                groups.setdefault((c.checkpoint, c.eps, budget), {}).setdefault(c.seed, []).append(c)

    def mean(c: Cell) -> float:
        return float(_values(c).mean())

    rows = []
    for (ckpt, eps, budget), by_seed in groups.items():
        minima = [min(cs, key=mean) for _, cs in sorted(by_seed.items())]
        values = np.array([mean(c) for c in minima])
        episodes = np.concatenate([_values(c) for c in minima])
        per_episode = [stats.episode_worst({c.attack: _values(c) for c in cs}) for _, cs in sorted(by_seed.items())]
        worst_each = np.concatenate([w for w, _ in per_episode])
        which = [a for _, attacks in per_episode for a in attacks]
        rows.append({"checkpoint": ckpt, "attack": "worst", "eps255": eps, "budget": budget, "metric": metric,
                     f"{metric}_ci95": bootstrap_ci(episodes),
                     f"{metric}_mean": float(values.mean()), f"{metric}_std": float(values.std()),
                     "seeds": len(minima), "episodes": int(sum(c.team_returns.size for c in minima)),
                     "per_seed": [{"seed": c.seed, "attack": c.attack, "value": mean(c)} for c in minima],
                     "episode_values": [float(v) for v in episodes],
                     "episode_worst_mean": float(worst_each.mean()),
                     "episode_worst_ci95": bootstrap_ci(worst_each),
                     "episode_worst_values": [float(v) for v in worst_each],
                     "episode_worst_attacks": {a: which.count(a) for a in dict.fromkeys(which)}})
    return rows


def worst_across_checkpoints(worst: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per eps: mean ± std over checkpoints of each checkpoint's worst (its mean over seeds; std ddof 0).

    This is the figure the README and docs/RESULTS.md quote when checkpoints are independent training seeds: its
    spread is the spread a reader retraining the method would see, while a single checkpoint's std
    over evaluation seeds only measures env-seed noise.
    """
    by_eps: dict[float, list[dict[str, Any]]] = {}
    for r in worst:
        if r.get("budget", "all") == "all":
            by_eps.setdefault(r["eps255"], []).append(r)
    rows = []
    for eps, rs in sorted(by_eps.items()):
        metric = rs[0]["metric"]
        values = np.array([r[f"{metric}_mean"] for r in rs])
        rows.append({"attack": "worst", "eps255": eps, "metric": metric, f"{metric}_mean": float(values.mean()),
                     f"{metric}_std": float(values.std()), "checkpoints": len(rs),
                     "per_checkpoint": {r["checkpoint"]: r[f"{metric}_mean"] for r in rs}})
    return rows


#: the threat model of each attack kind (the label's name before ``[``); any other kind is an L-inf attack
THREAT_MODELS = {"pgd_l2": "L2", "patch_attack": "patch", "corruption": "corruptions", "fault": "faults"}
PROFILE_ORDER = ("L-inf", "L2", "patch", "corruptions", "faults")


def threat_model(attack_label: str) -> str:
    """The threat model an attack label belongs to (``pgd[steps=20]`` -> L-inf, ``fault[kind=frozen]`` -> faults)."""
    return THREAT_MODELS.get(attack_label.partition("[")[0].partition("@")[0], "L-inf")


def profile_rows(cells: list[Cell]) -> list[dict[str, Any]]:
    """The robustness profile: per checkpoint and eps, the worst case within each threat model (per seed the
    attack of lowest mean, then the mean over seeds, and the per-episode worst case), then one row ``all``, the
    worst case over every threat model. Unbudgeted attackers only (budgets are the budget table's).

    Why: robustness to one threat model does not transfer to another, so a claim needs each, and the last row.
    """
    metric = _metric(cells) if cells else "normalised"
    groups: dict[tuple[str, float], dict[str, dict[int, list[Cell]]]] = {}
    for c in cells:
        if c.attack != "none" and c.budget == "all":
            for model in (threat_model(c.attack), "all"):
                groups.setdefault((c.checkpoint, c.eps), {}).setdefault(model, {}).setdefault(c.seed, []).append(c)
    rows = []
    for (ckpt, eps), by_model in groups.items():
        for model in [m for m in (*PROFILE_ORDER, "all") if m in by_model]:
            by_seed = by_model[model]
            minima = [min(cs, key=lambda c: float(_values(c).mean())) for _, cs in sorted(by_seed.items())]
            per_episode = np.concatenate([stats.episode_worst({c.attack: _values(c) for c in cs})[0]
                                          for _, cs in sorted(by_seed.items())])
            rows.append({"checkpoint": ckpt, "eps255": eps, "threat_model": model, "metric": metric,
                         "mean": float(np.mean([_values(c).mean() for c in minima])),
                         "episode_worst_mean": float(per_episode.mean()),
                         "episode_worst_ci95": bootstrap_ci(per_episode), "episodes": int(per_episode.size),
                         "episode_worst_values": [float(v) for v in per_episode],
                         "attacks": sorted({c.attack for cs in by_seed.values() for c in cs}),
                         "weakest": [c.attack for c in minima]})
    return rows
