"""Training the PA-AD-style director against a frozen team and judging it against the fixed attacks it could be
replaced by; ``scripts/train_adversary.py`` is its command line (its docstring says what the run holds)."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import VecMonitor

from fgmf_marl import config as cfglib
from fgmf_marl import seeds
from fgmf_marl.agents.adversary import (
    AdversaryConfig,
    AdversaryVecEnv,
    director_policy_kwargs,
    warm_start,
)
from fgmf_marl.atomic import atomic_write_text
from fgmf_marl.attacks.base import LEAST_LIKELY
from fgmf_marl.attacks.budget import LEARNED
from fgmf_marl.envs.registry import horizon, make_vec_env, n_agents_of
from fgmf_marl.runs import staged_run_dir
from fgmf_marl.teams.checkpoints import (
    PeriodicCheckpoint,
    Victim,
    load_victim,
    save_checkpoint,
)
from fgmf_marl.teams.eval_config import EvalConfig
from fgmf_marl.teams.grid import evaluate


def make_training_env(cfg: AdversaryConfig, victim: Victim) -> AdversaryVecEnv:
    """The director's VecEnv: one slot per env copy of the victim's env, seeded apart from its runs."""
    env_cfg = dataclasses.replace(victim.train_config.env, n_envs=cfg.n_envs)
    venv = make_vec_env(env_cfg, seed=seeds.env_seed(cfg.seed, seeds.ADVERSARY_TRAINING))
    return AdversaryVecEnv(venv, victim.view, cfg.eps / 255.0, n_agents_of(venv, env_cfg), cfg.actor_steps,
                           budget=cfg.budget, horizon=horizon(env_cfg), seed=cfg.seed, joint=cfg.joint)


def train_adversary(cfg: AdversaryConfig, run_root: str | Path, progress: bool = True) -> dict[str, Any]:
    """Train the director with PPO against the frozen victim; returns a summary (also in eval/summary.json)."""
    cfglib.validate(cfg)
    victim = load_victim(cfg.victim, cfg.device)
    for p in victim.view.parameters():
        p.requires_grad_(False)  # frozen: the director's PPO must never touch the victim
    venv = make_training_env(cfg, victim)
    try:
        with staged_run_dir(Path(run_root)) as run:
            cfglib.save_yaml(cfg, run.config)
            # VecMonitor: TensorBoard's rollout/ep_rew_mean is minus the team return under attack
            model = PPO("MultiInputPolicy", VecMonitor(venv), learning_rate=cfg.learning_rate, clip_range=cfg.clip_range,
                        n_steps=cfg.n_steps, batch_size=cfg.batch_size, n_epochs=cfg.n_epochs, ent_coef=cfg.ent_coef,
                        gamma=cfg.gamma, seed=cfg.seed, device=cfg.device, tensorboard_log=str(run.tensorboard),
                        verbose=0, policy_kwargs=director_policy_kwargs())
            warm_start(model.policy, venv.core, cfg.warm_start, cfg.warm_start_prob, cfg.warm_share(venv.core.n_agents))
            checkpoints = PeriodicCheckpoint(run, cfg.checkpoint_every, cfg.timesteps, echo=print)
            start = time.perf_counter()
            model.learn(cfg.timesteps, callback=checkpoints, progress_bar=progress, tb_log_name="director")
            wall = time.perf_counter() - start
            save_checkpoint(model, run.final_checkpoint)
            summary = {"victim": cfg.victim, "eps255": cfg.eps, "budget": cfg.budget.label(),
                       "timesteps": int(model.num_timesteps), "wall_seconds": round(wall, 1),
                       "director_steps_per_second": round(model.num_timesteps / max(wall, 1e-9), 1),
                       **versus_fixed_attacks(cfg, run.root, progress),
                       "behaviour": director_behaviour(model, venv, cfg.eval_episodes, venv.state.horizon)}
            run.eval.mkdir(exist_ok=True)
            atomic_write_text(run.eval / "summary.json", json.dumps(summary, indent=2))
    finally:
        venv.close()
    return summary


def versus_fixed_attacks(cfg: AdversaryConfig, run_root: Path, progress: bool) -> dict[str, Any]:
    """The director against PGD and least-likely PGD within its budget (see the module docstring)."""
    steps = f"steps={cfg.actor_steps}"
    fixed = [f"pgd:{steps}", f"pgd:targeted=true,target_action={LEAST_LIKELY},{steps}"]
    budget = cfg.budget
    ecfg = EvalConfig(checkpoints=[cfg.victim], attacks=[*fixed, f"adversary:path={run_root}"], eps=[cfg.eps],
                      seeds=[0], episodes=cfg.eval_episodes, n_envs=cfg.n_envs, device=cfg.device,
                      budget_agents=None if budget.agents is None else [budget.agents],
                      budget_steps=None if budget.steps is None else [budget.steps])
    result = evaluate(ecfg, run_root / "eval" / "versus", progress=progress, echo=lambda _: None)
    label = budget.label()
    rows = [r for r in result.summary if r["attack"] != "none" and r["budget"] == label]
    key = "normalised_mean" if "normalised_mean" in rows[0] else "team_return_mean"
    director = next(r for r in rows if r["selector"] == LEARNED or r["attack"].startswith("adversary"))
    baselines = {r["attack"]: r[key] for r in rows if r is not director}
    best = min(baselines, key=baselines.get)
    clean = next(r[key] for r in result.summary if r["attack"] == "none")
    return {"metric": key.removesuffix("_mean"), "episodes": cfg.eval_episodes, "clean": clean,
            "director": director[key], "fixed_attacks": baselines, "best_fixed_attack": best,
            "damage_beyond_best": baselines[best] - director[key]}


def director_behaviour(model: PPO, venv: AdversaryVecEnv, episodes: int, horizon_steps: int) -> dict[str, Any]:
    """What the trained director does, from ``episodes`` deterministic episodes of ``venv`` (whole batches).

    The budget issue asks, where the director does not beat the heuristics, to show what it learned:
    which option it realises (``options``: shares of the granted attacks that are untargeted PGD,
    least-likely PGD, or a push toward one chosen action), whom (``victims``: share of granted
    attacks per agent index), when (``by_quarter``: share of slots attacked in each quarter of the
    episode), how much it asks compared with what the budget grants (``asked_per_step``,
    ``granted_per_step``), and ``largest_gap_share``: of the steps where one victim was attacked, the
    share where that victim had the largest clean top-1 minus top-2 action probability (Lin et al.'s
    timing signal; chance is 1 / n_agents). Steps are counted from each batch's reset, which is the
    episode's step in envs of fixed length (the native env).
    """
    core, n = venv.core, venv.n_agents
    batches = -(-episodes // venv.num_envs)
    asked = granted = 0
    options = np.zeros(3)
    victims = np.zeros(n)
    quarters, quarter_slots = np.zeros(4), np.zeros(4)
    gap_hits = single = 0
    for _ in range(batches):
        obs = venv.reset()
        for t in range(horizon_steps):
            actions, _ = model.predict(obs, deterministic=True)
            decisions = core.to_decisions(actions)
            top2 = np.sort(core.victim_probabilities(obs["victim"]), axis=-1)[..., -2:]
            gap = top2[..., 1] - top2[..., 0]
            obs, _, _, _ = venv.step(actions)
            hit = venv.last_granted
            asked += int((decisions != core.no_attack).sum())
            granted += int(hit.sum())
            chosen = decisions[hit]
            options += [(chosen == core.untargeted).sum(), (chosen == core.least_likely).sum(),
                        (chosen < core.n_actions).sum()]
            victims += hit.sum(0)
            q = min(4 * t // horizon_steps, 3)
            quarters[q] += hit.sum()
            quarter_slots[q] += hit.size
            one = hit.sum(1) == 1
            single += int(one.sum())
            gap_hits += int((hit[one].argmax(1) == gap[one].argmax(1)).sum())
    steps = batches * horizon_steps * venv.num_envs
    share = lambda x: (x / max(x.sum(), 1)).round(3).tolist()   # noqa: E731
    return {"episodes": batches * venv.num_envs, "asked_per_step": round(asked / steps, 3),
            "granted_per_step": round(granted / steps, 3),
            "options": dict(zip(("untargeted", "least_likely", "toward_action"), share(options))),
            "victims": share(victims), "by_quarter": (quarters / np.maximum(quarter_slots, 1)).round(3).tolist(),
            "largest_gap_share": round(gap_hits / single, 3) if single else None}
