"""The run config of ``scripts/train_marl.py``: one section per floor it ties together.

``env`` comes from ``envs``, ``policy``, ``ppo`` and ``adversary`` (adversarial training) from ``agents``,
``defense`` from the framework's ``fgmf_marl.defenses``; only a job above all three may compose them, which is why this lives here.
Defaults are the embedded default job (see the README's ``make train``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from fgmf_marl.agents.adversarial import AdversarialTrainingConfig
from fgmf_marl.agents.config import PolicyConfig, PPOConfig
from fgmf_marl.agents.policies import cnn_min_image_size
from fgmf_marl.config import ConfigError, check_device, check_range, check_seed, merge
from fgmf_marl.defenses.config import DEFENSES, DefenseConfig
from fgmf_marl.envs.registry import EnvConfig

#: tuned settings per env and per backbone (rl-zoo style), beside this file
PRESETS_FILE = Path(__file__).with_name("presets.yaml")
#: the choices a preset may be keyed on, in the order their presets are merged (a later one wins)
PRESET_KEYS = ("env.name", "policy.backbone")


@cache
def _preset_table() -> dict[str, dict[str, dict[str, Any]]]:
    table = yaml.safe_load(PRESETS_FILE.read_text(encoding="utf-8")) or {}
    if not isinstance(table, dict) or set(table) - set(PRESET_KEYS):
        raise ConfigError(f"{PRESETS_FILE.name} must map some of {', '.join(PRESET_KEYS)} to presets")
    return table


#: the largest accepted training budget (agent-steps)
MAX_TIMESTEPS = 10_000_000_000

@dataclass
class TrainConfig:
    """Everything one training run needs; written to ``runs/<name>/config.yaml``.

    ``log_explanations`` writes the final evaluation's episodes to the oversight log
    (``runs/<name>/eval/oversight/``: PGCA maps of every agent, every ``log_every``-th step), with an
    HMAC per record when ``log_key_file`` (or ``$FGMF_LOG_KEY_FILE``) names a key.

    ``eval_episodes`` is 256 because per-episode returns are noisy: 256 episodes cut the standard error
    of the oracle-normalised mean to about a third of 32's for a few seconds more (measurements:
    docs/experiments/evaluation-protocol.md, "Evaluation protocol").
    """

    seed: int = 0
    timesteps: int = 1_000_000
    device: str = "cpu"
    checkpoint_every: int = 100_000
    eval_episodes: int = 256
    log_explanations: bool = False
    log_every: int = 1
    log_key_file: str | None = None
    env: EnvConfig = field(default_factory=EnvConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    adversary: AdversarialTrainingConfig = field(default_factory=AdversarialTrainingConfig)

    @classmethod
    def presets(cls, data: dict[str, Any]) -> dict[str, Any]:
        """The tuned settings of ``presets.yaml`` for the env and backbone ``data`` chooses (the defaults'
        where it chooses none), merged env first; ``fgmf_marl.config.load`` puts them beneath ``data``.

        Why: the PPO knobs were tuned for the CNN on the native env; a backbone or an env that needs
        others (measured, docs/experiments/) gets them without the user having to know, and a run's
        config.yaml records them like any other value.
        """
        defaults = {"env.name": EnvConfig().name, "policy.backbone": PolicyConfig().backbone}
        out: dict[str, Any] = {}
        for key in PRESET_KEYS:
            section, name = key.split(".")
            given = data.get(section)
            chosen = given.get(name, defaults[key]) if isinstance(given, dict) else defaults[key]
            preset = _preset_table().get(key, {}).get(chosen) if isinstance(chosen, str) else None
            if preset:
                out = merge(out, preset)
        return out

    def validate(self) -> None:
        check_seed(self.seed)
        check_device(self.device)
        # far above any run a machine finishes (ten billion agent-steps): a typo like 1e30 is refused, not run forever
        check_range("timesteps", self.timesteps, 1, MAX_TIMESTEPS)
        if self.checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        check_range("log_every", self.log_every, 1, 100_000)
        check_range("eval_episodes", self.eval_episodes, 1, 100_000)
        size = self.env.image_size
        min_size = cnn_min_image_size(self.policy.cnn_layout)
        if self.policy.backbone == "cnn" and size < min_size:
            raise ConfigError(f"policy.cnn_layout={self.policy.cnn_layout} needs images of at least {min_size} px, "
                              f"got {size} (env.native.size or env.adapter.size)")
        if self.policy.backbone == "vit" and self.policy.vit_stem == "patch" and size % self.policy.vit_patch_size:
            raise ConfigError(f"policy.vit_patch_size={self.policy.vit_patch_size} must divide the image size {size} "
                              "(env.native.size or env.adapter.size)")

    def check_new_run(self) -> None:
        """The checks a new run makes beyond :meth:`validate`: no knob set that its kind ignores (one-line error).

        Not part of ``validate``, because a recorded config holds every knob and must load whatever the defaults
        become; a new run (``train_marl.py``, or an experiment's plan before any task starts) checks it.
        """
        self.adversary.check_knobs_apply()


def without_unused_defenses(config: dict[str, Any]) -> dict[str, Any]:
    """A resolved train config (as a dict) without the knob sections of the defense components its
    ``defense.kind`` does not train (``defense.scorpio`` of a vanilla run, say); everything else as given.

    Why: those knobs cannot change what such a run computes, so a cache keyed on the config
    (``reproduce.py``) must not rerun a vanilla training because a default of SCOR-PIO changed.
    """
    defense = config.get("defense")
    if not isinstance(defense, dict) or defense.get("kind") not in DEFENSES:
        return config
    unused = {c for parts in DEFENSES.values() for c in parts} - DEFENSES[defense["kind"]]
    return {**config, "defense": {k: v for k, v in defense.items() if k not in unused}}
