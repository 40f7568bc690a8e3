"""``coverage_v0``: the native cooperative vision environment (a PettingZoo ParallelEnv).

Why it exists: PettingZoo's image environments are slow and carry no ground truth of what an
agent *should* look at. This one is small enough to train PPO on a 2-core CPU in minutes, and it
knows, pixel by pixel, which parts of every observation matter, so explanation metrics
(relevance mass, pointing game) have an exact reference.

World (all coordinates are integer pixel positions of a sprite's top-left corner, row ``y`` then
column ``x``, in ``[0, L)`` with ``L = size - entity_size + 1``; sprites are
``entity_size`` x ``entity_size``):

- ``n_agents`` agents, actions ``0 noop, 1 up (y - speed), 2 down, 3 left (x - speed), 4 right``,
  positions clipped to the arena; agents pass through each other (at a penalty);
- ``n_landmarks`` static landmarks, spawned at pairwise Chebyshev distance
  ``>= entity_size + 2 * cover_radius + 2``, so that no agent can cover two landmarks and two agents
  on two landmarks never collide;
- ``n_distractors`` moving rings that bounce off the walls with a constant integer velocity drawn
  at reset; they never touch reward or dynamics, and their colours share a channel with every
  relevant colour (yellow shares R with the own body and G with landmarks; magenta shares R with the
  own body and B with teammates), so an explanation that points at them is measurably wrong.

Rewards (defined here once; the batched env and every report use these definitions):

- landmark ``k`` is *covered* when some agent is within Chebyshev distance ``cover_radius`` of it;
  by the spawn spacing, covered landmarks are covered by distinct agents;
- ``k_i``: the landmark the oracle's optimal assignment (below) gives agent ``i`` in the current
  state (none when ``n_agents > n_landmarks`` leaves ``i`` out);
- potentials, in agent-steps (``L1 / agent_speed``) times ``shaping_coef``:
  team ``Phi = shaping_coef * sum_k min_a L1(a, k) / (agent_speed * n_landmarks)`` (MPE
  ``simple_spread``'s distance term) and local ``phi_i = shaping_coef * L1(i, k_i) / agent_speed``;
- shared term ``team_shared = cover_reward * n_covered / n_landmarks + (Phi_prev - Phi)``;
  local term ``local_i = cover_reward * [i covers k_i] + (phi_i_prev - phi_i)``;
- agent reward ``r_i = (1 - local_ratio) * team_shared + local_ratio * local_i - collision_penalty * c_i``,
  ``c_i`` = number of teammates whose sprite overlaps agent ``i``'s sprite (Chebyshev distance
  ``< entity_size``);
- **team reward** of a step = mean over agents of ``r_i``; **team return** = its sum over the
  episode. Oracle-normalised return = ``(R - R_random) / (R_oracle - R_random)``.

Why this shape. The distance terms are *potential-based* shaping (Ng, Harada & Russell 1999):
they telescope over an episode, so they guide learning without changing which policies are optimal,
and a step toward the target pays at once instead of through a value function that first has to
learn absolute distances from pixels (with MPE's absolute ``-distance`` reward, PPO on these images
stayed at ~0.0 normalised after 60k agent-steps). The local term is credit assignment: under pure
team reward each agent's own action is a ~1/N share of a noisy signal (MPE mixes in a local term
through its ``local_ratio`` for the same reason). The default ``local_ratio = 1`` makes the team
reward the mean of the local terms; it is highest exactly when every landmark is covered by a
distinct agent (then the optimal assignment matches each landmark to the agent covering it), so
the team objective is unchanged while each agent gets its own credit. Which landmark is "mine" depends on where the
teammates are, so the policy still coordinates through what it sees; moving toward one's assigned
landmark lowers the cost of every assignment by at most as much as the current one, so the
assignment is stable along the oracle's paths.

Episodes have a fixed length: all agents truncate together after ``max_steps`` steps, no agent ever
terminates (time is not in the observation, so learners must bootstrap at the time limit).

Observation of agent ``i``: an RGB image, uint8 ``(size, size, 3)`` (height, width, channel), the
layout of PettingZoo's image environments, so SuperSuit's wrappers (``frame_stack_v1``,
``color_reduction_v0``, ``resize_v1``) compose on it; ``fgmf_marl.envs.registry`` transposes it to the
channel-first ``(3, size, size)`` SB3 trains on, which ``fgmf_marl.envs.batched`` produces directly. It shows
background, then distractors (rings), then landmarks (green squares), then all agents as teammates
(blue squares), then agent ``i`` itself on top in red. Draw order puts every relevant entity above
every distractor, so:

- ``relevance_mask`` (bool ``(size, size)``) = the union of the sprite pixels of the agent's own
  body, all landmarks and all teammates. All of them are relevant because the oracle's choice (a
  joint optimal assignment of agents to landmarks) depends on every agent and landmark position.
  These are exactly the pixels drawn by relevant entities, never a distractor pixel (a distractor
  pixel hidden under a relevant sprite is the relevant sprite's pixel).
- ``target_mask`` = own body + the landmark the oracle assigns to the agent (own body only if it
  is unassigned, when ``n_agents > n_landmarks``).

The oracle (:func:`oracle_assignment`, :func:`oracle_action`): the assignment of landmarks to
distinct agents minimising the total L1 distance (brute force over all ``P(n_agents, n_landmarks)``
injections, vectorised, first minimum wins); each assigned agent not yet covering its landmark moves
along the axis with the larger remaining distance (ties: x), others stay.

This module is the readable reference implementation (per-entity loops); ``fgmf_marl.envs.batched`` is the
vectorised one used for training, tested to match it exactly under the same seeds.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from gymnasium import spaces
from pettingzoo import ParallelEnv

from fgmf_marl.config import ConfigError, check_range

# Colours (RGB). Own body and teammates differ strongly so a shared policy knows who it is.
BACKGROUND = np.array([20, 20, 20], dtype=np.uint8)
OWN = np.array([240, 60, 60], dtype=np.uint8)
TEAMMATE = np.array([60, 100, 240], dtype=np.uint8)
LANDMARK = np.array([60, 220, 60], dtype=np.uint8)
DISTRACTORS = np.array([[220, 220, 60], [220, 60, 220]], dtype=np.uint8)  # distractor d uses d % 2
WALL = np.array([90, 90, 90], dtype=np.uint8)  # outside the arena, in the egocentric view
# Global render frame only: one colour per agent so a human can follow each agent.
RENDER_AGENTS = np.array([[240, 60, 60], [60, 100, 240], [250, 160, 40], [40, 220, 220],
                          [250, 250, 250], [160, 90, 250], [150, 150, 150], [250, 120, 180]], dtype=np.uint8)

# (dy, dx) per action, in units of agent_speed, and the actions' names (replays label actions with them).
MOVES = np.array([[0, 0], [-1, 0], [1, 0], [0, -1], [0, 1]], dtype=np.int64)
ACTION_NAMES = ("noop", "up", "down", "left", "right")
N_ACTIONS = len(MOVES)
MAX_AGENTS = 8  # the brute-force oracle enumerates P(n_agents, n_landmarks) <= 40320 assignments
MAX_DISTRACTORS = 64
MAX_SIZE = 512  # pixels per side: 10x the default, and a 512x512 frame is 768 KiB per agent-step
MAX_EPISODE_STEPS = 100_000


@dataclass
class CoverageConfig:
    """Shape, physics, reward weights and view of ``coverage_v0`` (defaults: 3 agents, 48x48, 40 steps).

    ``view="egocentric"`` (default) re-centres each agent's image on itself (see :func:`egocentric`):
    PPO learns from it where it did not learn from the global view, because "where is my landmark
    relative to me" becomes a fixed pattern instead of a function of two absolute positions
    (measurements: docs/experiments/ppo-defaults.md, "The native environment's learnability").

    The defaults make typical agent-landmark distances take ~10 steps at ``agent_speed=2`` px/step,
    so a 40-step episode leaves most of its steps for holding the cover.
    """

    n_agents: int = 3
    n_landmarks: int = 3
    n_distractors: int = 4
    size: int = 48
    max_steps: int = 40
    entity_size: int = 4
    agent_speed: int = 2
    cover_radius: int = 2
    distractor_speed: int = 2
    cover_reward: float = 1.0
    shaping_coef: float = 1.0
    collision_penalty: float = 0.25
    local_ratio: float = 1.0
    view: Literal["egocentric", "global"] = "egocentric"

    def validate(self) -> None:
        """Counts and sizes are bounded (``MAX_*``) far above any useful env, so a typo cannot allocate
        unbounded memory or hang placement; entities must fit the arena; rewards are finite."""
        check_range("env.native.n_agents", self.n_agents, 1, MAX_AGENTS)
        check_range("env.native.n_landmarks", self.n_landmarks, 1, self.n_agents)
        check_range("env.native.n_distractors", self.n_distractors, 0, MAX_DISTRACTORS)
        check_range("env.native.size", self.size, 16, MAX_SIZE)
        check_range("env.native.max_steps", self.max_steps, 1, MAX_EPISODE_STEPS)
        check_range("env.native.entity_size", self.entity_size, 1, self.size // 4)
        check_range("env.native.agent_speed", self.agent_speed, 1, self.size)
        if not self.agent_speed // 2 <= self.cover_radius <= self.size:  # i.e. 2 r >= agent_speed - 1
            raise ConfigError(f"env.native.cover_radius={self.cover_radius} must be an integer in "
                              f"{self.agent_speed // 2}..{self.size} (at least (agent_speed - 1) / 2, so agents "
                              "can settle on a landmark)")
        if self.view not in ("egocentric", "global"):
            raise ConfigError(f"env.native.view must be 'egocentric' or 'global', got {self.view!r}")
        if not 0 <= self.distractor_speed < self.arena:
            raise ConfigError(f"env.native.distractor_speed must be in 0..{self.arena - 1}, got {self.distractor_speed}")
        for what, count, spacing in (("landmarks", self.n_landmarks, self.landmark_spacing),
                                     ("agents", self.n_agents, self.entity_size)):
            fits = _guaranteed_fit(self.arena, spacing)
            if count > fits:
                raise ConfigError(f"env.native: {count} {what} at spacing {spacing} px cannot always be placed in a "
                                  f"{self.size}px arena (at most {fits}); lower n_{what}, entity_size or "
                                  f"cover_radius, or raise size")
        if not 0.0 <= self.local_ratio <= 1.0:
            raise ConfigError(f"env.native.local_ratio must be in [0, 1], got {self.local_ratio}")
        for name in ("cover_reward", "shaping_coef", "collision_penalty"):
            if not np.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise ConfigError(f"env.native.{name} must be a finite number >= 0, got {getattr(self, name)}")

    @property
    def arena(self) -> int:
        """Number of valid top-left positions per axis."""
        return self.size - self.entity_size + 1

    @property
    def landmark_spacing(self) -> int:
        """Minimum Chebyshev distance between landmarks (see the module docstring)."""
        return self.entity_size + 2 * self.cover_radius + 2


def _guaranteed_fit(arena: int, spacing: int) -> int:
    """How many entities sequential uniform placement can always place: each placed one blocks at
    most ``min(2 * spacing - 1, arena) ** 2`` of the ``arena ** 2`` cells, so this many never run out."""
    blocked = min(2 * spacing - 1, arena) ** 2
    return (arena * arena - 1) // blocked + 1


# --------------------------------------------------------------------------------------------
# Episode sampling (shared by the single and the batched env: both draw from a per-env Generator)
# --------------------------------------------------------------------------------------------

def _place(rng: np.random.Generator, side: int, n: int, spacing: int) -> np.ndarray:
    """Pick ``n`` cells uniformly among the free ones, one at a time, blocking a Chebyshev ball of
    radius ``spacing - 1`` around each (``CoverageConfig.validate`` guarantees cells never run out)."""
    free = np.ones((side, side), bool)
    out = np.zeros((n, 2), dtype=np.int64)
    for i in range(n):
        cells = np.flatnonzero(free)
        y, x = divmod(int(cells[rng.integers(cells.size)]), side)
        out[i] = y, x
        free[max(0, y - spacing + 1):y + spacing, max(0, x - spacing + 1):x + spacing] = False
    return out


def sample_episode(rng: np.random.Generator, cfg: CoverageConfig) -> dict[str, np.ndarray]:
    """Initial state of one episode: landmarks (spaced), agents (non-overlapping), distractors.

    The order of draws is part of the seeding contract shared by both implementations.
    """
    side = cfg.arena
    landmarks = _place(rng, side, cfg.n_landmarks, cfg.landmark_spacing)
    agents = _place(rng, side, cfg.n_agents, cfg.entity_size)
    d = cfg.n_distractors
    dpos = rng.integers(0, side, size=(d, 2))
    dvel = rng.integers(0, cfg.distractor_speed + 1, size=(d, 2)) * rng.choice(np.array([-1, 1]), size=(d, 2))
    return {"agents": agents, "landmarks": landmarks, "dpos": dpos.astype(np.int64), "dvel": dvel.astype(np.int64)}


def bounce(pos: np.ndarray, vel: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Move by ``vel`` and reflect off ``[0, side - 1]`` (exact integer arithmetic)."""
    pos = pos + vel
    hi = pos > side - 1
    lo = pos < 0
    pos = np.where(hi, 2 * (side - 1) - pos, np.where(lo, -pos, pos))
    vel = np.where(hi | lo, -vel, vel)
    return pos, vel


