"""``scripts/evaluate.py``: robustness of checkpoints over attacks x eps x seeds x episodes, and its command line.

Every grid cell is one call of :func:`fgmf_marl.rollout.rollout` (the one episode loop) with the
attack adapted to its ``perturb`` callable, so "return under attack" means what it means in
training and in the oversight log. A clean row (attack ``none``, eps 0) is always evaluated per
checkpoint and seed: it is the left end of every robustness curve.

Outputs, in one folder (created only after every input is validated, removed if the run fails):

    config.yaml         the resolved evaluation config (rerun with --config)
    episodes.csv        one row per episode: checkpoint, attack, eps (/255), seed, episode,
                        team return, oracle-normalised return, length, the episode's flip rate
    results.md/.json    per (checkpoint, attack, eps): mean +- std over all episodes of all seeds of
                        team return, normalised return and action-flip rate (the mean flip rate
                        weights episodes by their agent-steps); per (checkpoint, eps) a ``worst``
                        row, and with several checkpoints the worst case across them (:func:`worst_rows`)
    curves_<ckpt>.png   return (normalised where the env has an oracle) vs eps, one line per attack
                        and a dashed one for the worst case
    budget_<ckpt>_eps<e>.png  with a budget grid: return vs (k, p), one panel per attacker
    comparison.png      every checkpoint's worst case vs eps on one axis, clean reference lines and
                        95% bootstrap bands; with several checkpoints their mean and [min, max]
    tb/                 the same rows as TensorBoard scalars, step = eps (/255)
    audit_<ckpt>.md     with ``audit: true``: the gradient-masking audit on observations visited by
                        the clean policy (see :mod:`fgmf_marl.audit`); with a transfer attack in the
                        grid, its surrogate also runs the audit's transfer check
    audit_control_<ckpt>.md  for a victim with an SGAM gate: the same audit of the same policy with the
                        gate's gradient_shield on (same forward, masked gradients), the positive control
                        that shows the audit catches masking on this policy: it must FAIL

Choices: evaluation envs use seeds ``seed + fgmf_marl.seeds.EVALUATION`` (never a training seed, as the
trainer's own evaluation); the deterministic (greedy) policy is evaluated, the usual protocol in robust-RL papers
(SA-PPO, PA-AD) since it isolates the attack's effect from action sampling; the flip rate is over
all agent-steps, as the rollout reports it, so attacking 1 of 3 agents caps it at 1/3.

``--attacks strong`` is the registry's preset (:data:`fgmf_marl.attacks.registry.PRESETS`):
PGD-20 with 5 restarts, least-likely targeted PGD-20, MAD, critic, Square; plus transfer from
``--surrogate``, BPDA-20 when a victim has an input gate, EOT-20 when a victim's forward pass is
random (two forward passes of the same input differ; EOT over a deterministic forward is PGD at 8x
the cost, so it is left out), and the learned adversary of ``--adversary`` (trained against the one
checkpoint given). ``--attacks budgeted`` is the budgeted-adversary comparison: PGD-10 and least-likely
PGD-10 (the two fixed attacks a director chooses between, which the budget heuristics then apply),
BPDA-10 for a gated victim, and the learned adversary of ``--adversary``. config.yaml records the
expanded list, so ``--config`` reruns exactly those attacks.

Budgets (``--budget-agents K,... --budget-steps P,...``, :mod:`fgmf_marl.attacks.budget`): every
attack also runs within every budget (k agents per step, a share p of each episode's steps) on the
agents and steps each selector (``--budget-selectors``: random, fixed, timed, value) picks, labelled
``ATTACK@SELECTOR[k=K,p=P]``. Every row reports what was spent, as the episode loop measured it;
the worst case is taken per budget (``all`` = unbudgeted, the robustness claim), and results.md
marks the strongest attacker per budget.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from stable_baselines3.common.vec_env import VecEnv
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from agents.adversary import AdversaryAttack, LoadedAdversary
from agents.policy_view import PolicyView
from envs.reference import normalise
from envs.registry import MAX_ENVS, horizon, make_vec_env, n_agents_of, reference_for
from fgmf_marl import config as cfglib
from fgmf_marl import seeds, stats
from fgmf_marl.stats import bootstrap_ci
from fgmf_marl.atomic import atomic_write, atomic_write_text
from fgmf_marl.attacks import ATTACKS, PRESETS, Attack, Transfer, expand_presets, has_gate, make_attack, parse_spec
from fgmf_marl.attacks.base import MAX_ITERATIONS
from fgmf_marl.attacks.budget import LEARNED, SELECTORS, Budget, BudgetedAttack, make_selector
from fgmf_marl.attacks.frames import on_frames
from fgmf_marl.audit import AuditConfig, AuditReport, audit
from fgmf_marl.config import ConfigError, check_device, check_range, check_seed
from fgmf_marl.defenses.sgam import with_gradient_shield
from fgmf_marl.jobs import cli
from fgmf_marl.jobs.checkpoints import Victim, env_spaces, load_adversary, load_victim
from fgmf_marl.oversight import OversightLogger
from fgmf_marl.oversight.store import holds_log, read_key
from fgmf_marl.rollout import StepRecord, rollout
from fgmf_marl.runs import check_output_dir, staged_run_dir

PROG = "evaluate.py"


@dataclass
class EvalConfig:
    """What ``scripts/evaluate.py`` runs; written as ``config.yaml`` next to the results."""

    checkpoints: list[str] = field(default_factory=list)
    attacks: list[str] = field(default_factory=lambda: ["random", "fgsm", "pgd", "mad", "critic"])
    eps: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0])   # in 1/255 units
    seeds: list[int] = field(default_factory=lambda: [0])
    episodes: int = 8                   # per seed and grid cell
    agents: list[int] | None = None     # attacked agents (indices within an env); null = all
    n_envs: int = 8
    device: str = "cpu"
    audit: bool = False
    audit_obs: int = 256
    audit_queries: int = 300
    log_explanations: str | None = None
    log_every: int = 1
    log_append: bool = False            # add to oversight logs that exist (else a log belongs to one run)
    log_key_file: str | None = None     # HMAC key of the oversight logs (or $FGMF_LOG_KEY_FILE)
    surrogate: str | None = None        # for a preset: an independently trained policy to transfer from
    adversary: str | None = None        # for a preset: a director trained against the (one) checkpoint
    budget_agents: list[int] | None = None     # k values: at most k attacked agents per env and step
    budget_steps: list[float] | None = None    # p values: at most floor(p * horizon) attacked steps per episode
    budget_selectors: list[str] = field(default_factory=lambda: list(SELECTORS))  # who/when heuristics

    def budgets(self) -> list[Budget]:
        """The budget grid: every (k, p) pair of ``budget_agents`` x ``budget_steps``; empty without either."""
        if self.budget_agents is None and self.budget_steps is None:
            return []
        return [Budget(k, p) for k in (self.budget_agents or [None]) for p in (self.budget_steps or [None])]

    def validate(self) -> None:
        check_device(self.device)
        if not self.checkpoints:
            raise ConfigError("give at least one checkpoint (a run directory or a .zip written by train_marl.py)")
        if not self.attacks:
            raise ConfigError("give at least one attack")
        if (self.surrogate or self.adversary) and not any(s.partition(":")[0].strip() in PRESETS for s in self.attacks):
            raise ConfigError("surrogate/adversary feed a preset (--attacks strong); without one give "
                              "transfer:surrogate=PATH or adversary:path=PATH as attacks")
        if self.adversary and len(self.checkpoints) > 1:
            raise ConfigError(f"adversary is trained against one checkpoint; got {len(self.checkpoints)} checkpoints "
                              "(evaluate them one at a time, or give adversary:path=PATH as an attack)")
        for spec in expand_presets(self.attacks, surrogate=self.surrogate, adversary=self.adversary, gated=True,
                                   random_forward=True):
            parse_spec(spec)
        for e in self.eps:
            if not 0 < e <= 255:
                raise ConfigError(f"eps {e:g} is out of range; accepted: numbers in (0, 255] in 1/255 units, e.g. 1,2,4,8")
        if not self.eps:
            raise ConfigError("give at least one eps (1/255 units)")
        if not self.seeds:
            raise ConfigError("give at least one seed")
        for seed in self.seeds:
            check_seed(seed, "seeds")
        check_range("episodes", self.episodes, 1, 100_000)
        check_range("n_envs", self.n_envs, 1, MAX_ENVS)
        check_range("audit_obs", self.audit_obs, 8, 100_000)
        check_range("audit_queries", self.audit_queries, 1, MAX_ITERATIONS)
        check_range("log_every", self.log_every, 1, 100_000)
        if self.agents is not None and (not self.agents or min(self.agents) < 0):
            raise ConfigError(f"agents={self.agents} must be non-empty agent indices >= 0")
        for k in self.budget_agents or []:
            if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= 4096:
                raise ConfigError(f"budget_agents value {k!r} is out of range; accepted: integers 0..4096 "
                                  "(attacked agents per env and step)")
        for p in self.budget_steps or []:
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
                raise ConfigError(f"budget_steps value {p!r} is out of range; accepted: fractions in [0, 1] "
                                  "of each episode's steps")
        for key, values in (("budget_agents", self.budget_agents), ("budget_steps", self.budget_steps)):
            if values is not None and not values:
                raise ConfigError(f"{key} is an empty list; accepted: one value or more (leave it out for no "
                                  f"{key.split('_')[1][:-1]} budget)")
        if not self.budgets() and self.budget_selectors != list(SELECTORS):
            raise ConfigError(f"budget_selectors={','.join(self.budget_selectors)!r} has no effect without a budget; "
                              "it applies with budget_agents or budget_steps (--budget-agents, --budget-steps)")
        if self.budgets() and not self.budget_selectors:
            raise ConfigError(f"a budget needs at least one selector; accepted: {', '.join(SELECTORS)}")
        for name in self.budget_selectors:
            try:
                make_selector(name)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None


def _loader(device: str) -> Callable[[str, str], PolicyView | LoadedAdversary]:
    """Resolves the checkpoints that attack specs name (``transfer:surrogate=...``, ``adversary:path=...``)."""
    def load(kind: str, path: str) -> PolicyView | LoadedAdversary:
        return load_victim(path, device).view if kind == "surrogate" else load_adversary(path, device=device)

    return load


def _eval_env(victim: Victim, n_envs: int, seed: int, offset: int = seeds.EVALUATION) -> tuple[VecEnv, int]:
    env_cfg = dataclasses.replace(victim.train_config.env, n_envs=n_envs)
    venv = make_vec_env(env_cfg, seed=seeds.env_seed(seed, offset))
    return venv, n_agents_of(venv, env_cfg)


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


@dataclass(frozen=True)
class GridAttack:
    """One attacker of the grid: an attack, alone or within ``budget`` on the agents and steps ``selector`` picks."""

    label: str
    attack: Attack
    base: str                       # the attack's own label
    budget: Budget | None = None
    selector: str | None = None


@dataclass
class EvalResult:
    folder: Path
    cells: list[Cell]
    summary: list[dict[str, Any]]
    audits: dict[str, AuditReport]


def _attack_label(spec: str) -> str:
    return spec.replace(":", "[", 1) + "]" if ":" in spec else spec


def check_fits(attack: Attack, victims: list[Victim]) -> None:
    """A one-line ConfigError when a transfer surrogate or a learned adversary was built for other images.

    Both carry a policy of their own; one trained on another env's observations would otherwise
    fail inside the first episode with a shape error that names nothing the user typed.
    """
    for victim in victims:
        shape = tuple(victim.model.observation_space.shape)
        if isinstance(attack, Transfer):
            theirs = tuple(attack.surrogate.policy.observation_space.shape)
            if theirs != shape:
                raise ConfigError(f"transfer surrogate sees observations {theirs}, the victim {victim.label} {shape}; "
                                  "accepted: a surrogate trained on the victim's env")
        if isinstance(attack, AdversaryAttack):
            theirs = tuple(attack.director.observation_space["image"].shape)
            if theirs[1:] != shape[1:] or theirs[0] != attack.n_agents * shape[0]:
                raise ConfigError(f"adversary director sees observations {theirs}, built for victims other than "
                                  f"{victim.label} {shape}; accepted: a director trained against this victim's env")


def build_attacks(cfg: EvalConfig, eps255: float, n_actions: int | None = None) -> list[GridAttack]:
    """The grid's attackers at ``eps255``: every attack alone, then within every budget x selector."""
    out = []
    for spec in cfg.attacks:
        name, opts = parse_spec(spec)
        attack = make_attack(name, eps255 / 255.0, loader=_loader(cfg.device), n_actions=n_actions, **opts)
        label = _attack_label(spec)
        if isinstance(attack, AdversaryAttack) and not attack.budget.unlimited:   # the budget it was trained for
            out.append(GridAttack(f"{label}@{LEARNED}[{attack.budget.label()}]", attack, label, attack.budget, LEARNED))
        else:
            out.append(GridAttack(label, attack, label))
    budgeted = []
    for g in out:
        for b in cfg.budgets():
            if isinstance(g.attack, AdversaryAttack):   # a director chooses whom and when itself
                if g.budget != b:
                    budgeted.append(GridAttack(f"{g.base}@{LEARNED}[{b.label()}]", g.attack.within(b), g.base, b, LEARNED))
            else:
                budgeted += [GridAttack(f"{g.base}@{sel}[{b.label()}]", g.attack, g.base, b, sel)
                             for sel in cfg.budget_selectors]
    return out + budgeted


