"""The config of a robustness evaluation (``scripts/evaluate.py``): checkpoints x attacks x eps x seeds x episodes.

Validated by :func:`fgmf_marl.config.load` before any compute; the grid (:mod:`fgmf_marl.teams.grid`)
runs it and records it as ``config.yaml`` next to the results, so ``--config`` reruns it exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from fgmf_marl.attacks import PRESETS, expand_presets, parse_spec
from fgmf_marl.attacks.base import MAX_ITERATIONS
from fgmf_marl.attacks.budget import SELECTORS, Budget, make_selector
from fgmf_marl.config import ConfigError, check_device, check_range, check_seed
from fgmf_marl.envs.registry import MAX_ENVS


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
    alarm: str | None = None            # an alarm_detector.json (scripts/alarm_eval.py): its scores go into the logs
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
        if self.alarm and not self.log_explanations:
            raise ConfigError("--alarm writes its scores into the oversight log; give --log-explanations DIR too")
        if self.alarm and len(self.checkpoints) > 1:
            raise ConfigError(f"an alarm is fitted to one policy; got {len(self.checkpoints)} checkpoints "
                              "(evaluate them one at a time, each with its own alarm_detector.json)")
        if self.adversary and len(self.checkpoints) > 1:
            raise ConfigError(f"adversary is trained against one checkpoint; got {len(self.checkpoints)} checkpoints "
                              "(evaluate them one at a time, or give adversary:path=PATH as an attack)")
        expanded = expand_presets(self.attacks, surrogate=self.surrogate, adversary=self.adversary, gated=True,
                                  random_forward=True)
        if not expanded:
            raise ConfigError(f"--attacks {','.join(self.attacks)} expands to no attack here (the preset 'learned' is "
                              "the director given by --adversary); accepted: an attack or a preset with its inputs")
        for spec in expanded:
            parse_spec(spec)
        for e in self.eps:
            if not 0 < e <= 255:
                raise ConfigError(f"eps {e:g} is out of range; accepted: numbers in (0, 255] in 1/255 units, e.g. 1,2,4,8")
        if not self.eps:
            raise ConfigError("give at least one eps (1/255 units)")
        if not self.seeds:
            raise ConfigError("give at least one seed")
        # a repeated value would run a grid cell twice and, with --log-explanations, collide with its own log
        for name, values in (("eps", self.eps), ("seeds", self.seeds), ("attacks", self.attacks),
                             ("checkpoints", self.checkpoints)):
            repeated = sorted({str(v) for v in values if list(values).count(v) > 1})
            if repeated:
                raise ConfigError(f"{name} repeats {', '.join(repeated)}; accepted: each value once")
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
