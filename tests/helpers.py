"""Shared test fixtures-in-code: a random-image env and a real SB3 policy view built on it."""
from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import DummyVecEnv

from fgmf_marl.agents.policies import ImageFeatures
from fgmf_marl.agents.policy_view import PolicyView
from fgmf_marl.envs.batched import CoverageVecEnv
from fgmf_marl.envs.native import CoverageConfig


class ImageEnv(gym.Env):
    """Random channel-first uint8 images and 5 actions: enough to build a real SB3 policy."""

    def __init__(self, size: int = 48) -> None:
        self.observation_space = gym.spaces.Box(0, 255, (3, size, size), np.uint8)
        self.action_space = gym.spaces.Discrete(5)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        return self.observation_space.sample(), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        return self.observation_space.sample(), 0.0, False, False, {}


def tiny_view(backbone: str = "cnn", size: int = 48, seed: int = 0, net_arch: Any = None,
              **extractor_kwargs: Any) -> PolicyView:
    """A real SB3 PPO policy with our ``ImageFeatures`` extractor and random weights, as a view."""
    torch.manual_seed(seed)
    policy_kwargs: dict[str, Any] = dict(features_extractor_class=ImageFeatures,
                                         features_extractor_kwargs=dict(backbone=backbone, **extractor_kwargs))
    if net_arch is not None:
        policy_kwargs["net_arch"] = net_arch
    model = PPO("CnnPolicy", DummyVecEnv([lambda: ImageEnv(size)]), policy_kwargs=policy_kwargs, seed=seed,
                device="cpu", n_steps=8, batch_size=8)
    return PolicyView.from_model(model)


def coverage_view(cfg: CoverageConfig, seed: int = 0) -> PolicyView:
    """An untrained SB3 PPO policy built on the native env ``cfg``, as an eval-mode view."""
    torch.manual_seed(seed)
    model = PPO("CnnPolicy", CoverageVecEnv(cfg, n_envs=1, seed=seed), device="cpu", seed=seed, n_steps=8,
                batch_size=8, policy_kwargs=dict(features_extractor_class=ImageFeatures,
                                                 features_extractor_kwargs=dict(backbone="cnn")))
    return PolicyView.from_model(model).eval()
