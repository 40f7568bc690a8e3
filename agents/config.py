"""The run config of ``scripts/train_marl.py``: env, policy, PPO and defense sections.

Defaults are the embedded default job: the native coverage env, the small CNN, and a budget
(1M agent-steps) that took 8 min 21 s to 9 min 53 s alone on a 2-core AVX2-only EPYC (1,718-2,035
agent-steps/s; see :class:`PPOConfig`). The budget is in agent-steps, not seconds, so what is learned
does not depend on the CPU's speed, but the time does. Figures in the README.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from stable_baselines3.common.utils import LinearSchedule

from agents.policies import ImageFeatures
from envs.registry import EnvConfig
from fgmf_marl.config import ConfigError
from fgmf_marl.defenses.config import DefenseConfig


@dataclass
class PolicyConfig:
    """Policy network: backbone (features extractor) and the actor/critic MLP heads.

    ``train_dtype=bfloat16`` autocasts the extractor's forward during training. It pays only on CPUs
    with native bfloat16 (AVX-512 BF16 / AMX): there the default job trained 1.46x faster (3,072 vs
    2,100 agent-steps/s, interleaved). On an AVX2-only CPU (AMD EPYC, ``torch.backends.cpu.
    get_cpu_capability() == "AVX2"``) it fell to 144 agent-steps/s against float32's 1,270, so float32
    stays the default: the default job must not depend on which CPU it lands on.
    """

    backbone: Literal["cnn", "vit"] = "cnn"
    features_dim: int = 128
    cnn_channels: tuple[int, int, int] = (16, 32, 32)
    vit_patch_size: int = 6
    vit_dim: int = 64
    vit_depth: int = 2
    vit_heads: int = 4
    net_arch: tuple[int, ...] = (64,)
    train_dtype: Literal["float32", "bfloat16"] = "float32"

    @property
    def torch_train_dtype(self) -> torch.dtype:
        """dtype of the policy's forward during training (see ``agents.policies.compute_dtype``)."""
        return getattr(torch, self.train_dtype)

    def validate(self) -> None:
        if self.features_dim < 1 or min(self.cnn_channels) < 1 or any(n < 1 for n in self.net_arch):
            raise ConfigError("policy.features_dim, policy.cnn_channels and policy.net_arch must be positive")
        if self.vit_dim % self.vit_heads:
            raise ConfigError(f"policy.vit_dim={self.vit_dim} must be divisible by policy.vit_heads={self.vit_heads}")

    def policy_kwargs(self) -> dict[str, Any]:
        """SB3 ``policy_kwargs`` for an ``ActorCriticPolicy`` with our image extractor."""
        if self.backbone == "cnn":
            backbone_kwargs: dict[str, Any] = {"channels": tuple(self.cnn_channels)}
        else:
            backbone_kwargs = {"patch_size": self.vit_patch_size, "dim": self.vit_dim, "depth": self.vit_depth,
                               "heads": self.vit_heads}
        return {
            "features_extractor_class": ImageFeatures,
            "features_extractor_kwargs": {"backbone": self.backbone, "features_dim": self.features_dim, **backbone_kwargs},
            "net_arch": {"pi": list(self.net_arch), "vf": list(self.net_arch)},
            "share_features_extractor": True,
        }


