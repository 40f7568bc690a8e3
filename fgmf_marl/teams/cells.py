"""A grid cell's episodes and what is computed from them: per-attack rows and the worst case over attacks.

Every interval and per-episode worst case comes from :mod:`fgmf_marl.stats`, the one home of the
statistics; these rows are what results.md/.json, the plots and the experiment tables read.

An eps-free cell (``eps`` None: an attacker whose budget is its own option, ``Attack.uses_eps`` False) ran once per
checkpoint and seed, and its rows keep ``eps255`` None. It is available to the attacker at every eps of the grid
(:func:`~fgmf_marl.attacks.base.at_eps`), so it enters the worst case at each of them (:func:`by_eps`), while the
rows of its own attack and of its threat model stand once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from fgmf_marl import stats
from fgmf_marl.attacks.base import at_eps
from fgmf_marl.stats import bootstrap_ci


@dataclass
class Cell:
    checkpoint: str
    attack: str
    eps: float | None                             # 1/255 units; None: eps-free (the attack's own budget)
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


#: the array fields of a Cell and the dtypes a saved cell may give them (anything else is refused on load)
_CELL_ARRAYS = ("team_returns", "normalised", "lengths", "flip_rates", "attacked_steps", "max_attacked_agents")
_CELL_DTYPES = frozenset({"float64", "float32", "int64", "int32", "bool"})


def cell_record(cell: Cell) -> dict[str, Any]:
    """``cell`` as plain JSON data that :func:`cell_from_record` reads back equal (arrays with their dtypes).

    Why: an evaluation saves each finished cell, so that ``evaluate.py --resume`` continues an interrupted grid
    without recomputing it; Python's float repr round-trips float64 exactly, so the resumed tables are the ones an
    uninterrupted run writes."""
    data: dict[str, Any] = {}
    for name, value in vars(cell).items():
        if name in _CELL_ARRAYS:
            data[name] = None if value is None else {"dtype": str(np.asarray(value).dtype),
                                                     "values": np.asarray(value).tolist()}
        else:
            data[name] = value.item() if isinstance(value, np.generic) else value
    return data


def cell_from_record(data: Any) -> Cell:
    """The :class:`Cell` of :func:`cell_record`'s data; ValueError for anything else (unknown or missing fields, an
    array that is not a flat list of numbers of an allowed dtype)."""
    fields = set(Cell.__dataclass_fields__)
    if not isinstance(data, dict) or not set(data) <= fields or not {"checkpoint", "attack", "eps", "seed"} <= set(data):
        raise ValueError(f"not a saved grid cell: expected the fields {sorted(fields)}")
    values = dict(data)
    for name in _CELL_ARRAYS:
        array = values.get(name)
        if array is None:
            continue
        if not isinstance(array, dict) or array.get("dtype") not in _CELL_DTYPES or not isinstance(array.get("values"), list):
            raise ValueError(f"saved grid cell field {name!r} is not an array of {', '.join(sorted(_CELL_DTYPES))}")
        if not all(isinstance(v, (int, float)) for v in array["values"]):
            raise ValueError(f"saved grid cell field {name!r} holds something other than numbers")
        values[name] = np.asarray(array["values"], dtype=array["dtype"])
    return Cell(**values)


def by_eps(cells: Sequence[Cell]) -> dict[tuple[str, float | None], list[Cell]]:
    """The attacked ``cells`` available per (checkpoint, eps) (``at_eps``): an eps-using cell at its own eps, an
    eps-free one at every eps of its checkpoint, or once under None where the checkpoint has eps-free cells only.

    Keys in the order the eps-using cells first name them; each list in grid order (the order in which the attack
    labels first appear). Why grid order: the worst case names the first attacker in grid order on a tie, wherever
    an eps-free cell ran.
    """
    rank = {a: i for i, a in enumerate(dict.fromkeys(c.attack for c in cells))}
    keys = list(dict.fromkeys((c.checkpoint, c.eps) for c in cells if c.eps is not None))
    keys += [(k, None) for k in dict.fromkeys(c.checkpoint for c in cells) if all(k != ckpt for ckpt, _ in keys)]
    return {(k, e): sorted((c for c in cells if c.checkpoint == k and at_eps(c.eps, e)), key=lambda c: rank[c.attack])
            for k, e in keys}


def summarise(cells: list[Cell]) -> list[dict[str, Any]]:
    """One row per (checkpoint, attack, eps): its episodes over seeds pooled (an eps-free attack's one row has
    ``eps255`` None)."""
    groups: dict[tuple[str, str, float | None], list[Cell]] = {}
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
    gets its own row, the strongest attacker at that budget. The attackers at an eps are those
    :func:`by_eps` makes available there: the eps-free ones join every eps (in a grid of eps-free
    attackers only, the rows have ``eps255`` None).

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
    groups: dict[tuple[str, float | None, str], dict[int, list[Cell]]] = {}
    for (ckpt, eps), available in by_eps([c for c in cells if c.attack != "none"]).items():
        for c in available:
            for budget in dict.fromkeys(("all", c.budget)):
                groups.setdefault((ckpt, eps, budget), {}).setdefault(c.seed, []).append(c)

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

    A threat model whose cells are all eps-free (patches, corruptions, faults, L2 of its own radius) has one row
    per checkpoint, ``eps255`` None, before the eps rows; the ``all`` row of every eps includes it (:func:`by_eps`).

    Why: robustness to one threat model does not transfer to another, so a claim needs each, and the last row.
    """
    metric = _metric(cells) if cells else "normalised"
    attacked = [c for c in cells if c.attack != "none" and c.budget == "all"]
    models = {(c.checkpoint, threat_model(c.attack)) for c in attacked}
    free = models - {(c.checkpoint, threat_model(c.attack)) for c in attacked if c.eps is not None}
    rows: list[dict[str, Any]] = []
    shown: set[str] = set()
    for (ckpt, eps), available in by_eps(attacked).items():
        if ckpt not in shown:   # its eps-free threat models, once, before its first eps
            shown.add(ckpt)
            rows += [_profile_row(ckpt, None, model, [c for c in attacked if c.checkpoint == ckpt
                                                      and threat_model(c.attack) == model], metric)
                     for model in PROFILE_ORDER if (ckpt, model) in free]
        rows += [_profile_row(ckpt, eps, model, [c for c in available if threat_model(c.attack) == model], metric)
                 for model in PROFILE_ORDER if (ckpt, model) in models - free
                 and any(threat_model(c.attack) == model for c in available)]
        rows.append(_profile_row(ckpt, eps, "all", available, metric))
    return rows


def _profile_row(ckpt: str, eps: float | None, model: str, cells: list[Cell], metric: str) -> dict[str, Any]:
    """One profile row: the worst case over ``cells`` (one checkpoint's attackers of ``model`` at ``eps``)."""
    by_seed: dict[int, list[Cell]] = {}
    for c in cells:
        by_seed.setdefault(c.seed, []).append(c)
    minima = [min(cs, key=lambda c: float(_values(c).mean())) for _, cs in sorted(by_seed.items())]
    per_episode = np.concatenate([stats.episode_worst({c.attack: _values(c) for c in cs})[0]
                                  for _, cs in sorted(by_seed.items())])
    return {"checkpoint": ckpt, "eps255": eps, "threat_model": model, "metric": metric,
            "mean": float(np.mean([_values(c).mean() for c in minima])),
            "episode_worst_mean": float(per_episode.mean()),
            "episode_worst_ci95": bootstrap_ci(per_episode), "episodes": int(per_episode.size),
            "episode_worst_values": [float(v) for v in per_episode],
            "attacks": sorted({c.attack for c in cells}),
            "weakest": [c.attack for c in minima]}
