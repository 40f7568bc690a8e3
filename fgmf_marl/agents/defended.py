"""Builds and loads the PPO variant that a ``DefenseConfig`` asks for.

A defense kind names the components it trains (``fgmf_marl.defenses.config.DEFENSES``); the
algorithm is the first class of :data:`ALGORITHMS` that trains all of them: SB3's own ``PPO`` for
``none``, ``fgmf_marl.agents.fgmf_ppo.FGMFPPO`` for ``scorpio``/``sgam``/``fgmf``, ``fgmf_marl.agents.sappo.SAPPO`` for
``sappo``. SGAM changes the network (a gate module in front of the backbone), so a checkpoint is
loaded through the defended class, which rebuilds the gate from the run's ``defense`` config before
the weights are read.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import VecEnv

from fgmf_marl import config as cfglib
from fgmf_marl.agents.fgmf_ppo import FGMFPPO
from fgmf_marl.agents.regularised_ppo import RegularisedPPO
from fgmf_marl.agents.safe_load import load_without_pickle
from fgmf_marl.agents.sappo import SAPPO
from fgmf_marl.agents.smooth_ppo import SmoothPPO
from fgmf_marl.config import ConfigError
from fgmf_marl.defenses.config import DEFENSE_KINDS, DEFENSES, DefenseConfig

#: defended algorithms, most specific last; plain SB3 PPO trains the kinds with no component
ALGORITHMS: tuple[type[RegularisedPPO], ...] = (FGMFPPO, SAPPO, SmoothPPO)


def algorithm_class(kind: str) -> type[PPO]:
    """The algorithm class that trains (and loads) a policy with defense ``kind``."""
    if kind not in DEFENSES:
        raise ConfigError(f"defense.kind={kind!r} is unknown; accepted: {', '.join(DEFENSE_KINDS)}")
    if not DEFENSES[kind]:
        return PPO
    for cls in ALGORITHMS:
        if cls.trains(kind):
            return cls
    raise ConfigError(f"defense.kind={kind!r}: no algorithm trains its components {sorted(DEFENSES[kind])}")


def build_model(defense: DefenseConfig, env: VecEnv, policy_kwargs: dict[str, Any], ppo_kwargs: dict[str, Any]) -> PPO:
    """A fresh model for ``env`` with the defense installed (the config is validated first)."""
    cfglib.validate(defense)
    cls = algorithm_class(defense.kind)
    if cls is PPO:
        return PPO("CnnPolicy", env, policy_kwargs=policy_kwargs, **ppo_kwargs)
    return cls("CnnPolicy", env, defense=defense, policy_kwargs=policy_kwargs, **ppo_kwargs)  # type: ignore[call-arg]


def load_model(path: str | Path, defense: DefenseConfig, objects: dict[str, Any], env: VecEnv | None,
               device: str) -> PPO:
    """Load a checkpoint written by ``build_model``'s model, unpickling nothing from it.

    ``defense`` (the run's config) decides the algorithm and its layers; ``objects`` are the
    checkpoint's serialized entries rebuilt from the run's config (``fgmf_marl.agents.safe_load.ppo_objects``).
    """
    cls = algorithm_class(defense.kind)
    if cls is PPO:
        return load_without_pickle(PPO, path, objects, env=env, device=device)
    return load_without_pickle(cls, path, {**objects, "defense": defense}, env=env, device=device, defense=defense)