# --------------------------------------------------------------------------------------------
# Oracle (vectorised over a leading batch axis; the single env calls it with B = 1)
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _injections(n_agents: int, n_landmarks: int) -> np.ndarray:
    """All assignments landmark k -> distinct agent, as (P, n_landmarks), in lexicographic order."""
    return np.array(list(itertools.permutations(range(n_agents), n_landmarks)), dtype=np.int64).reshape(-1, n_landmarks)


def oracle_assignment(agents: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """Landmark index assigned to each agent, -1 for none: ``(B, N, 2), (B, K, 2) -> (B, N)``.

    Minimises the total L1 distance over injections landmark -> agent (first minimum wins).
    """
    b, n = agents.shape[:2]
    k = landmarks.shape[1]
    dist = np.abs(agents[:, :, None, :] - landmarks[:, None, :, :]).sum(-1)  # (B, N, K)
    perms = _injections(n, k)  # (P, K)
    cost = dist[:, perms, np.arange(k)].sum(-1)  # (B, P)
    best = perms[np.argmin(cost, axis=1)]  # (B, K): agent of landmark k
    assign = np.full((b, n), -1, dtype=np.int64)
    assign[np.arange(b)[:, None], best] = np.arange(k)[None, :]
    return assign


def oracle_action(agents: np.ndarray, landmarks: np.ndarray, cover_radius: int) -> np.ndarray:
    """Oracle actions ``(B, N)`` for positions ``(B, N, 2)`` and landmarks ``(B, K, 2)``."""
    assign = oracle_assignment(agents, landmarks)
    target = np.take_along_axis(landmarks, np.maximum(assign, 0)[..., None], axis=1)  # (B, N, 2)
    d = target - agents
    dy, dx = d[..., 0], d[..., 1]
    along_x = np.abs(dx) >= np.abs(dy)
    act = np.where(along_x, np.where(dx > 0, 4, 3), np.where(dy > 0, 2, 1))
    settled = (assign < 0) | (np.abs(d).max(-1) <= cover_radius)
    return np.where(settled, 0, act).astype(np.int64)


def egocentric(images: np.ndarray, agents: np.ndarray, entity_size: int, fill: np.ndarray | bool) -> np.ndarray:
    """Re-centre per-agent global images on each agent: ``(B, N, S, S[, C])`` -> the same shape.

    Pixel ``(r, c)`` of the result shows world pixel ``(cy - S + 2r, cx - S + 2c)``, with
    ``(cy, cx)`` the agent's sprite centre: a ``2S`` window at half resolution, so the whole arena
    stays in view from anywhere and the agent itself is always at the centre. World pixels outside
    the arena show ``fill`` (walls ``(C,)`` for images, False for masks). ``agents`` is ``(B, N, 2)``.
    """
    b, n, size = images.shape[:3]
    channel = (1,) * (images.ndim - 4)  # the trailing colour axis of images; none for masks
    steps = 2 * np.arange(size) - size
    centre = agents + entity_size // 2
    rows, cols = centre[..., 0, None] + steps, centre[..., 1, None] + steps  # (B, N, S)
    inside = ((rows >= 0) & (rows < size))[..., :, None] & ((cols >= 0) & (cols < size))[..., None, :]
    rows, cols = np.clip(rows, 0, size - 1), np.clip(cols, 0, size - 1)
    out = np.take_along_axis(images, rows.reshape(b, n, size, 1, *channel), axis=2)
    out = np.take_along_axis(out, cols.reshape(b, n, 1, size, *channel), axis=3)
    return np.where(inside.reshape(b, n, size, size, *channel), out, np.asarray(fill, images.dtype))


# --------------------------------------------------------------------------------------------
# The single (reference) environment
# --------------------------------------------------------------------------------------------

def ring_mask(e: int) -> np.ndarray:
    """Boolean (e, e) outline of a square: the shape distractors are drawn with."""
    m = np.ones((e, e), bool)
    if e > 2:
        m[1:-1, 1:-1] = False
    return m


class CoverageParallelEnv(ParallelEnv):
    """Cooperative landmark coverage with image observations; see the module docstring."""

    metadata = {"render_modes": ["rgb_array", "human"], "name": "coverage_v0", "is_parallelizable": True, "render_fps": 10}

    def __init__(self, config: CoverageConfig | None = None, render_mode: str | None = None) -> None:
        self.config = config if config is not None else CoverageConfig()
        self.config.validate()
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ValueError(f"render_mode must be None or one of {self.metadata['render_modes']}, got {render_mode!r}")
        self.render_mode = render_mode
        cfg = self.config
        self.possible_agents = [f"agent_{i}" for i in range(cfg.n_agents)]
        self.agents: list[str] = []
        self._obs_space = spaces.Box(0, 255, (cfg.size, cfg.size, 3), np.uint8)
        self._act_space = spaces.Discrete(N_ACTIONS)
        self._rng = np.random.default_rng()
        self._ring = ring_mask(cfg.entity_size)
        self._state: dict[str, np.ndarray] | None = None
        self._t = 0
        self._figure: Any = None
        self._image: Any = None

    # PettingZoo calls these per agent; the spaces are shared (parameter sharing)
    def observation_space(self, agent: str) -> spaces.Box:
        return self._obs_space

    def action_space(self, agent: str) -> spaces.Discrete:
        return self._act_space

    # ---- dynamics -------------------------------------------------------------------------
    def reset(self, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        self._state = sample_episode(self._rng, self.config)
        self._t = 0
        self.agents = list(self.possible_agents)
        _, self._phi_team, _, self._phi_local = self._potentials()
        return self._observations(), self._infos()

    def step(self, actions: dict[str, int]) -> tuple[dict, dict, dict, dict, dict]:
        if not self.agents:
            raise RuntimeError("step() called on a finished episode; call reset() first")
        cfg, s = self.config, self._state
        hi = cfg.arena - 1
        for i, agent in enumerate(self.possible_agents):
            a = int(actions[agent])
            if not 0 <= a < N_ACTIONS:
                raise ValueError(f"action of {agent} must be in 0..{N_ACTIONS - 1}, got {a}")
            y, x = s["agents"][i] + cfg.agent_speed * MOVES[a]
            s["agents"][i] = min(max(y, 0), hi), min(max(x, 0), hi)
        s["dpos"], s["dvel"] = bounce(s["dpos"], s["dvel"], cfg.arena)
        self._t += 1

        covered, phi_team, local_cov, phi_local = self._potentials()
        shared = cfg.cover_reward * covered / cfg.n_landmarks + (self._phi_team - phi_team)
        rewards = {}
        for i, agent in enumerate(self.possible_agents):
            local = cfg.cover_reward * local_cov[i] + (self._phi_local[i] - phi_local[i])
            hits = sum(1 for j in range(cfg.n_agents)
                       if j != i and int(np.abs(s["agents"][i] - s["agents"][j]).max()) < cfg.entity_size)
            rewards[agent] = (1 - cfg.local_ratio) * shared + cfg.local_ratio * local - cfg.collision_penalty * hits
        self._phi_team, self._phi_local = phi_team, phi_local
        done = self._t >= cfg.max_steps
        obs, infos = self._observations(), self._infos()
        terminations = {a: False for a in self.agents}
        truncations = {a: done for a in self.agents}
        if done:
            self.agents = []
        return obs, rewards, terminations, truncations, infos

    def _potentials(self) -> tuple[int, float, np.ndarray, np.ndarray]:
        """Coverage and shaping potentials of the current state (definitions in the module docstring):
        landmarks covered, team potential, per-agent "my landmark is covered" flags, local potentials."""
        cfg, s = self.config, self._state
        covered, dsum = 0, 0
        for k in range(cfg.n_landmarks):
            diff = np.abs(s["agents"] - s["landmarks"][k])
            covered += int(diff.max(axis=1).min() <= cfg.cover_radius)
            dsum += int(diff.sum(axis=1).min())
        assign = oracle_assignment(s["agents"][None], s["landmarks"][None])[0]
        local_cov = np.zeros(cfg.n_agents)
        local_dist = np.zeros(cfg.n_agents)
        for i in range(cfg.n_agents):
            if assign[i] >= 0:
                diff = np.abs(s["agents"][i] - s["landmarks"][assign[i]])
                local_cov[i] = float(diff.max() <= cfg.cover_radius)
                local_dist[i] = float(diff.sum())
        scale = cfg.shaping_coef / cfg.agent_speed
        return covered, scale * dsum / cfg.n_landmarks, local_cov, scale * local_dist

    def get_state(self) -> dict[str, np.ndarray]:
        """Copy of the simulator state: ``agents`` (N, 2), ``landmarks`` (K, 2), distractor
        positions ``dpos`` and velocities ``dvel`` (D, 2), as (row, col) sprite top-left pixels."""
        if self._state is None:
            raise RuntimeError("get_state() called before reset()")
        return {key: value.copy() for key, value in self._state.items()}

    def set_state(self, agents: Any, landmarks: Any, dpos: Any = None, dvel: Any = None) -> tuple[dict, dict]:
        """Put the env in a hand-made state (for tests and explanation studies); returns the
        observations and infos of that state and restarts the episode clock. ``dpos`` must have
        ``n_distractors`` rows (may be omitted when there are none); ``dvel`` defaults to still."""
        cfg = self.config
        state = {"agents": np.array(agents, np.int64).reshape(-1, 2), "landmarks": np.array(landmarks, np.int64).reshape(-1, 2),
                 "dpos": np.zeros((0, 2), np.int64) if dpos is None else np.array(dpos, np.int64).reshape(-1, 2),
                 "dvel": None if dvel is None else np.array(dvel, np.int64).reshape(-1, 2)}
        if state["dvel"] is None:
            state["dvel"] = np.zeros_like(state["dpos"])
        shapes = {"agents": cfg.n_agents, "landmarks": cfg.n_landmarks, "dpos": cfg.n_distractors, "dvel": cfg.n_distractors}
        for key, rows in shapes.items():
            if len(state[key]) != rows:
                raise ValueError(f"set_state: {key} needs {rows} (row, col) pairs for this config, got {len(state[key])}")
        for key in ("agents", "landmarks", "dpos"):
            if state[key].size and (state[key].min() < 0 or state[key].max() >= cfg.arena):
                raise ValueError(f"set_state: {key} positions must be in 0..{cfg.arena - 1} (size - entity_size)")
        self._state = state
        self._t = 0
        self.agents = list(self.possible_agents)
        _, self._phi_team, _, self._phi_local = self._potentials()
        return self._observations(), self._infos()

    # ---- oracle ---------------------------------------------------------------------------
    def oracle_actions(self) -> dict[str, int]:
        """The scripted oracle's action for every agent in the current state."""
        acts = oracle_action(self._state["agents"][None], self._state["landmarks"][None], self.config.cover_radius)[0]
        return {agent: int(acts[i]) for i, agent in enumerate(self.possible_agents)}

    # ---- drawing --------------------------------------------------------------------------
    def _draw(self, frame: np.ndarray, pos: np.ndarray, colour: np.ndarray, ring: bool = False) -> None:
        e = self.config.entity_size
        y, x = int(pos[0]), int(pos[1])
        if ring:
            frame[y:y + e, x:x + e][self._ring] = colour
        else:
            frame[y:y + e, x:x + e] = colour

    def _base_frame(self) -> np.ndarray:
        cfg, s = self.config, self._state
        frame = np.empty((cfg.size, cfg.size, 3), np.uint8)
        frame[:] = BACKGROUND
        for d in range(cfg.n_distractors):
            self._draw(frame, s["dpos"][d], DISTRACTORS[d % 2], ring=True)
        for k in range(cfg.n_landmarks):
            self._draw(frame, s["landmarks"][k], LANDMARK)
        return frame

    def _observations(self) -> dict[str, np.ndarray]:
        s = self._state
        base = self._base_frame()
        for j in range(self.config.n_agents):
            self._draw(base, s["agents"][j], TEAMMATE)
        frames = []
        for i in range(self.config.n_agents):
            frame = base.copy()
            self._draw(frame, s["agents"][i], OWN)
            frames.append(frame)
        stack = self._view(np.stack(frames)[None], WALL)[0]
        return {agent: np.ascontiguousarray(stack[i]) for i, agent in enumerate(self.possible_agents)}

    def _view(self, images: np.ndarray, fill: np.ndarray | bool) -> np.ndarray:
        """Per-agent global images (1, N, ...) as the agents see them (``config.view``)."""
        if self.config.view == "global":
            return images
        return egocentric(images, self._state["agents"][None], self.config.entity_size, fill)

    def _sprite_mask(self, positions: np.ndarray) -> np.ndarray:
        e, size = self.config.entity_size, self.config.size
        mask = np.zeros((size, size), bool)
        for y, x in positions:
            mask[y:y + e, x:x + e] = True
        return mask

    def relevance_masks(self) -> dict[str, np.ndarray]:
        """Ground-truth relevance per agent: own body + all landmarks + all teammates."""
        s = self._state
        mask = self._sprite_mask(np.concatenate([s["agents"], s["landmarks"]]))
        masks = self._view(np.repeat(mask[None, None], self.config.n_agents, axis=1), False)[0]
        return {agent: masks[i] for i, agent in enumerate(self.possible_agents)}

    def target_masks(self) -> dict[str, np.ndarray]:
        """Own body + the landmark the oracle assigns to the agent."""
        s = self._state
        assign = oracle_assignment(s["agents"][None], s["landmarks"][None])[0]
        masks = []
        for i in range(self.config.n_agents):
            pos = [s["agents"][i]] + ([s["landmarks"][assign[i]]] if assign[i] >= 0 else [])
            masks.append(self._sprite_mask(np.array(pos)))
        masks = self._view(np.stack(masks)[None], False)[0]
        return {agent: masks[i] for i, agent in enumerate(self.possible_agents)}

    def _infos(self) -> dict[str, dict[str, Any]]:
        rel, tgt = self.relevance_masks(), self.target_masks()
        return {agent: {"relevance_mask": rel[agent], "target_mask": tgt[agent]} for agent in self.possible_agents}

    def _render_frame(self) -> np.ndarray:
        frame = self._base_frame()
        for j in range(self.config.n_agents):
            self._draw(frame, self._state["agents"][j], RENDER_AGENTS[j % len(RENDER_AGENTS)])
        return frame

    def render(self) -> np.ndarray | None:
        """``rgb_array``: the global frame (HxWx3 uint8), agents in distinct colours; ``human``: shows
        it (8x upscaled) in a matplotlib window and returns None."""
        if self.render_mode is None:
            return None
        if self._state is None:
            raise RuntimeError("render() called before reset()")
        frame = self._render_frame()
        if self.render_mode == "rgb_array":
            return frame
        import matplotlib.pyplot as plt  # deferred: a window is wanted only in render_mode "human"

        big = frame.repeat(8, axis=0).repeat(8, axis=1)
        if self._figure is None:
            self._figure, ax = plt.subplots(figsize=(4, 4))
            ax.set_axis_off()
            self._image = ax.imshow(big)
        else:
            self._image.set_data(big)
        self._figure.canvas.draw_idle()
        self._figure.canvas.flush_events()
        return None

    def close(self) -> None:
        if self._figure is not None:
            import matplotlib.pyplot as plt  # deferred: as in render()

            plt.close(self._figure)
            self._figure = self._image = None
