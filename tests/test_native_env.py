"""The native coverage env: PettingZoo API, seeding, rendering, ground-truth masks, oracle, config."""
from __future__ import annotations

import numpy as np
import pytest
from pettingzoo.test import parallel_api_test, parallel_seed_test, render_test
from pettingzoo.utils.conversions import parallel_to_aec

from fgmf_marl.config import ConfigError
from fgmf_marl.envs.native import (BACKGROUND, DISTRACTORS, LANDMARK, OWN, TEAMMATE, WALL, CoverageConfig, CoverageParallelEnv,
                         oracle_action, oracle_assignment)
from fgmf_marl.envs.reference import ReferenceReturns, normalised_return, reference_returns


def test_parallel_api() -> None:
    parallel_api_test(CoverageParallelEnv(CoverageConfig(max_steps=25)), num_cycles=60)


def test_parallel_seed() -> None:
    parallel_seed_test(lambda: CoverageParallelEnv(CoverageConfig(max_steps=15)))


def test_render() -> None:
    render_test(lambda render_mode=None: parallel_to_aec(CoverageParallelEnv(render_mode=render_mode)))
    env = CoverageParallelEnv(CoverageConfig(size=32), render_mode="rgb_array")
    env.reset(seed=0)
    frame = env.render()
    assert frame.shape == (32, 32, 3) and frame.dtype == np.uint8
    assert CoverageParallelEnv().render() is None


def test_spaces_and_fixed_length() -> None:
    cfg = CoverageConfig(n_agents=4, n_landmarks=2, size=40, max_steps=7)
    env = CoverageParallelEnv(cfg)
    obs, infos = env.reset(seed=1)
    assert env.possible_agents == ["agent_0", "agent_1", "agent_2", "agent_3"]
    assert env.observation_space("agent_0").shape == (40, 40, 3) and env.action_space("agent_0").n == 5
    for agent, o in obs.items():
        assert o.shape == (40, 40, 3) and o.dtype == np.uint8 and env.observation_space(agent).contains(o)
        assert infos[agent]["relevance_mask"].shape == (40, 40) and infos[agent]["relevance_mask"].dtype == bool
    for t in range(7):
        obs, rew, term, trunc, infos = env.step({a: 0 for a in env.agents})
        assert not any(term.values())
        assert all(trunc.values()) == (t == 6) and any(trunc.values()) == (t == 6)
    assert env.agents == []


def _hand_env(agents, landmarks, dpos, dvel=None, **kw) -> CoverageParallelEnv:
    """A hand-made state; pixel checks are written in world coordinates, so the view defaults to global."""
    kw.setdefault("view", "global")
    cfg = CoverageConfig(n_agents=len(agents), n_landmarks=len(landmarks), n_distractors=len(dpos), **kw)
    env = CoverageParallelEnv(cfg)
    env.reset(seed=0)
    env.set_state(agents, landmarks, dpos if dpos else None, dvel)
    return env


def test_set_state_checks_shapes_and_ranges() -> None:
    env = _hand_env(agents=[(0, 0), (5, 5)], landmarks=[(20, 20)], dpos=[(1, 1)])
    with pytest.raises(ValueError, match="agents needs 2"):
        env.set_state([(0, 0)], [(20, 20)], [(1, 1)])
    with pytest.raises(ValueError, match="landmarks positions must be in 0..44"):
        env.set_state([(0, 0), (1, 1)], [(45, 20)], [(1, 1)])
    state = env.get_state()
    assert state["agents"].tolist() == [[0, 0], [5, 5]] and state["dvel"].tolist() == [[0, 0]]


def _box(size: int, y: int, x: int, e: int = 4) -> np.ndarray:
    m = np.zeros((size, size), bool)
    m[y:y + e, x:x + e] = True
    return m


