"""The one attribution interface of fgmf-marl (Captum's API shape).

Every explanation method is an :class:`Attribution`: built from a :class:`~fgmf_marl.policy.PolicyLike`
(``fgmf_marl.agents.policy_view.PolicyView`` in every command) and called as
``method.attribute(obs01, target=actions)``. Inputs are float images (B, C, H, W) in [0, 1], the
attacker's scale, for any batch of agents x envs at once; the output is one map (B, H, W) per sample,
non-negative and normalised to [0, 1] per sample unless a method documents otherwise, so that maps
of different methods are directly comparable by the metrics in :mod:`fgmf_marl.attribution.metrics`.

The *target score* is the logit (default) or the softmax probability of the target action. The logit
is the usual choice for gradient methods (it is not saturated by the other actions); the probability
answers "how much more likely did this region make the action", which some reviewers prefer.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from fgmf_marl.policy import PolicyLike, TargetLike, as_target, greedy

TargetKind = Literal["logit", "prob"]


def target_score(logits: Tensor, target: Tensor, kind: TargetKind) -> Tensor:
    """Score (B,) of the target action: its logit or its softmax probability."""
    if kind == "logit":
        return logits.gather(1, target[:, None]).squeeze(1)
    if kind == "prob":
        return torch.softmax(logits, dim=-1).gather(1, target[:, None]).squeeze(1)
    raise ValueError(f"target kind must be 'logit' or 'prob', got {kind!r}")


def normalise_maps(maps: Tensor, eps: float = 1e-12) -> Tensor:
    """Scale each non-negative map (B, ...) to [0, 1] by its maximum; an all-zero map stays zero.

    Dividing by the max (not min-max) keeps "no evidence" at 0, so a map that is flat because
    nothing matters is not stretched into noise.
    """
    flat = maps.flatten(1)
    peak = flat.amax(dim=1).clamp_min(eps)
    return (flat / peak[:, None]).reshape(maps.shape)


def upsample(maps: Tensor, size: tuple[int, int], mode: str = "bilinear") -> Tensor:
    """(B, h, w) -> (B, H, W)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    kwargs: dict[str, Any] = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(maps[:, None], size=size, mode=mode, **kwargs)[:, 0]


class Attribution(ABC):
    """Base class: ``attribute(inputs, target=...) -> (B, H, W)`` maps, Captum style."""

    def __init__(self, view: PolicyLike, target_kind: TargetKind = "logit") -> None:
        if target_kind not in ("logit", "prob"):
            raise ValueError(f"target_kind must be 'logit' or 'prob', got {target_kind!r}")
        self.view = view
        self.target_kind: TargetKind = target_kind

    def score(self, obs: Tensor, target: Tensor) -> Tensor:
        """Target score (B,) of ``obs`` under the policy."""
        return target_score(self.view(obs), target, self.target_kind)

    def resolve_target(self, obs: Tensor, target: TargetLike) -> Tensor:
        """Target actions (B,), range-checked where the model knows its ``n_actions``; ``None`` = greedy."""
        resolved = as_target(target, obs.shape[0], obs.device, getattr(self.view, "n_actions", None))
        return greedy(self.view, obs) if resolved is None else resolved

    @abstractmethod
    def attribute(self, inputs: Tensor, target: TargetLike = None) -> Tensor:
        """Maps (B, H, W) for float images ``inputs`` (B, C, H, W) and target actions (B,)."""

    def __call__(self, inputs: Tensor, target: TargetLike = None) -> Tensor:
        return self.attribute(inputs, target=target)