def calibration_batches(victim: Victim, n_envs: int, seed: int) -> list[torch.Tensor]:
    """Every step's clean observations (all slots) of one episode per env copy of the clean greedy policy.

    What a budgeted heuristic sets its step threshold on (:meth:`BudgetedAttack.calibrated`): clean
    episodes on seeds of their own (``seeds.BUDGET_CALIBRATION``), never the evaluation's.
    """
    venv, n_agents = _eval_env(victim, n_envs, seed, seeds.BUDGET_CALIBRATION)
    batches: list[torch.Tensor] = []
    try:
        rollout(victim.view, venv, n_envs, n_agents=n_agents, seed=seed,
                step_hook=lambda record: batches.append(record.clean_obs.detach()))
    finally:
        venv.close()
    return batches


def _budgeted(grid: GridAttack, victim: Victim, n_agents: int, seed: int,
              calibration: Callable[[], list[torch.Tensor]]) -> Attack:
    """``grid``'s attack for this victim: wrapped in its budget and calibrated, or as it is (a director
    holds its budget itself)."""
    if grid.budget is None or grid.selector in (None, LEARNED):
        return grid.attack
    attack = BudgetedAttack(grid.attack, make_selector(grid.selector), grid.budget, n_agents=n_agents,
                            horizon=horizon(victim.train_config.env), seed=seed)
    return attack.calibrated(victim.view, calibration()) if attack.needs_calibration else attack


