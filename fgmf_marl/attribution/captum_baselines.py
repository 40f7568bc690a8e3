"""Captum baselines behind the fgmf-marl attribution interface: Integrated Gradients, Occlusion,
GradientShap, SmoothGrad (``NoiseTunnel`` over ``Saliency``) and a random map (chance level).

Both are Captum's own implementations applied to the target score; only the reduction to one
non-negative (H, W) map per sample is ours, and it is the usual one for images:
- IG: |attribution| summed over channels (Sundararajan et al. 2017; sign is dropped because the
  localisation metrics compare where evidence is, not its direction), baseline = black image.
- Occlusion: positive part of the channel mean of Captum's sliding-window occlusion (window = one
  grid cell, stride = half a cell, zero baseline): where hiding the region lowers the score.
Both are divided by their per-sample max.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch
from captum.attr import GradientShap, IntegratedGradients, NoiseTunnel, Occlusion, Saliency
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




@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's and NumPy's global RNGs inside the block and restore both afterwards."""
    state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(state)


class GradientShapMap(Attribution):
    """Captum's ``GradientShap`` (Lundberg & Lee 2017): expected gradients x (input - baseline) over
    ``n_samples`` baselines drawn uniformly in [0, 1] (seeded) with input noise ``stdevs``; |.| summed
    over channels, divided by the max."""

    def __init__(self, view: PolicyLike, n_samples: int = 16, stdevs: float = 0.05, n_baselines: int = 8,
                 seed: int = 0, target_kind: TargetKind = "logit") -> None:
        super().__init__(view, target_kind)
        self.n_samples, self.stdevs, self.n_baselines, self.seed = n_samples, stdevs, n_baselines, seed
        self.gs = GradientShap(_ScoreModule(view, target_kind))

    def attribute(self, inputs: Tensor, target: TargetLike = None) -> Tensor:
        obs = check_obs(inputs, "attribution").detach()
        target = self.resolve_target(obs, target)
        gen = torch.Generator().manual_seed(self.seed)
        baselines = torch.rand((self.n_baselines, *obs.shape[1:]), generator=gen).to(obs.device)
        with _seeded(self.seed):   # Captum draws baselines, path points and noise from the global RNGs
            attr = self.gs.attribute(obs, baselines=baselines, target=target, n_samples=self.n_samples,
                                     stdevs=self.stdevs)
        return normalise_maps(attr.abs().sum(dim=1).detach())


class SmoothGradMap(Attribution):
    """SmoothGrad (Smilkov et al. 2017): Captum's ``NoiseTunnel`` over ``Saliency`` (|gradient|),
    ``nt_samples`` Gaussian copies with std ``stdevs``; summed over channels, divided by the max."""

    def __init__(self, view: PolicyLike, nt_samples: int = 16, stdevs: float = 0.1, seed: int = 0,
                 target_kind: TargetKind = "logit") -> None:
        super().__init__(view, target_kind)
        self.nt_samples, self.stdevs, self.seed = nt_samples, stdevs, seed
        self.nt = NoiseTunnel(Saliency(_ScoreModule(view, target_kind)))

    def attribute(self, inputs: Tensor, target: TargetLike = None) -> Tensor:
        obs = check_obs(inputs, "attribution").detach()
        target = self.resolve_target(obs, target)
        with _seeded(self.seed):
            attr = self.nt.attribute(obs, nt_type="smoothgrad", nt_samples=self.nt_samples, stdevs=self.stdevs,
                                     target=target, nt_samples_batch_size=self.nt_samples)
        return normalise_maps(attr.abs().sum(dim=1).detach())


class RandomMap(Attribution):
    """Chance level: i.i.d. uniform maps, seeded per call, ignoring the model."""

    def __init__(self, view: PolicyLike, seed: int = 0) -> None:
        super().__init__(view)
        self.seed = seed

    def attribute(self, inputs: Tensor, target: TargetLike = None) -> Tensor:
        obs = check_obs(inputs, "attribution")
        gen = torch.Generator().manual_seed(self.seed)
        return torch.rand(obs.shape[0], *obs.shape[-2:], generator=gen).to(obs.device)


__all__ = ["GradientShapMap", "IntegratedGradientsMap", "OcclusionMap", "RandomMap", "SmoothGradMap", "target_score"]
