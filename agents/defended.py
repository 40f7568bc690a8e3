"""Builds and loads the PPO variant that a ``DefenseConfig`` asks for."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import VecEnv

from fgmf_marl.defenses.config import DefenseConfig


def algorithm_class(kind: str) -> type[PPO]:
    """The algorithm class that trains (and loads) a policy with defense ``kind``."""
    return PPO


def build_model(defense: DefenseConfig, env: VecEnv, policy_kwargs: dict[str, Any], ppo_kwargs: dict[str, Any]) -> PPO:
    """A fresh model for ``env`` with the defense installed."""
    return algorithm_class(defense.kind)("CnnPolicy", env, policy_kwargs=policy_kwargs, **ppo_kwargs)


def load_model(path: str | Path, defense: DefenseConfig, env: VecEnv | None, device: str) -> PPO:
    """Load a checkpoint written by ``build_model``'s model."""
    return algorithm_class(defense.kind).load(str(path), env=env, device=device)