def random_forward(victim: Victim) -> bool:
    """Whether two eval-mode forward passes of the same input differ (then EOT has something to average)."""
    view = victim.view
    x = torch.rand(4, *victim.model.observation_space.shape, generator=torch.Generator().manual_seed(0))
    x = x.to(next(view.parameters()).device)
    with torch.no_grad():
        return not torch.equal(view(x), view(x))


def expand_attacks(cfg: EvalConfig, victims: Sequence[Victim]) -> EvalConfig:
    """``cfg`` with its presets expanded for these victims: the config that is recorded and run.

    The surrogate and adversary then live in the expanded specs, so they are cleared, and the
    recorded config reruns as it is.
    """
    attacks = expand_presets(cfg.attacks, surrogate=cfg.surrogate, adversary=cfg.adversary,
                             gated=any(has_gate(v.view) for v in victims),
                             random_forward=any(random_forward(v) for v in victims))
    return dataclasses.replace(cfg, attacks=attacks, surrogate=None, adversary=None)


def cell_folder(checkpoint: str, label: str, eps255: float, seed: int) -> str:
    """The oversight-log folder name of one grid cell, ``<checkpoint>__<attack>__eps<e>__s<seed>``, shell-safe.

    Attack labels hold ``[ ] = , @ :`` (``pgd[steps=20]``); each run of other characters than
    ``A-Za-z0-9._-`` becomes one ``-``, so the name needs no quoting; the exact label is in every
    episode's run info.
    """
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{checkpoint}__{label}").strip("-")
    return f"{safe}__eps{eps255:g}__s{seed}"


