"""Checkpoints on disk: the one way a command saves a model and loads it back with its run's config.

A checkpoint is SB3's ``.zip`` inside a run directory (:mod:`fgmf_marl.runs`); the run's
``config.yaml`` decides which algorithm class and which layers (SGAM) it is rebuilt with, and every
object SB3 would unpickle from the ``.zip`` is rebuilt from that config instead
(:mod:`fgmf_marl.agents.safe_load`), so loading a checkpoint someone sent you cannot run code. Every load
path (evaluation, the explanation study, the adversary's victim and surrogate, the learned
adversary, ``--resume``) goes through :func:`load_model` or :func:`load_adversary` here.
"""
from __future__ import annotations

import dataclasses
import json
import random
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from typing import Any, Callable

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper, VecTransposeImage

from fgmf_marl import config as cfglib
from fgmf_marl.agents import defended
from fgmf_marl.agents.adversary import AdversaryConfig, LoadedAdversary, load_director
from fgmf_marl.agents.policy_view import PolicyView
from fgmf_marl.agents.safe_load import ppo_objects
from fgmf_marl.atomic import atomic_write
from fgmf_marl.config import ConfigError
from fgmf_marl.envs.registry import EnvConfig, horizon, make_vec_env, n_agents_of
from fgmf_marl.interrupts import Terminated, stop_requested
from fgmf_marl.runs import RunDir, resolve_checkpoint
from fgmf_marl.teams.train_config import TrainConfig


def save_checkpoint(model: PPO, path: Path) -> None:
    """SB3 ``save`` through the one atomic writer: a crash never leaves a truncated checkpoint."""
    atomic_write(path, model.save)


def env_spaces(cfg: EnvConfig) -> tuple[gym.Space, gym.Space, int]:
    """Observation space, action space and agents per env copy of the env a run trained on."""
    venv = make_vec_env(dataclasses.replace(cfg, n_envs=1))
    try:
        return venv.observation_space, venv.action_space, n_agents_of(venv, dataclasses.replace(cfg, n_envs=1))
    finally:
        venv.close()


def run_objects(cfg: TrainConfig, env: VecEnv | None = None) -> dict[str, Any]:
    """Every object a team checkpoint of this run pickles, rebuilt from the run's config."""
    if env is not None:
        observation_space, action_space = env.observation_space, env.action_space
    else:
        observation_space, action_space, _ = env_spaces(cfg.env)
    return ppo_objects(observation_space=observation_space, action_space=action_space,
                       policy_kwargs=cfg.policy.policy_kwargs(), learning_rate=cfg.ppo.learning_rate_schedule(),
                       clip_range=cfg.ppo.clip_range)


def _run_config(path: str | Path) -> tuple[Path, TrainConfig]:
    ckpt, run = resolve_checkpoint(path)
    return ckpt, cfglib.load(TrainConfig, run.config) if run is not None else TrainConfig()


def load_model(path: str | Path, device: str = "cpu", env: VecEnv | None = None) -> tuple[PPO, TrainConfig]:
    """Load a checkpoint (file or run directory) with the config of the run that wrote it.

    A bare ``.zip`` outside a run directory is read with the default config; a checkpoint that does
    not fit its config (another env's image size, another network) is a one-line ConfigError.
    """
    ckpt, cfg = _run_config(path)
    try:
        model = defended.load_model(ckpt, cfg.defense, run_objects(cfg, env), env=env, device=device)
    except ConfigError:
        raise
    except Exception as exc:  # SB3 raises ValueError/KeyError/RuntimeError/zipfile errors alike
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"checkpoint {str(ckpt)!r} could not be loaded (not an SB3 checkpoint, or incompatible "
                          f"with its config or environment): {first}") from None
    return model, cfg


@dataclass
class Victim:
    """A loaded team checkpoint ready to be attacked or explained."""

    label: str
    path: str
    model: PPO
    view: PolicyView
    train_config: TrainConfig


def load_victim(path: str | Path, device: str = "cpu") -> Victim:
    """The checkpoint at ``path`` (run directory or ``.zip``) as an eval-mode :class:`PolicyView`."""
    ckpt, run = resolve_checkpoint(path)
    model, cfg = load_model(path, device=device)
    label = run.root.name if run is not None else ckpt.stem
    return Victim(label=label, path=str(path), model=model, view=PolicyView.from_model(model).eval(), train_config=cfg)


