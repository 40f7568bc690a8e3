"""Pistonball's ground-truth masks against the pixels pistonball itself draws, and through the VecEnv."""
from __future__ import annotations

import numpy as np
import pytest
from pettingzoo.butterfly import pistonball_v6

from envs.ground_truth import PistonballMasks, pistonball_masks, reduce_any
from envs.registry import AdapterConfig, EnvConfig, make_vec_env

BLUE = np.array([65, 159, 221])   # pistonball's colour of the ball and of the piston heads


def _dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    out = mask.copy()
    for dy in range(-pixels, pixels + 1):
        for dx in range(-pixels, pixels + 1):
            out |= np.roll(np.roll(mask, dy, axis=0), dx, axis=1)
    return out


def _blue(obs: np.ndarray) -> np.ndarray:
    return np.all(np.abs(obs.astype(int) - BLUE) <= 3, axis=-1)


def test_masks_cover_exactly_what_pistonball_draws_in_each_agents_view() -> None:
    env = PistonballMasks(pistonball_v6.parallel_env(continuous=False, max_cycles=60, render_mode="rgb_array"), 48)
    obs, _ = env.reset(seed=3)
    rng = np.random.default_rng(0)
    seen_ball = 0
    for _ in range(40):
        obs, *_ = env.step({a: int(rng.integers(3)) for a in env.agents})
        masks = pistonball_masks(env.unwrapped, None)
        for agent in env.agents:
            i = env.unwrapped.agent_name_mapping[agent]
            relevance, target = masks[i]
            blue = _blue(obs[agent])
            assert relevance.shape == blue.shape                      # the crop observe() returns
            # everything blue is ball or piston, to within the 1-2 px pygame's integer drawing rounds to
            assert not (blue & ~_dilate(relevance, 2)).any()
            assert (blue & relevance).sum() >= 0.95 * blue.sum()
            colours, counts = np.unique(obs[agent].reshape(-1, 3), axis=0, return_counts=True)
            drawn = np.any(obs[agent] != colours[counts.argmax()], axis=-1)     # not the background
            assert (relevance & drawn).sum() >= 0.9 * relevance.sum()        # and the masks hold little else
            if (target & blue).sum() > 500:
                seen_ball += 1
            assert target.sum() <= relevance.sum()
    assert seen_ball > 0


def test_reduce_any_keeps_a_one_pixel_entity() -> None:
    mask = np.zeros((457, 120), dtype=bool)
    mask[200, 60] = True
    small = reduce_any(mask, 48)
    assert small.sum() == 1 and small[200 * 48 // 457, 60 * 48 // 120]


def test_the_pistonball_vecenv_reports_masks_of_its_current_observations() -> None:
    venv = make_vec_env(EnvConfig(name="pistonball", n_envs=2, adapter=AdapterConfig(size=48, max_cycles=20)), seed=0)
    obs = venv.reset()
    assert venv.relevance_masks().shape == (40, 48, 48) == venv.target_masks().shape
    assert (venv.relevance_masks().sum(axis=(1, 2)) > 0).all()          # every piston sees piston heads
    assert (venv.target_masks() <= venv.relevance_masks()).all()     # own piston + ball within all of it
    for _ in range(25):   # past max_cycles: the slots that just reset report empty masks for one step
        obs, _, dones, _ = venv.step(np.full(venv.num_envs, 2))
        if dones.any():
            assert not venv.relevance_masks()[dones].any()
