"""The env registry: every name yields the same VecEnv shape; PettingZoo adapters go through SuperSuit."""
from __future__ import annotations

import numpy as np
import pytest
from pettingzoo.test import parallel_api_test
from stable_baselines3.common.vec_env import VecEnv

from fgmf_marl.config import ConfigError, from_dict
from fgmf_marl.envs.native import CoverageConfig
from fgmf_marl.envs.registry import ENVIRONMENTS, AdapterConfig, EnvConfig, make_parallel_env, make_vec_env, n_agents_of

ADAPTER_AGENTS = {"pistonball": 20, "cooperative_pong": 2, "kaz": 4}


@pytest.mark.parametrize("name", ["native", "pistonball", "cooperative_pong", "kaz"])
def test_vec_env_shape_is_shared_channel_first_uint8(name: str) -> None:
    cfg = EnvConfig(name=name, n_envs=2, adapter=AdapterConfig(size=32, max_cycles=20))
    venv = make_vec_env(cfg, seed=3)
    try:
        n_agents = n_agents_of(venv, cfg)
        if name in ADAPTER_AGENTS:
            assert n_agents == ADAPTER_AGENTS[name]
        obs = venv.reset()
        c, h, w = venv.observation_space.shape
        assert c == 3 and obs.shape == (2 * n_agents, c, h, w) and obs.dtype == np.uint8
        if name != "native":
            assert h == w == 32
        obs, rewards, dones, infos = venv.step(np.zeros(venv.num_envs, dtype=np.int64))
        assert obs.shape == (2 * n_agents, c, h, w) and rewards.shape == (2 * n_agents,) and len(infos) == 2 * n_agents
    finally:
        venv.close()


def test_grayscale_frame_stack_adapter() -> None:
    cfg = EnvConfig(name="cooperative_pong", n_envs=1, adapter=AdapterConfig(size=24, grayscale=True, frame_stack=3))
    venv = make_vec_env(cfg, seed=0)
    assert venv.observation_space.shape == (3, 24, 24) and venv.reset().shape == (2, 3, 24, 24)
    venv.close()
    cfg = EnvConfig(name="cooperative_pong", n_envs=1, adapter=AdapterConfig(size=24, grayscale=True))
    assert make_parallel_env(cfg).observation_space("paddle_0").shape == (1, 24, 24)


def test_seed_seeds_the_next_reset_env_major() -> None:
    """SB3 calls ``seed()`` on every env it is given a seed for; SuperSuit's chain must take it."""
    cfg = EnvConfig(name="cooperative_pong", n_envs=2, adapter=AdapterConfig(size=24, max_cycles=30))
    venv = make_vec_env(cfg)
    assert venv.seed(5) == [5, 5, 6, 6]
    seen = [_after_three_steps(v) for v in (venv, make_vec_env(cfg, seed=5), make_vec_env(cfg, seed=6))]
    np.testing.assert_array_equal(seen[0], seen[1])
    np.testing.assert_array_equal(seen[0][2:], seen[2][:2])  # copy 1 of seed 5 is copy 0 of seed 6
    assert not np.array_equal(seen[0][:2], seen[2][:2]) and seen[0].any()


def _after_three_steps(venv: VecEnv) -> np.ndarray:
    """Observations once the ball has moved (its direction is what the seed decides)."""
    venv.reset()
    for _ in range(3):
        obs = venv.step(np.zeros(venv.num_envs, dtype=np.int64))[0]
    venv.close()
    return obs


def test_native_parallel_env_is_the_vec_env_through_one_transpose() -> None:
    """The registry's native ParallelEnv (PettingZoo's HWC transposed once) equals the VecEnv SB3 trains on."""
    cfg = EnvConfig(n_envs=1, native=CoverageConfig(max_steps=5))
    env, venv = make_parallel_env(cfg), make_vec_env(cfg, seed=2)
    parallel_api_test(make_parallel_env(cfg), num_cycles=10)
    assert env.observation_space("agent_0") == venv.observation_space
    obs, infos = env.reset(seed=2)
    vec_obs = venv.reset()
    rng = np.random.default_rng(0)
    for _ in range(5):
        np.testing.assert_array_equal(np.stack([obs[agent] for agent in env.possible_agents]), vec_obs)
        assert infos["agent_0"]["relevance_mask"].shape == (48, 48)
        actions = rng.integers(0, 5, venv.num_envs)
        obs, _, _, _, infos = env.step({agent: int(actions[i]) for i, agent in enumerate(env.possible_agents)})
        vec_obs, _, dones, vec_infos = venv.step(actions)
    assert dones.all()
    np.testing.assert_array_equal(np.stack([obs[a] for a in env.possible_agents]),
                                  np.stack([info["terminal_observation"] for info in vec_infos]))


def test_adapted_parallel_env_passes_pettingzoo_api_test() -> None:
    env = make_parallel_env(EnvConfig(name="cooperative_pong", adapter=AdapterConfig(size=24, max_cycles=30)))
    parallel_api_test(env, num_cycles=30)


def test_unknown_env_lists_known_names() -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(EnvConfig, {"name": "atari"})
    message = str(info.value)
    assert all(name in message for name in ENVIRONMENTS)
    with pytest.raises(ConfigError, match="adapter.size"):
        from_dict(EnvConfig, {"adapter": {"size": 4}})
