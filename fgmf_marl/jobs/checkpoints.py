"""Checkpoints on disk: the one way a command saves a model and loads it back with its run's config.

A checkpoint is SB3's ``.zip`` inside a run directory (:mod:`fgmf_marl.runs`); the run's
``config.yaml`` decides which algorithm class and which layers (SGAM) it is rebuilt with, so every
load path (evaluation, the explanation study, the adversary's victim and surrogate, ``--resume``)
goes through :func:`load_model` here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import VecEnv

from agents import defended
from agents.policy_view import PolicyView
from fgmf_marl import config as cfglib
from fgmf_marl.atomic import atomic_write
from fgmf_marl.config import ConfigError
from fgmf_marl.jobs.train_config import TrainConfig
from fgmf_marl.runs import resolve_checkpoint


def save_checkpoint(model: PPO, path: Path) -> None:
    """SB3 ``save`` through the one atomic writer: a crash never leaves a truncated checkpoint."""
    atomic_write(path, model.save)


def load_model(path: str | Path, device: str = "cpu", env: VecEnv | None = None) -> tuple[PPO, TrainConfig]:
    """Load a checkpoint (file or run directory) with the config of the run that wrote it."""
    ckpt, run = resolve_checkpoint(path)
    cfg = cfglib.load(TrainConfig, run.config) if run is not None else TrainConfig()
    try:
        model = defended.load_model(ckpt, cfg.defense, env=env, device=device)
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
