"""Attack budgets, and the heuristics that choose whom and when to attack within one.

The multi-agent question (c-MARL, Lin et al. 2020): with one compromised sensor, or a few attacked
steps, how much can an attacker do, and does choosing whom and when matter? A :class:`Budget` caps
an attacker at ``agents`` (k) attacked agents per env and step, and at ``steps`` (p) attacked steps
per episode, as a fraction of the env's horizon T: at most ``floor(p * T)`` steps, a count fixed
before the episode starts (an online attacker cannot know how long an episode will last; the native
env's episodes all last T steps). A step is attacked when at least one agent of its env is.

:class:`BudgetedAttack` wraps any :class:`~fgmf_marl.attacks.base.Attack` (so budgets hold for every
attack, learned or fixed) with a :class:`Selector`, the heuristic that ranks agents each step and
says whether the step is worth spending budget on:

* ``random``: k agents uniformly at random, each step attacked with probability p;
* ``fixed``: always agents 0..k-1 (one compromised sensor), steps as ``random``; ``fixed:agent=J``
  starts the set at agent J (agents J..J+k-1, mod n), so a grid over J finds the team's weakest
  sensor (evaluated on the same episodes, the best J is a hindsight choice: a baseline no online
  attacker beats by luck);
* ``timed``: strategically timed (Lin et al. 2017): the k agents with the largest action-preference
  gap ``max_a pi(a|x) - min_a pi(a|x)``, on steps whose gap is among the largest;
* ``value``: critic-guided greedy: the k agents whose own value estimate the attack lowers most,
  on steps where that drop is among the largest (the attack runs on every agent to measure it and
  the chosen rows keep that perturbation, so nothing is attacked twice).

"Among the largest" is a threshold: the ``1 - p`` quantile of the step score on a calibration
rollout of the clean policy (:func:`step_scores`, seeds of their own); the hard cap binds where an
episode has more high-scoring steps than that. Scores under attack differ from clean ones, so a
threshold alone underspends (docs/experiments/adversary.md, "Budgeted attacks and the learned director"), hence
pacing, as Lin et al. set their threshold so the budget is spent: once the budget left equals the
steps left in the episode, every remaining step is attacked. Random timing needs no calibration
(its step score is uniform, the threshold is ``1 - p``).

The budget is enforced here, and measured independently by the episode loop
(:class:`~fgmf_marl.rollout.RolloutResult` counts the rows whose observation changed), so a report
of what was spent never relies on the code that was meant to limit it.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from fgmf_marl.attacks.base import Attack
from fgmf_marl.config import ConfigError
from fgmf_marl.policy import PolicyLike, TargetLike


@dataclass(frozen=True)
class Budget:
    """At most ``agents`` attacked agents per env and step, ``steps`` (fraction of the horizon) per episode."""

    agents: int | None = None     # k; None: every agent
    steps: float | None = None    # p in [0, 1]; None: every step

    def __post_init__(self) -> None:
        if self.agents is not None and (isinstance(self.agents, bool) or not isinstance(self.agents, int)
                                        or self.agents < 0):
            raise ValueError(f"budget agents={self.agents!r} must be an integer >= 0")
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, (int, float))
                                       or not 0.0 <= self.steps <= 1.0):
            raise ValueError(f"budget steps={self.steps!r} must be a fraction of the episode in [0, 1]")

    @property
    def unlimited(self) -> bool:
        return self.agents is None and (self.steps is None or self.steps >= 1.0)

    def label(self) -> str:
        """``k=1,p=0.25``; ``all`` for no budget."""
        parts = ([f"k={self.agents}"] if self.agents is not None else []) + \
                ([f"p={self.steps:g}"] if self.steps is not None else [])
        return ",".join(parts) or "all"

    def step_count(self, horizon: int) -> int:
        """Attacked steps allowed per episode of ``horizon`` steps: ``floor(p * T)``."""
        return horizon if self.steps is None else int(math.floor(self.steps * horizon + 1e-9))


@dataclass
class Scores:
    """A selector's view of one step: per-agent ranking, and a precomputed perturbation if it made one."""

    agents: Tensor                    # (n_envs, n_agents), larger = attack first
    step: Tensor | None               # (n_envs,) how much the step is worth; None = random timing
    adversarial: Tensor | None = None  # (B, C, H, W) the attack applied to every row, reused for chosen rows


class Selector(ABC):
    """Ranks agents and steps for a budgeted attacker (see the module docstring)."""

    name: str = "selector"

    @abstractmethod
    def scores(self, view: PolicyLike, clean: Tensor, n_agents: int, attack: Attack, target: TargetLike,
               generator: torch.Generator) -> Scores:
        """Scores of one step's rows ``clean`` (B = n_envs * n_agents, env-major)."""


