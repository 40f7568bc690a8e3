"""Checkpoints on disk: the one way a command saves a model and loads it back with its run's config.

A checkpoint is SB3's ``.zip`` inside a run directory (:mod:`fgmf_marl.runs`); the run's
``config.yaml`` decides which algorithm class and which layers (SGAM) it is rebuilt with, and every
object SB3 would unpickle from the ``.zip`` is rebuilt from that config instead
(:mod:`agents.safe_load`), so loading a checkpoint someone sent you cannot run code. Every load
path (evaluation, the explanation study, the adversary's victim and surrogate, the learned
adversary, ``--resume``) goes through :func:`load_model` or :func:`load_adversary` here.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from typing import Any, Callable

import gymnasium as gym
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import VecEnv

from agents import defended
from agents.adversary import AdversaryConfig, LoadedAdversary, load_director
from agents.policy_view import PolicyView
from agents.safe_load import ppo_objects
from envs.registry import EnvConfig, horizon, make_vec_env, n_agents_of
from fgmf_marl import config as cfglib
from fgmf_marl.atomic import atomic_write
from fgmf_marl.config import ConfigError
from fgmf_marl.jobs.train_config import TrainConfig
from fgmf_marl.runs import RunDir, resolve_checkpoint


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


class PeriodicCheckpoint(BaseCallback):
    """Saves ``checkpoints/step_<timesteps>.zip`` every ``every`` steps, atomically; with ``echo``, also a
    progress line (steps done of ``total``, steps/s), so a log redirected to a file shows progress;
    ``also(timesteps)`` saves what must be restored with the checkpoint (e.g. an ATLA director)."""

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
        if self.num_timesteps >= self._next:
            if self.also is not None:   # first: a team checkpoint never exists without what it needs
                self.also(self.num_timesteps)
            save_checkpoint(self.model, self.run.checkpoint_at(self.num_timesteps))
            if self.echo is not None:
                rate = (self.num_timesteps - self._started_at) / max(time.perf_counter() - self._start, 1e-9)
                of = f"/{self.total}" if self.total else ""
                self.echo(f"step {self.num_timesteps}{of} ({rate:.0f} steps/s), checkpoint "
                          f"{self.run.checkpoint_at(self.num_timesteps)}")
            self._next += self.every * max(1, (self.num_timesteps - self._next) // self.every + 1)
        return True
