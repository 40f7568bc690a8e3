"""The batched coverage env equals B copies of the reference single env, and is a proper SB3 VecEnv.

The reference emits PettingZoo's (H, W, C) images, the batched env SB3's (C, H, W): every comparison
of observations goes through that one transpose (``chw``) and is bitwise.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from stable_baselines3.common.vec_env import VecEnv

from fgmf_marl.config import ConfigError
from fgmf_marl.envs.batched import BatchedCoverage, CoverageVecEnv
from fgmf_marl.envs.native import CoverageConfig, CoverageParallelEnv
from fgmf_marl.envs.reference import reference_returns

def chw(obs: np.ndarray) -> np.ndarray:
    """A reference observation (H, W, C) in the batched env's layout (C, H, W)."""
    return obs.transpose(2, 0, 1)


CONFIGS = [
    CoverageConfig(max_steps=12),
    CoverageConfig(n_agents=4, n_landmarks=2, n_distractors=6, size=32, entity_size=3, max_steps=9,
                   agent_speed=3, cover_radius=1, distractor_speed=3, collision_penalty=0.5),
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_batched_equals_single_envs(cfg: CoverageConfig) -> None:
    """Observations, rewards, dones, masks and oracle actions over 3 episodes incl. auto-resets."""
    n_envs, seed = 5, 100
    venv = CoverageVecEnv(cfg, n_envs=n_envs, seed=seed)
    singles = [CoverageParallelEnv(cfg, render_mode="rgb_array") for _ in range(n_envs)]
    n = cfg.n_agents
    obs = venv.reset()
    infos_single = []
    for b, env in enumerate(singles):
        o, inf = env.reset(seed=seed + b)
        infos_single.append(inf)
        for i, agent in enumerate(env.possible_agents):
            np.testing.assert_array_equal(obs[b * n + i], chw(o[agent]))
    rng = np.random.default_rng(0)
    episode_returns = []
    for t in range(3 * cfg.max_steps):
        rel, tgt, ora = venv.relevance_masks(), venv.target_masks(), venv.oracle_actions()
        frames = venv.render()
        for b, env in enumerate(singles):
            np.testing.assert_array_equal(frames[b], env.render())
            oracle = env.oracle_actions()
            for i, agent in enumerate(env.possible_agents):
                np.testing.assert_array_equal(rel[b * n + i], infos_single[b][agent]["relevance_mask"])
                np.testing.assert_array_equal(tgt[b * n + i], infos_single[b][agent]["target_mask"])
                assert ora[b * n + i] == oracle[agent]
        # Mix oracle and random actions so agents collide, cover and hit walls.
        actions = np.where(rng.random(venv.num_envs) < 0.5, ora, rng.integers(0, 5, venv.num_envs))
        obs, rewards, dones, infos = venv.step(actions)
        assert obs.dtype == np.uint8 and rewards.dtype == np.float32 and dones.dtype == bool
        for b, env in enumerate(singles):
            acts = {agent: int(actions[b * n + i]) for i, agent in enumerate(env.possible_agents)}
            o, r, term, trunc, inf = env.step(acts)
            infos_single[b] = inf
            ended = all(trunc.values())
            for i, agent in enumerate(env.possible_agents):
                slot = b * n + i
                assert rewards[slot] == np.float32(r[agent])
                assert dones[slot] == ended and not term[agent]
                if ended:
                    info = infos[slot]
                    np.testing.assert_array_equal(info["terminal_observation"], chw(o[agent]))
                    assert info["TimeLimit.truncated"] is True and info["episode"]["l"] == cfg.max_steps
                else:
                    np.testing.assert_array_equal(obs[slot], chw(o[agent]))
                    assert infos[slot] == {}
            if ended:
                episode_returns.append((b, [infos[b * n + i]["episode"] for i in range(n)]))
                o, infos_single[b] = env.reset()  # unseeded: continues the env's generator
                for i, agent in enumerate(env.possible_agents):
                    np.testing.assert_array_equal(obs[b * n + i], chw(o[agent]))
    assert len(episode_returns) == 3 * n_envs
    for _, eps in episode_returns:
        team = eps[0]["team_r"]
        assert all(e["team_r"] == team for e in eps)
        assert team == pytest.approx(np.mean([e["r"] for e in eps]))


def test_episode_returns_match_reward_sums() -> None:
    cfg = CoverageConfig(max_steps=10)
    venv = CoverageVecEnv(cfg, n_envs=3, seed=1)
    venv.reset()
    total = np.zeros(venv.num_envs)
    for _ in range(10):
        _, r, dones, infos = venv.step(venv.oracle_actions())
        total += r
    assert dones.all()
    for slot, info in enumerate(infos):
        assert info["episode"]["r"] == pytest.approx(total[slot], rel=1e-5)
        env = slot // cfg.n_agents
        assert info["episode"]["team_r"] == pytest.approx(total[env * 3:env * 3 + 3].mean(), rel=1e-5)


def test_vecenv_api() -> None:
    cfg = CoverageConfig(size=32)
    venv = CoverageVecEnv(cfg, n_envs=2, seed=0)
    assert isinstance(venv, VecEnv) and venv.num_envs == 6 and venv.n_envs == 2 and venv.n_agents == 3
    assert venv.observation_space.shape == (3, 32, 32) and venv.action_space.n == 5
    obs = venv.reset()
    assert obs.shape == (6, 3, 32, 32)
    assert venv.get_attr("config", [0, 4]) == [cfg, cfg]
    assert venv.env_is_wrapped(object) == [False] * 6
    assert venv.env_method("oracle_actions", indices=[1])[0].shape == (6,)
    venv.set_attr("note", 3)
    assert venv.get_attr("note") == [3] * 6
    assert venv.relevance_masks().shape == (6, 32, 32) and venv.target_masks().shape == (6, 32, 32)
    assert venv.render().shape == (2, 32, 32, 3)
    # seed() takes effect at the next reset, env b gets seed + b.
    assert venv.seed(7)[:4] == [7, 7, 7, 8]
    first = venv.reset()
    np.testing.assert_array_equal(first, CoverageVecEnv(cfg, n_envs=2, seed=7).reset())
    with pytest.raises(ValueError, match="expected 6 actions"):
        venv.step(np.zeros(5, dtype=np.int64))
    with pytest.raises(ValueError, match="actions must be in"):
        venv.step(np.full(6, 5))
    venv.close()


def test_reference_returns_use_batched_oracle() -> None:
    cfg = CoverageConfig(max_steps=20)
    ref = reference_returns(cfg, n_episodes=8, seed=3)
    core = BatchedCoverage(cfg, n_envs=8)
    core.reset(seeds=[3 + b for b in range(8)])
    team = np.zeros(8)
    for _ in range(cfg.max_steps):
        team += core.step(core.oracle_actions()).mean(1)
    assert ref.oracle == pytest.approx(team.mean())


@st.composite
def _configs(draw: st.DrawFn) -> CoverageConfig:
    size = draw(st.sampled_from([16, 24, 33, 48]))
    e = draw(st.integers(1, size // 4))
    speed = draw(st.integers(1, 3))
    radius = draw(st.integers(speed // 2, 3))
    n = draw(st.integers(1, 4))
    cfg = CoverageConfig(n_agents=n, n_landmarks=draw(st.integers(1, n)), n_distractors=draw(st.integers(0, 5)),
                         size=size, entity_size=e, agent_speed=speed, cover_radius=radius,
                         distractor_speed=draw(st.integers(0, 3)), max_steps=draw(st.integers(1, 6)),
                         collision_penalty=draw(st.sampled_from([0.0, 0.3])))
    try:
        cfg.validate()
    except ConfigError:
        assume(False)
    return cfg


@settings(max_examples=25, deadline=None)
@given(cfg=_configs(), seed=st.integers(0, 2**31))
def test_batched_equals_single_random_configs(cfg: CoverageConfig, seed: int) -> None:
    """Property: for any valid config, obs/rewards/dones match the reference over two episodes."""
    venv = CoverageVecEnv(cfg, n_envs=2, seed=seed)
    singles = [CoverageParallelEnv(cfg) for _ in range(2)]
    obs = venv.reset()
    seen = [env.reset(seed=seed + b)[0] for b, env in enumerate(singles)]
    rng = np.random.default_rng(seed)
    n = cfg.n_agents
    for _ in range(2 * cfg.max_steps):
        for b, env in enumerate(singles):
            for i, agent in enumerate(env.possible_agents):
                np.testing.assert_array_equal(obs[b * n + i], chw(seen[b][agent]))
        actions = rng.integers(0, 5, venv.num_envs)
        obs, rewards, dones, _ = venv.step(actions)
        for b, env in enumerate(singles):
            o, r, _, trunc, _ = env.step({agent: int(actions[b * n + i]) for i, agent in enumerate(env.possible_agents)})
            assert [rewards[b * n + i] for i in range(n)] == [np.float32(r[a]) for a in env.possible_agents]
            assert all(dones[b * n:(b + 1) * n] == all(trunc.values()))
            seen[b] = env.reset()[0] if all(trunc.values()) else o
