"""Adversarial team training: an attacker perturbs what the team sees while it collects its rollouts.

:class:`AttackedVecEnv` wraps the training VecEnv: every observation the env returns passes through
a gradient attack against the *current* policy before the policy acts on it, so PPO stores and
learns from what the agents saw (Madry-style adversarial training, as ATLA trains against its
attacker; Zhang et al. 2021). :class:`AdversarialTrainingCallback` sets the attack's budget before
each rollout from the training progress, with the defenses' one schedule (off for the first
``start`` fraction of training, then a linear ramp over ``warmup``): a policy that has not learned
what to look at cannot learn it under attack either.

Choices:

* a share ``fraction`` of the agent-slots is attacked at each step (Bernoulli per slot and step,
  from a dedicated generator): the team also keeps meeting clean observations, which is what keeps
  its clean return, and in a multi-agent team it meets the partly-attacked situations a budgeted
  attacker creates;
* the perturbed image is quantised to the uint8 grid inside the eps-ball (what a sensor can emit,
  and what the buffer stores), so eps below 1/255 changes nothing;
* the critic and every regulariser see the perturbed observations too: the buffer holds only what
  the agents saw (the value of the observation an agent acts on is the value it is trained on).
* ``bpda: true`` attacks a gated policy (SGAM) as BPDA does at evaluation: the gradient passes
  through a straight-through version of the gate (forward unchanged). Why it is offered: a team
  trained only against attacks that differentiate through its own soft mask meets, at evaluation,
  a BPDA attacker it never trained against, and BPDA was that team's worst attack on some seeds
  (docs/RESULTS.md, robust_team). On a policy without a gate it is exactly the plain attack.

``kind: director`` is ATLA (Zhang et al. 2021) with the PA-AD director of :mod:`fgmf_marl.agents.adversary`
as the attacker: every ``director_every`` team rollouts the director trains for ``director_steps``
steps with PPO against the current (frozen for that phase) team, on episodes of its own, and the
team's next rollouts meet it. It starts warm at the least-likely attack, the strongest fixed one, so
the team meets a strong attacker from the first attacked rollout and an adaptive one after.
Checkpoints carry the director (``checkpoints/director_step_N.zip``) and ``--resume`` restores it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper

from stable_baselines3 import PPO

from fgmf_marl.agents.adversary import AdversaryAttack, AdversaryConfig, AdversaryVecEnv, director_policy_kwargs, warm_start
from fgmf_marl.attacks import BPDA, Attack, make_attack
from fgmf_marl.config import ConfigError, check_range
from fgmf_marl.policy import PolicyLike


@dataclass
class AdversarialTrainingConfig:
    """The ``adversary:`` section of a run config: which attacker the team trains against, and how hard."""

    kind: Literal["none", "fgsm", "pgd", "director"] = "none"
    eps: float = 4.0             # L-inf budget once ramped in, in 1/255 units
    steps: int = 3               # PGD steps (ignored by fgsm)
    fraction: float = 0.5        # share of agent-slots attacked at each step
    bpda: bool = False           # fgsm/pgd: differentiate through the input gate's straight-through version
    start: float = 0.3           # fraction of training before the attacker switches on
    warmup: float = 0.3          # fraction of training over which eps then ramps up linearly from 0
    director_every: int = 8      # director: team rollouts between its training phases
    director_steps: int = 1024   # director: its PPO steps per phase (one per env copy per step)
    director_envs: int = 8       # director: env copies it trains on

    def validate(self) -> None:
        if not 0 < self.eps <= 255:
            raise ConfigError(f"adversary.eps={self.eps} is out of range; accepted: (0, 255] in 1/255 units, e.g. 4")
        if not 1 <= self.steps <= 100:
            raise ConfigError(f"adversary.steps={self.steps} is out of range; accepted: integers 1..100")
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"adversary.fraction={self.fraction} must be in (0, 1]")
        if not (0 <= self.start < 1 and 0 <= self.warmup < 1):
            raise ConfigError(f"adversary.start={self.start} and adversary.warmup={self.warmup} must be in [0, 1)")
        check_range("adversary.director_every", self.director_every, 1, 10**6)
        check_range("adversary.director_steps", self.director_steps, 1, 10**8)
        check_range("adversary.director_envs", self.director_envs, 1, 4096)

    def check_knobs_apply(self) -> None:
        """A one-line ConfigError naming the first knob set away from its default that ``kind`` ignores.

        Not part of :meth:`validate`: a run's saved config holds every knob, and loading it must not
        depend on defaults staying the same; a new run checks it, since a knob that does nothing is a
        mistake the user would otherwise only find in the results.
        """
        default = AdversarialTrainingConfig()
        for name, kinds in KNOB_KINDS.items():
            if self.kind not in kinds and getattr(self, name) != getattr(default, name):
                raise ConfigError(f"adversary.{name}={getattr(self, name)!r} has no effect with adversary.kind="
                                  f"{self.kind}; it applies with adversary.kind={' or '.join(kinds)}")

    def attack(self, eps255: float) -> Attack:
        """The fixed attack (fgsm, pgd) at budget ``eps255`` (1/255 units), quantised to the uint8 grid."""
        if self.kind == "director":
            raise ValueError("the director is trained, not built: see AdversarialTrainingCallback")
        options: dict[str, Any] = {"quantize": True}
        if self.kind == "pgd":
            options["steps"] = self.steps
        attack = make_attack(self.kind, eps255 / 255.0, **options)
        return BPDA(attack) if self.bpda else attack

    def eps_at(self, done: float) -> float:
        """Budget (1/255 units) after the fraction ``done`` of training: 0, then a ramp to ``eps``."""
        if done < self.start:
            return 0.0
        return self.eps if self.warmup <= 0 else self.eps * min(1.0, (done - self.start) / self.warmup)


#: the adversary kinds each knob of :class:`AdversarialTrainingConfig` acts in
KNOB_KINDS: dict[str, tuple[str, ...]] = {
    "eps": ("fgsm", "pgd", "director"), "fraction": ("fgsm", "pgd", "director"), "start": ("fgsm", "pgd", "director"),
    "warmup": ("fgsm", "pgd", "director"), "steps": ("pgd", "director"), "bpda": ("fgsm", "pgd"),
    "director_every": ("director",), "director_steps": ("director",), "director_envs": ("director",)}


class AttackedVecEnv(VecEnvWrapper):
    """The training VecEnv as the team sees it under attack: observations perturbed before acting.

    ``view`` is the policy being trained (its current weights are attacked at every step; set it
    once the model exists, since the model is built on this env); ``attack`` is None while the budget is 0. ``attacked_fraction`` is the share of slots actually
    perturbed since the last :meth:`reset_counts`, for TensorBoard.
    """

    def __init__(self, venv: VecEnv, view: PolicyLike | None, fraction: float, seed: int) -> None:
        super().__init__(venv)
        self.view = view
        self.fraction = fraction
        self.attack: Attack | None = None
        self._rng = np.random.default_rng(seed)
        self._attacked = 0
        self._seen = 0

    def reset_counts(self) -> float:
        """The share of slots attacked since the last call, and start counting again."""
        share = self._attacked / max(self._seen, 1)
        self._attacked = self._seen = 0
        return share

    def get_state(self) -> dict[str, Any]:
        """The generator that picks the attacked slots (and the slot counters), for an exact resume."""
        return {"rng": self._rng.bit_generator.state, "attacked": self._attacked, "seen": self._seen}

    def set_state(self, state: dict[str, Any]) -> None:
        self._rng.bit_generator.state = state["rng"]
        self._attacked, self._seen = int(state["attacked"]), int(state["seen"])

    def _perturb(self, obs: np.ndarray) -> np.ndarray:
        if self.attack is None or self.view is None:
            return obs
        rows = self._rng.random(obs.shape[0]) < self.fraction
        self._seen += obs.shape[0]
        if not rows.any():
            return obs
        self._attacked += int(rows.sum())
        device = next(self.view.parameters()).device
        clean = torch.as_tensor(obs, device=device).float().div_(255.0)
        seen = self.attack.perturb(self.view, clean, agent_mask=torch.as_tensor(rows, device=device))
        return torch.round(seen * 255.0).to(torch.uint8).cpu().numpy()

    def reset(self) -> np.ndarray:
        return self._perturb(self.venv.reset())

    def step_wait(self) -> Any:
        obs, rewards, dones, infos = self.venv.step_wait()
        return self._perturb(obs), rewards, dones, infos


class DirectorTrainer:
    """The ATLA attacker: a PA-AD director and the env it trains on against the team being trained."""

    def __init__(self, env: AdversaryVecEnv, config: AdversarialTrainingConfig, seed: int, device: str = "cpu",
                 director: PPO | None = None) -> None:
        defaults = AdversaryConfig()
        self.env, self.config, self.n_agents = env, config, env.n_agents
        if director is None:
            director = PPO("MultiInputPolicy", env, learning_rate=defaults.learning_rate, n_steps=defaults.n_steps,
                           batch_size=defaults.batch_size, n_epochs=defaults.n_epochs, ent_coef=defaults.ent_coef,
                           gamma=defaults.gamma, clip_range=defaults.clip_range, seed=seed, device=device,
                           verbose=0, policy_kwargs=director_policy_kwargs())
            warm_start(director.policy, env.core, defaults.warm_start, defaults.warm_start_prob)
        else:
            director.set_env(env)
        self.director = director
        self.phases = 0

    def train(self, eps255: float) -> float:
        """One phase: ``director_steps`` PPO steps at ``eps255`` against the team; returns the mean team reward."""
        self.env.set_eps(eps255 / 255.0)
        rewards: list[float] = []
        self.env.on_step = lambda team: rewards.append(float(np.mean(team)))
        try:
            self.director.learn(self.config.director_steps, reset_num_timesteps=False, progress_bar=False)
        finally:
            self.env.on_step = None
        self.phases += 1
        return float(np.mean(rewards)) if rewards else float("nan")

    def attack(self, eps255: float) -> AdversaryAttack:
        return AdversaryAttack(self.director, self.n_agents, eps255 / 255.0, steps=self.config.steps, quantize=True)


class AdversarialTrainingCallback(BaseCallback):
    """Before each rollout, sets the attack of :class:`AttackedVecEnv` from the training progress."""

    def __init__(self, env: AttackedVecEnv, config: AdversarialTrainingConfig,
                 director: DirectorTrainer | None = None) -> None:
        super().__init__()
        if (config.kind == "director") != (director is not None):
            raise ValueError("adversary kind 'director' needs a DirectorTrainer, and only it")
        self.env = env
        self.config = config
        self.director = director
        self._attacked_rollouts = 0

    def _on_rollout_start(self) -> None:
        eps = self.config.eps_at(1.0 - self.model._current_progress_remaining)
        self.logger.record("adversary/eps255", eps)
        if eps <= 0:
            self.env.attack = None
            return
        if self.director is None:
            self.env.attack = self.config.attack(eps)
            return
        if self._attacked_rollouts % self.config.director_every == 0:
            team = self.director.train(eps)
            self.logger.record("adversary/director_team_reward", team)
            self.logger.record("adversary/director_phases", self.director.phases)
        self._attacked_rollouts += 1
        self.env.attack = self.director.attack(eps)

    def _on_rollout_end(self) -> None:
        self.logger.record("adversary/attacked_fraction", self.env.reset_counts())

    def _on_step(self) -> bool:
        return True
