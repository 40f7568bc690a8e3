"""SuperSuit's image wrappers compose on the native env as on PettingZoo's image envs: (H, W, C) uint8; the
registry's chain, which applies SuperSuit's transforms on the parallel side, equals the chain of SuperSuit's
own wrappers step for step."""
from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import supersuit as ss
from pettingzoo import ParallelEnv
from pettingzoo.butterfly import pistonball_v6
from pettingzoo.test import api_test, parallel_api_test

from fgmf_marl.envs.ground_truth import PistonballMasks
from fgmf_marl.envs.native import CoverageConfig, CoverageParallelEnv
from fgmf_marl.envs.registry import (PETTINGZOO_ENVS, AdapterConfig, EnvConfig, ObservedOncePerFrame,
                                     make_parallel_env)

CFG = CoverageConfig(max_steps=6)


def test_frame_stack_stacks_along_channels() -> None:
    stacked, raw = ss.frame_stack_v1(CoverageParallelEnv(CFG), 2), CoverageParallelEnv(CFG)
    assert stacked.observation_space("agent_0").shape == (48, 48, 6)
    first, _ = stacked.reset(seed=4)
    before, _ = raw.reset(seed=4)
    for agent in raw.possible_agents:
        np.testing.assert_array_equal(first[agent][..., 3:], before[agent])
    actions = {agent: 4 for agent in raw.possible_agents}
    second, after = stacked.step(actions)[0], raw.step(actions)[0]
    for agent in raw.possible_agents:
        np.testing.assert_array_equal(second[agent], np.concatenate([before[agent], after[agent]], axis=-1))


def test_color_reduction_resize_and_frame_stack_compose() -> None:
    env = ss.frame_stack_v1(ss.resize_v1(ss.color_reduction_v0(CoverageParallelEnv(CFG), "full"), 24, 24), 3)
    assert env.observation_space("agent_0").shape == (24, 24, 3)
    obs, infos = env.reset(seed=0)
    assert obs["agent_0"].shape == (24, 24, 3) and obs["agent_0"].dtype == np.uint8
    assert infos["agent_0"]["relevance_mask"].shape == (48, 48)  # infos pass through, in the env's own pixels
    parallel_api_test(env, num_cycles=20)


def _supersuit_chain(cfg: EnvConfig) -> ParallelEnv:
    """The registry's chain as SuperSuit's own wrappers compose it (what ``make_parallel_env`` built before
    the observation transforms moved to the parallel side): pistonball's parallel env -> ``PistonballMasks``
    -> ``color_reduction_v0`` -> ``resize_v1`` -> ``frame_stack_v1`` -> ``observation_lambda_v0`` to CHW."""
    def chw_space(space: gym.spaces.Box, agent: Any = None) -> gym.spaces.Box:
        h, w, c = space.shape
        return gym.spaces.Box(0, 255, (c, h, w), np.uint8)

    def chw(obs: np.ndarray, space: gym.spaces.Box, agent: Any = None) -> np.ndarray:
        return np.ascontiguousarray(obs.transpose(2, 0, 1))

    adapter = cfg.adapter
    if cfg.name == "native":
        return ss.observation_lambda_v0(CoverageParallelEnv(cfg.native), chw, chw_space)
    if cfg.name == "pistonball":
        env = PistonballMasks(pistonball_v6.parallel_env(continuous=False, max_cycles=adapter.max_cycles,
                                                         render_mode="rgb_array"), adapter.size)
    else:
        env = PETTINGZOO_ENVS[cfg.name](adapter)
    if adapter.grayscale:
        env = ss.color_reduction_v0(env, "full")
    env = ss.resize_v1(env, adapter.size, adapter.size)
    if adapter.grayscale or adapter.frame_stack > 1:
        env = ss.frame_stack_v1(env, adapter.frame_stack)
    return ss.observation_lambda_v0(env, chw, chw_space)


def _assert_same(a: Any, b: Any, where: str) -> None:
    """Equal values of equal types, arrays by ``np.array_equal`` and dtype, dicts key by key, tuples item by item."""
    if isinstance(a, tuple):
        assert isinstance(b, tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b), where
    else:
        assert type(a) is type(b) and a == b, where


def _assert_same_steps(cfg: EnvConfig, seed: int, steps: int) -> None:
    """Both chains from ``reset(seed=seed)``, stepped with the same random actions; each episode's end
    resets both with the next seed."""
    old, new = _supersuit_chain(cfg), make_parallel_env(cfg)
    for agent in old.possible_agents:
        assert old.observation_space(agent) == new.observation_space(agent)
    rng = np.random.default_rng(seed)
    _assert_same(old.reset(seed=seed), new.reset(seed=seed), "reset 0")
    episodes = 1
    for step in range(steps):
        assert old.agents == new.agents, step
        if not old.agents:
            _assert_same(old.reset(seed=seed + episodes), new.reset(seed=seed + episodes), f"reset {episodes}")
            episodes += 1
            continue
        actions = {agent: int(rng.integers(old.action_space(agent).n)) for agent in old.agents}
        _assert_same(old.step(actions), new.step(actions), f"step {step}")
    assert episodes >= 2, "the episodes should end within the steps"


@pytest.mark.parametrize("adapter", [AdapterConfig(size=48, max_cycles=25),
                                     AdapterConfig(size=32, max_cycles=20, grayscale=True, frame_stack=3)])
def test_pistonball_chain_equals_supersuits_wrappers_with_masks_and_episode_ends(adapter: AdapterConfig) -> None:
    cfg = EnvConfig(name="pistonball", adapter=adapter)
    for seed in (0, 7):
        _assert_same_steps(cfg, seed, 100)


@pytest.mark.parametrize("name", ["native", "cooperative_pong", "kaz"])
def test_every_chain_equals_supersuits_wrappers(name: str) -> None:
    _assert_same_steps(EnvConfig(name=name, native=CoverageConfig(max_steps=10),
                                 adapter=AdapterConfig(size=24, max_cycles=10)), 3, 25)


def test_pistonball_chain_passes_pettingzoos_api_tests() -> None:
    parallel_api_test(make_parallel_env(EnvConfig(name="pistonball", adapter=AdapterConfig(size=32, max_cycles=20))),
                      num_cycles=25)
    api_test(ObservedOncePerFrame(pistonball_v6.env(continuous=False, max_cycles=20, render_mode="rgb_array")),
             num_cycles=25)
