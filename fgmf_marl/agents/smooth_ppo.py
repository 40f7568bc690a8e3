"""``--defense smooth``: PPO trained for randomised-smoothing certificates at ``sigma``, by Gaussian noise in two
places that compose:

* ``augment`` (default): the training env adds the noise (:class:`GaussianObservationNoise`, installed by the
  trainer) to every agent's observation at every step of the rollouts, so the rollout buffer holds what the policy
  acted on and PPO's ratios compare like with like (Cohen et al. 2019 train with Gaussian augmentation; Kumar et
  al. 2022 train the agent on noisy observations).
* ``consistency`` > 0: a stability term (Zheng et al. 2016; Li et al. 2019 certify such networks): the mean over
  ``copies`` noisy copies of KL(pi(.|x) || pi(.|clip(x + N(0, sigma^2)))), the clean distribution detached as in
  SA-PPO, on a ``subsample`` of each minibatch. Why: the certificate's radius grows with the probability that the
  base policy keeps its action under the noise, and augmentation alone only teaches it to act well on noisy
  frames, not to act *the same*. The noise is the certificate's (``fgmf_marl.certify``: clipped, not rounded),
  drawn from the algorithm's own generator. With ``augment`` off, PPO learns on clean frames and only this term
  sees noise; with both on, ``x`` is already a noisy frame.

The trained policy is evaluated and attacked as any other (noise-free), and certified by ``scripts/certify.py``
with the same sigma.
"""
from __future__ import annotations

import time
from typing import Any, ClassVar

import numpy as np
import torch
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper
from torch import Tensor

from fgmf_marl.agents.policy_view import PolicyView
from fgmf_marl.agents.regularised_ppo import RegularisedPPO
from fgmf_marl.agents.sappo import policy_kl


def noise_consistency(view: PolicyView, x: Tensor, sigma: float, copies: int,
                      generator: torch.Generator | None = None) -> Tensor:
    """(B,) per observation of ``x`` (B, C, H, W) in [0, 1]: the mean over ``copies`` draws of
    KL(pi(.|x) || pi(.|clip(x + N(0, sigma^2 I), 0, 1))), pi(.|x) detached; differentiable in the policy."""
    with torch.no_grad():
        clean = view(x)
    repeated = x.detach().repeat(copies, 1, 1, 1)
    noise = torch.randn(repeated.shape, generator=generator, device=x.device, dtype=x.dtype)
    kl = policy_kl(clean.repeat(copies, 1), view((repeated + sigma * noise).clamp(0.0, 1.0)))
    return kl.reshape(copies, x.shape[0]).mean(dim=0)


class SmoothPPO(RegularisedPPO):
    """PPO trained with Gaussian noise (``defense.smooth``): in the training env (``augment``) and/or as the
    stability term (``consistency``)."""

    components: ClassVar[frozenset[str]] = frozenset({"smooth"})
    default_kind: ClassVar[str] = "smooth"

    def _regularisers(self, obs01: Tensor, actions: Tensor) -> dict[str, Tensor]:
        cfg = self.defense.smooth
        if cfg.consistency == 0:
            return {}
        start = time.perf_counter()
        kl = noise_consistency(self._view, self._head(obs01, cfg.subsample), cfg.sigma, cfg.copies,
                               self._generator).mean()
        self._log_term("smooth_kl", kl.detach())
        self._log_term("smooth_seconds", time.perf_counter() - start)
        return {"smooth": cfg.consistency * kl}


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
