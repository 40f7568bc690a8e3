"""The ``policy:`` and ``ppo:`` sections of a run config: the network and the PPO hyperparameters.

Defaults are those of the embedded default job (the small CNN, PPO tuned for the native env; the
whole run config is ``fgmf_marl.teams.train_config.TrainConfig``; measurements: docs/experiments/ppo-defaults.md,
"PPO defaults and the default job").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from stable_baselines3.common.utils import LinearSchedule

from fgmf_marl.agents.policies import CNN_LAYOUTS, CnnLayout, ImageFeatures
from fgmf_marl.config import ConfigError, check_range


#: upper bounds of the network and rollout sizes (each far above anything trained in this project)
MAX_WIDTH = 4096          # channels, features, MLP and ViT widths
MAX_LAYERS = 32           # MLP layers, ViT blocks
MAX_IMAGE = 512           # pixels per side
MAX_ROLLOUT_STEPS = 100_000
MAX_BATCH = 1_000_000
MAX_EPOCHS = 1000


@dataclass
class PolicyConfig:
    """Policy network: backbone (features extractor) and the actor/critic MLP heads.

    ``cnn_layout`` is the CNN's convolution geometry (``fgmf_marl.agents.policies.CNN_LAYOUTS``: ``small`` for the
    native env's 48 x 48 views, ``nature`` for 84 x 84 Atari-style frames); ``net_arch=[]`` feeds the
    features straight into the action and value layers, as SB3's ``CnnPolicy`` does with ``NatureCNN``.

    ``train_dtype=bfloat16`` autocasts the extractor's forward during training (attacks, attributions
    and regularisers stay float32). float32 is the default because bfloat16 only pays on CPUs with
    native bfloat16 (AVX-512 BF16 / AMX) and is far slower on AVX2-only CPUs (``torch.backends.cpu.
    get_cpu_capability() == "AVX2"``), and the default job must not depend on which CPU it lands on
    (measurements: docs/experiments/throughput.md, "Throughput and speed").
    """

    backbone: Literal["cnn", "vit"] = "cnn"
    features_dim: int = 128
    cnn_channels: tuple[int, int, int] = (16, 32, 32)
    cnn_layout: CnnLayout = "small"
    vit_stem: Literal["patch", "conv"] = "conv"
    vit_patch_size: int = 6
    vit_dim: int = 64
    vit_depth: int = 2
    vit_heads: int = 4
    net_arch: tuple[int, ...] = (64,)
    train_dtype: Literal["float32", "bfloat16"] = "float32"

    @property
    def torch_train_dtype(self) -> torch.dtype:
        """dtype of the policy's forward during training (see ``fgmf_marl.agents.policies.compute_dtype``)."""
        return getattr(torch, self.train_dtype)

    def validate(self) -> None:
        """Sizes are positive and bounded far above any network trained here, so a typo cannot
        allocate unbounded memory; ``vit_heads`` must divide ``vit_dim`` (multi-head attention)."""
        check_range("policy.features_dim", self.features_dim, 1, MAX_WIDTH)
        for i, n in enumerate(self.cnn_channels):
            check_range(f"policy.cnn_channels[{i}]", n, 1, MAX_WIDTH)
        if self.cnn_layout not in CNN_LAYOUTS:
            raise ConfigError(f"policy.cnn_layout={self.cnn_layout!r} is not a CNN layout; known: {', '.join(CNN_LAYOUTS)}")
        if len(self.net_arch) > MAX_LAYERS:
            raise ConfigError(f"policy.net_arch={list(self.net_arch)} must list 0..{MAX_LAYERS} layer widths")
        for i, n in enumerate(self.net_arch):
            check_range(f"policy.net_arch[{i}]", n, 1, MAX_WIDTH)
        check_range("policy.vit_patch_size", self.vit_patch_size, 1, MAX_IMAGE)
        check_range("policy.vit_dim", self.vit_dim, 1, MAX_WIDTH)
        check_range("policy.vit_depth", self.vit_depth, 1, MAX_LAYERS)
        check_range("policy.vit_heads", self.vit_heads, 1, self.vit_dim)
        if self.vit_dim % self.vit_heads:
            raise ConfigError(f"policy.vit_dim={self.vit_dim} must be divisible by policy.vit_heads={self.vit_heads}")

    def policy_kwargs(self) -> dict[str, Any]:
        """SB3 ``policy_kwargs`` for an ``ActorCriticPolicy`` with our image extractor."""
        if self.backbone == "cnn":
            backbone_kwargs: dict[str, Any] = {"channels": tuple(self.cnn_channels), "layout": self.cnn_layout}
        else:
            backbone_kwargs = {"patch_size": self.vit_patch_size, "dim": self.vit_dim, "depth": self.vit_depth,
                               "heads": self.vit_heads, "stem": self.vit_stem}
        return {
            "features_extractor_class": ImageFeatures,
            "features_extractor_kwargs": {"backbone": self.backbone, "features_dim": self.features_dim, **backbone_kwargs},
            "net_arch": {"pi": list(self.net_arch), "vf": list(self.net_arch)},
            "share_features_extractor": True,
        }


