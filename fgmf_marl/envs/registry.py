"""One registry from environment names to factories, all producing the same SB3 VecEnv shape.

Every environment reaches training, attacks and explanations as an SB3 ``VecEnv`` with parameter
sharing: one slot per agent per environment copy, slot = env * n_agents + agent, observations
channel-first uint8 images (C, H, W), discrete actions. Every ParallelEnv, the native one included,
emits PettingZoo's (H, W, C) images. The native env's VecEnv is its batched numpy twin
(``fgmf_marl.envs.batched``, channel-first, tested equal to the ParallelEnv through the transpose);
PettingZoo's butterfly environments go through the SuperSuit chain

    [color_reduction] -> resize -> frame_stack -> transpose to CHW
    -> pettingzoo_env_to_vec_env_v1 -> concat_vec_envs_v1 -> SeededVecEnv -> VecMonitor

Transposing inside the PettingZoo chain (rather than SB3's ``VecTransposeImage``) keeps the parallel
env and the VecEnv in one layout, so the adversary wrapper can work at the PettingZoo level
(``make_parallel_env``). The chain's observation transforms are SuperSuit's, applied on the parallel
side by :class:`ObservationMap` (SuperSuit's own wrappers for them are AEC wrappers, which would run
every ParallelEnv through ``aec_to_parallel`` and transform each observation twice), and pistonball's
AEC env crops each observation once per frame (:class:`ObservedOncePerFrame`); both are tested equal
to the chain of SuperSuit's wrappers (``tests/test_supersuit.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Sequence

import gymnasium as gym
import numpy as np
import supersuit as ss
from pettingzoo import AECEnv, ParallelEnv
from pettingzoo.utils import BaseParallelWrapper, BaseWrapper
from pettingzoo.utils.conversions import aec_to_parallel
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper, VecMonitor
from stable_baselines3.common.vec_env.base_vec_env import VecEnvObs
from supersuit.utils.basic_transforms import color_reduction, resize

from fgmf_marl.config import ConfigError, check_range
from fgmf_marl.envs.batched import CoverageVecEnv
from fgmf_marl.envs.ground_truth import PistonballMasks
from fgmf_marl.envs.native import MAX_EPISODE_STEPS, MAX_SIZE, CoverageConfig, CoverageParallelEnv
from fgmf_marl.envs.reference import ReferenceReturns, reference_returns


MAX_ENVS = 4096         # env copies of one VecEnv
MAX_FRAME_STACK = 16


@dataclass
class AdapterConfig:
    """How a PettingZoo image env is reduced to small policy inputs (ignored by ``native``)."""

    size: int = 48
    grayscale: bool = False
    frame_stack: int = 1
    max_cycles: int = 125

    def validate(self) -> None:
        """Bounded far above any useful setting, so a typo cannot allocate unbounded memory."""
        check_range("env.adapter.size", self.size, 16, MAX_SIZE)
        check_range("env.adapter.frame_stack", self.frame_stack, 1, MAX_FRAME_STACK)
        check_range("env.adapter.max_cycles", self.max_cycles, 1, MAX_EPISODE_STEPS)


@dataclass
class EnvConfig:
    """The ``env:`` section of a run config."""

    name: str = "native"
    n_envs: int = 16
    native: CoverageConfig = field(default_factory=CoverageConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)

    @property
    def image_size(self) -> int:
        """Side of the square images the policy sees (``native.size``, or ``adapter.size`` after resizing)."""
        return self.native.size if self.name == "native" else self.adapter.size

    def validate(self) -> None:
        """``n_envs`` is bounded (``MAX_ENVS``, far above the 16 of the default job) so a typo cannot
        allocate unbounded memory."""
        if self.name not in ENVIRONMENTS:
            raise ConfigError(f"unknown environment {self.name!r}; known: {', '.join(ENVIRONMENTS)}")
        check_range("env.n_envs", self.n_envs, 1, MAX_ENVS)


class ObservedOncePerFrame(BaseWrapper):
    """Pistonball's AEC env whose ``observe(agent)`` is cropped once per frame: later calls return the same
    array until pistonball draws its next frame (its ``frames`` counter advances, at the end of each cycle),
    ``reset`` or ``render``. Callers must not write into the arrays it returns.

    Why: ``aec_to_parallel`` observes every agent twice per step (``last()`` before each agent's action,
    then all of them at the end of the cycle), and pistonball crops every observation from its screen,
    which changes only when it draws, so the second crop would copy the first.
    """

    def __init__(self, env: AECEnv) -> None:
        super().__init__(env)
        self._frame: int | None = None
        self._crops: dict[str, np.ndarray] = {}

    def reset(self, seed: int | None = None, options: dict | None = None) -> None:
        self._frame = None
        self.env.reset(seed=seed, options=options)

    def render(self) -> Any:
        self._frame = None
        return self.env.render()

    def observe(self, agent: str) -> np.ndarray:
        frame = self.env.unwrapped.frames
        if frame != self._frame:
            self._frame, self._crops = frame, {}
        if agent not in self._crops:
            self._crops[agent] = self.env.observe(agent)
        return self._crops[agent]


# The butterfly imports are deferred: they load pygame, needed only when that env is asked for.
def _pistonball(cfg: AdapterConfig) -> ParallelEnv:
    from pettingzoo.butterfly import pistonball_v6  # deferred: pygame

    # As pong: with render_mode None, pistonball never redraws its screen, and every observation is the
    # first frame (docs/DESIGN.md, "The native environment"). Its masks: fgmf_marl/envs/ground_truth.py.
    env = pistonball_v6.env(continuous=False, max_cycles=cfg.max_cycles, render_mode="rgb_array")
    return PistonballMasks(aec_to_parallel(ObservedOncePerFrame(env)), cfg.size)


def _cooperative_pong(cfg: AdapterConfig) -> ParallelEnv:
    from pettingzoo.butterfly import cooperative_pong_v6  # deferred: pygame

    # With render_mode None, PettingZoo 1.27's pong never draws its screen: every observation is black.
    return cooperative_pong_v6.parallel_env(max_cycles=cfg.max_cycles, render_mode="rgb_array")


def _kaz(cfg: AdapterConfig) -> ParallelEnv:
    from pettingzoo.butterfly import knights_archers_zombies_v11  # deferred: pygame

    env = knights_archers_zombies_v11.parallel_env(obs_method="image", max_cycles=cfg.max_cycles)
    # Agents die in KAZ; black death keeps the slot count fixed, as parameter sharing needs.
    return ss.black_death_v3(env)


PETTINGZOO_ENVS: dict[str, Callable[[AdapterConfig], ParallelEnv]] = {
    "pistonball": _pistonball,
    "cooperative_pong": _cooperative_pong,
    "kaz": _kaz,
}
ENVIRONMENTS: tuple[str, ...] = ("native", *PETTINGZOO_ENVS)


def _check_name(name: str) -> None:
    if name not in ENVIRONMENTS:
        raise ConfigError(f"unknown environment {name!r}; known: {', '.join(ENVIRONMENTS)}")


class ObservationMap(BaseParallelWrapper):
    """A ParallelEnv whose observations are ``fn(obs, space)`` of the env's (``space``: the env's observation
    space of that agent) and whose observation spaces are ``space_fn(space)``; rewards, terminations,
    truncations and infos pass through.

    Why: SuperSuit's observation wrappers are AEC wrappers, and a ParallelEnv given to them is stepped
    through ``aec_to_parallel``, which observes every agent twice per step, so each transform would run twice.
    """

    def __init__(self, env: ParallelEnv, fn: Callable[[np.ndarray, gym.spaces.Box], np.ndarray],
                 space_fn: Callable[[gym.spaces.Box], gym.spaces.Box]) -> None:
        super().__init__(env)
        self._fn = fn
        self._inner = {agent: env.observation_space(agent) for agent in env.possible_agents}
        self._spaces = {agent: space_fn(space) for agent, space in self._inner.items()}

    def observation_space(self, agent: str) -> gym.spaces.Box:
        return self._spaces[agent]

    def _map(self, observations: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {agent: self._fn(obs, self._inner[agent]) for agent, obs in observations.items()}

    def reset(self, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        observations, infos = self.env.reset(seed=seed, options=options)
        return self._map(observations), infos

    def step(self, actions: dict) -> tuple[dict, dict, dict, dict, dict]:
        observations, rewards, terminations, truncations, infos = self.env.step(actions)
        return self._map(observations), rewards, terminations, truncations, infos


def _supersuit_transform(env: ParallelEnv, transform: ModuleType, param: Any) -> ObservationMap:
    """One of SuperSuit's basic observation transforms (``supersuit.utils.basic_transforms``) with the
    parameter its wrapper passes it (``ss.color_reduction_v0``: the mode; ``ss.resize_v1``: (x, y, linear))."""
    def space_fn(space: gym.spaces.Box) -> gym.spaces.Box:
        transform.check_param(space, param)
        return transform.change_obs_space(space, param)

    return ObservationMap(env, lambda obs, space: transform.change_observation(obs, space, param), space_fn)


def _to_chw(env: ParallelEnv) -> ObservationMap:
    def space_fn(space: gym.spaces.Box) -> gym.spaces.Box:
        h, w, c = space.shape
        return gym.spaces.Box(0, 255, (c, h, w), np.uint8)

    return ObservationMap(env, lambda obs, space: np.ascontiguousarray(obs.transpose(2, 0, 1)), space_fn)


def make_parallel_env(cfg: EnvConfig, render_mode: str | None = None) -> ParallelEnv:
    """A single PettingZoo ParallelEnv with the observations the policy sees (CHW uint8).

    Every env, the native one included, emits PettingZoo's (H, W, C) and is transposed here, once.
    """
    _check_name(cfg.name)
    if cfg.name == "native":
        return _to_chw(CoverageParallelEnv(cfg.native, render_mode=render_mode))
    adapter = cfg.adapter
    env = PETTINGZOO_ENVS[cfg.name](adapter)
    if adapter.grayscale:
        env = _supersuit_transform(env, color_reduction, "full")
    env = _supersuit_transform(env, resize, (adapter.size, adapter.size, True))
    # frame_stack_v1 also gives grayscale frames their channel axis (H, W) -> (H, W, k); it has a
    # parallel wrapper of its own, which it picks for a ParallelEnv.
    if adapter.grayscale or adapter.frame_stack > 1:
        env = ss.frame_stack_v1(env, adapter.frame_stack)
    return _to_chw(env)


class SeededVecEnv(VecEnvWrapper):
    """SuperSuit's SB3 VecEnv with SB3's ``seed()``: ``seed(s)`` seeds env copy ``i`` with ``s + i`` at
    the next ``reset()``; later unseeded resets continue from there, as ``CoverageVecEnv`` does.

    Why: SB3 calls ``env.seed(seed)`` whenever a model is given a seed, and SuperSuit's wrapper
    forwards it to gymnasium's ``ConcatVecEnv``, which has no ``seed``, only ``reset(seed=)``.
    """

    def __init__(self, venv: VecEnv, n_envs: int) -> None:
        super().__init__(venv)
        self.n_envs = n_envs
        self._seed: int | None = None

    def seed(self, seed: int | None = None) -> list[int | None]:
        """Returns each slot's env seed (slot = env * n_agents + agent); None draws one, as SB3's VecEnv does."""
        if seed is None:
            seed = int(np.random.randint(0, np.iinfo(np.uint32).max, dtype=np.uint32))
        self._seed = seed
        n_agents = self.num_envs // self.n_envs
        return [seed + slot // n_agents for slot in range(self.num_envs)]

    def reset(self) -> VecEnvObs:
        if self._seed is None:
            obs = self.venv.reset()
        else:
            obs, self.venv.reset_infos = self.venv.venv.reset(seed=self._seed)
            self._seed = None
        self.reset_infos = self.venv.reset_infos
        return obs

    def step_wait(self) -> Any:
        return self.venv.step_wait()


class MaskedVecEnv(SeededVecEnv):
    """A :class:`SeededVecEnv` whose env reports ground-truth masks in its infos (``fgmf_marl/envs/ground_truth.py``):
    ``relevance_masks()`` / ``target_masks()`` are those of the current observations, (num_envs, size, size).

    A slot whose episode just ended holds the next episode's first observation while its infos
    describe the last one, so its masks are left empty for that step (explanation metrics skip
    empty masks) rather than wrong.
    """

    KEYS = ("relevance_mask", "target_mask")

    def __init__(self, venv: VecEnv, n_envs: int, size: int) -> None:
        super().__init__(venv, n_envs)
        self.size = size
        self._masks = {key: np.zeros((self.num_envs, size, size), dtype=bool) for key in self.KEYS}

    def _read(self, infos: Sequence[dict], dones: np.ndarray | None = None) -> None:
        for key in self.KEYS:
            masks = np.zeros((self.num_envs, self.size, self.size), dtype=bool)
            for slot, info in enumerate(infos):
                if key in info and (dones is None or not dones[slot]):
                    masks[slot] = info[key]
            self._masks[key] = masks

    def reset(self) -> VecEnvObs:
        obs = super().reset()
        self._read(self.reset_infos)
        return obs

    def step_wait(self) -> Any:
        obs, rewards, dones, infos = super().step_wait()
        self._read(infos, dones)
        return obs, rewards, dones, infos

    def relevance_masks(self) -> np.ndarray:
        return self._masks["relevance_mask"].copy()

    def target_masks(self) -> np.ndarray:
        return self._masks["target_mask"].copy()


#: PettingZoo envs whose ground-truth masks ``fgmf_marl/envs/ground_truth.py`` computes
MASKED_ENVS = ("pistonball",)


def make_vec_env(cfg: EnvConfig, seed: int | None = None) -> VecEnv:
    """The training/evaluation VecEnv: ``cfg.n_envs`` copies x agents slots, env-major; ``seed`` (if
    given) seeds the first ``reset()``, env copy ``i`` with ``seed + i``."""
    _check_name(cfg.name)
    if cfg.name == "native":
        return CoverageVecEnv(cfg.native, n_envs=cfg.n_envs, seed=seed)
    vec = ss.pettingzoo_env_to_vec_env_v1(make_parallel_env(cfg))
    concat = ss.concat_vec_envs_v1(vec, cfg.n_envs, num_cpus=0, base_class="stable_baselines3")
    vec = (MaskedVecEnv(concat, cfg.n_envs, cfg.adapter.size) if cfg.name in MASKED_ENVS
           else SeededVecEnv(concat, cfg.n_envs))
    if seed is not None:
        vec.seed(seed)
    return VecMonitor(vec)


def n_agents_of(venv: VecEnv, cfg: EnvConfig) -> int:
    """Agents per environment copy (slots per env) of a VecEnv made by ``make_vec_env``."""
    return venv.num_envs // cfg.n_envs


def horizon(cfg: EnvConfig) -> int:
    """The most steps an episode can last (``native.max_steps`` or ``adapter.max_cycles``): what step budgets are fractions of."""
    return cfg.native.max_steps if cfg.name == "native" else cfg.adapter.max_cycles


def reference_for(cfg: EnvConfig) -> ReferenceReturns | None:
    """Random/oracle team returns that normalise this env's returns; None for envs without an oracle."""
    return reference_returns(cfg.native) if cfg.name == "native" else None
