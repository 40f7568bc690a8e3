"""SuperSuit's image wrappers compose on the native env as on PettingZoo's image envs: (H, W, C) uint8."""
from __future__ import annotations

import numpy as np
import supersuit as ss
from pettingzoo.test import parallel_api_test

from fgmf_marl.envs.native import CoverageConfig, CoverageParallelEnv

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