@dataclass
class PPOConfig:
    """SB3 PPO hyperparameters (timesteps count agent-steps: one per slot per step).

    Each default was chosen on the default job by its oracle-normalised return on a deterministic
    evaluation (measurements: docs/experiments/ppo-defaults.md, "PPO defaults and the default job"):

    * ``gamma`` 0.9, ``gae_lambda`` 0.8: the env's potential-based shaping pays for progress at once,
      so short horizons lose little and cut the variance that other agents' random moves add to the
      advantage.
    * ``vf_coef`` 0.05 (SB3's default is 0.5): policy and value share the CNN, and at 0.5 the value
      term's gradient swamped the policy term's inside the ``max_grad_norm`` clip. Scaling the rewards
      down would do much the same; the coefficient keeps every logged return in env units.
    * one epoch (``n_epochs``) of minibatches of 128 (``batch_size``) at ``learning_rate`` 1e-3,
      annealed linearly to 0 (CleanRL's ``anneal_lr``): the update, not the rollout, is what costs, and
      this gives as many gradient steps per sample as 2 epochs of 256 at half the update's compute.
    * ``ent_coef`` 0.003: it scored higher than 0.01, likely because evaluation is deterministic and
      0.01 kept the policy more random than the task needs (not measured directly).
    """

    learning_rate: float = 1e-3
    lr_schedule: Literal["constant", "linear"] = "linear"
    n_steps: int = 64
    batch_size: int = 128
    n_epochs: int = 1
    gamma: float = 0.9
    gae_lambda: float = 0.8
    clip_range: float = 0.2
    ent_coef: float = 0.003
    vf_coef: float = 0.05
    max_grad_norm: float = 0.5

    def learning_rate_schedule(self) -> float | LinearSchedule:
        """``linear`` anneals to 0 over the run (CleanRL's ``anneal_lr``), ``constant`` keeps it."""
        return LinearSchedule(self.learning_rate, 0.0, 1.0) if self.lr_schedule == "linear" else self.learning_rate

    def validate(self) -> None:
        """SB3's own ranges, made explicit (it accepts e.g. a negative ``vf_coef`` and trains on);
        sizes are bounded far above any useful rollout, so a typo cannot allocate unbounded memory."""
        check_range("ppo.learning_rate", self.learning_rate, 0, 1, low_open=True)
        check_range("ppo.n_steps", self.n_steps, 1, MAX_ROLLOUT_STEPS)
        check_range("ppo.batch_size", self.batch_size, 2, MAX_BATCH)
        check_range("ppo.n_epochs", self.n_epochs, 1, MAX_EPOCHS)
        check_range("ppo.gamma", self.gamma, 0, 1, low_open=True)
        check_range("ppo.gae_lambda", self.gae_lambda, 0, 1)
        check_range("ppo.clip_range", self.clip_range, 0, 1, low_open=True)
        check_range("ppo.ent_coef", self.ent_coef, 0)
        check_range("ppo.vf_coef", self.vf_coef, 0)
        check_range("ppo.max_grad_norm", self.max_grad_norm, 0, low_open=True)
