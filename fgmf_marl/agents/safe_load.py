"""Loading an SB3 checkpoint without unpickling anything from it.

SB3's ``.zip`` stores plain JSON for simple values and a cloudpickle blob (``":serialized:"``) for
every object: spaces, schedules, classes, the policy's kwargs, buffers. ``PPO.load`` unpickles each
blob, so a checkpoint with one crafted blob runs code on load. Here every object the JSON would
deserialise is rebuilt by the caller from the run's own config and handed to SB3 as
``custom_objects`` (SB3 then never touches those blobs), and a checkpoint holding a serialized entry
not on that list is refused before SB3 opens it. Weights are read by SB3 with
``torch.load(weights_only=True)``, which cannot run code either.

What a checkpoint may contain, then: the JSON ``data`` (its plain values are read, its serialized
entries ignored), ``policy.pth`` / ``policy.optimizer.pth`` / ``pytorch_variables.pth`` tensors, and
SB3's version and system-info text files.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import gymnasium as gym
from stable_baselines3 import PPO
from stable_baselines3.common.buffers import DictRolloutBuffer, RolloutBuffer
from stable_baselines3.common.utils import FloatSchedule, LinearSchedule
from stable_baselines3.common.vec_env import VecEnv

from fgmf_marl.config import ConfigError

SERIALIZED = ":serialized:"


def serialized_entries(path: str | Path) -> list[str]:
    """Keys of the checkpoint's ``data`` JSON that hold a pickled object (read as JSON only)."""
    try:
        with zipfile.ZipFile(path) as archive:
            data = json.loads(archive.read("data"))
    except (OSError, KeyError, zipfile.BadZipFile, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"checkpoint {str(path)!r} could not be loaded: not an SB3 checkpoint (a .zip with a "
                          f"JSON 'data' entry): {type(exc).__name__}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"checkpoint {str(path)!r}: its 'data' entry is not a JSON object")
    return sorted(k for k, v in data.items() if isinstance(v, dict) and SERIALIZED in v)


def ppo_objects(*, observation_space: gym.Space, action_space: gym.Space, policy_kwargs: dict[str, Any],
                learning_rate: float | LinearSchedule, clip_range: float, **extra: Any) -> dict[str, Any]:
    """Every object a PPO checkpoint pickles, rebuilt from config: SB3's ``custom_objects`` for ``load``.

    Training state that is not configuration (the last observation, episode-info buffers) is
    replaced by ``None``, which SB3 treats as "start fresh": the env is reset before training, as
    SB3's ``force_reset`` already does, and the rolling episode statistics restart empty. A ``Dict``
    observation space gets SB3's ``MultiInputPolicy`` and its dict rollout buffer. ``extra``
    adds algorithm-specific entries (e.g. a defended algorithm's ``defense`` config).
    """
    dict_obs = isinstance(observation_space, gym.spaces.Dict)   # the adversary's director
    return {
        "policy_class": PPO.policy_aliases["MultiInputPolicy" if dict_obs else "CnnPolicy"],
        "policy_kwargs": policy_kwargs,
        "observation_space": observation_space,
        "action_space": action_space,
        "learning_rate": learning_rate,
        "lr_schedule": FloatSchedule(learning_rate),
        "clip_range": clip_range,
        "clip_range_vf": None,
        "rollout_buffer_class": DictRolloutBuffer if dict_obs else RolloutBuffer,
        "_last_obs": None,
        "_last_episode_starts": None,
        "_last_original_obs": None,
        "ep_info_buffer": None,
        "ep_success_buffer": None,
        **extra,
    }


def load_without_pickle(cls: type[PPO], path: str | Path, objects: dict[str, Any], *, env: VecEnv | None,
                        device: str, **kwargs: Any) -> PPO:
    """``cls.load(path, ...)`` with every serialized entry replaced by ``objects``; refuses any other one."""
    unexpected = [key for key in serialized_entries(path) if key not in objects]
    if unexpected:
        raise ConfigError(f"checkpoint {str(path)!r} holds a pickled entry {unexpected[0]!r} that fgmf-marl does "
                          f"not rebuild from the run's config, so it is not loaded (pickles can run code); "
                          f"accepted serialized entries: {', '.join(sorted(objects))}")
    return cls.load(str(path), env=env, device=device, custom_objects=objects, **kwargs)
