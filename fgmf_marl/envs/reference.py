"""Reference returns of the native coverage env: what "oracle-normalised" is normalised by.

A random policy scores 0 and the scripted optimal-assignment oracle 1. Both are simulated on the
batched env (``fgmf_marl.envs.batched.BatchedCoverage``) over seeded episodes and cached per config, so every
evaluation of the same env normalises by the same two numbers at no extra cost.
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import numpy as np

from fgmf_marl.envs.batched import BatchedCoverage
from fgmf_marl.envs.native import N_ACTIONS, CoverageConfig


@dataclass(frozen=True)
class ReferenceReturns:
    """Mean team returns of the random and the oracle policy (the 0 and 1 of normalised return)."""

    random: float
    oracle: float
    n_episodes: int


@functools.lru_cache(maxsize=32)
def _reference_cached(cfg_items: tuple, n_episodes: int, seed: int) -> ReferenceReturns:
    cfg = CoverageConfig(**dict(cfg_items))
    out = {}
    for policy in ("random", "oracle"):
        core = BatchedCoverage(cfg, n_envs=n_episodes)
        core.reset(seeds=[seed + b for b in range(n_episodes)])
        act_rng = np.random.default_rng(seed)
        team = np.zeros(n_episodes)
        for _ in range(cfg.max_steps):
            if policy == "random":
                actions = act_rng.integers(0, N_ACTIONS, size=(n_episodes, cfg.n_agents))
            else:
                actions = core.oracle_actions()
            rewards = core.step(actions)
            team += rewards.mean(axis=1)
        out[policy] = float(team.mean())
    return ReferenceReturns(random=out["random"], oracle=out["oracle"], n_episodes=n_episodes)


def reference_returns(config: CoverageConfig | None = None, n_episodes: int = 64, seed: int = 12345) -> ReferenceReturns:
    """Random and oracle mean team returns over ``n_episodes`` seeded episodes (batched env;
    cached in-process by config, so repeated evaluation costs nothing)."""
    cfg = config or CoverageConfig()
    cfg.validate()
    return _reference_cached(tuple(sorted(asdict(cfg).items())), int(n_episodes), int(seed))


def normalised_return(team_return: float, ref: ReferenceReturns) -> float:
    """Oracle-normalised team return: random = 0, oracle = 1."""
    return float((team_return - ref.random) / (ref.oracle - ref.random))


def normalise(team_returns: np.ndarray, reference: ReferenceReturns | None) -> np.ndarray | None:
    """Oracle-normalised returns of a batch of team returns; None where the env has no oracle."""
    if reference is None:
        return None
    return np.array([normalised_return(float(r), reference) for r in team_returns])
