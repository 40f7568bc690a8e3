"""Captum baselines behind the fgmf-marl attribution interface: Integrated Gradients and Occlusion.

Both are Captum's own implementations applied to the target score; only the reduction to one
non-negative (H, W) map per sample is ours, and it is the usual one for images:
- IG: |attribution| summed over channels (Sundararajan et al. 2017; sign is dropped because the
  localisation metrics compare where evidence is, not its direction), baseline = black image.
- Occlusion: positive part of the channel mean of Captum's sliding-window occlusion (window = one
  grid cell, stride = half a cell, zero baseline): where hiding the region lowers the score.
Both are divided by their per-sample max.
"""
from __future__ import annotations

from typing import Any

import torch
from captum.attr import IntegratedGradients, Occlusion
from torch import Tensor

from fgmf_marl.attribution.base import Attribution, TargetKind, normalise_maps, target_score
from fgmf_marl.policy import PolicyLike, TargetLike, check_obs


class _ScoreModule(torch.nn.Module):
    """Forward returning all target scores (B, n_actions) so Captum's ``target=`` indexes them."""

    def __init__(self, view: PolicyLike, kind: TargetKind) -> None:
        super().__init__()
        self.view, self.kind = view, kind

    def forward(self, x: Tensor) -> Tensor:
        logits = self.view(x)
        return logits if self.kind == "logit" else torch.softmax(logits, dim=-1)


class IntegratedGradientsMap(Attribution):
    def __init__(self, view: PolicyLike, n_steps: int = 32, target_kind: TargetKind = "logit",
                 internal_batch_size: int | None = 256) -> None:
        super().__init__(view, target_kind)
        self.n_steps, self.internal_batch_size = n_steps, internal_batch_size
        self.ig = IntegratedGradients(_ScoreModule(view, target_kind))

    def attribute(self, inputs: Tensor, target: TargetLike = None) -> Tensor:
        obs = check_obs(inputs, "attribution").detach()
        target = self.resolve_target(obs, target)
        attr = self.ig.attribute(obs, baselines=torch.zeros_like(obs), target=target, n_steps=self.n_steps,
                                 internal_batch_size=self.internal_batch_size)
        return normalise_maps(attr.abs().sum(dim=1).detach())


class OcclusionMap(Attribution):
    def __init__(self, view: PolicyLike, window: int = 6, stride: int = 3, target_kind: TargetKind = "logit",
                 perturbations_per_eval: int = 64) -> None:
        super().__init__(view, target_kind)
        self.window, self.stride, self.ppe = window, stride, perturbations_per_eval
        self.occlusion = Occlusion(_ScoreModule(view, target_kind))

    def attribute(self, inputs: Tensor, target: TargetLike = None) -> Tensor:
        obs = check_obs(inputs, "attribution").detach()
        target = self.resolve_target(obs, target)
        c = obs.shape[1]
        with torch.no_grad():
            attr = self.occlusion.attribute(obs, sliding_window_shapes=(c, self.window, self.window),
                                            strides=(c, self.stride, self.stride), baselines=0.0, target=target,
                                            perturbations_per_eval=self.ppe)
        return normalise_maps(torch.relu(attr.mean(dim=1)))


__all__ = ["IntegratedGradientsMap", "OcclusionMap", "target_score"]
