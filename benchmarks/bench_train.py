"""PPO training throughput on the native env with the default CNN (agent-steps per second).

Measured side by side in one run, on the same env config:
  * env only          batched env stepping with random actions (the ceiling),
  * rollout only      env + policy forward (SB3's collect_rollouts, no gradient step),
  * PPO train         full SB3 PPO learn() with the default config (collect + update).
Ratios to the env-only ceiling show where the time goes. With ``--vs-cnn`` (for ``--policy vit``) the CNN's PPO
training is measured in the same run, and the ViT/CNN throughput ratio printed (the issue's goal: >= 0.3). Usage:
    python benchmarks/bench_train.py [--timesteps 30000] [--policy cnn|vit] [--vs-cnn]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from stable_baselines3.common.callbacks import CallbackList

from fgmf_marl import config as cfglib
from fgmf_marl.agents.defended import build_model
from fgmf_marl.envs.registry import make_vec_env
from fgmf_marl.teams.train_config import TrainConfig
from fgmf_marl.teams.training import ppo_kwargs


def env_only(cfg: TrainConfig, steps: int) -> float:
    venv = make_vec_env(cfg.env, seed=0)
    venv.reset()
    rng = np.random.default_rng(0)
    actions = rng.integers(0, 5, size=(64, venv.num_envs))
    start = time.perf_counter()
    for i in range(steps):
        venv.step(actions[i % 64])
    return steps * venv.num_envs / (time.perf_counter() - start)


def rollout_only(cfg: TrainConfig, timesteps: int) -> float:
    venv = make_vec_env(cfg.env, seed=0)
    model = build_model(cfg.defense, venv, cfg.policy.policy_kwargs(), ppo_kwargs(cfg, None))
    model._setup_learn(timesteps, callback=None)
    callback = CallbackList([])
    callback.init_callback(model)
    collected = 0
    start = time.perf_counter()
    while collected < timesteps:
        model.collect_rollouts(model.env, callback, model.rollout_buffer, n_rollout_steps=model.n_steps)
        collected += model.n_steps * venv.num_envs
    return collected / (time.perf_counter() - start)


def ppo_train(cfg: TrainConfig, timesteps: int) -> float:
    venv = make_vec_env(cfg.env, seed=0)
    model = build_model(cfg.defense, venv, cfg.policy.policy_kwargs(), ppo_kwargs(cfg, None))
    start = time.perf_counter()
    model.learn(timesteps)
    return model.num_timesteps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timesteps", type=int, default=30_000, help="agent-steps of PPO training timed (default 30,000)")
    parser.add_argument("--policy", choices=("cnn", "vit"), default="cnn", help="policy backbone (default cnn)")
    parser.add_argument("--vs-cnn", action="store_true", help="also measure the CNN's PPO training and print the ratio")
    args = parser.parse_args()
    cfg = cfglib.load(TrainConfig, overrides=[f"policy.backbone={args.policy}"])
    print(f"torch threads: {torch.get_num_threads()}, slots: {cfg.env.n_envs} envs x {cfg.env.native.n_agents} agents, "
          f"policy: {args.policy}, timesteps per row: {args.timesteps}")
    rows = [("env only (random actions)", env_only(cfg, 300)),
            ("rollout only (env + policy forward)", rollout_only(cfg, args.timesteps)),
            ("PPO train (collect + update)", ppo_train(cfg, args.timesteps))]
    ceiling = rows[0][1]
    print(f"\n| {'stage':<38} | {'agent-steps/s':>13} | {'vs env only':>11} |")
    print(f"|{'-' * 40}|{'-' * 15}|{'-' * 13}|")
    for name, rate in rows:
        print(f"| {name:<38} | {rate:>13,.0f} | {rate / ceiling:>10.3f}x |")
    print(f"\n10-minute budget at this rate: {rows[-1][1] * 600:,.0f} agent-steps "
          f"(default timesteps: {cfg.timesteps:,})")
    if args.vs_cnn:
        cnn = ppo_train(cfglib.load(TrainConfig, overrides=["policy.backbone=cnn"]), args.timesteps)
        print(f"CNN PPO train: {cnn:,.0f} agent-steps/s; {args.policy} / CNN throughput: {rows[-1][1] / cnn:.3f}x")


if __name__ == "__main__":
    main()
