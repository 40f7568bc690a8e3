"""Batched ``coverage_v0``: numpy over B environments at once, and its SB3 ``VecEnv``.

Training and evaluation use this implementation; ``fgmf_marl.envs.native.CoverageParallelEnv`` is the
readable reference it is tested against (same observations, rewards, dones and masks under the same
seeds). Observations are channel-first ``(3, H, W)``, what SB3 trains on: the reference's
PettingZoo ``(H, W, 3)`` images transposed, as ``fgmf_marl.envs.registry`` does for every PettingZoo env.
Dynamics, rewards and drawing are defined in ``fgmf_marl.envs.native``'s docstring; here they are vectorised:
``step`` has no Python loop over environments or agents (only over the few distractors, so that
overlapping distractors of different colours are drawn in the reference's order). Sprites
are drawn with precomputed flat pixel offsets and one fancy-indexed write per entity kind into one
base frame per env; each agent's observation is a copy of its env's frame with its own body
recoloured. Relevance and target masks are computed only when asked.

Resets loop over environments: each env owns a ``np.random.Generator`` seeded like the single env,
so env ``b`` of ``CoverageVecEnv(config, n_envs, seed)`` equals ``CoverageParallelEnv.reset(seed=seed + b)``
step for step, auto-resets included (later resets continue that env's generator, as an unseeded
``reset()`` of the single env does).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from stable_baselines3.common.vec_env import VecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvStepReturn

from fgmf_marl.envs.native import (ACTION_NAMES, BACKGROUND, DISTRACTORS, LANDMARK, MOVES, N_ACTIONS, OWN, RENDER_AGENTS, TEAMMATE,
                         WALL, CoverageConfig, bounce, egocentric, oracle_action, oracle_assignment, ring_mask,
                         sample_episode)


class BatchedCoverage:
    """The numpy simulator of ``n_envs`` independent coverage episodes (no auto-reset, no SB3)."""

    def __init__(self, config: CoverageConfig | None = None, n_envs: int = 1) -> None:
        self.config = cfg = config if config is not None else CoverageConfig()
        cfg.validate()
        if n_envs < 1:
            raise ValueError(f"n_envs must be >= 1, got {n_envs}")
        self.n_envs = b = n_envs
        n, k, d, s, e = cfg.n_agents, cfg.n_landmarks, cfg.n_distractors, cfg.size, cfg.entity_size
        self.rngs = [np.random.default_rng() for _ in range(b)]
        self.agents = np.zeros((b, n, 2), np.int64)
        self.landmarks = np.zeros((b, k, 2), np.int64)
        self.dpos = np.zeros((b, d, 2), np.int64)
        self.dvel = np.zeros((b, d, 2), np.int64)
        self.t = np.zeros(b, np.int64)
        self.phi_team = np.zeros(b)
        self.phi_local = np.zeros((b, n))
        # Flat-index geometry: frames are (B, 3, S, S) channel-first, sprites are offsets from the
        # top-left pixel.
        ys, xs = np.nonzero(np.ones((e, e), bool))
        self._fill = ys * s + xs
        ys, xs = np.nonzero(ring_mask(e))
        self._ringoff = ys * s + xs
        self._chan = np.arange(3) * s * s
        self._frame_off = np.arange(b) * 3 * s * s
        self._mask_off = np.arange(b) * s * s
        self._slot_frame_off = (np.arange(b * n) * 3 * s * s).reshape(b, n)
        self._slot_mask_off = (np.arange(b * n) * s * s).reshape(b, n)
        self._bg = np.broadcast_to(BACKGROUND[:, None, None], (3, s, s))
        self._base = np.empty((b, 3, s, s), np.uint8)
        # Egocentric fast path: wall-padded parity sub-grids, and the centre pixels showing the agent.
        self._ego_canvas = np.empty((b, 2, 2, 3, 3 * (s // 2), 3 * (s // 2)), np.uint8)
        self._ego_canvas[:] = WALL[:, None, None]
        own = (2 * np.arange(s) - s + e // 2 >= 0) & (2 * np.arange(s) - s + e // 2 < e)
        self._own_rows, self._own_cols = np.flatnonzero(own)[:, None], np.flatnonzero(own)[None, :]
        self._moves = MOVES * cfg.agent_speed

    # ---- dynamics -------------------------------------------------------------------------
    def reset(self, seeds: Sequence[int | None] | None = None, envs: Sequence[int] | np.ndarray | None = None) -> None:
        """New episodes for ``envs`` (default all); ``seeds[i]`` reseeds env ``envs[i]`` when not None."""
        envs = range(self.n_envs) if envs is None else envs
        for i, b in enumerate(envs):
            if seeds is not None and seeds[i] is not None:
                self.rngs[b] = np.random.default_rng(seeds[i])
            st = sample_episode(self.rngs[b], self.config)
            self.agents[b], self.landmarks[b], self.dpos[b], self.dvel[b] = st["agents"], st["landmarks"], st["dpos"], st["dvel"]
            self.t[b] = 0
        envs = np.asarray(list(envs), dtype=np.int64)
        _, phi_team, _, phi_local = self.potentials()
        self.phi_team[envs], self.phi_local[envs] = phi_team[envs], phi_local[envs]

    def step(self, actions: np.ndarray) -> np.ndarray:
        """Apply ``actions`` (B, N) in 0..4; return agent rewards (B, N) float64."""
        cfg = self.config
        actions = np.asarray(actions).reshape(self.n_envs, cfg.n_agents)
        if actions.size and (actions.min() < 0 or actions.max() >= N_ACTIONS):
            raise ValueError(f"actions must be in 0..{N_ACTIONS - 1}, got values in {actions.min()}..{actions.max()}")
        np.clip(self.agents + self._moves[actions], 0, cfg.arena - 1, out=self.agents)
        if cfg.n_distractors:
            self.dpos, self.dvel = bounce(self.dpos, self.dvel, cfg.arena)
        self.t += 1
        return self.rewards()

    def potentials(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Coverage and shaping potentials of the current states (definitions in ``fgmf_marl.envs.native``):
        landmarks covered (B,), team potential (B,), my-landmark-covered flags (B, N), local potentials (B, N)."""
        cfg = self.config
        diff = np.abs(self.agents[:, :, None, :] - self.landmarks[:, None, :, :])  # (B, N, K, 2)
        covered = (diff.max(-1).min(1) <= cfg.cover_radius).sum(-1)  # (B,)
        dsum = diff.sum(-1).min(1).sum(-1)  # (B,)
        assign = oracle_assignment(self.agents, self.landmarks)  # (B, N)
        mine = np.take_along_axis(diff, np.maximum(assign, 0)[:, :, None, None], axis=2)[:, :, 0]  # (B, N, 2)
        local_cov = np.where(assign >= 0, (mine.max(-1) <= cfg.cover_radius).astype(np.float64), 0.0)
        local_dist = np.where(assign >= 0, mine.sum(-1), 0).astype(np.float64)
        scale = cfg.shaping_coef / cfg.agent_speed
        return covered, scale * dsum / cfg.n_landmarks, local_cov, scale * local_dist

    def rewards(self) -> np.ndarray:
        """Agent rewards (B, N) of the step that led to the current state; updates the potentials."""
        cfg = self.config
        covered, phi_team, local_cov, phi_local = self.potentials()
        shared = cfg.cover_reward * covered / cfg.n_landmarks + (self.phi_team - phi_team)
        local = cfg.cover_reward * local_cov + (self.phi_local - phi_local)
        near = np.abs(self.agents[:, :, None, :] - self.agents[:, None, :, :]).max(-1) < cfg.entity_size
        hits = near.sum(-1) - 1
        self.phi_team, self.phi_local = phi_team, phi_local
        return (1 - cfg.local_ratio) * shared[:, None] + cfg.local_ratio * local - cfg.collision_penalty * hits

    def oracle_actions(self) -> np.ndarray:
        """Oracle actions (B, N)."""
        return oracle_action(self.agents, self.landmarks, self.config.cover_radius)

    # ---- drawing --------------------------------------------------------------------------
    def _sprite_index(self, pos: np.ndarray, offsets: np.ndarray, origin: np.ndarray, channels: bool) -> np.ndarray:
        """Flat indices of sprites at ``pos`` (..., 2) whose frames start at ``origin`` (...)."""
        top = origin + pos[..., 0] * self.config.size + pos[..., 1]
        if channels:
            return top[..., None, None] + self._chan[:, None] + offsets
        return top[..., None] + offsets

    def _draw_base(self, teammates: bool = True) -> np.ndarray:
        """Background, distractors, landmarks (and all agents as teammates) into ``self._base``."""
        base = self._base
        base[:] = self._bg
        flat = base.reshape(-1)
        origin = self._frame_off[:, None]
        for d in range(self.config.n_distractors):  # few; keeps the reference's overwrite order
            flat[self._sprite_index(self.dpos[:, d], self._ringoff, self._frame_off, True)] = DISTRACTORS[d % 2][:, None]
        flat[self._sprite_index(self.landmarks, self._fill, origin, True)] = LANDMARK[:, None]
        if teammates:
            flat[self._sprite_index(self.agents, self._fill, origin, True)] = TEAMMATE[:, None]
        return base

    def observations(self) -> np.ndarray:
        """Per-agent observations (B, N, 3, S, S) uint8 (a fresh array)."""
        cfg = self.config
        base = self._draw_base()
        if cfg.view == "egocentric" and cfg.size % 2 == 0:
            return self._egocentric_observations(base)
        obs = np.empty((self.n_envs, cfg.n_agents, 3, cfg.size, cfg.size), np.uint8)
        obs[:] = base[:, None]
        obs.reshape(-1)[self._sprite_index(self.agents, self._fill, self._slot_frame_off, True)] = OWN[:, None]
        if cfg.view == "global":
            return obs
        # Odd sizes: the reference's gather, which takes channel-last images.
        return np.moveaxis(egocentric(np.moveaxis(obs, 2, -1), self.agents, cfg.entity_size, WALL), -1, 2)

    def _egocentric_observations(self, base: np.ndarray) -> np.ndarray:
        """The fast path of :func:`fgmf_marl.envs.native.egocentric` for observations (even ``size``).

        An egocentric image samples every second world pixel, so it is a plain window of one of
        the four parity sub-grids ``base[..., py::2, px::2]``, padded with walls: the windows are
        read from one strided view, per env instead of per agent. The agent's own sprite always
        lands on the same centre pixels, which are then painted in its own colour.
        """
        cfg, size, half = self.config, self.config.size, self.config.size // 2
        padded = self._ego_canvas
        for py in (0, 1):
            for px in (0, 1):
                padded[:, py, px, :, half:2 * half, half:2 * half] = base[:, :, py::2, px::2]
        windows = np.lib.stride_tricks.sliding_window_view(padded, (size, size), axis=(4, 5))
        centre = self.agents + cfg.entity_size // 2  # (B, N, 2)
        parity = centre % 2
        start = (centre - parity) // 2
        envs = np.arange(self.n_envs)[:, None]
        obs = windows[envs, parity[..., 0], parity[..., 1], :, start[..., 0], start[..., 1]]  # (B, N, 3, S, S)
        obs[..., self._own_rows, self._own_cols] = OWN[:, None, None]
        return obs

    def _view(self, masks: np.ndarray) -> np.ndarray:
        """Per-agent global masks (B, N, S, S) as the agents see them (``config.view``)."""
        if self.config.view == "global":
            return masks
        return egocentric(masks, self.agents, self.config.entity_size, False)

    def render_frames(self) -> np.ndarray:
        """Global frames (B, S, S, 3) uint8 with one colour per agent (for humans)."""
        base = self._draw_base(teammates=False)
        flat = base.reshape(-1)
        for j in range(self.config.n_agents):
            flat[self._sprite_index(self.agents[:, j], self._fill, self._frame_off, True)] = RENDER_AGENTS[j % len(RENDER_AGENTS)][:, None]
        return np.ascontiguousarray(base.transpose(0, 2, 3, 1))

    # ---- ground truth -----------------------------------------------------------------------
    def relevance_masks(self) -> np.ndarray:
        """Per-agent relevance (B, N, S, S) bool: all agent and landmark sprites, in each agent's view."""
        s = self.config.size
        mask = np.zeros((self.n_envs, s, s), bool)
        origin = self._mask_off[:, None]
        flat = mask.reshape(-1)
        flat[self._sprite_index(self.agents, self._fill, origin, False)] = True
        flat[self._sprite_index(self.landmarks, self._fill, origin, False)] = True
        return self._view(np.repeat(mask[:, None], self.config.n_agents, axis=1))

    def target_masks(self) -> np.ndarray:
        """Per-agent target masks (B, N, S, S) bool: own body + oracle-assigned landmark."""
        cfg, s = self.config, self.config.size
        mask = np.zeros((self.n_envs, cfg.n_agents, s, s), bool)
        flat = mask.reshape(-1)
        flat[self._sprite_index(self.agents, self._fill, self._slot_mask_off, False)] = True
        assign = oracle_assignment(self.agents, self.landmarks)
        target = np.take_along_axis(self.landmarks, np.maximum(assign, 0)[..., None], axis=1)
        idx = self._sprite_index(target, self._fill, self._slot_mask_off, False)
        flat[idx[assign >= 0]] = True
        return self._view(mask)