def load_adversary(path: str | Path, device: str = "cpu") -> LoadedAdversary:
    """A director written by ``scripts/train_adversary.py`` (its run directory or final.zip).

    Its spaces are rebuilt from its victim's run config (the director sees the victim's images and
    chooses among the victim's actions), so the victim run named in its config must still exist.
    """
    ckpt, run = resolve_checkpoint(path)
    if run is None:
        raise ConfigError(f"adversary {str(path)!r} has no config.yaml beside its checkpoints (use its run directory)")
    try:
        cfg = cfglib.load(AdversaryConfig, run.config)
    except ConfigError as exc:
        raise ConfigError(f"{str(path)!r} is not an adversary run (train it with scripts/train_adversary.py): {exc}") from None
    _, victim_cfg = _run_config(cfg.victim)
    victim_space, victim_actions, n_agents = env_spaces(victim_cfg.env)
    try:
        return load_director(ckpt, cfg, victim_space, int(victim_actions.n), n_agents, horizon(victim_cfg.env),
                             device=device)
    except ConfigError:
        raise
    except Exception as exc:  # as in load_model
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"adversary checkpoint {str(ckpt)!r} could not be loaded (not a director of its victim "
                          f"{cfg.victim!r}): {first}") from None


# ---------------------------------------------------------------------------------------- exact resume
RESUME_FORMAT = 1
_STATELESS_LAYERS = (VecTransposeImage,)   # VecEnv wrappers that hold nothing the next steps depend on


def _env_layers(env: VecEnv) -> list[VecEnv]:
    layers = [env]
    while isinstance(layers[-1], VecEnvWrapper):
        layers.append(layers[-1].venv)
    return layers


def exact_resume_supported(env: VecEnv) -> bool:
    """True when every layer of ``env`` either exposes ``get_state``/``set_state`` or holds no state.

    The native env and the adversarial-training wrapper do; SuperSuit's vector envs (the PettingZoo
    envs) do not, so their runs resume with a fresh ``reset()`` instead."""
    return all(hasattr(layer, "get_state") or isinstance(layer, _STATELESS_LAYERS) for layer in _env_layers(env))


