"""``PolicyView``: the one way attacks, attributions, defenses and the audit call a policy.

SB3's ``ActorCriticPolicy.forward`` samples actions from uint8 observations. Everything in
fgmf-marl that differentiates through a policy instead wants *float images in [0, 1]* (the
attacker's scale, see DESIGN.md "threat model") mapped to action logits and values. This view
bypasses SB3's ``preprocess_obs`` (which only divides by 255) and calls the same modules, so a
view's logits on ``obs / 255`` equal the logits the trained policy acts on.
"""
from __future__ import annotations

from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.policies import ActorCriticPolicy
from torch import Tensor, nn

from agents.policies import ImageFeatures


class PolicyView(nn.Module):
    """Differentiable view of a discrete-action SB3 actor-critic with an ``ImageFeatures`` extractor.

    Inputs are (B, C, H, W) float tensors in [0, 1]; any batch of agents x envs at once.
    """

    def __init__(self, policy: ActorCriticPolicy) -> None:
        super().__init__()
        extractor = policy.pi_features_extractor
        if not isinstance(extractor, ImageFeatures):
            raise TypeError(f"PolicyView needs an ImageFeatures extractor, got {type(extractor).__name__}")
        self.policy = policy
        self.extractor: ImageFeatures = extractor

    @classmethod
    def from_model(cls, model: BaseAlgorithm) -> "PolicyView":
        return cls(model.policy)

    @property
    def gate(self) -> nn.Module:
        """The input gate in front of the backbone (identity, or an SGAM layer)."""
        return self.extractor.gate

    @property
    def n_actions(self) -> int:
        return int(self.policy.action_space.n)

    def spatial(self, obs: Tensor) -> Tensor:
        """Last spatial feature map (B, D, h, w): conv channels, or the ViT token grid."""
        return self.extractor.spatial(obs)

    def logits_from_spatial(self, fmap: Tensor) -> Tensor:
        latent_pi = self.policy.mlp_extractor.forward_actor(self.extractor.head(fmap))
        return self.policy.action_net(latent_pi)

    def forward(self, obs: Tensor) -> Tensor:
        """Action logits (B, n_actions)."""
        return self.logits_from_spatial(self.spatial(obs))

    def value(self, obs: Tensor) -> Tensor:
        """State value (B,)."""
        features = self.policy.vf_features_extractor(obs)
        return self.policy.value_net(self.policy.mlp_extractor.forward_critic(features)).squeeze(-1)

    def logits_and_value(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """Both heads from one pass through a shared extractor (the default in fgmf-marl)."""
        if self.policy.share_features_extractor:
            features = self.extractor(obs)
            latent_pi, latent_vf = self.policy.mlp_extractor(features)
            return self.policy.action_net(latent_pi), self.policy.value_net(latent_vf).squeeze(-1)
        return self.forward(obs), self.value(obs)