class CoverageVecEnv(VecEnv):
    """SB3 ``VecEnv`` over ``n_envs`` coverage envs with parameter sharing (one slot per agent).

    Slot ``env * n_agents + agent``; observations uint8 (num_envs, 3, H, W); rewards float32 are the
    agents' own rewards; at the fixed episode end every slot of the env is done, with SB3's
    conventions (``terminal_observation``, ``TimeLimit.truncated = True`` since the time limit is not
    observable, so PPO bootstraps) and ``episode = {r: the agent's return, l, t: 0.0, team_r: team
    return}``, then the env auto-resets. All slots share one simulator, so ``get_attr``/``set_attr``
    act on this object and ``env_method`` calls a method once, replicating its result per slot.
    """

    def __init__(self, config: CoverageConfig | None = None, n_envs: int = 1, seed: int | None = None,
                 render_mode: str | None = "rgb_array") -> None:
        self.config = cfg = config if config is not None else CoverageConfig()
        self.core = BatchedCoverage(cfg, n_envs)
        self.n_envs = n_envs
        self.n_agents = cfg.n_agents
        self.render_mode = render_mode
        obs_space = spaces.Box(0, 255, (3, cfg.size, cfg.size), np.uint8)
        super().__init__(n_envs * cfg.n_agents, obs_space, spaces.Discrete(N_ACTIONS))
        self._env_seeds: list[int | None] = [None if seed is None else seed + b for b in range(n_envs)]
        self._actions: np.ndarray | None = None
        self._agent_ret = np.zeros((n_envs, cfg.n_agents))
        self._team_ret = np.zeros(n_envs)

    # ---- exact resume ------------------------------------------------------------------------
    _STATE_ARRAYS = ("agents", "landmarks", "dpos", "dvel", "t", "phi_team", "phi_local")

    def get_state(self) -> dict[str, Any]:
        """Everything the next steps depend on: the simulator's arrays, each env copy's random generator,
        the running returns and pending seeds. With :meth:`set_state`, an interrupted training run
        continues exactly where the saved one was (numpy arrays, and JSON-ready values)."""
        core = self.core
        return {**{name: getattr(core, name).copy() for name in self._STATE_ARRAYS},
                "agent_ret": self._agent_ret.copy(), "team_ret": self._team_ret.copy(),
                "rngs": [rng.bit_generator.state for rng in core.rngs], "env_seeds": list(self._env_seeds)}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`get_state`'s output; a state of another env size is a ValueError."""
        core = self.core
        for name in self._STATE_ARRAYS:
            if np.shape(state[name]) != getattr(core, name).shape:
                raise ValueError(f"env state {name!r} has shape {np.shape(state[name])}, this env "
                                 f"{getattr(core, name).shape}")
        if len(state["rngs"]) != self.n_envs:
            raise ValueError(f"env state holds {len(state['rngs'])} env copies, this env {self.n_envs}")
        for name in self._STATE_ARRAYS:
            getattr(core, name)[...] = state[name]
        self._agent_ret[...], self._team_ret[...] = state["agent_ret"], state["team_ret"]
        for rng, rng_state in zip(core.rngs, state["rngs"]):
            rng.bit_generator.state = rng_state
        self._env_seeds = list(state["env_seeds"])

    # ---- VecEnv API -------------------------------------------------------------------------
    def seed(self, seed: int | None = None) -> list[int | None]:
        """Env ``b`` gets ``seed + b`` at the next ``reset()``; returns each slot's env seed."""
        if seed is None:
            seed = int(np.random.randint(0, np.iinfo(np.uint32).max, dtype=np.uint32))
        self._env_seeds = [seed + b for b in range(self.n_envs)]
        return [seed + slot // self.n_agents for slot in range(self.num_envs)]

    def reset(self) -> np.ndarray:
        self.core.reset(seeds=self._env_seeds)
        self._env_seeds = [None] * self.n_envs
        self._agent_ret[:] = 0.0
        self._team_ret[:] = 0.0
        self.reset_infos = [{} for _ in range(self.num_envs)]
        return self._flat_obs()

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions)

    def step_wait(self) -> VecEnvStepReturn:
        if self._actions is None:
            raise RuntimeError("step_wait() called without step_async()")
        actions, self._actions = self._actions, None
        if actions.size != self.num_envs:
            raise ValueError(f"expected {self.num_envs} actions (n_envs x n_agents), got {actions.size}")
        rewards = self.core.step(actions.reshape(self.n_envs, self.n_agents))
        self._agent_ret += rewards
        self._team_ret += rewards.mean(axis=1)
        obs = self._flat_obs()
        done_env = self.core.t >= self.config.max_steps
        dones = np.repeat(done_env, self.n_agents)
        infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        if done_env.any():
            ended = np.flatnonzero(done_env)
            for b in ended:
                for i in range(self.n_agents):
                    slot = b * self.n_agents + i
                    infos[slot] = {"terminal_observation": obs[slot], "TimeLimit.truncated": True,
                                   "episode": {"r": float(self._agent_ret[b, i]), "l": int(self.core.t[b]), "t": 0.0,
                                               "team_r": float(self._team_ret[b])}}
            self.core.reset(envs=ended)
            self._agent_ret[ended] = 0.0
            self._team_ret[ended] = 0.0
            obs = self._flat_obs()
        return obs, rewards.reshape(-1).astype(np.float32), dones, infos

    def close(self) -> None:
        pass

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        value = getattr(self, attr_name)
        return [value for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        setattr(self, attr_name, value)

    def env_method(self, method_name: str, *method_args: Any, indices: VecEnvIndices = None, **method_kwargs: Any) -> list[Any]:
        result = getattr(self, method_name)(*method_args, **method_kwargs)
        return [result for _ in self._get_indices(indices)]

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        return [False for _ in self._get_indices(indices)]

    def get_images(self) -> list[np.ndarray]:
        return list(self.core.render_frames())

    def render(self, mode: str | None = None) -> np.ndarray:
        """Global frames of every env, (n_envs, H, W, 3) uint8."""
        return self.global_frames()

    # ---- what the oversight log records beside the agents' views --------------------------------
    action_names = ACTION_NAMES

    def global_frames(self) -> np.ndarray:
        """Global frames of every env, (n_envs, H, W, 3) uint8: the replay's view of the whole arena."""
        return self.core.render_frames()

    # ---- ground truth and oracle, per slot ------------------------------------------------------
    def _flat_obs(self) -> np.ndarray:
        cfg = self.config
        return self.core.observations().reshape(self.num_envs, 3, cfg.size, cfg.size)

    def relevance_masks(self) -> np.ndarray:
        """Relevance masks of the current observations, bool (num_envs, H, W)."""
        s = self.config.size
        return self.core.relevance_masks().reshape(self.num_envs, s, s)

    def target_masks(self) -> np.ndarray:
        """Own body + oracle-assigned landmark per slot, bool (num_envs, H, W)."""
        s = self.config.size
        return self.core.target_masks().reshape(self.num_envs, s, s)

    def oracle_actions(self) -> np.ndarray:
        """The oracle's action per slot, int64 (num_envs,)."""
        return self.core.oracle_actions().reshape(-1)