def run_cell(victim: Victim, grid: GridAttack | None, eps255: float, seed: int, cfg: EvalConfig,
             log_dir: Path | None = None, log_key: bytes | None = None,
             calibration: Callable[[], list[torch.Tensor]] = list) -> Cell:
    """One grid cell: ``cfg.episodes`` episodes of ``victim`` under ``grid``'s attacker (None = clean).

    With ``log_dir`` the cell's episodes go to an oversight log there, sealed when they all ran;
    ``calibration`` gives the clean batches a budgeted heuristic calibrates on (called only if needed).
    """
    label = "none" if grid is None else grid.label
    venv, n_agents = _eval_env(victim, cfg.n_envs, seed)
    torch.manual_seed(seed)
    try:
        if cfg.agents is not None and max(cfg.agents) >= n_agents:
            raise ConfigError(f"attacked agents {cfg.agents} out of range; this env has agents 0..{n_agents - 1}")
        perturb = None
        if grid is not None:
            attack = _budgeted(grid, victim, n_agents, seed, calibration)
            perturb = on_frames(attack.as_perturb(victim.view, n_agents=n_agents, agents=cfg.agents),
                                venv.observation_space.shape[0], victim.train_config.env.adapter.frame_stack, n_agents)
        hook, logger = None, None
        if log_dir is not None:
            logger = OversightLogger.for_venv(log_dir, victim.view, venv, every=cfg.log_every, attack_name=label,
                                              append=cfg.log_append, key=log_key,
                                              run_info={"checkpoint": victim.path, "attack": label, "eps255": eps255,
                                                        "seed": seed})
            hook = logger.step_hook
        result = rollout(victim.view, venv, cfg.episodes, n_agents=n_agents, perturb=perturb, step_hook=hook, seed=seed)
        log = None if logger is None else logger.summary(logger.close())
    finally:
        venv.close()
    return Cell(victim.label, label, eps255, seed, result.team_returns,
                normalise(result.team_returns, reference_for(victim.train_config.env)), result.lengths,
                result.flip_rate, result.agent_steps, result.episode_flip_rates, log,
                budget="all" if grid is None or grid.budget is None else grid.budget.label(),
                selector=None if grid is None else grid.selector,
                attacked_steps=result.episode_attacked_steps, max_attacked_agents=result.episode_max_attacked_agents)


def collect_observations(victim: Victim, n_obs: int, seed: int, n_envs: int) -> torch.Tensor:
    """Observations (float [0, 1]) visited by the clean greedy policy: the audit's test set."""
    venv, n_agents = _eval_env(victim, n_envs, seed)
    frames: list[torch.Tensor] = []

    def hook(record: StepRecord) -> None:
        if sum(f.shape[0] for f in frames) < 4 * n_obs:
            frames.append(record.clean_obs.detach().cpu())

    try:
        rollout(victim.view, venv, n_envs, n_agents=n_agents, step_hook=hook, seed=seed)
    finally:
        venv.close()
    obs = torch.cat(frames)
    idx = torch.randperm(obs.shape[0], generator=torch.Generator().manual_seed(seed))[:n_obs]
    return obs[idx]


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


def _metric_label(metric: str) -> str:
    return "oracle-normalised return" if metric == "normalised" else "team return"