def test_relevance_mask_exactly_relevant_entities() -> None:
    # Distractor touching landmark 0, another half under agent 1; relevant sprites drawn on top.
    env = _hand_env(agents=[(5, 5), (30, 30)], landmarks=[(20, 10), (40, 40)], dpos=[(20, 14), (32, 32)])
    obs, infos = env.set_state([(5, 5), (30, 30)], [(20, 10), (40, 40)], [(20, 14), (32, 32)])
    expected = _box(48, 5, 5) | _box(48, 30, 30) | _box(48, 20, 10) | _box(48, 40, 40)
    for agent in env.possible_agents:
        np.testing.assert_array_equal(infos[agent]["relevance_mask"], expected)
    img = obs["agent_0"]
    # Own body red, teammate blue, landmarks green, distractors drawn where visible, background elsewhere.
    assert (img[_box(48, 5, 5)] == OWN).all()
    assert (img[_box(48, 30, 30)] == TEAMMATE).all()
    assert (img[_box(48, 20, 10) | _box(48, 40, 40)] == LANDMARK).all()
    ring0 = _box(48, 20, 14) & ~_box(48, 21, 15, 2)
    assert (img[ring0] == DISTRACTORS[0]).all()
    ring1 = (_box(48, 32, 32) & ~_box(48, 33, 33, 2)) & ~expected
    assert ring1.sum() == 9 and (img[ring1] == DISTRACTORS[1]).all()
    # Every pixel outside the relevant sprites and the visible ring pixels is background.
    rest = ~(expected | ring0 | ring1)
    assert (img[rest] == BACKGROUND).all()
    # No distractor colour inside the mask, and every non-background pixel outside it is a distractor's.
    assert not (img[expected] == DISTRACTORS[0]).all(-1).any() and not (img[expected] == DISTRACTORS[1]).all(-1).any()
    # The other agent sees itself red and agent_0 blue.
    img1 = obs["agent_1"]
    assert (img1[_box(48, 30, 30)] == OWN).all() and (img1[_box(48, 5, 5)] == TEAMMATE).all()


def test_egocentric_view_is_the_padded_global_view_at_half_resolution() -> None:
    # Independent construction: pad the global image with walls by S on each side, then take every
    # second pixel of the 2S window centred on the agent's sprite centre.
    kw = dict(agents=[(0, 0), (30, 40), (44, 10)], landmarks=[(10, 11), (30, 30), (2, 40)], dpos=[(20, 20)], dvel=[(2, 2)])
    glob, ego = _hand_env(**kw), _hand_env(**kw, view="egocentric")
    for _ in range(3):
        obs_g, _, _, _, info_g = glob.step({a: 4 for a in glob.agents})
        obs_e, _, _, _, info_e = ego.step({a: 4 for a in ego.agents})
    size, half = 48, 2
    for i, agent in enumerate(glob.possible_agents):
        cy, cx = glob.get_state()["agents"][i] + half
        padded = np.empty((3 * size, 3 * size, 3), np.uint8)
        padded[:] = WALL
        padded[size:2 * size, size:2 * size] = obs_g[agent]
        np.testing.assert_array_equal(obs_e[agent], padded[cy:cy + 2 * size:2, cx:cx + 2 * size:2])
        for key in ("relevance_mask", "target_mask"):
            pad_mask = np.zeros((3 * size, 3 * size), bool)
            pad_mask[size:2 * size, size:2 * size] = info_g[agent][key]
            np.testing.assert_array_equal(info_e[agent][key], pad_mask[cy:cy + 2 * size:2, cx:cx + 2 * size:2])
        # The agent itself is always the 2x2 block at the centre, drawn in its own colour.
        assert (obs_e[agent][23:25, 23:25] == OWN).all()
    assert CoverageConfig().view == "egocentric"


def test_target_mask_follows_oracle_assignment() -> None:
    env = _hand_env(agents=[(0, 0), (40, 40)], landmarks=[(38, 36), (2, 6)], dpos=[])
    tgt = env.target_masks()
    np.testing.assert_array_equal(tgt["agent_0"], _box(48, 0, 0) | _box(48, 2, 6))
    np.testing.assert_array_equal(tgt["agent_1"], _box(48, 40, 40) | _box(48, 38, 36))
    # An unassigned agent's target is its own body.
    env = _hand_env(agents=[(0, 0), (40, 40)], landmarks=[(38, 36)], dpos=[])
    np.testing.assert_array_equal(env.target_masks()["agent_0"], _box(48, 0, 0))


@pytest.mark.parametrize("local_ratio", [0.0, 0.5, 1.0])
def test_rewards_closed_form(local_ratio: float) -> None:
    # Agent 0 sits on landmark 0 (covered), agent 1 is 6 px (L1) from landmark 1 and steps right to 4 px,
    # agent 2 overlaps agent 0. Optimal assignment by hand: a0->L0 (1) + a1->L1 (4) + a2->L2 (39) = 44
    # beats a2->L0, a0->L2 (2 + 4 + 40 = 46).
    env = _hand_env(agents=[(10, 10), (30, 24), (11, 12)], landmarks=[(10, 11), (30, 30), (0, 40)], dpos=[],
                    collision_penalty=0.5, local_ratio=local_ratio, shaping_coef=1.0)
    _, rew, *_ = env.step({"agent_0": 0, "agent_1": 4, "agent_2": 0})  # agent 1 moves right by 2 px
    # Potentials are in agent-steps (L1 / agent_speed); only landmark 1's nearest distance fell, by 2 px.
    shared = 1.0 * 1 / 3 + (2 / 2) / 3            # one landmark covered, team potential fell by 1 step / 3
    local = [1.0 + 0.0, 0.0 + 2 / 2, 0.0 + 0.0]   # a0 covers its landmark; a1 came one step closer
    mix = [(1 - local_ratio) * shared + local_ratio * loc for loc in local]
    assert rew["agent_0"] == pytest.approx(mix[0] - 0.5)
    assert rew["agent_1"] == pytest.approx(mix[1])
    assert rew["agent_2"] == pytest.approx(mix[2] - 0.5)
    # Shaping telescopes: stepping back gives the potential back, and a noop in place gives none.
    _, rew_back, *_ = env.step({"agent_0": 0, "agent_1": 3, "agent_2": 0})
    assert rew_back["agent_1"] == pytest.approx((1 - local_ratio) * (1 / 3 - 1 / 3) + local_ratio * -1.0)
    _, rew_stay, *_ = env.step({a: 0 for a in env.agents})
    assert rew_stay["agent_1"] == pytest.approx((1 - local_ratio) / 3)