def _split(prefix: str, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """``state`` with its numpy arrays moved into ``arrays`` (under ``prefix.key``), the rest JSON-ready."""
    meta = {}
    for key, value in state.items():
        if isinstance(value, np.ndarray):
            arrays[f"{prefix}.{key}"] = value
        else:
            meta[key] = value
    return meta


def _join(prefix: str, meta: dict[str, Any], arrays: Any) -> dict[str, Any]:
    out = dict(meta)
    for name in arrays.files:
        if name.startswith(prefix + "."):
            out[name[len(prefix) + 1:]] = arrays[name]
    return out


def _expected_arrays(model: PPO, layers: list[VecEnv]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """The shape and dtype of every array :func:`save_resume_state` writes for ``model`` and its env ``layers``."""
    env = model.get_env()
    expected = {"torch_rng": (tuple(torch.get_rng_state().shape), np.dtype(np.uint8)),
                "numpy_rng_key": (np.random.get_state()[1].shape, np.dtype(np.uint32)),
                "last_obs": ((env.num_envs, *env.observation_space.shape), np.dtype(env.observation_space.dtype)),
                "last_episode_starts": ((env.num_envs,), np.dtype(bool))}
    states = [("algorithm", model.get_state())] if hasattr(model, "get_state") else []
    states += [(f"env{i}", layer.get_state()) for i, layer in enumerate(layers) if hasattr(layer, "get_state")]
    for prefix, state in states:
        expected.update({f"{prefix}.{key}": (value.shape, value.dtype) for key, value in state.items()
                         if isinstance(value, np.ndarray)})
    return expected


def save_resume_state(path: Path, model: PPO) -> None:
    """Write what ``--resume`` needs to continue ``model``'s training exactly, at a rollout boundary.

    The random streams (torch, numpy, Python, the algorithm's own generator), the observation and
    episode-start flags of the next step, and every env layer's state, as an ``.npz`` of plain arrays
    plus one JSON string: loading it never unpickles anything. Why: a checkpoint alone restarts the
    env and the random streams, so a resumed run is another sample of the experiment, not the same run.
    """
    arrays: dict[str, np.ndarray] = {"torch_rng": torch.get_rng_state().numpy(),
                                     "last_obs": np.asarray(model._last_obs),
                                     "last_episode_starts": np.asarray(model._last_episode_starts)}
    bit_generator, key, pos, has_gauss, cached = np.random.get_state()
    arrays["numpy_rng_key"] = key
    version, internal, gauss = random.getstate()
    meta: dict[str, Any] = {
        "format": RESUME_FORMAT, "num_timesteps": int(model.num_timesteps),
        "numpy_rng": [bit_generator, int(pos), int(has_gauss), float(cached)],
        "python_rng": [version, list(internal), gauss],
        "algorithm": _split("algorithm", model.get_state(), arrays) if hasattr(model, "get_state") else None,
        "env": [{"class": type(layer).__name__,
                 "state": _split(f"env{i}", layer.get_state(), arrays) if hasattr(layer, "get_state") else None}
                for i, layer in enumerate(_env_layers(model.get_env()))]}

    def write(fh: Any) -> None:
        np.savez(fh, __json__=np.array(json.dumps(meta)), **arrays)

    atomic_write(path, write)


def restore_resume_state(path: Path, model: PPO) -> str | None:
    """Restore :func:`save_resume_state`'s file into the freshly loaded ``model`` and its env.

    Returns None when the run now continues exactly, else why not (no state file, another env stack,
    another checkpoint, an array of another shape or dtype than this run's): the run then resumes as
    SB3 does, with a fresh env ``reset()``. Every array is checked before anything is restored, since a
    damaged or crafted file would otherwise fail only later, inside the training loop.
    """
    if not path.is_file():
        return f"no {path.name} beside the checkpoint"
    layers = _env_layers(model.get_env())
    try:
        with np.load(path, allow_pickle=False) as arrays:
            meta = json.loads(str(arrays["__json__"]))
            if meta.get("format") != RESUME_FORMAT or meta.get("num_timesteps") != model.num_timesteps:
                return f"{path.name} belongs to another checkpoint or format"
            if [e["class"] for e in meta["env"]] != [type(layer).__name__ for layer in layers]:
                return f"{path.name} was saved with another env stack"
            for name, (shape, dtype) in _expected_arrays(model, layers).items():
                if name not in arrays.files:
                    return f"{path.name} does not fit this run: it has no array {name}"
                if arrays[name].shape != shape or arrays[name].dtype != dtype:
                    return (f"{path.name} does not fit this run: {name} is {arrays[name].dtype} {arrays[name].shape}, "
                            f"this run's {dtype} {shape}")
            for i, (layer, saved) in enumerate(zip(layers, meta["env"])):
                if saved["state"] is not None:
                    layer.set_state(_join(f"env{i}", saved["state"], arrays))
            if meta["algorithm"] is not None:
                model.set_state(_join("algorithm", meta["algorithm"], arrays))
            model._last_obs = arrays["last_obs"].copy()
            model._last_episode_starts = arrays["last_episode_starts"].copy()
            bit_generator, pos, has_gauss, cached = meta["numpy_rng"]
            np.random.set_state((bit_generator, arrays["numpy_rng_key"], pos, has_gauss, cached))
            version, internal, gauss = meta["python_rng"]
            random.setstate((version, tuple(internal), gauss))
            torch.set_rng_state(torch.from_numpy(arrays["torch_rng"].copy()))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, zipfile.BadZipFile) as exc:
        # nothing half-restored matters: the env is reset and SB3 starts its rollout afresh
        model._last_obs = None
        return f"{path.name} is unreadable ({type(exc).__name__})"
    return None


class PeriodicCheckpoint(BaseCallback):
    """Saves ``checkpoints/step_<timesteps>.zip`` at the first rollout boundary after every ``every``
    steps, atomically; with ``echo``, also a progress line (steps done of ``total``, steps/s), so a log
    redirected to a file shows progress; ``also(timesteps)`` first saves what must be restored with the
    checkpoint (an ATLA director, the exact-resume state). At a rollout boundary (the start of the next
    rollout, or the end of training, after the update on the last one) nothing is half-collected, so a
    resume can continue exactly. A stop requested by SIGUSR1 (``fgmf_marl.interrupts``) is honoured at the
    first rollout boundary after this process trained a rollout: a checkpoint is saved there, due or not,
    and :class:`~fgmf_marl.interrupts.Terminated` raised, so the stop loses no training.
    """

    def __init__(self, run: RunDir, every: int, total: int | None = None,
                 echo: Callable[[str], None] | None = None, also: Callable[[int], None] | None = None) -> None:
        super().__init__()
        self.run = run
        self.every = every
        self.total, self.echo, self.also = total, echo, also
        self._next = every
        self._start, self._started_at = time.perf_counter(), 0

    def _on_training_start(self) -> None:
        self._next = (self.num_timesteps // self.every + 1) * self.every
        self._start, self._started_at = time.perf_counter(), self.num_timesteps

    def _on_step(self) -> bool:
        return True

    def _on_rollout_start(self) -> None:
        saved = self._save_if_due()
        if stop_requested() and self.num_timesteps > self._started_at:
            if not saved:
                self._save()
            print(f"stopped on request at step {self.num_timesteps}: checkpoint "
                  f"{self.run.checkpoint_at(self.num_timesteps)} (--resume continues from it)", file=sys.stderr)
            raise Terminated

    def _on_training_end(self) -> None:   # after the update on the last rollout: a boundary too
        self._save_if_due()

    def _save_if_due(self) -> bool:
        """Save a checkpoint if one is due; whether it did."""
        if self.num_timesteps < self._next:
            return False
        self._save()
        self._next += self.every * max(1, (self.num_timesteps - self._next) // self.every + 1)
        return True

    def _save(self) -> None:
        if self.also is not None:   # first: a team checkpoint never exists without what it needs
            self.also(self.num_timesteps)
        save_checkpoint(self.model, self.run.checkpoint_at(self.num_timesteps))
        if self.echo is not None:
            rate = (self.num_timesteps - self._started_at) / max(time.perf_counter() - self._start, 1e-9)
            of = f"/{self.total}" if self.total else ""
            self.echo(f"step {self.num_timesteps}{of} ({rate:.0f} steps/s), checkpoint "
                      f"{self.run.checkpoint_at(self.num_timesteps)}")