def worst_markdown(worst: list[dict[str, Any]], across: list[dict[str, Any]]) -> str:
    """The two worst-case tables of results.md (the second only with several checkpoints), unbudgeted attacks."""
    worst = [r for r in worst if r.get("budget", "all") == "all"]
    if not worst:
        return ""
    metric = worst[0]["metric"]
    text = (f"\n## Worst case over attacks\n\nWeakest attack: per seed the lowest mean {_metric_label(metric)} over "
            "the grid's attacks at that eps, then mean ± std over seeds. Per episode: every episode scored by its own "
            "worst attack (episodes paired by env seed), then the mean [95% bootstrap CI over episodes]; the "
            "stricter of the two.\n\n"
            f"| checkpoint | attack | eps | worst {_metric_label(metric)} (weakest attack) | per-episode worst | seeds "
            "| episodes | minimum per seed | attacks that were an episode's worst |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    for r in worst:
        minima = "; ".join(f"seed {m['seed']}: {m['attack']} {m['value']:.3f}" for m in r["per_seed"])
        low, high = r["episode_worst_ci95"]
        which = "; ".join(f"{a} {n}" for a, n in r["episode_worst_attacks"].items())
        text += (f"| {r['checkpoint']} | worst | {r['eps255']:g} | {r[f'{metric}_mean']:.3f} ± {r[f'{metric}_std']:.3f} "
                 f"| {r['episode_worst_mean']:.3f} [{low:.3f}, {high:.3f}] | {r['seeds']} | {r['episodes']} | {minima} "
                 f"| {which} |\n")
    if across:
        text += (f"\n## Worst case across checkpoints\n\nMean ± std over checkpoints of each checkpoint's worst "
                 f"(the figure to quote).\n\n| eps | worst {_metric_label(metric)} | checkpoints | per checkpoint |\n"
                 "|---|---|---|---|\n")
        for r in across:
            each = "; ".join(f"{k}: {v:.3f}" for k, v in r["per_checkpoint"].items())
            text += (f"| {r['eps255']:g} | {r[f'{metric}_mean']:.3f} ± {r[f'{metric}_std']:.3f} | {r['checkpoints']} "
                     f"| {each} |\n")
    return text


def _budget_key(label: str) -> tuple[str, str]:
    """``k=1,p=0.25`` -> ("1", "0.25"); a missing k is ``all`` agents, a missing p every step (``1``)."""
    parts = dict(item.split("=") for item in label.split(",")) if label != "all" else {}
    return parts.get("k", "all"), parts.get("p", "1")


def _budget_axes(rows: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """The k and p values of the budget grid in ``rows``, as labels (``all`` = no limit), in order."""
    keys = [_budget_key(r["budget"]) for r in rows if r.get("selector")]
    return (sorted({k for k, _ in keys}, key=lambda k: (k == "all", int(k) if k != "all" else 0)),
            sorted({p for _, p in keys}, key=float))


def budget_markdown(rows: list[dict[str, Any]], worst: list[dict[str, Any]]) -> str:
    """Per checkpoint and eps: each attacker's return per budget (k, p), the strongest per budget in bold.

    Also what each attacker spent (share of steps attacked, most agents in one step), measured by the
    episode loop; and, for reference, the unbudgeted worst case the budgets are fractions of.
    """
    budgeted = [r for r in rows if r.get("selector")]
    if not budgeted:
        return ""
    metric = "normalised_mean" if "normalised_mean" in budgeted[0] else "team_return_mean"
    text = ("\n## Budgeted attackers\n\nk: attacked agents per env and step; p: attacked share of each episode's "
            "steps (at most floor(p x horizon)); spent: the measured share of steps attacked and the most agents "
            "attacked in one step. Lower is a stronger attacker; the strongest per budget is in bold. "
            f"Values: {_metric_label(metric.removesuffix('_mean'))}.\n")
    for ckpt in dict.fromkeys(r["checkpoint"] for r in budgeted):
        for eps in dict.fromkeys(r["eps255"] for r in budgeted if r["checkpoint"] == ckpt):
            mine = [r for r in budgeted if r["checkpoint"] == ckpt and r["eps255"] == eps]
            attackers = list(dict.fromkeys(r["attack"].rsplit("[", 1)[0] for r in mine))
            everything = next((w for w in worst if w["checkpoint"] == ckpt and w["eps255"] == eps
                               and w.get("budget", "all") == "all"), None)
            text += f"\n### {ckpt}, eps {eps:g}/255"
            if everything is not None:
                text += f" (unbudgeted worst case: {everything[everything['metric'] + '_mean']:.3f})"
            text += "\n\n| budget | " + " | ".join(attackers) + " |\n|---|" + "---|" * len(attackers) + "\n"
            for budget in dict.fromkeys(r["budget"] for r in mine):
                cells = {r["attack"].rsplit("[", 1)[0]: r for r in mine if r["budget"] == budget}
                best = min(cells.values(), key=lambda r: r[metric])
                shown = []
                for a in attackers:
                    r = cells.get(a)
                    if r is None:
                        shown.append("n/a")
                        continue
                    value = f"{r[metric]:.3f}"
                    value = f"**{value}**" if r is best else value
                    shown.append(f"{value} (spent {r.get('attacked_step_fraction', 0):.2f}, "
                                 f"≤{r.get('attacked_agents_max', 0)} ag.)")
                text += f"| {budget} | " + " | ".join(shown) + " |\n"
    return text


def plot_budget_heatmaps(rows: list[dict[str, Any]], checkpoint: str, eps255: float, path: Path) -> bool:
    """Return vs (k, p) of ``checkpoint`` at ``eps255``, one panel per attacker; False when there is no budget grid."""
    mine = [r for r in rows if r.get("selector") and r["checkpoint"] == checkpoint and r["eps255"] == eps255]
    if not mine:
        return False
    metric = "normalised_mean" if "normalised_mean" in mine[0] else "team_return_mean"
    ks, ps = _budget_axes(mine)
    attackers = list(dict.fromkeys(r["attack"].rsplit("[", 1)[0] for r in mine))
    cell = {(r["attack"].rsplit("[", 1)[0], *_budget_key(r["budget"])): r[metric] for r in mine}
    values = [np.array([[cell.get((a, k, p), np.nan) for p in ps] for k in ks]) for a in attackers]
    finite = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.array([0.0])
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    cols = min(4, len(attackers))
    fig = Figure(figsize=(3.2 * cols + 0.8, 3.2 * ((len(attackers) + cols - 1) // cols)))
    axes = np.atleast_1d(fig.subplots((len(attackers) + cols - 1) // cols, cols, squeeze=False)).ravel()
    image = None
    for ax, attacker, grid in zip(axes, attackers, values):
        image = ax.imshow(grid, cmap="viridis", vmin=lo, vmax=hi if hi > lo else lo + 1e-6, aspect="auto")
        ax.set_xticks(range(len(ps)), ps)
        ax.set_yticks(range(len(ks)), ks)
        ax.set_xlabel("p (share of steps)")
        ax.set_ylabel("k (agents)")
        ax.set_title(attacker, fontsize=9)
        for i in range(len(ks)):
            for j in range(len(ps)):
                if np.isfinite(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8, color="white")
    for ax in axes[len(attackers):]:
        ax.set_visible(False)
    fig.suptitle(f"{checkpoint}: return under budgeted attacks, eps {eps255:g}/255", fontsize=10, y=0.995)
    fig.subplots_adjust(top=0.82, bottom=0.2, left=0.06, right=0.9, wspace=0.35)
    if image is not None:
        fig.colorbar(image, cax=fig.add_axes((0.925, 0.2, 0.012, 0.62)),
                     label="oracle-normalised return" if metric.startswith("normalised") else "team return")
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=100))
    return True


def results_markdown(rows: list[dict[str, Any]], cfg: EvalConfig) -> str:
    who = "all agents" if cfg.agents is None else "agents " + ",".join(map(str, cfg.agents))
    text = (f"# Robustness evaluation\n\nAttacked: {who}; {cfg.episodes} episodes x {len(cfg.seeds)} seed(s) per cell; "
            "eps in /255 units; mean ± std over episodes.\n\n"
            "| checkpoint | attack | eps | team return | oracle-normalised | flip rate |\n|---|---|---|---|---|---|\n")
    for r in rows:
        norm = f"{r['normalised_mean']:.3f} ± {r['normalised_std']:.3f}" if "normalised_mean" in r else "n/a"
        eps = "0 (clean)" if r["eps255"] == 0 else f"{r['eps255']:g}"
        text += (f"| {r['checkpoint']} | {r['attack']} | {eps} | {r['team_return_mean']:.3f} ± {r['team_return_std']:.3f} "
                 f"| {norm} | {r['flip_rate']:.3f} ± {r['flip_rate_std']:.3f} |\n")
    return text


def episodes_csv(cells: list[Cell]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["checkpoint", "attack", "eps255", "seed", "episode", "team_return", "normalised_return", "length",
                "flip_rate"])
    for c in cells:
        for i, ret in enumerate(c.team_returns):
            norm = "" if c.normalised is None else f"{c.normalised[i]:.6f}"
            w.writerow([c.checkpoint, c.attack, f"{c.eps:g}", c.seed, i, f"{ret:.6f}", norm, int(c.lengths[i]),
                        f"{c.flip_rates[i]:.6f}"])
    return buf.getvalue()


def _band(ax: Any, xs: list[float], pts: list[dict[str, Any]], key: str, **style: Any) -> None:
    """The 95% bootstrap band of ``pts`` (rows with ``<metric>_ci95``), where every point has one."""
    ci = key.replace("_mean", "_ci95")
    if all(ci in r for r in pts):
        ax.fill_between(xs, [r[ci][0] for r in pts], [r[ci][1] for r in pts], alpha=0.12, **style)


def plot_curves(rows: list[dict[str, Any]], checkpoint: str, path: Path) -> None:
    """Return vs eps of one checkpoint, one line per attack, clean at eps 0, 95% bootstrap bands; written atomically."""
    mine = [r for r in rows if r["checkpoint"] == checkpoint]
    key = "normalised_mean" if all("normalised_mean" in r for r in mine) else "team_return_mean"
    clean = [r for r in mine if r["attack"] == "none"]
    fig = Figure(figsize=(6, 4))  # no pyplot: no GUI backend, no global figure state
    ax = fig.subplots()
    for attack in dict.fromkeys(r["attack"] for r in mine if r["attack"] != "none"):
        pts = sorted(clean + [r for r in mine if r["attack"] == attack], key=lambda r: r["eps255"])
        xs = [r["eps255"] for r in pts]
        ax.plot(xs, [r[key] for r in pts], marker="o", label=attack,
                **({"color": "black", "linestyle": "--"} if attack == "worst" else {}))
        _band(ax, xs, pts, key)
    ax.set_xlabel("eps (/255)")
    ax.set_ylabel("oracle-normalised team return" if key.startswith("normalised") else "team return")
    ax.set_title(f"robustness of {checkpoint} (bands: 95% bootstrap CI of the mean)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=100))


def plot_comparison(rows: list[dict[str, Any]], worst: list[dict[str, Any]],
                    across: list[dict[str, Any]], path: Path) -> None:
    """Every checkpoint's worst case vs eps on one axis, its clean return as a dotted reference line.

    Bands: the 95% bootstrap interval of each point's mean over episodes. With several checkpoints
    (independent training seeds), a black line is their mean and its band spans their [min, max].
    """
    key = "normalised_mean" if all("normalised_mean" in r for r in rows) else "team_return_mean"
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    mine = [w for w in worst if w.get("budget", "all") == "all"]
    for i, ckpt in enumerate(dict.fromkeys(r["checkpoint"] for r in rows)):
        clean = next(r for r in rows if r["checkpoint"] == ckpt and r["attack"] == "none")
        pts = [clean] + sorted((w for w in mine if w["checkpoint"] == ckpt), key=lambda w: w["eps255"])
        xs = [r["eps255"] for r in pts]
        color = f"C{i % 10}"
        ax.plot(xs, [r[key] for r in pts], marker="o", color=color, label=f"{ckpt} (worst case)")
        _band(ax, xs, pts, key, color=color)
        ax.axhline(clean[key], color=color, linestyle=":", linewidth=1)
    if across:
        by_eps = sorted(across, key=lambda r: r["eps255"])
        cleans = [r[key] for r in rows if r["attack"] == "none"]
        xs = [0.0] + [r["eps255"] for r in by_eps]
        values = [np.array(cleans)] + [np.array(list(r["per_checkpoint"].values())) for r in by_eps]
        ax.plot(xs, [v.mean() for v in values], color="black", linewidth=2, label="mean over checkpoints")
        ax.fill_between(xs, [v.min() for v in values], [v.max() for v in values], color="black", alpha=0.08)
    ax.set_xlabel("eps (/255); eps 0 = clean")
    ax.set_ylabel("oracle-normalised team return" if key.startswith("normalised") else "team return")
    ax.set_title("worst case over attacks (dotted: each checkpoint's clean return)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=100))


def write_tensorboard(rows: list[dict[str, Any]], worst: list[dict[str, Any]], folder: Path) -> None:
    """Every row's return and flip rate as TensorBoard scalars ``<checkpoint>/<attack>/...``, the step
    being eps in 1/255 units (rounded to an integer: TensorBoard steps are integers; results.json
    keeps the exact eps), so a robustness curve reads along the step axis."""
    with SummaryWriter(str(folder)) as writer:
        for r in rows + worst:
            step = int(round(r["eps255"]))
            metric = "normalised_mean" if "normalised_mean" in r else "team_return_mean"
            writer.add_scalar(f"{r['checkpoint']}/{r['attack']}/{metric.removesuffix('_mean')}", r[metric], step)
            if "flip_rate" in r:
                writer.add_scalar(f"{r['checkpoint']}/{r['attack']}/flip_rate", r["flip_rate"], step)


def check_fixed_agents(cfg: EvalConfig, victims: Sequence[Victim]) -> None:
    """Every ``fixed:agent=J`` selector names an agent each victim's env has (checked before any compute)."""
    fixed = [make_selector(s) for s in cfg.budget_selectors if s.startswith("fixed:")] if cfg.budgets() else []
    for victim in victims if fixed else []:
        n_agents = env_spaces(victim.train_config.env)[2]
        for selector in fixed:
            if selector.agent >= n_agents:
                raise ConfigError(f"budget selector fixed:agent={selector.agent}: {victim.label} has {n_agents} agents "
                                  f"per env; accepted: fixed:agent=0..{n_agents - 1}")


@contextmanager
def removed_on_failure(folders: Sequence[Path]) -> Iterator[None]:
    """Remove ``folders`` (those a run creates) if the body raises, then re-raise.

    Why: the run's results, which record each oversight log's head, are removed with its staged output
    folder; logs left behind would be half-written and vouched for by nothing.
    """
    try:
        yield
    except BaseException:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
        raise


def evaluate(cfg: EvalConfig, out: str | Path, *, progress: bool = True, echo: Callable[[str], None] = print) -> EvalResult:
    """Run the grid (and the audit) and write every output into the new folder ``out``.

    Every input and output location is checked before any compute; a run that fails or is interrupted
    leaves no ``out`` and none of the oversight log folders it created.
    """
    cfglib.validate(cfg)
    check_output_dir(out, "output folder")                                     # unwritable --out -> ConfigError
    if cfg.log_explanations:
        check_output_dir(cfg.log_explanations, "oversight log folder")
    log_key = read_key(cfg.log_key_file)                                       # bad key file -> ConfigError
    victims = [load_victim(p, cfg.device) for p in cfg.checkpoints]           # missing checkpoint -> ConfigError
    cfg = expand_attacks(cfg, victims)
    n_actions = min(v.view.n_actions for v in victims)
    grid = {e: build_attacks(cfg, e, n_actions) for e in cfg.eps}              # unknown attack / option -> ConfigError
    for attack in (g.attack for attackers in grid.values() for g in attackers):
        check_fits(attack, victims)                                            # another env's policy -> ConfigError
    check_fixed_agents(cfg, victims)                                           # fixed:agent=J beyond the team -> ConfigError
    log_root = Path(cfg.log_explanations) if cfg.log_explanations else None

    def log_dir(victim: Victim, label: str, e: float, seed: int) -> Path | None:
        return None if log_root is None else log_root / cell_folder(victim.label, label, e, seed)

    cell_jobs: list[tuple[int, GridAttack | None, float]] = [
        (seed, g, e) for seed in cfg.seeds for g, e in [(None, 0.0)] + [(g, e) for e in cfg.eps for g in grid[e]]]
    cell_logs = [d for v in victims for s, g, e in cell_jobs
                 if (d := log_dir(v, "none" if g is None else g.label, e, s)) is not None]
    taken = [d for d in cell_logs if holds_log(d)]
    if taken and not cfg.log_append:                                           # a log belongs to one run
        raise ConfigError(f"oversight log folder {str(taken[0])!r} already holds a log; give --append to add to it, "
                          "or another --log-explanations folder")
    # the grid's transfer surrogate (if any) also feeds the audit's black-box-beats-white-box check
    surrogate = next((g.attack.surrogate for attackers in grid.values() for g in attackers
                      if isinstance(g.attack, Transfer)), None)
    cells: list[Cell] = []
    audits: dict[str, AuditReport] = {}
    controls: dict[str, AuditReport] = {}
    total = len(victims) * len(cell_jobs)
    batches: dict[tuple[str, int], list[torch.Tensor]] = {}

    def calibration(victim: Victim, seed: int) -> Callable[[], list[torch.Tensor]]:
        def get() -> list[torch.Tensor]:
            if (victim.label, seed) not in batches:
                batches[victim.label, seed] = calibration_batches(victim, cfg.n_envs, seed)
            return batches[victim.label, seed]
        return get

    created = [d for d in ([log_root] if log_root is not None else []) + cell_logs if not d.exists()]
    with removed_on_failure(created), staged_run_dir(Path(out)) as run:
        cfglib.save_yaml(cfg, run.root / "config.yaml")
        bar = tqdm(total=total, desc="evaluate", disable=not progress)
        start = time.perf_counter()
        for victim in victims:
            for seed, g, e in cell_jobs:
                label = "none" if g is None else g.label
                bar.set_postfix_str(f"{victim.label} {label} eps={e:g} seed={seed}")
                cells.append(run_cell(victim, g, e, seed, cfg, log_dir(victim, label, e, seed), log_key,
                                      calibration(victim, seed)))
                if cells[-1].oversight_log is not None:
                    echo(f"oversight log {cells[-1].oversight_log['dir']} head {cells[-1].oversight_log['head']}")
                bar.update(1)
            if cfg.audit:
                obs = collect_observations(victim, cfg.audit_obs, cfg.seeds[0], cfg.n_envs)
                acfg = AuditConfig(eps=tuple(cfg.eps), square_queries=cfg.audit_queries, max_obs=cfg.audit_obs)
                report = audit(victim.view, obs, acfg, surrogate=surrogate, progress=progress)
                name = f"audit_{victim.label}.md" if len(victims) > 1 else "audit.md"
                atomic_write_text(run.root / name, report.markdown())
                atomic_write_text(run.root / name.replace(".md", ".json"), json.dumps(report.to_dict(), indent=2))
                audits[victim.label] = report
                echo(f"[{victim.label}] audit verdict: {report.verdict}\n{report.table_markdown()}")
                shielded = with_gradient_shield(victim.view)
                if shielded is not None:   # the positive control on this very policy: it must FAIL
                    control = audit(shielded, obs, acfg, surrogate=surrogate, progress=progress)
                    atomic_write_text(run.root / name.replace("audit", "audit_control", 1), control.markdown())
                    controls[victim.label] = control
                    echo(f"[{victim.label}] audit of the gradient_shield control (must FAIL): {control.verdict}")
        bar.close()
        rows = summarise(cells)
        worst = worst_rows(cells)
        across = worst_across_checkpoints(worst) if len(victims) > 1 else []
        text = results_markdown(rows, cfg) + worst_markdown(worst, across) + budget_markdown(rows, worst)
        atomic_write_text(run.root / "episodes.csv", episodes_csv(cells))
        atomic_write_text(run.root / "results.md", text)
        logs = [c.oversight_log for c in cells if c.oversight_log is not None]
        atomic_write_text(run.root / "results.json", json.dumps(
            {"rows": rows, "worst": worst, "worst_across_checkpoints": across,
             "wall_seconds": time.perf_counter() - start,
             "audits": {k: v.to_dict() for k, v in audits.items()},
             "audit_controls": {k: v.to_dict() for k, v in controls.items()}, "oversight_logs": logs}, indent=2))
        for victim in victims:
            plot_curves([r for r in rows + worst if r.get("budget", "all") == "all"], victim.label,
                        run.root / f"curves_{victim.label}.png")
            for e in cfg.eps:
                plot_budget_heatmaps(rows, victim.label, e, run.root / f"budget_{victim.label}_eps{e:g}.png")
        plot_comparison(rows, worst, across, run.root / "comparison.png")
        write_tensorboard(rows, worst, run.root / "tb")
    echo(text)
    return EvalResult(folder=run.root, cells=cells, summary=rows, audits=audits)


# ---------------------------------------------------------------------------------------- CLI
def _floats(text: str, what: str = "eps", accepted: str = "numbers in 1/255 units, e.g. 1,2,4,8") -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{what} {text!r} is not a comma-separated list of {accepted}") from None


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{what} {text!r} is not a comma-separated list of integers, e.g. 0,2") from None


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog=PROG, description="Evaluate checkpoints against a grid of attacks x eps x seeds x "
                           "episodes; writes episodes.csv, results.md, robustness curves and (with --audit) the "
                           "gradient-masking audit.")
    p.add_argument("checkpoints", nargs="*", help="run directories or .zip checkpoints written by train_marl.py "
                   "(default: those of --config; at least one is needed)")
    p.add_argument("--config", type=Path, help="YAML evaluation config, keys as in an evaluation's config.yaml "
                   "(default: none, the built-in defaults)")
    p.add_argument("--attacks", nargs="+", metavar="SPEC",
                   help=f"attack specs name[:key=value,...]; names: {', '.join(ATTACKS)}; presets: "
                        f"{', '.join(PRESETS)} (strong[:steps=N,restarts=R]: PGD-20 x5 restarts, least-likely PGD, "
                        "mad, critic, square, + transfer/bpda/eot/adversary where they apply; budgeted[:steps=N]: "
                        "PGD-10, least-likely PGD-10, + bpda/adversary where they apply) (default: random fgsm "
                        "pgd mad critic; e.g. pgd:steps=20 transfer:surrogate=runs/other adversary:path=runs/adv)")
    p.add_argument("--surrogate", metavar="RUN_OR_ZIP",
                   help="for a preset: an independently trained vanilla policy to transfer attacks from "
                        "(default: none, the preset has no transfer attack)")
    p.add_argument("--adversary", metavar="RUN",
                   help="for a preset: a director (train_adversary.py) trained against the one checkpoint given "
                        "(default: none, the preset has no learned adversary)")
    p.add_argument("--eps", help="comma-separated budgets in 1/255 units (default 1,2,4,8)")
    p.add_argument("--seeds", help="comma-separated seeds (default 0)")
    p.add_argument("--episodes", type=int, help="episodes per seed and grid cell (default 8)")
    p.add_argument("--agents", help="attack only these agents (indices within an env, e.g. 0,2); default all")
    p.add_argument("--budget-agents", metavar="K,...",
                   help="also attack within each budget of at most K attacked agents per env and step, e.g. 1,2 "
                        "(default: no agent budget)")
    p.add_argument("--budget-steps", metavar="P,...",
                   help="also attack within each budget of at most a share P in [0, 1] of each episode's steps, "
                        "e.g. 0.1,0.25 (default: no step budget)")
    p.add_argument("--budget-selectors", metavar="NAME,...",
                   help=f"who/when heuristics of budgeted attacks: {', '.join(SELECTORS)}, or fixed:agent=J for the "
                        "fixed set starting at agent J (default: the four plain ones)")
    p.add_argument("--n-envs", type=int, help="parallel env copies (default 8)")
    cli.add_runtime_flags(p, seed=False)
    p.add_argument("--audit", action="store_true", help="also run the gradient-masking audit")
    p.add_argument("--audit-obs", type=int, help="observations the audit uses (default 256)")
    p.add_argument("--log-explanations", metavar="DIR", help="write an oversight log (PGCA per step) "
                   "for every cell into DIR (default: no log)")
    p.add_argument("--log-every", type=int, help="log every k-th step of each episode (default 1)")
    p.add_argument("--append", action="store_true",
                   help="add to oversight logs that already exist (default: refuse; a log belongs to one run)")
    p.add_argument("--log-key-file", metavar="F",
                   help="HMAC key for the oversight logs (default: $FGMF_LOG_KEY_FILE if set, else no key)")
    p.add_argument("--out", type=Path, help="output folder (default runs/eval-<time>)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def resolve_config(args: argparse.Namespace) -> EvalConfig:
    """Defaults < --config file < flags."""
    flags: dict[str, Any] = {
        "checkpoints": list(args.checkpoints) or None, "attacks": args.attacks,
        "eps": _floats(args.eps) if args.eps is not None else None,
        "seeds": _ints(args.seeds, "seeds") if args.seeds is not None else None,
        "episodes": args.episodes, "agents": _ints(args.agents, "agents") if args.agents is not None else None,
        "n_envs": args.n_envs, "device": args.device, "audit": True if args.audit else None,
        "audit_obs": args.audit_obs, "log_explanations": args.log_explanations, "log_every": args.log_every,
        "log_append": True if args.append else None, "log_key_file": args.log_key_file,
        "surrogate": args.surrogate, "adversary": args.adversary,
        "budget_agents": _ints(args.budget_agents, "budget agents") if args.budget_agents is not None else None,
        "budget_steps": _floats(args.budget_steps, "budget steps", "fractions in [0, 1], e.g. 0.1,0.25") if args.budget_steps is not None else None,
        "budget_selectors": [x.strip() for x in args.budget_selectors.split(",") if x.strip()]
        if args.budget_selectors is not None else None,
    }
    return cli.load_config(EvalConfig, config_file=args.config, flags=flags)


def main(argv: Sequence[str] | None = None) -> int:
    args = cli.parse(build_parser(), argv)
    cfg = resolve_config(args)
    cli.apply_threads(args.threads)
    out = args.out or Path("runs") / f"eval-{time.strftime('%Y%m%d-%H%M%S')}"
    result = evaluate(cfg, out, progress=not args.no_progress)
    print(f"results: {result.folder / 'results.md'}\nepisodes: {result.folder / 'episodes.csv'}")
    return 0


def entry(argv: Sequence[str] | None = None) -> int:
    """The process entry point of ``scripts/evaluate.py``."""
    return cli.run(main, argv, prog=PROG)