class RandomSelector(Selector):
    name = "random"

    def scores(self, view: PolicyLike, clean: Tensor, n_agents: int, attack: Attack, target: TargetLike,
               generator: torch.Generator) -> Scores:
        n_envs = clean.shape[0] // n_agents
        return Scores(torch.rand(n_envs, n_agents, generator=generator).to(clean.device), None)


class FixedSelector(Selector):
    name = "fixed"

    def __init__(self, agent: int = 0) -> None:
        if isinstance(agent, bool) or not isinstance(agent, int) or agent < 0:
            raise ValueError(f"fixed:agent={agent!r} must be an agent index >= 0")
        self.agent = agent

    def scores(self, view: PolicyLike, clean: Tensor, n_agents: int, attack: Attack, target: TargetLike,
               generator: torch.Generator) -> Scores:
        if self.agent >= n_agents:
            raise ValueError(f"fixed:agent={self.agent} but the env has {n_agents} agents (0..{n_agents - 1})")
        n_envs = clean.shape[0] // n_agents
        rank = (torch.arange(n_agents, device=clean.device) - self.agent) % n_agents
        order = -rank.float()   # agent J first, then J+1, ... (mod n)
        return Scores(order.expand(n_envs, n_agents).clone(), None)


class TimedSelector(Selector):
    name = "timed"

    @torch.no_grad()
    def scores(self, view: PolicyLike, clean: Tensor, n_agents: int, attack: Attack, target: TargetLike,
               generator: torch.Generator) -> Scores:
        probs = torch.softmax(view(clean), dim=-1)
        gap = (probs.amax(dim=-1) - probs.amin(dim=-1)).reshape(-1, n_agents)
        return Scores(gap, gap)


class ValueSelector(Selector):
    name = "value"

    def scores(self, view: PolicyLike, clean: Tensor, n_agents: int, attack: Attack, target: TargetLike,
               generator: torch.Generator) -> Scores:
        adversarial = attack.perturb(view, clean, target=target)
        with torch.no_grad():
            drop = (view.value(clean) - view.value(adversarial)).reshape(-1, n_agents)
        return Scores(drop, drop, adversarial)


#: the selector label of a learned director's rows in an evaluation: it chooses whom and when itself
LEARNED = "learned"
SELECTORS: dict[str, type[Selector]] = {s.name: s for s in (RandomSelector, FixedSelector, TimedSelector, ValueSelector)}


def make_selector(spec: str) -> Selector:
    """The selector ``spec`` names (``random``, ``fixed``, ``fixed:agent=J``, ``timed``, ``value``);
    ValueError naming the accepted ones otherwise."""
    name, _, option = spec.partition(":")
    if name not in SELECTORS:
        raise ValueError(f"unknown budget selector {spec!r}; accepted: {', '.join(SELECTORS)} or fixed:agent=J")
    if not option:
        return SELECTORS[name]()
    key, _, value = option.partition("=")
    if name != "fixed" or key != "agent" or not value.isdigit():
        raise ValueError(f"budget selector {spec!r}: the only option is fixed:agent=J (J an agent index)")
    return FixedSelector(int(value))


