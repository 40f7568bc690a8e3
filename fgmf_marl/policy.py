"""The bottom floor: how the framework sees a policy, and the tensor conventions it shares.

Attacks, attributions, defenses, the audit, the episode loop and the oversight log reach a trained
policy only through :class:`PolicyLike`, so the framework never imports the package that builds
networks (``agents``); ``fgmf_marl.agents.policy_view.PolicyView`` is the implementation every command uses.

Conventions shared by every floor above:

* observations are float tensors (B, C, H, W) in [0, 1], the attacker's scale (``check_obs``);
  a batch holds any number of envs x agents, slot = env * n_agents + agent;
* target actions are a long tensor (B,), given as an int, a sequence or an array (``as_target``);
* a perturbation of a whole step is a ``Perturb``: ``seen01 = perturb(clean01)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

TargetLike = Tensor | np.ndarray | Sequence[int] | int | None
Perturb = Callable[[Tensor], Tensor]


@runtime_checkable
class PolicyLike(Protocol):
    """A differentiable discrete-action actor-critic on float images in [0, 1].

    ``spatial`` / ``logits_from_spatial`` split the actor at its last spatial feature map (conv
    channels or a ViT token grid), which Grad-CAM++ and PGCA need; ``gate`` is the input gate in
    front of the backbone (``nn.Identity`` or a defense's masking layer such as SGAM); ``set_gate``
    replaces it, so that adaptive attacks (BPDA) and SGAM's teacher can swap it for the duration of a call.
    """

    @property
    def n_actions(self) -> int: ...

    @property
    def gate(self) -> nn.Module: ...

    def set_gate(self, module: nn.Module) -> None:
        """Put ``module`` in front of the backbone, for the actor and the critic alike."""
        ...

    def __call__(self, obs: Tensor) -> Tensor:
        """Action logits (B, n_actions)."""
        ...

    def value(self, obs: Tensor) -> Tensor:
        """State values (B,)."""
        ...

    def logits_and_value(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """Both heads, from one pass where the extractor is shared."""
        ...

    def spatial(self, obs: Tensor) -> Tensor:
        """The last spatial feature map (B, D, h, w) of the gated input."""
        ...

    def logits_of_ablations(self, ablations: "Ablations", clean: Tensor) -> Tensor:
        """Action logits (n, n_actions) of ``ablations.images()`` given ``clean`` = ``spatial(ablations.obs)``;
        an implementation may recompute only what each ablated region can reach (ablation-based explanations
        remove one small entity per copy). Equal to the full pass up to float summation order."""
        ...

    def logits_from_spatial(self, fmap: Tensor) -> Tensor:
        """Action logits (B, n_actions) from a feature map returned by :meth:`spatial`."""
        ...

    def actor_layers(self) -> list[tuple[str, nn.Module]]:
        """Parametrised modules on the actor path, input to output, named as in the policy: what the
        model-parameter randomisation test (``fgmf_marl.attribution.randomisation``) may re-initialise.

        A name ending in ``.params`` stands for the module's own parameters only (not its children's).
        """
        ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...

    def train(self, mode: bool = True) -> "PolicyLike": ...

    def eval(self) -> "PolicyLike": ...

    @property
    def training(self) -> bool: ...


@dataclass
class Ablations:
    """n ablated copies of a batch ``obs`` (B, C, H, W): copy i is ``obs[sample[i]]`` with the pixels where
    ``region[sample[i]] == label[i]`` replaced by ``baseline[sample[i]]``; ``region`` (B, H, W) labels
    pixels, ``box`` (n, 4) is the half-open bounding box (y0, y1, x0, x1) of copy i's replaced pixels.

    Described rather than materialised so that a policy can crop what it needs (``logits_of_ablations``);
    this is Captum's ``FeatureAblation`` with ``feature_mask = region`` and ``baselines = baseline``."""

    obs: Tensor
    baseline: Tensor
    region: Tensor
    label: Tensor
    sample: Tensor
    box: Tensor

    def images(self, index: Tensor | None = None) -> Tensor:
        """The ablated copies (n, C, H, W), or those at ``index``."""
        label, sample = (self.label, self.sample) if index is None else (self.label[index], self.sample[index])
        replaced = (self.region[sample] == label[:, None, None])[:, None]
        return torch.where(replaced, self.baseline[sample], self.obs[sample])


def check_obs(obs: Tensor, what: str = "policy") -> Tensor:
    """``obs`` itself if it is a float (B, C, H, W) tensor; a ValueError naming ``what`` otherwise."""
    if not isinstance(obs, Tensor) or obs.ndim != 4 or not obs.is_floating_point():
        desc = f"{type(obs).__name__} shape {tuple(obs.shape)}" if hasattr(obs, "shape") else type(obs).__name__
        raise ValueError(f"{what} inputs must be a float tensor (B, C, H, W) in [0, 1], got {desc}")
    return obs


def as_target(target: TargetLike, batch: int, device: torch.device | str = "cpu",
              n_actions: int | None = None) -> Tensor | None:
    """Target actions as a long tensor (B,) (a scalar is broadcast), None for None; range-checked.

    Checked here once for attacks and attributions alike, because an out-of-range action would
    otherwise fail deep inside ``gather`` with an index error that names nothing the user typed.
    """
    if target is None:
        return None
    t = (target if isinstance(target, Tensor) else torch.as_tensor(np.asarray(target))).to(device).long()
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"target must be an int or one action per sample, shape ({batch},), got shape {tuple(t.shape)}")
    if batch and (int(t.min()) < 0 or (n_actions is not None and int(t.max()) >= n_actions)):
        upper = n_actions - 1 if n_actions is not None else "n_actions - 1"
        raise ValueError(f"target actions must be in [0, {upper}], got {t.tolist()}")
    return t


def greedy(view: PolicyLike, obs: Tensor) -> Tensor:
    """The greedy actions (B,) of ``view`` on ``obs``, without building a graph."""
    with torch.no_grad():
        return view(obs).argmax(dim=-1)
