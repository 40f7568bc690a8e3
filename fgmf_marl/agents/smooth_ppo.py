"""``--defense smooth``: PPO on observations with Gaussian noise, the policy randomised-smoothing certificates
are made for (Cohen et al. 2019 train with Gaussian augmentation; Kumar et al. 2022 train the agent on noisy
observations).

The noise is added by the training env (:class:`GaussianObservationNoise`, installed by the trainer when
``defense.kind`` is ``smooth``), to every agent's observation at every step of the rollouts, so the rollout
buffer holds what the policy acted on and PPO's ratios compare like with like; no loss term is added. The
trained policy is evaluated and attacked as any other (noise-free), and certified by ``scripts/certify.py``
with the same sigma.
"""
from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper

from fgmf_marl.agents.regularised_ppo import RegularisedPPO


class SmoothPPO(RegularisedPPO):
    """PPO trained on noisy observations (``defense.smooth``); the noise lives in the training env."""

    components: ClassVar[frozenset[str]] = frozenset({"smooth"})
    default_kind: ClassVar[str] = "smooth"


class GaussianObservationNoise(VecEnvWrapper):
    """Observations (uint8 images) plus N(0, (255 sigma)^2) noise, rounded and clipped to 0..255; ``sigma`` is in
    input units [0, 1], as ``scripts/certify.py --sigma``."""

    def __init__(self, venv: VecEnv, sigma: float, seed: int) -> None:
        super().__init__(venv)
        self.sigma = sigma
        self._rng = np.random.default_rng(seed)

    def get_state(self) -> dict[str, Any]:
        """The noise generator, for an exact resume."""
        return {"rng": self._rng.bit_generator.state}

    def set_state(self, state: dict[str, Any]) -> None:
        self._rng.bit_generator.state = state["rng"]

    def _noisy(self, obs: np.ndarray) -> np.ndarray:
        noisy = obs.astype(np.float32) + self._rng.normal(0.0, 255.0 * self.sigma, obs.shape).astype(np.float32)
        return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)

    def reset(self) -> np.ndarray:
        return self._noisy(self.venv.reset())

    def step_wait(self) -> tuple:
        obs, rewards, dones, infos = self.venv.step_wait()
        return self._noisy(obs), rewards, dones, infos
