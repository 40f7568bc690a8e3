"""The one episode loop: clean observation -> optional perturbation -> policy -> environment.

Evaluation, attacks, the adversary's victims, the trainer's final evaluation and the oversight
log all run episodes through :func:`rollout`, so "the return under attack" means the same thing
everywhere. Observations enter the perturbation and the policy as float images in [0, 1]
(``obs / 255``), the threat model's scale.

Episodes are counted per environment copy as SB3's ``evaluate_policy`` does (copy ``i`` runs
``(n_episodes + i) // n_envs`` episodes), so fast-ending copies do not bias the mean. Results are in
the canonical episode order (each copy's first episode, copy by copy, then each copy's second, ...),
not in the order episodes ended: episode ``i`` then starts from the same env seed under every attack,
which is what pairs episodes across attacks (the per-episode worst case, ``fgmf_marl.stats``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from stable_baselines3.common.vec_env import VecEnv
from torch import Tensor
from tqdm.auto import tqdm

from fgmf_marl.policy import Perturb, PolicyLike


@dataclass
class StepRecord:
    """Everything one step of all slots produced; handed to ``step_hook``."""

    t: np.ndarray               # (n_envs,) step index within each env's current episode
    episode: np.ndarray         # (n_envs,) index of each env's current episode (0-based, per env)
    clean_obs: Tensor           # (num_envs, C, H, W) float in [0, 1]
    seen_obs: Tensor            # what the policy saw (== clean_obs without an attack)
    actions: np.ndarray         # (num_envs,) actions taken (on seen_obs)
    clean_actions: np.ndarray   # (num_envs,) greedy actions on clean_obs (flip = greedy differs)
    probs: Tensor               # (num_envs, n_actions) action probabilities on seen_obs
    values: Tensor              # (num_envs,) value estimates on seen_obs
    rewards: np.ndarray         # (num_envs,)
    dones: np.ndarray           # (num_envs,)
    infos: list[dict]
    n_agents: int
    relevance: np.ndarray | None  # (num_envs, H, W) ground-truth masks of clean_obs (native env only)
    counted: np.ndarray           # (n_envs,) bool: each env's current episode is one of the n_episodes


@dataclass
class RolloutResult:
    """Per-episode returns: team return = sum over steps of the mean agent reward."""

    team_returns: np.ndarray    # (n_episodes,)
    agent_returns: np.ndarray   # (n_episodes, n_agents)
    lengths: np.ndarray         # (n_episodes,)
    flip_rate: float            # fraction of agent-steps whose greedy action differs from the clean one
    agent_steps: int
    episode_flip_rates: np.ndarray  # (n_episodes,) the same fraction within each episode
    episode_attacked_steps: np.ndarray        # (n_episodes,) steps where some agent's observation was changed
    episode_attacked_agent_steps: np.ndarray  # (n_episodes,) agent-steps whose observation was changed
    episode_max_attacked_agents: np.ndarray   # (n_episodes,) most agents of the env attacked in one step


def _to_float(obs: np.ndarray, device: torch.device) -> Tensor:
    return torch.as_tensor(obs, device=device).float().div_(255.0)


@torch.no_grad()
def _act(view: PolicyLike, obs: Tensor, deterministic: bool, generator: torch.Generator) -> tuple[np.ndarray, Tensor, Tensor]:
    logits, values = view.logits_and_value(obs)
    probs = torch.softmax(logits, dim=-1)
    if deterministic:
        actions = probs.argmax(dim=-1)
    else:
        actions = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1)
    return actions.cpu().numpy(), probs, values


def rollout(view: PolicyLike, venv: VecEnv, n_episodes: int, *, n_agents: int | None = None,
            perturb: Perturb | None = None, step_hook: Callable[[StepRecord], None] | None = None,
            deterministic: bool = True, seed: int = 0, progress: bool = False) -> RolloutResult:
    """Run ``n_episodes`` episodes in total over all env copies of ``venv`` and return their returns.

    ``perturb(clean_obs01) -> seen_obs01`` is called once per step with all slots' observations;
    attacks restrict themselves to the agents they target. A perturbation with an episode budget
    also has ``end_episodes(env_done)``, called after every step with the envs whose episode ended; one
    that carries earlier perturbations forward (stacked frames) has ``changed(seen, clean) -> (slots,)``,
    the slots it touched this step, which the attacked-step counts use.
    What an attack spent is measured here, not asked of it: a slot counts as attacked when its seen
    observation differs from the clean one. ``n_agents`` defaults to ``venv.n_agents`` (the native
    env has it).
    """
    if n_episodes < 1:
        raise ValueError(f"n_episodes must be >= 1, got {n_episodes}")
    n_agents = n_agents or getattr(venv, "n_agents", None)
    if not n_agents or venv.num_envs % n_agents:
        raise ValueError(f"cannot split {venv.num_envs} slots into agents (n_agents={n_agents})")
    n_envs = venv.num_envs // n_agents
    device = next(view.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    targets = np.array([(n_episodes + i) // n_envs for i in range(n_envs)])
    done_count = np.zeros(n_envs, dtype=int)
    step_in_ep = np.zeros(n_envs, dtype=int)
    team_acc = np.zeros(n_envs)
    agent_acc = np.zeros((n_envs, n_agents))
    team_returns: list[float] = []
    agent_returns: list[np.ndarray] = []
    lengths: list[int] = []
    flips = 0
    agent_steps = 0
    flip_acc = np.zeros(n_envs, dtype=int)
    episode_flip_rates: list[float] = []
    attacked_steps = np.zeros(n_envs, dtype=int)
    attacked_agent_steps = np.zeros(n_envs, dtype=int)
    max_attacked = np.zeros(n_envs, dtype=int)
    spent: dict[str, list[int]] = {"steps": [], "agent_steps": [], "max_agents": []}
    order: list[int] = []   # canonical position of each recorded episode: (per-copy index, copy)
    end_episodes = getattr(perturb, "end_episodes", None)
    changed_of = getattr(perturb, "changed", None)   # which slots the attacker touched, if it says (stacked frames)

    was_training = view.training
    view.eval()
    obs = venv.reset()
    bar = tqdm(total=n_episodes, desc="episodes", disable=not progress, leave=False)
    try:
        while (done_count < targets).any():
            clean = _to_float(obs, device)
            seen = clean if perturb is None else perturb(clean).detach()
            actions, probs, values = _act(view, seen, deterministic, generator)
            greedy = probs.argmax(dim=-1).cpu().numpy()
            clean_actions = greedy if perturb is None else _act(view, clean, True, generator)[0]
            relevance = venv.relevance_masks() if step_hook is not None and hasattr(venv, "relevance_masks") else None
            obs, rewards, dones, infos = venv.step(actions)
            active = np.repeat(done_count < targets, n_agents)
            flipped = (greedy != clean_actions).reshape(n_envs, n_agents).sum(axis=1)
            flips += int((flipped * (done_count < targets)).sum())
            flip_acc += flipped
            if perturb is not None:
                changed = changed_of(seen, clean) if changed_of is not None else (seen != clean).flatten(1).any(1)
                touched = changed.reshape(n_envs, n_agents).sum(1).cpu().numpy()
                attacked_steps += touched > 0
                attacked_agent_steps += touched
                max_attacked = np.maximum(max_attacked, touched)
            agent_steps += int(active.sum())
            if step_hook is not None:
                step_hook(StepRecord(t=step_in_ep.copy(), episode=done_count.copy(), clean_obs=clean, seen_obs=seen,
                                     actions=actions, clean_actions=clean_actions, probs=probs, values=values,
                                     rewards=rewards, dones=dones, infos=infos, n_agents=n_agents, relevance=relevance,
                                     counted=done_count < targets))
            per_env = rewards.reshape(n_envs, n_agents)
            team_acc += per_env.mean(axis=1)
            agent_acc += per_env
            step_in_ep += 1
            env_done = dones.reshape(n_envs, n_agents).all(axis=1)
            if end_episodes is not None:
                end_episodes(env_done)
            for b in np.flatnonzero(env_done):
                if done_count[b] < targets[b]:
                    order.append(int(done_count[b]) * n_envs + int(b))
                    team_returns.append(float(team_acc[b]))
                    agent_returns.append(agent_acc[b].copy())
                    lengths.append(int(step_in_ep[b]))
                    episode_flip_rates.append(flip_acc[b] / (step_in_ep[b] * n_agents))
                    spent["steps"].append(int(attacked_steps[b]))
                    spent["agent_steps"].append(int(attacked_agent_steps[b]))
                    spent["max_agents"].append(int(max_attacked[b]))
                    bar.update(1)
                done_count[b] += 1
                team_acc[b] = 0.0
                agent_acc[b] = 0.0
                step_in_ep[b] = 0
                flip_acc[b] = 0
                attacked_steps[b] = attacked_agent_steps[b] = max_attacked[b] = 0
    finally:
        bar.close()
        view.train(was_training)
    idx = np.argsort(np.array(order, dtype=int), kind="stable")
    return RolloutResult(team_returns=np.array(team_returns)[idx], agent_returns=np.array(agent_returns)[idx],
                         lengths=np.array(lengths)[idx], flip_rate=flips / max(agent_steps, 1), agent_steps=agent_steps,
                         episode_flip_rates=np.array(episode_flip_rates)[idx],
                         episode_attacked_steps=np.array(spent["steps"], dtype=int)[idx],
                         episode_attacked_agent_steps=np.array(spent["agent_steps"], dtype=int)[idx],
                         episode_max_attacked_agents=np.array(spent["max_agents"], dtype=int)[idx])
