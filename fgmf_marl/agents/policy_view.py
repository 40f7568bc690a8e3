"""``PolicyView``: the :class:`~fgmf_marl.policy.PolicyLike` of an SB3 actor-critic with our extractor.

SB3's ``ActorCriticPolicy.forward`` samples actions from uint8 observations. Everything in
fgmf-marl that differentiates through a policy instead wants *float images in [0, 1]* (the
attacker's scale, see docs/DESIGN.md, "Threat model") mapped to action logits and values. This view
bypasses SB3's ``preprocess_obs`` (which only divides by 255) and calls the same modules, so a
view's logits on ``obs / 255`` equal the logits the trained policy acts on.
"""
from __future__ import annotations

from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.policies import ActorCriticPolicy
from torch import Tensor, nn

from fgmf_marl.agents.policies import ImageFeatures, image_extractors
from fgmf_marl.policy import Ablations


class PolicyView(nn.Module):
    """Differentiable view of a discrete-action SB3 actor-critic with an ``ImageFeatures`` extractor.

    Inputs are (B, C, H, W) float tensors in [0, 1]; any batch of agents x envs at once.
    """

    def __init__(self, policy: ActorCriticPolicy) -> None:
        super().__init__()
        extractor = getattr(policy, "pi_features_extractor", None)
        if not isinstance(extractor, ImageFeatures):
            raise TypeError(f"PolicyView needs a policy with an ImageFeatures extractor, got {type(policy).__name__}")
        self.policy = policy
        self.extractor: ImageFeatures = extractor

    @classmethod
    def from_model(cls, model: BaseAlgorithm) -> "PolicyView":
        return cls(model.policy)

    @property
    def gate(self) -> nn.Module:
        """The input gate in front of the backbone (identity, or an SGAM layer)."""
        return self.extractor.gate

    def set_gate(self, module: nn.Module) -> None:
        """Install ``module`` in front of every ``ImageFeatures`` of the policy (actor's and critic's alike)."""
        for extractor in image_extractors(self.policy):
            extractor.gate = module

    @property
    def n_actions(self) -> int:
        return int(self.policy.action_space.n)

    def spatial(self, obs: Tensor) -> Tensor:
        """Last spatial feature map (B, D, h, w): conv channels, or the ViT token grid."""
        return self.extractor.spatial(obs)

    def logits_of_ablations(self, ablations: Ablations, clean: Tensor) -> Tensor:
        """Action logits (n, n_actions) of the ablated copies (:class:`~fgmf_marl.policy.Ablations`) given
        ``clean`` = ``spatial(ablations.obs)``: only each ablation's receptive field is recomputed when the
        backbone knows its locality (the CNN) and the gate is the identity; otherwise the full pass."""
        local = getattr(self.extractor.backbone, "features_of_ablations", None)
        if local is None or not isinstance(self.gate, nn.Identity):
            return self(ablations.images())
        return self.logits_from_features(local(ablations, clean))

    def logits_from_spatial(self, fmap: Tensor) -> Tensor:
        return self.logits_from_features(self.extractor.head(fmap))

    def logits_from_features(self, features: Tensor) -> Tensor:
        return self.policy.action_net(self.policy.mlp_extractor.forward_actor(features))

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

    def actor_layers(self) -> list[tuple[str, nn.Module]]:
        """Parametrised modules on the actor path, input to output: each backbone layer, the head, the actor MLP,
        the action layer (the gate and the critic are off the path); a ViT's learned positions as ``backbone.params``."""
        backbone = self.extractor.backbone
        layers: list[tuple[str, nn.Module]] = []
        for name, child in backbone.named_children():
            if name == "fc":
                continue
            if isinstance(child, nn.Sequential):
                layers += [(f"backbone.{name}.{n}", m) for n, m in child.named_children() if any(True for _ in m.parameters())]
            elif any(True for _ in child.parameters()):
                layers.append((f"backbone.{name}", child))
        if any(isinstance(v, nn.Parameter) for v in backbone._parameters.values()):
            layers.insert(1 if layers else 0, ("backbone.params", backbone))
        layers.append(("backbone.fc", backbone.fc))
        if any(True for _ in self.policy.mlp_extractor.policy_net.parameters()):
            layers.append(("mlp_extractor.policy_net", self.policy.mlp_extractor.policy_net))
        layers.append(("action_net", self.policy.action_net))
        return layers
