"""Pistonball's ground-truth masks against the pixels pistonball itself draws, and through the VecEnv."""
from __future__ import annotations

import numpy as np
import pytest
from pettingzoo.butterfly import pistonball_v6

from fgmf_marl.envs.ground_truth import PistonballMasks, _head_footprint, box, pistonball_masks, reduce_any, stamp
from fgmf_marl.envs.registry import AdapterConfig, EnvConfig, make_vec_env

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


def _masks_drawn_per_agent(raw, size):  # noqa: ANN001, ANN202
    """The reference: every piston and the ball drawn into every agent's crop on its own (quadratic)."""
    wall, width = raw.wall_width, raw.piston_width
    top, bottom = wall, raw.screen_height - wall - raw.piston_body_height
    height, head = bottom - top, _head_footprint(raw)
    bx, by = int(raw.ball.position[0]), int(raw.ball.position[1])
    out = {}
    for i in range(len(raw.pistonList)):
        left, crop_w = wall + width * (i - 1), 3 * width
        rr, cc = np.ogrid[:height, :crop_w]
        ball = (rr - (by - top)) ** 2 + (cc - (bx - left)) ** 2 <= (raw.ball_radius + 0.5) ** 2
        heads = []
        for piston in raw.pistonList:
            px, py, r = float(piston.position[0]), float(piston.position[1]), raw.piston_radius
            rod = raw.screen_height - wall - raw.piston_body_height - (py + r) + (raw.piston_body_height - 6)
            heads.append(stamp(height, crop_w, int(py - r) - top, int(px - r) - left, head)
                         | box(height, crop_w, py + r + 1 - top, px + r + 1 - left, rod, 18))
        relevance, target = ball | np.logical_or.reduce(heads), ball | heads[i]
        out[i] = (relevance, target) if size is None else (_any_per_cell(relevance, size), _any_per_cell(target, size))
    return out


def _any_per_cell(mask: np.ndarray, size: int) -> np.ndarray:
    rows = np.linspace(0, mask.shape[0], size + 1).astype(int)
    cols = np.linspace(0, mask.shape[1], size + 1).astype(int)
    return np.add.reduceat(np.add.reduceat(mask.astype(np.int32), rows[:-1], axis=0), cols[:-1], axis=1) > 0


def test_masks_equal_drawing_every_piston_into_every_agents_crop() -> None:
    env = pistonball_v6.parallel_env(continuous=False, max_cycles=80, render_mode="rgb_array")
    env.reset(seed=5)
    rng = np.random.default_rng(1)
    for step in range(60):
        env.step({a: int(rng.integers(3)) for a in env.agents})
        for size in (None, 48, 84):
            fast, reference = pistonball_masks(env.unwrapped, size), _masks_drawn_per_agent(env.unwrapped, size)
            assert fast.keys() == reference.keys()
            for i in fast:
                assert np.array_equal(fast[i][0], reference[i][0]) and np.array_equal(fast[i][1], reference[i][1]), \
                    (step, size, i)


@pytest.mark.parametrize("shape, size", [((457, 120), 48), ((457, 120), 84), ((3, 50, 40), 48), ((30, 20), 7)])
def test_reduce_any_is_any_pixel_of_the_cell(shape: tuple[int, ...], size: int) -> None:
    mask = np.random.default_rng(0).random(shape) < 0.02
    expected = np.stack([_any_per_cell(m, size) for m in mask.reshape(-1, *shape[-2:])]).reshape(*shape[:-2], size, size)
    assert np.array_equal(reduce_any(mask, size), expected)


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