def _choose(scores: Scores, k: int, allowed: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The k best allowed agents per env (n_envs, n_agents) bool, and each env's step score (mean of theirs)."""
    ranking = scores.agents.float()
    if allowed is not None:
        ranking = ranking.masked_fill(~allowed, float("-inf"))
    k = min(k, ranking.shape[1])
    chosen = torch.zeros_like(ranking, dtype=torch.bool)
    if k == 0:
        return chosen, None if scores.step is None else torch.full_like(ranking[:, 0], float("-inf"))
    top = ranking.topk(k, dim=1)
    chosen.scatter_(1, top.indices, torch.isfinite(top.values))
    if scores.step is None:
        return chosen, None
    step = scores.step.float().masked_fill(~chosen, 0.0).sum(1) / chosen.sum(1).clamp(min=1)
    return chosen, step.masked_fill(~chosen.any(1), float("-inf"))


def check_budgetable(attack: Attack) -> None:
    """A one-line ConfigError for an attack that keeps state over an episode (a sensor fault): a budget of steps
    or agents per step would cut that state mid-episode, so such an attack is not budgeted."""
    if getattr(attack, "stateful", False):
        raise ConfigError(f"attack {attack.name!r} keeps state over an episode and cannot be budgeted by steps or "
                          "agents per step; accepted: --agents to choose the faulty sensors, without a budget")


class BudgetedAttack(Attack):
    """``attack`` within ``budget``, on the agents and steps ``selector`` picks (see the module docstring).

    Stateful over episodes: :meth:`as_perturb` returns a fresh :class:`BudgetedPerturb` whose spent
    counters the episode loop resets through ``end_episodes``; a bare :meth:`perturb` call is one
    step of a fresh episode. ``n_agents`` is the slots per env, ``horizon`` the env's episode length
    T, ``threshold`` the step-score threshold (see :meth:`calibrated`).
    """

    name = "budgeted"

    def __init__(self, attack: Attack, selector: Selector, budget: Budget, *, n_agents: int, horizon: int,
                 threshold: float | None = None, seed: int = 0) -> None:
        super().__init__(attack.eps, quantize=attack.quantize)
        if horizon < 1 or n_agents < 1:
            raise ValueError(f"horizon={horizon} and n_agents={n_agents} must be >= 1")
        check_budgetable(attack)
        self.attack, self.selector, self.budget = attack, selector, budget
        self.n_agents, self.horizon, self.seed = n_agents, horizon, seed
        self.uses_gradients, self.targeted, self.uses_eps = attack.uses_gradients, attack.targeted, attack.uses_eps
        self.threshold = self.default_threshold() if threshold is None else float(threshold)

    def project(self, adv: Tensor, clean: Tensor) -> Tensor:
        """The wrapped attack's threat model (an L2 or patch attack stays one within a budget)."""
        return self.attack.project(adv, clean)

    @property
    def needs_calibration(self) -> bool:
        """Whether the step threshold must come from a calibration rollout (scored timing under p < 1)."""
        return self.selector.name in ("timed", "value") and self.budget.steps is not None and self.budget.steps < 1

    def default_threshold(self) -> float:
        """-inf at p = 1 (every step is worth it); ``1 - p`` for random timing (uniform step score)."""
        p = 1.0 if self.budget.steps is None else self.budget.steps
        return float("-inf") if p >= 1.0 or self.needs_calibration else 1.0 - p

    def calibrated(self, view: PolicyLike, batches: Iterable[Tensor]) -> "BudgetedAttack":
        """A copy whose threshold is the ``1 - p`` quantile of :func:`step_scores` over ``batches``."""
        if not self.needs_calibration:
            return self
        scores = np.concatenate([step_scores(self, view, b) for b in batches])
        scores = scores[np.isfinite(scores)]
        threshold = float(np.quantile(scores, 1.0 - float(self.budget.steps))) if scores.size else float("inf")
        return BudgetedAttack(self.attack, self.selector, self.budget, n_agents=self.n_agents, horizon=self.horizon,
                              threshold=threshold, seed=self.seed)

    def as_perturb(self, view: PolicyLike, *, n_agents: int | None = None,
                   agents: Sequence[int] | None = None) -> "BudgetedPerturb":
        if n_agents is not None and n_agents != self.n_agents:
            raise ValueError(f"budgeted attack built for {self.n_agents} agents per env, used with {n_agents}")
        return BudgetedPerturb(self, view, agents)

    def perturb(self, view: PolicyLike, obs: Tensor, *, agent_mask: Tensor | None = None, target: TargetLike = None) -> Tensor:
        """One step of a fresh episode: the attack on the rows the selector picks within the budget."""
        if agent_mask is not None:
            raise ValueError("a budgeted attack chooses its own rows; restrict agents with as_perturb(agents=...)")
        return BudgetedPerturb(self, view)(obs)

    def _attack(self, view: PolicyLike, clean: Tensor, target: Tensor | None) -> Tensor:
        """The wrapped attack on every row: the unbudgeted attack (the budget lives in :class:`BudgetedPerturb`)."""
        return self.attack._attack(view, clean, target)


def step_scores(attack: BudgetedAttack, view: PolicyLike, clean: Tensor) -> np.ndarray:
    """Each env's step score (n_envs,) for the agents the selector would choose in ``clean``."""
    generator = torch.Generator().manual_seed(attack.seed)
    scores = attack.selector.scores(view, clean, attack.n_agents, attack.attack, None, generator)
    k = attack.n_agents if attack.budget.agents is None else attack.budget.agents
    _, step = _choose(scores, k, None)
    if step is None:
        return torch.rand(clean.shape[0] // attack.n_agents, generator=generator).numpy()
    return step.cpu().numpy()


class BudgetState:
    """One budget spent per env over episodes: the single place where k and the step count are enforced.

    Heuristic attackers (:class:`BudgetedPerturb`) and the learned director (``fgmf_marl.agents.adversary``)
    both ask :meth:`grant` which of the agents they want to attack they may attack this step.
    """

    def __init__(self, budget: Budget, n_agents: int, horizon: int, generator: torch.Generator) -> None:
        self.n_agents, self.horizon = n_agents, horizon
        self.max_steps = budget.step_count(horizon)
        self.k = n_agents if budget.agents is None else min(budget.agents, n_agents)
        self.generator = generator
        self.spent: np.ndarray | None = None     # attacked steps of each env's current episode
        self.elapsed: np.ndarray | None = None   # steps of each env's current episode so far

    def _spent(self, n_envs: int) -> np.ndarray:
        if self.spent is None or self.spent.shape[0] != n_envs:
            self.spent = np.zeros(n_envs, dtype=int)
            self.elapsed = np.zeros(n_envs, dtype=int)
        return self.spent

    def must_spend(self, n_envs: int) -> np.ndarray:
        """Envs whose budget left is at least the steps left in the episode (horizon minus steps so far):
        a heuristic attacks them now or leaves budget unspent (pacing)."""
        left = self.steps_left(n_envs)
        return (left > 0) & (left >= self.horizon - self.elapsed)

    def steps_left(self, n_envs: int) -> np.ndarray:
        """Attacked steps each env may still spend this episode (n_envs,)."""
        return self.max_steps - self._spent(n_envs)

    def grant(self, wanted: Tensor, priority: Tensor | None = None) -> Tensor:
        """The wanted (n_envs, n_agents) attacks that fit: at most k per env, by ``priority`` (random when
        None), in envs with steps left; the granted steps are spent."""
        n_envs = wanted.shape[0]
        left = torch.as_tensor(self.steps_left(n_envs) > 0, device=wanted.device)
        if self.k == 0:
            self.elapsed += 1
            return torch.zeros_like(wanted)
        if priority is None:
            priority = torch.rand(wanted.shape, generator=self.generator).to(wanted.device)
        ranked = priority.float().masked_fill(~wanted, float("-inf"))
        top = ranked.topk(self.k, dim=1)
        granted = torch.zeros_like(wanted).scatter_(1, top.indices, torch.isfinite(top.values)) & left[:, None]
        self.spent += granted.any(1).cpu().numpy().astype(int)
        self.elapsed += 1
        return granted

    def end_episodes(self, env_done: np.ndarray) -> None:
        """Reset the spent counters of the envs whose episode just ended."""
        if self.spent is not None and self.elapsed is not None:
            done = np.asarray(env_done, dtype=bool)
            self.spent[done] = 0
            self.elapsed[done] = 0


class BudgetedPerturb:
    """The episode loop's ``perturb`` for one :class:`BudgetedAttack`: spends and resets its budget per env."""

    def __init__(self, attack: BudgetedAttack, view: PolicyLike, agents: Sequence[int] | None = None) -> None:
        self.attack, self.view, self.n_agents = attack, view, attack.n_agents
        self.agents = check_agents(agents, attack.n_agents)
        self.generator = torch.Generator().manual_seed(attack.seed)
        self.state = BudgetState(attack.budget, attack.n_agents, attack.horizon, self.generator)

    def __call__(self, clean: Tensor) -> Tensor:
        n_envs = envs_of(clean, self.n_agents)
        if self.state.k == 0 or not (self.state.steps_left(n_envs) > 0).any():
            return clean
        scores = self.attack.selector.scores(self.view, clean, self.n_agents, self.attack.attack, None, self.generator)
        chosen, step = _choose(scores, self.state.k, allowed_agents(self.agents, n_envs, self.n_agents, clean.device))
        if step is None:
            step = torch.rand(n_envs, generator=self.generator).to(clean.device)
        must = torch.as_tensor(self.state.must_spend(n_envs), device=clean.device)
        go = ((step >= self.attack.threshold) | must) & chosen.any(1)
        rows = self.state.grant(chosen & go[:, None], scores.agents).reshape(-1)
        if not bool(rows.any()):
            return clean
        if scores.adversarial is not None:
            return torch.where(rows[:, None, None, None], scores.adversarial, clean)
        return self.attack.attack.perturb(self.view, clean, agent_mask=rows)

    def end_episodes(self, env_done: np.ndarray) -> None:
        self.state.end_episodes(env_done)


def check_agents(agents: Sequence[int] | None, n_agents: int) -> list[int] | None:
    """The attacked-agent subset, sorted; ValueError naming the accepted range when one is out of it."""
    if agents is None:
        return None
    chosen = sorted(set(int(a) for a in agents))
    if not all(0 <= a < n_agents for a in chosen):
        raise ValueError(f"attacked agents {chosen} out of range; accepted: 0..{n_agents - 1}")
    return chosen


def allowed_agents(agents: list[int] | None, n_envs: int, n_agents: int, device: torch.device) -> Tensor | None:
    """(n_envs, n_agents) mask of the agents an attacker may touch; None = all."""
    if agents is None:
        return None
    allowed = torch.zeros(n_envs, n_agents, dtype=torch.bool, device=device)
    allowed[:, agents] = True
    return allowed


def envs_of(batch: Tensor, n_agents: int) -> int:
    """Whole envs in an env-major batch of slots; ValueError otherwise."""
    if batch.shape[0] % n_agents:
        raise ValueError(f"batch of {batch.shape[0]} observations is not a whole number of envs with {n_agents} agents")
    return batch.shape[0] // n_agents