def test_moves_clip_and_distractors_bounce() -> None:
    env = _hand_env(agents=[(0, 44)], landmarks=[(20, 20)], dpos=[(43, 1)], dvel=[(2, -2)])
    env.step({"agent_0": 1})  # up at the wall: stays
    assert tuple(env.get_state()["agents"][0]) == (0, 44)
    env.step({"agent_0": 3})  # left
    assert tuple(env.get_state()["agents"][0]) == (0, 42)
    # 43 -> 45 > 44 reflects to 43; 1 -> -1 reflects to 1; then velocities flipped.
    assert tuple(env.get_state()["dpos"][0]) == (41, 3) and tuple(env.get_state()["dvel"][0]) == (-2, 2)


def test_oracle_assignment_is_optimal() -> None:
    rng = np.random.default_rng(0)
    import itertools
    agents = rng.integers(0, 45, (50, 4, 2))
    landmarks = rng.integers(0, 45, (50, 3, 2))
    assign = oracle_assignment(agents, landmarks)
    for b in range(50):
        dist = np.abs(agents[b][:, None] - landmarks[b][None]).sum(-1)
        best = min(sum(dist[p[k], k] for k in range(3)) for p in itertools.permutations(range(4), 3))
        got = sum(dist[i, assign[b, i]] for i in range(4) if assign[b, i] >= 0)
        assert got == best and sorted(assign[b][assign[b] >= 0]) == [0, 1, 2]


def test_oracle_action_steps_along_larger_axis() -> None:
    agents = np.array([[[10, 10]], [[10, 10]], [[10, 10]], [[10, 10]]])
    landmarks = np.array([[[10, 20]], [[2, 12]], [[12, 11]], [[10, 3]]])
    np.testing.assert_array_equal(oracle_action(agents, landmarks, cover_radius=2)[:, 0], [4, 1, 0, 3])


def test_oracle_beats_random_widely() -> None:
    ref = reference_returns(CoverageConfig(), n_episodes=32)
    assert isinstance(ref, ReferenceReturns)
    assert ref.oracle - ref.random > 20.0 and ref.oracle > 0.0
    assert normalised_return(ref.random, ref) == 0.0 and normalised_return(ref.oracle, ref) == 1.0
    assert reference_returns(CoverageConfig(), n_episodes=32) is ref  # cached


def test_oracle_covers_all_landmarks_single_env() -> None:
    env = CoverageParallelEnv(CoverageConfig())
    env.reset(seed=7)
    for _ in range(39):
        _, rew, *_ = env.step(env.oracle_actions())
    s = env.get_state()
    cheb = np.abs(s["agents"][:, None] - s["landmarks"][None]).max(-1)
    assert (cheb.min(0) <= env.config.cover_radius).all()


@pytest.mark.parametrize("override, fragment", [
    (dict(n_agents=0), "n_agents"), (dict(n_landmarks=4), "n_landmarks"), (dict(size=12), "size"),
    (dict(max_steps=0), "max_steps"), (dict(n_distractors=-1), "n_distractors"),
    (dict(entity_size=20), "entity_size"), (dict(cover_radius=0, agent_speed=4), "cover_radius"),
    (dict(collision_penalty=-1.0), "collision_penalty"), (dict(local_ratio=1.5), "local_ratio"), (dict(size=16, n_landmarks=3, cover_radius=4), "landmarks"),
])
def test_config_validation(override: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment) as err:
        CoverageParallelEnv(CoverageConfig(**override))
    assert "\n" not in str(err.value)


def test_config_loads_through_project_config() -> None:
    from fgmf_marl.config import from_dict

    cfg = from_dict(CoverageConfig, {"n_agents": 4, "size": 32})
    assert cfg.n_agents == 4 and cfg.size == 32
    with pytest.raises(ConfigError):
        from_dict(CoverageConfig, {"n_agent": 4})
