"""The learned adversary agent, PA-AD style (Sun et al. 2022): a PPO *director* plus a gradient *actor*.

Each step the director sees every victim's clean observation of one environment (stacked along
channels) and decides, per victim agent, either "leave alone" or "push toward action a". The actor,
a targeted PGD within eps (:class:`fgmf_marl.attacks.PGD`), realises the decision on the victim's
observation; the frozen victim policy acts (greedily) on what it sees. The director's reward is minus
the team reward, so PPO trains it to minimise the team's return: the PA-AD split, where RL searches
the small space of policy-level directions and gradients find the pixels.

Three shapes of the same mechanism (:class:`DirectorCore` holds it, once):

* :class:`AdversaryParallelEnv`: a PettingZoo ``ParallelEnv`` wrapper adding ``adversary_0`` to any of
  our environments as the policy sees them (channel-first, e.g. ``fgmf_marl.envs.registry.make_parallel_env``); the victims stay listed as agents (their observations, rewards and infos are the
  env's, infos add what the attack did) but they are frozen checkpoints: the actions passed for them
  are ignored, their policy acts on the perturbed observation. Passes ``parallel_api_test``.
* :class:`AdversaryVecEnv`: the same over our batched SB3 VecEnvs (all env copies attacked in one
  batched PGD call), which is what ``scripts/train_adversary.py`` trains PPO on; a one-env-at-a-time
  ParallelEnv would spend most of its time in tiny PGD batches.
* :class:`AdversaryAttack`: the trained director as an :class:`~fgmf_marl.attacks.Attack`, so
  ``evaluate.py --attacks adversary:path=runs/<adv>`` ranks it next to PGD at the same eps.

Choices: the "no attack" option exists because an attacker with a per-step budget or a detection
risk wants it, and because "which agents to attack" is part of the issue's decision; besides "push
toward action a" the director may pick two policy-level directions that need no perception
(untargeted PGD, and the least-likely action) and starts at the least-likely one
(:func:`warm_start`), so PPO searches for damage beyond the fixed attacks; the actor is PGD with
``actor_steps`` steps (default 10, as PGD-10 in the evaluation grid).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import gymnasium as gym
import numpy as np
import torch
from pettingzoo import ParallelEnv
from stable_baselines3 import PPO
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.vec_env import VecEnv
from torch import Tensor, nn

from fgmf_marl.agents.config import MAX_BATCH, MAX_EPOCHS, MAX_ROLLOUT_STEPS
from fgmf_marl.agents.policies import ImageFeatures
from fgmf_marl.agents.safe_load import load_without_pickle, ppo_objects
from fgmf_marl.attacks import PGD, Attack
from fgmf_marl.attacks.base import LEAST_LIKELY, MAX_ITERATIONS
from fgmf_marl.attacks.budget import Budget, BudgetState, allowed_agents, check_agents, envs_of
from fgmf_marl.config import ConfigError, check_device, check_range, check_seed
from fgmf_marl.policy import PolicyLike, TargetLike

ADVERSARY = "adversary_0"
#: the director's options per victim besides "push toward action a": no attack, untargeted, least likely
POLICY_LEVEL_OPTIONS = 3
#: how a director's action is laid out (``AdversaryConfig.decision``): an option per victim, or one joint choice
DECISIONS: tuple[str, ...] = ("per_victim", "joint")


def knowledge_size(n_agents: int, n_actions: int) -> int:
    """Length of the director's ``victim`` vector: each victim's clean action probabilities and value, then
    the share of the step budget left and the share of agents it may attack per step."""
    return n_agents * (n_actions + 1) + 2


def director_spaces(victim_space: gym.spaces.Box, n_actions: int, n_agents: int,
                    joint: bool = False) -> tuple[gym.spaces.Dict, gym.spaces.MultiDiscrete | gym.spaces.Discrete]:
    """The director's observation (``image``: every victim's image stacked on channels; ``victim``: what it
    knows of the victims and its budget, :meth:`DirectorCore.knowledge`) and decision spaces: one option per
    victim, or with ``joint`` one choice per env of "no attack" or a (victim, option) pair
    (:meth:`DirectorCore.to_decisions`)."""
    c, h, w = victim_space.shape
    observation = gym.spaces.Dict({"image": gym.spaces.Box(0, 255, (n_agents * c, h, w), np.uint8),
                                   "victim": gym.spaces.Box(-np.inf, np.inf, (knowledge_size(n_agents, n_actions),),
                                                            np.float32)})
    if joint:
        return observation, gym.spaces.Discrete(1 + n_agents * (n_actions + POLICY_LEVEL_OPTIONS - 1))
    return observation, gym.spaces.MultiDiscrete([n_actions + POLICY_LEVEL_OPTIONS] * n_agents)


class DirectorFeatures(BaseFeaturesExtractor):
    """The director's features: our CNN on the stacked victim images, beside an MLP on the ``victim`` vector.

    PA-AD's director knows the victim policy; giving it each victim's clean action distribution and
    value (and its budget left) lets it learn whom and when to attack without re-deriving them
    from pixels, which its short training could not do.
    """

    def __init__(self, observation_space: gym.spaces.Dict, image_dim: int = 128, victim_dim: int = 64) -> None:
        image = ImageFeatures(observation_space["image"], backbone="cnn", features_dim=image_dim)
        super().__init__(observation_space, image_dim + victim_dim)
        self.image = image
        self.victim = nn.Sequential(nn.Linear(observation_space["victim"].shape[0], victim_dim), nn.ReLU())

    def forward(self, obs: dict[str, Tensor]) -> Tensor:
        return torch.cat([self.image(obs["image"]), self.victim(obs["victim"])], dim=1)


def director_policy_kwargs() -> dict[str, Any]:
    """SB3 ``policy_kwargs`` of the director (``MultiInputPolicy``): :class:`DirectorFeatures` (a fresh dict)."""
    return {"features_extractor_class": DirectorFeatures}


class DirectorCore:
    """Turns per-victim decisions into the observations the victims see.

    Decisions (n_envs, n_agents) take ``n_actions + 3`` values:

    * ``a < n_actions``: push the victim toward action ``a`` (targeted PGD);
    * :attr:`no_attack` (``n_actions``): leave it alone;
    * :attr:`untargeted` (``n_actions + 1``): push it away from its greedy action (plain PGD, the
      same attack as ``evaluate.py --attacks pgd``);
    * :attr:`least_likely` (``n_actions + 2``): push it toward its least-preferred clean action
      (``pgd:targeted=true,target_action=least_likely``).

    The last two are policy-level directions that need no perception from the director: with them
    its choice set contains PGD and the least-likely attack, so training searches for damage
    *beyond* theirs (where and whom to attack, which action to force) instead of first having to
    rediscover them, which a director starting from scratch could not do in its budget.

    With ``joint`` the director's action is one choice per env instead of one per victim
    (:meth:`to_decisions` turns it into the decisions above): 0 is "no attack", ``1 + i * m + o`` is
    option ``o`` on victim ``i`` (``m = n_actions + 2`` attacking options: the actions, then untargeted,
    then least likely). Why: under a budget of one victim per step, "attack exactly victim i now" is
    one of the per-victim heads saying yes while every other says no, a joint choice PPO's independent
    heads rarely explore; here it is one logit.
    """

    def __init__(self, view: PolicyLike, eps: float, n_agents: int, actor_steps: int = 10, quantize: bool = False,
                 joint: bool = False) -> None:
        self.view = view
        self.n_agents = n_agents
        self.joint = joint
        self.n_actions = int(view.n_actions)
        self.no_attack = self.n_actions
        self.untargeted = self.n_actions + 1
        self.least_likely = self.n_actions + 2
        self.n_options = self.n_actions + POLICY_LEVEL_OPTIONS
        self.n_attacking = self.n_options - 1
        self.actor = PGD(eps, steps=actor_steps, targeted=True, quantize=quantize)
        self.untargeted_actor = PGD(eps, steps=actor_steps, quantize=quantize)
        self.least_likely_actor = PGD(eps, steps=actor_steps, targeted=True, target_action=LEAST_LIKELY, quantize=quantize)

    def to_decisions(self, actions: np.ndarray | Tensor) -> np.ndarray:
        """The director's actions (per-victim options, or one joint choice per env) as (n_envs, n_agents) options."""
        actions = np.asarray(actions).astype(np.int64)
        if not self.joint:
            return actions.reshape(-1, self.n_agents)
        choice = actions.reshape(-1)
        decisions = np.full((len(choice), self.n_agents), self.no_attack, dtype=np.int64)
        rows = np.flatnonzero(choice > 0)
        victim, option = np.divmod(choice[rows] - 1, self.n_attacking)
        decisions[rows, victim] = np.where(option < self.n_actions, option, option + 1)   # skip the no-attack code
        return decisions

    def joint_index(self, victim: int, option: int) -> int:
        """The joint choice that puts ``option`` (an attacking option code) on ``victim``."""
        if option == self.no_attack or not 0 <= option < self.n_options:
            raise ValueError(f"option {option} is not an attacking option")
        return 1 + victim * self.n_attacking + (option if option < self.n_actions else option - 1)

    def realise(self, obs01: Tensor, decisions: np.ndarray | Tensor, allowed: Tensor | None = None) -> Tensor:
        """Perturb slot ``env * n_agents + agent`` as ``decisions[env, agent]`` says (rows are independent)."""
        dec = torch.as_tensor(np.asarray(decisions), device=obs01.device).long().reshape(-1)
        allowed = torch.ones_like(dec, dtype=torch.bool) if allowed is None else allowed.to(obs01.device)
        seen = obs01
        targeted = (dec < self.n_actions) & allowed
        if targeted.any():
            seen = self.actor.perturb(self.view, seen, agent_mask=targeted, target=dec.clamp(max=self.n_actions - 1))
        for option, actor in ((self.untargeted, self.untargeted_actor), (self.least_likely, self.least_likely_actor)):
            rows = (dec == option) & allowed
            if rows.any():
                seen = actor.perturb(self.view, seen, agent_mask=rows)
        return seen

    @torch.no_grad()
    def victim_actions(self, seen01: Tensor) -> np.ndarray:
        return self.view(seen01).argmax(-1).cpu().numpy()

    @torch.no_grad()
    def knowledge(self, clean01: Tensor, state: BudgetState, steps_left: np.ndarray | None = None) -> np.ndarray:
        """(n_envs, knowledge_size) float32: per victim its clean action probabilities and value, then
        the share of the episode's step budget left (``steps_left``, default the state's) and k / n_agents."""
        n_envs = envs_of(clean01, self.n_agents)
        left = state.steps_left(n_envs) if steps_left is None else steps_left
        logits, values = self.view.logits_and_value(clean01)
        per_victim = torch.cat([torch.softmax(logits, -1), values.reshape(-1, 1)], dim=1).reshape(n_envs, -1)
        budget = np.stack([left / max(state.max_steps, 1), np.full(n_envs, state.k / self.n_agents)], axis=1)
        return np.concatenate([per_victim.cpu().numpy(), budget], axis=1).astype(np.float32)

    def victim_probabilities(self, knowledge: np.ndarray) -> np.ndarray:
        """(n_envs, n_agents, n_actions): the clean action probabilities a :meth:`knowledge` vector holds."""
        per_victim = knowledge[:, :self.n_agents * (self.n_actions + 1)]
        return per_victim.reshape(len(knowledge), self.n_agents, self.n_actions + 1)[..., :-1]

    def observe(self, obs_uint8: np.ndarray, state: BudgetState,
                steps_left: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The director's observation of every env of a batch of victim observations (uint8, env-major)."""
        clean = torch.as_tensor(obs_uint8, device=next(self.view.parameters()).device).float().div(255.0)
        return {"image": stack_agents(np.asarray(obs_uint8), self.n_agents),
                "victim": self.knowledge(clean, state, steps_left)}

    def decide(self, decisions: np.ndarray | Tensor, state: BudgetState, allowed: Tensor | None = None) -> Tensor:
        """Which victims the budget lets the director attack: (n_envs * n_agents,) bool, spent from ``state``.

        When it asks for more than k victims, k of them are kept at random: the director sees k in
        its observation and learns to ask for no more.
        """
        dec = torch.as_tensor(np.asarray(decisions)).long().reshape(-1, self.n_agents)
        wanted = dec != self.no_attack
        if allowed is not None:
            wanted &= allowed.cpu()
        return state.grant(wanted).reshape(-1)


def stack_agents(obs: np.ndarray, n_agents: int) -> np.ndarray:
    """(n_envs * n_agents, C, H, W) -> (n_envs, n_agents * C, H, W): the director's view of one env."""
    n, c, h, w = obs.shape
    return obs.reshape(n // n_agents, n_agents * c, h, w)


class AdversaryParallelEnv(ParallelEnv):
    """PettingZoo wrapper: ``env``'s agents (frozen victims) plus ``adversary_0`` (reward = -team reward)."""

    metadata = {"name": "adversary_v0", "render_modes": []}

    def __init__(self, env: ParallelEnv, victim: PolicyLike, eps: float, actor_steps: int = 10,
                 budget: Budget = Budget(), horizon: int | None = None, seed: int = 0, joint: bool = False) -> None:
        self.env = env
        self.victims = list(env.possible_agents)
        self.possible_agents = [*self.victims, ADVERSARY]
        self.agents: list[str] = []
        self.core = DirectorCore(victim, eps, len(self.victims), actor_steps, joint=joint)
        self.state = budget_state(budget, len(self.victims), horizon, seed)
        self._adv_obs_space, self._adv_act_space = director_spaces(env.observation_space(self.victims[0]),
                                                                   self.core.n_actions, len(self.victims), joint)
        self._last: dict[str, np.ndarray] = {}

    @functools.lru_cache(maxsize=None)
    def observation_space(self, agent: str) -> gym.Space:
        return self._adv_obs_space if agent == ADVERSARY else self.env.observation_space(agent)

    @functools.lru_cache(maxsize=None)
    def action_space(self, agent: str) -> gym.Space:
        return self._adv_act_space if agent == ADVERSARY else self.env.action_space(agent)

    def _adv_obs(self) -> dict[str, np.ndarray]:
        obs = self.core.observe(np.stack([self._last[a] for a in self.victims]), self.state)
        return {key: value[0] for key, value in obs.items()}

    def reset(self, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        obs, infos = self.env.reset(seed=seed, options=options)
        self._last = {a: obs[a] for a in self.victims}
        self.state.end_episodes(np.ones(1, dtype=bool))
        self.agents = [*self.env.agents, ADVERSARY]
        return {**obs, ADVERSARY: self._adv_obs()}, {**infos, ADVERSARY: {}}

    def step(self, actions: dict) -> tuple[dict, dict, dict, dict, dict]:
        idle = 0 if self.core.joint else [self.core.no_attack] * len(self.victims)
        decision = self.core.to_decisions(np.asarray(actions.get(ADVERSARY, idle))[None])[0]
        alive = [a for a in self.victims if a in self.env.agents]
        clean = torch.as_tensor(np.stack([self._last[a] for a in self.victims])).float().div(255.0)
        allowed = self.core.decide(decision[None], self.state, torch.tensor([[a in alive for a in self.victims]]))
        seen = self.core.realise(clean, decision[None], allowed)
        chosen = self.core.victim_actions(seen)
        obs, rewards, terms, truncs, infos = self.env.step({a: int(chosen[i]) for i, a in enumerate(self.victims) if a in alive})
        for i, a in enumerate(self.victims):
            if a in infos:
                infos[a] = {**infos[a], "attacked": bool(allowed[i]),
                            "action_taken": int(chosen[i])}
            if a in obs:
                self._last[a] = obs[a]
        team = float(np.mean([rewards[a] for a in alive])) if alive else 0.0
        over = not self.env.agents
        self.agents = [*self.env.agents, ADVERSARY] if not over else []
        obs[ADVERSARY] = self._adv_obs()
        rewards[ADVERSARY] = -team
        terms[ADVERSARY] = over and all(terms.get(a, False) for a in alive)
        truncs[ADVERSARY] = over and not terms[ADVERSARY]
        infos[ADVERSARY] = {"team_reward": team}
        return obs, rewards, terms, truncs, infos

    def render(self) -> Any:
        return self.env.render()

    def close(self) -> None:
        self.env.close()


class AdversaryVecEnv(VecEnv):
    """SB3 VecEnv of the director over a batched victim VecEnv: one slot per env copy."""

    def __init__(self, venv: VecEnv, victim: PolicyLike, eps: float, n_agents: int, actor_steps: int = 10,
                 budget: Budget = Budget(), horizon: int | None = None, seed: int = 0, joint: bool = False) -> None:
        self.venv, self.n_agents = venv, n_agents
        self.core = DirectorCore(victim, eps, n_agents, actor_steps, joint=joint)
        self.state = budget_state(budget, n_agents, horizon, seed)
        space, decisions = director_spaces(venv.observation_space, self.core.n_actions, n_agents, joint)
        self.render_mode = None
        super().__init__(venv.num_envs // n_agents, space, decisions)
        self._obs: np.ndarray | None = None
        self._decisions: np.ndarray | None = None
        self._device = next(victim.parameters()).device
        self.actor_steps = actor_steps
        self.on_step: Callable[[np.ndarray], None] | None = None   # sees each step's team rewards (n_envs,)
        self.last_granted: np.ndarray | None = None   # (n_envs, n_agents) bool: whom the last step attacked

    def set_eps(self, eps: float) -> None:
        """Attack at budget ``eps`` (input units) from now on; the director's knowledge is unchanged."""
        self.core = DirectorCore(self.core.view, eps, self.n_agents, self.actor_steps, joint=self.core.joint)

    def reset(self) -> dict[str, np.ndarray]:
        self._obs = self.venv.reset()
        self.state.end_episodes(np.ones(self.num_envs, dtype=bool))
        return self.core.observe(self._obs, self.state)

    def step_async(self, actions: np.ndarray) -> None:
        self._decisions = self.core.to_decisions(actions)

    def step_wait(self) -> Any:
        clean = torch.as_tensor(self._obs, device=self._device).float().div(255.0)
        allowed = self.core.decide(self._decisions, self.state)
        seen = self.core.realise(clean, self._decisions, allowed)
        obs, rewards, dones, infos = self.venv.step(self.core.victim_actions(seen))
        self._obs = obs
        team = rewards.reshape(self.num_envs, self.n_agents).mean(axis=1)
        if self.on_step is not None:
            self.on_step(team)
        done = dones.reshape(self.num_envs, self.n_agents).all(axis=1)
        self.last_granted = allowed.reshape(self.num_envs, self.n_agents).cpu().numpy()
        attacked = self.last_granted.sum(1)
        terminal = [b for b in range(self.num_envs) if done[b] and all(
            "terminal_observation" in i for i in infos[b * self.n_agents:(b + 1) * self.n_agents])]
        final = None
        if terminal:   # the director's last observation of each ended episode, budget as it was spent
            last = np.stack([i["terminal_observation"] for b in terminal for i in infos[b * self.n_agents:(b + 1) * self.n_agents]])
            final = self.core.observe(last, self.state, self.state.steps_left(self.num_envs)[terminal])
        out_infos: list[dict] = []
        for b in range(self.num_envs):
            info: dict[str, Any] = {"team_reward": float(team[b]), "attacked_agents": int(attacked[b])}
            if final is not None and b in terminal:
                j = terminal.index(b)
                info["terminal_observation"] = {key: value[j] for key, value in final.items()}
                info["TimeLimit.truncated"] = bool(infos[b * self.n_agents].get("TimeLimit.truncated", False))
            out_infos.append(info)
        self.state.end_episodes(done)
        return self.core.observe(obs, self.state), (-team).astype(np.float32), done, out_infos

    def close(self) -> None:
        self.venv.close()

    def get_attr(self, attr_name: str, indices: Any = None) -> list[Any]:
        return [getattr(self, attr_name)] * self.num_envs

    def set_attr(self, attr_name: str, value: Any, indices: Any = None) -> None:
        setattr(self, attr_name, value)

    def env_method(self, method_name: str, *args: Any, indices: Any = None, **kwargs: Any) -> list[Any]:
        return [getattr(self, method_name)(*args, **kwargs)] * self.num_envs

    def env_is_wrapped(self, wrapper_class: Any, indices: Any = None) -> list[bool]:
        return [False] * self.num_envs

    def seed(self, seed: int | None = None) -> list[Any]:
        return self.venv.seed(seed)


def budget_state(budget: Budget, n_agents: int, horizon: int | None, seed: int) -> BudgetState:
    """The director's budget; without a horizon only an agent budget (k) is possible."""
    if horizon is None and budget.steps is not None:
        raise ValueError("a step budget needs the env's horizon (episode length)")
    return BudgetState(budget, n_agents, horizon or MAX_ITERATIONS, torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ training
@dataclass
class AdversaryConfig:
    """``scripts/train_adversary.py``'s config, written to ``runs/<adversary>/config.yaml``."""

    victim: str = ""
    eps: float = 8.0              # 1/255 units
    actor_steps: int = 10
    timesteps: int = 20_000       # director steps (one per env copy per step)
    n_envs: int = 8
    seed: int = 0
    learning_rate: float = 3e-4
    clip_range: float = 0.2
    n_steps: int = 64
    batch_size: int = 128
    n_epochs: int = 4
    ent_coef: float = 0.01
    gamma: float = 0.95
    warm_start: Literal["least_likely", "untargeted", "none"] = "least_likely"  # "none": a uniform start
    warm_start_prob: float = 0.9  # its initial probability per victim (times the share below)
    warm_start_share: Literal["budget", "full"] = "budget"  # budget: attack about the budget's share of victim-steps
    budget_agents: int | None = None   # k: at most k attacked victims per env and step
    budget_steps: float | None = None  # p: at most floor(p * horizon) attacked steps per episode
    #: per_victim: an option for every victim (the budget keeps k of those asked); joint: one choice per env
    #: of "no attack" or (victim, option), a director of exactly one victim per step (needs budget_agents=1)
    decision: Literal["per_victim", "joint"] = "per_victim"
    checkpoint_every: int = 5_000      # director steps between checkpoints (and progress lines in the log)
    eval_episodes: int = 16            # the summary: director vs the best heuristic at the same budget
    device: str = "cpu"

    @property
    def budget(self) -> Budget:
        return Budget(self.budget_agents, self.budget_steps)

    @property
    def joint(self) -> bool:
        return self.decision == "joint"

    def warm_share(self, n_agents: int) -> float:
        """The warm start's attacked share (:func:`warm_start`): the budget's, or all. Per victim it is a share
        of victim-steps; a joint director attacks one victim whenever it attacks, so only the step budget counts."""
        if self.warm_start_share == "full":
            return 1.0
        return budget_share(Budget(None, self.budget_steps) if self.joint else self.budget, n_agents)

    def validate(self) -> None:
        if not self.victim:
            raise ConfigError("victim must be a run directory or .zip checkpoint written by train_marl.py")
        if not 0 < self.eps <= 255:
            raise ConfigError(f"eps {self.eps:g} is out of range; accepted: (0, 255] in 1/255 units")
        check_range("actor_steps", self.actor_steps, 1, MAX_ITERATIONS)
        check_range("timesteps", self.timesteps, 1, 10**9)
        check_range("n_envs", self.n_envs, 1, 4096)  # the bound of env.n_envs
        check_range("n_steps", self.n_steps, 1, MAX_ROLLOUT_STEPS)
        check_range("batch_size", self.batch_size, 2, MAX_BATCH)
        check_range("n_epochs", self.n_epochs, 1, MAX_EPOCHS)
        check_range("ent_coef", self.ent_coef, 0)
        if not 0 < self.warm_start_prob < 1:
            raise ConfigError(f"warm_start_prob={self.warm_start_prob:g} is out of range; accepted: (0, 1)")
        check_range("learning_rate", self.learning_rate, 0, 1, low_open=True)
        check_range("gamma", self.gamma, 0, 1, low_open=True)
        check_range("clip_range", self.clip_range, 0, 1, low_open=True)
        check_seed(self.seed)
        check_device(self.device)
        if self.budget_agents is not None:
            check_range("budget_agents", self.budget_agents, 0, 4096)
        if self.budget_steps is not None and not 0 <= self.budget_steps <= 1:
            raise ConfigError(f"budget_steps={self.budget_steps:g} is out of range; accepted: a fraction in [0, 1] "
                              "of each episode's steps")
        check_range("checkpoint_every", self.checkpoint_every, 1, 10**9)
        check_range("eval_episodes", self.eval_episodes, 1, 100_000)
        if self.decision not in DECISIONS:
            raise ConfigError(f"decision={self.decision!r} is unknown; accepted: {', '.join(DECISIONS)}")
        if self.joint and self.budget_agents != 1:
            raise ConfigError(f"decision=joint attacks exactly one victim per step; it needs budget_agents=1, "
                              f"got {self.budget_agents}")


def warm_start(policy: ActorCriticPolicy, core: DirectorCore, option: str, prob: float, share: float = 1.0) -> None:
    """Bias the director's initial logits so each victim is attacked with probability ``share``, by ``option``
    with probability ``prob * share``; "no attack" holds the rest (``1 - share``, plus its part of the
    other options' mass ``(1 - prob) * share``, spread evenly over the ``n_options - 1`` other options).

    Why: a director that starts uniform over its options is far weaker than PGD (measurements:
    docs/experiments/adversary.md, "The adversary's warm start") and spends its budget rediscovering fixed attacks.
    Starting at the least-likely attack (the strongest fixed option measured on the default victim)
    turns training into a search for *improvements*, as PA-AD intends; the other options keep
    ``1 - prob`` of the mass, so PPO still explores them. ``share`` < 1 (:func:`budget_share`) makes the
    initial director ask for about its budget: attacking every victim at every step under a budget
    of k agents or a share p of the steps, the budget's random truncation (or its pacing) and not the
    director decides whom and when, and no victim's head can learn that its choice matters.
    SB3's orthogonal init with gain 0.01 makes the initial logits ~ the bias. A joint director
    (:class:`DirectorCore`, ``joint``) attacks with probability ``share``, by ``option`` on each victim
    with ``prob * share / n_agents``, every other choice (no attack included) sharing ``(1 - prob) * share``
    evenly, and "no attack" holding ``1 - share`` besides.
    """
    if option == "none":
        return
    if not 0.0 < share <= 1.0:
        raise ValueError(f"warm-start share={share} must be in (0, 1]")
    index = core.least_likely if option == "least_likely" else core.untargeted
    if core.joint:
        warm = [core.joint_index(victim, index) for victim in range(core.n_agents)]
        choices = 1 + core.n_agents * core.n_attacking
        other = share * (1 - prob) / (choices - len(warm))
        probs = torch.full((choices,), other)
        probs[warm] = prob * share / core.n_agents
        probs[0] = other + (1 - share)
        with torch.no_grad():
            policy.action_net.bias.copy_(torch.log(probs))
        return
    other = share * (1 - prob) / (core.n_options - 1)
    probs = torch.full((core.n_options,), other)
    probs[index] = prob * share
    probs[core.no_attack] = other + (1 - share)
    with torch.no_grad():
        bias = policy.action_net.bias.view(core.n_agents, core.n_options)
        bias.copy_(torch.log(probs).expand_as(bias))


def budget_share(budget: Budget, n_agents: int) -> float:
    """The share of victim-steps ``budget`` lets an attacker touch: k / n agents times p of the steps."""
    agents = 1.0 if budget.agents is None else min(budget.agents, n_agents) / n_agents
    steps = 1.0 if budget.steps is None else budget.steps
    return max(agents * steps, 1e-3)


# ------------------------------------------------------------------------------ as an attack
class AdversaryAttack(Attack):
    """The trained director + targeted-PGD actor as an attack, within ``budget`` (default: none).

    Needs whole environments in the batch (rows env-major, ``n_agents`` per env). In the episode
    loop, :meth:`as_perturb` gives it an episode budget (``horizon``: the env's episode length),
    spent and reset per env and shown to the director as it was in training; a bare
    :meth:`perturb` call is one step of a fresh episode, its ``agent_mask`` restricting which
    victims the actor may touch (the director still sees every agent).
    """

    name = "adversary"

    def __init__(self, director: PPO, n_agents: int, eps: float, *, steps: int = 10, quantize: bool = False,
                 deterministic: bool = True, budget: Budget = Budget(), horizon: int | None = None) -> None:
        super().__init__(eps, quantize=quantize)
        self.director = director
        self.n_agents = n_agents
        self.steps = int(steps)
        self.deterministic = deterministic
        self.budget, self.horizon = budget, horizon
        budget_state(budget, n_agents, horizon, 0)   # a step budget without a horizon fails here, not mid-episode

    def within(self, budget: Budget) -> "AdversaryAttack":
        """The same director and actor within another budget."""
        return AdversaryAttack(self.director, self.n_agents, self.eps, steps=self.steps, quantize=self.quantize,
                               deterministic=self.deterministic, budget=budget, horizon=self.horizon)

    def as_perturb(self, view: PolicyLike, *, n_agents: int | None = None,
                   agents: Sequence[int] | None = None) -> "DirectorPerturb":
        if n_agents is not None and n_agents != self.n_agents:
            raise ValueError(f"the director was trained against {self.n_agents} agents per env, used with {n_agents}")
        return DirectorPerturb(self, view, check_agents(agents, self.n_agents))

    def perturb(self, view: PolicyLike, obs: Tensor, *, agent_mask: Tensor | None = None, target: TargetLike = None) -> Tensor:
        allowed = None if agent_mask is None else torch.as_tensor(agent_mask, device=obs.device).bool()
        return DirectorPerturb(self, view)(obs.detach(), allowed)

    def _attack(self, view: PolicyLike, clean: Tensor, target: Tensor | None) -> Tensor:
        """Every row as the director decides, one step of a fresh episode."""
        return self.perturb(view, clean)


class DirectorPerturb:
    """The episode loop's ``perturb`` for the director: observe, decide, keep what the budget allows, realise."""

    def __init__(self, attack: AdversaryAttack, view: PolicyLike, agents: list[int] | None = None) -> None:
        self.attack, self.agents = attack, agents
        joint = isinstance(attack.director.action_space, gym.spaces.Discrete)   # one (victim, option) choice per env
        self.core = DirectorCore(view, attack.eps, attack.n_agents, attack.steps, attack.quantize, joint=joint)
        self.state = budget_state(attack.budget, attack.n_agents, attack.horizon, 0)

    def __call__(self, clean: Tensor, allowed_rows: Tensor | None = None) -> Tensor:
        n_envs = envs_of(clean, self.attack.n_agents)
        uint8 = torch.round(clean * 255).to(torch.uint8).cpu().numpy()
        actions, _ = self.attack.director.predict(self.core.observe(uint8, self.state),
                                                  deterministic=self.attack.deterministic)
        decisions = self.core.to_decisions(actions)
        allowed = allowed_agents(self.agents, n_envs, self.attack.n_agents, clean.device)
        if allowed_rows is not None:
            rows = allowed_rows.reshape(n_envs, self.attack.n_agents)
            allowed = rows if allowed is None else allowed & rows
        granted = self.core.decide(decisions, self.state, allowed).to(clean.device)
        return self.core.realise(clean, decisions, granted)

    def end_episodes(self, env_done: np.ndarray) -> None:
        self.state.end_episodes(env_done)


@dataclass
class LoadedAdversary:
    director: PPO
    config: AdversaryConfig
    n_agents: int
    horizon: int

    def attack(self, eps: float, steps: int | None = None, quantize: bool = False,
               deterministic: bool = True) -> AdversaryAttack:
        """The director as an attack, within the budget it was trained under; ``deterministic=False`` samples its
        decisions (a mixed strategy: attacking one of two victims at random can beat always the same one)."""
        return AdversaryAttack(self.director, self.n_agents, eps, steps=steps or self.config.actor_steps,
                               quantize=quantize, deterministic=deterministic, budget=self.config.budget,
                               horizon=self.horizon)


def load_director(path: str | Path, cfg: AdversaryConfig, victim_space: gym.spaces.Box, victim_actions: int,
                  n_agents: int, horizon: int, device: str = "cpu") -> LoadedAdversary:
    """A director checkpoint, rebuilt from its run's config and its victim's spaces (nothing unpickled)."""
    observation_space, action_space = director_spaces(victim_space, victim_actions, n_agents, cfg.joint)
    objects = ppo_objects(observation_space=observation_space, action_space=action_space,
                          policy_kwargs=director_policy_kwargs(), learning_rate=cfg.learning_rate,
                          clip_range=cfg.clip_range)
    director = load_without_pickle(PPO, path, objects, env=None, device=device)
    return LoadedAdversary(director=director, config=cfg, n_agents=n_agents, horizon=horizon)