@dataclass
class PPOConfig:
    """SB3 PPO hyperparameters (timesteps count agent-steps: one per slot per step).

    Short horizons (gamma 0.9, GAE lambda 0.8) suit the env's potential-based shaping, which pays
    for progress at once: they cut the variance that other agents' random moves add to the
    advantage. Measured on the default env (egocentric view, local_ratio 1): this setting reached
    0.5 oracle-normalised after 215k agent-steps, gamma 0.95 / lambda 0.95 with local_ratio 0.5 was
    at 0.04 after 95k, and lr 1.5e-3 with 8 epochs at 0.005 after 43k.

    **vf_coef 0.05** (SB3's 0.5 starved the policy). Policy and value share the CNN, and the value loss
    here is ~5-20 (discounted returns up to ~10 in env units, with potential jumps when the oracle's
    assignment switches). At 0.5 the value term's gradient was 4-15x the policy term's: per-minibatch
    norms on fresh rollouts from the seed-0 run's checkpoints, value vs policy, 3.0 vs 0.59 at 100k, 9.7
    vs 1.18 at 500k, 15.2 vs 1.05 at 900k. Every minibatch's total exceeded ``max_grad_norm`` (0.5), so
    the clipped step was almost all value gradient and grew more so as returns grew. At 0.05 the two are
    comparable: 0.43 vs 0.90 at 100k, 0.82 vs 1.11 at 500k, 0.47 vs 1.45 at 900k. Scaling the rewards
    would do much the same (advantages are normalised, so scaling rewards by c only scales the value
    loss by c^2); the coefficient keeps every logged return in env units. Effect, seed 0, deterministic
    256-episode evaluation of the checkpoints on held-out seeds, at 100k / 200k / 300k / 1.1M: 0.336 /
    0.566 / 0.737 / 0.784 at 0.5 (run alone), 0.756 / 0.863 / 0.871 / 0.856 at 0.05 (paired). The policy
    now learns most of the task in the first 300k agent-steps; what is left is slow.

    Results of the defaults (1 x 128, lr 1e-3, vf_coef 0.05, 1M), the default command alone on a 2-core
    AVX2-only EPYC, 256 deterministic episodes: seeds 0-4 **0.856 / 0.801 / 0.805 / 0.808 / 0.806**
    (mean 0.815) in 8 min 21 s to 9 min 53 s (1,718-2,035 agent-steps/s; the machine's speed varied
    between runs). The same command at vf_coef 0.5 and 1.1M scored 0.796 / 0.766 / 0.884 / 0.779 / 0.765
    (mean 0.798): the new defaults are higher on four seeds of five, lower on seed 2, in less time.
    Paired (two 1-thread runs side by side; thread count changes float summation order, so only like is
    compared with like) at 1.1M, seeds 0/1/2: 0.863 / 0.794 / 0.845 at vf_coef 0.05 against 0.797 (1.2M)
    / 0.802 / 0.768 at 0.5; seed 0 at vf_coef 0.1: 0.866. The budget went from 1.1M to 1M for time: 1.1M
    took 9 min 20 s to 10 min 6 s alone, and the checkpoints at 1M and 1.1M scored alike (0.876 / 0.856
    at 0.05, seed 0).

    The update is what costs (rollouts run at ~6-12k agent-steps/s, the update at ~1.1-3.5k), so the
    defaults buy gradient steps cheaply: **one epoch of minibatches of 128** at lr 1e-3 annealed
    linearly to 0 (CleanRL's ``anneal_lr``). That is as many gradient steps per sample as the former 2
    epochs x 256, at half the update's compute: ~1.5x faster (alone on the AVX2 EPYC: 1,846-2,005
    agent-steps/s against 1,284), scoring as well or better at 1.1M. At vf_coef 0.5 (before the
    change above), 1.1M, 256 episodes:

    - 1 x 128, lr 1e-3: seeds 0-4 alone 0.796 / 0.766 / 0.884 / 0.779 / 0.765 (mean 0.798); seeds 1/2
      paired 0.802 / 0.768. At 1.2M, seed 0: 0.917 alone (10 min 38 s), 0.797 paired; at lr 7.5e-4,
      0.792 paired; seeds 1/2 paired with clip_range 0.1: 0.768 / 0.770, with n_steps 128: 0.752 /
      0.714. The spread between runs (~0.05, from seed and thread count) was larger than any
      difference between these settings.
    - 2 x 256, lr 7.5e-4 (the former default): seeds 0/1/2 0.777 (alone, 14 min 26 s) / 0.789 / 0.758
      (paired); at 750k (~10 min alone) 0.743 / 0.697 (seeds 0/1, paired); with lr 1e-3 at 750k
      0.815 / 0.740 (paired) / 0.739 (alone).

    Earlier, on a faster 2-core machine (~2,400 agent-steps/s for 2 x 256), oracle-normalised
    after ~10 minutes alone: 4 epochs x 512 at lr 5e-4: 0.605 ± 0.296 at 320k; 2 epochs x 512: 0.734
    at 1.1M; 1 epoch x 512 (a quarter of today's gradient steps): 0.59, flat from 1M to 1.5M; 2 x 256 at
    lr 7.5e-4: seeds 0-2 at 1M 0.803 / 0.750 / 0.697 (256 episodes, ent_coef 0.01). Smaller CNNs run
    faster but learn less per step ((16, 16, 16) at 2M: 0.760; with 2 x 256 on the AVX2 EPYC at equal
    time: (16, 16, 16) at 1.25M 0.754, (8, 16, 16) at 1.5M 0.673), so the architecture stays.

    ``ent_coef`` is 0.003 (was 0.01): it scores higher, likely because evaluation is deterministic and
    0.01 kept the policy more random than the task needs (not measured directly). With 2 x 256 at 1.1M
    on the AVX2 EPYC, seeds 0/1/2: 0.777 / 0.789 / 0.758 (mean 0.775) against 0.750 / 0.758 / 0.752
    (mean 0.753) at 0.01, better on every seed at the same cost.
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
        if self.learning_rate <= 0:
            raise ConfigError(f"ppo.learning_rate must be > 0, got {self.learning_rate}")
        if self.n_steps < 1 or self.batch_size < 2 or self.n_epochs < 1:
            raise ConfigError("ppo.n_steps and ppo.n_epochs must be >= 1 and ppo.batch_size >= 2")
        if not 0 < self.gamma <= 1 or not 0 <= self.gae_lambda <= 1:
            raise ConfigError(f"ppo.gamma must be in (0, 1] and ppo.gae_lambda in [0, 1], got {self.gamma}, {self.gae_lambda}")
        if self.clip_range <= 0:
            raise ConfigError(f"ppo.clip_range must be > 0, got {self.clip_range}")


@dataclass
class TrainConfig:
    """Everything one training run needs; written to ``runs/<name>/config.yaml``.

    ``log_explanations`` writes the final evaluation's episodes to the oversight log
    (``runs/<name>/eval/oversight/``: PGCA maps of every agent, every ``log_every``-th step).

    ``eval_episodes`` is 256: per-episode oracle-normalised returns have a std of ~0.25, so 32 episodes
    left a standard error of ~0.045 (the same checkpoint scored 0.700 on 32 and 0.795 on 256); 256 cost a
    few seconds and bring it to ~0.016.
    """

    seed: int = 0
    timesteps: int = 1_000_000
    device: str = "cpu"
    checkpoint_every: int = 100_000
    eval_episodes: int = 256
    log_explanations: bool = False
    log_every: int = 1
    env: EnvConfig = field(default_factory=EnvConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    defense: DefenseConfig = field(default_factory=DefenseConfig)

    def validate(self) -> None:
        if self.timesteps < 1:
            raise ConfigError(f"timesteps must be >= 1, got {self.timesteps}")
        if self.checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if self.log_every < 1:
            raise ConfigError(f"log_every must be >= 1 step, got {self.log_every}")
        if self.eval_episodes < 1:
            raise ConfigError(f"eval_episodes must be >= 1, got {self.eval_episodes}")
        if self.device not in ("cpu", "cuda", "auto") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device {self.device!r} is not one of cpu, cuda, cuda:N, auto")
