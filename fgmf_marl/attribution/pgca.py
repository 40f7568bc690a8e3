"""PGCA: perturbation-gradient consensus attribution (docs/DESIGN.md, "PGCA").

The paper (arXiv 2412.03884) gives no algorithm we could read, so this is our concrete reading:

1. P = :class:`~fgmf_marl.attribution.perturbation.PerturbationMap` (grid occlusion, zero + noise).
2. G = :class:`~fgmf_marl.attribution.gradcam.GradCAMPlusPlus` at the last spatial layer.
3. Consensus C = P^w * G^(1-w) (weighted geometric mean, w = 0.5): high only where both agree.
   Agreement (per sample, in [-1, 1]) = Spearman rank correlation of P and G averaged over the
   g x g grid cells (P is constant per cell, so pixel-level ranks would be mostly ties); also the
   top-k IoU of their most important cells, in [0, 1]. A low agreement tells the reviewer that the
   two paradigms disagree and the picture deserves less trust.
4. Gaussian smoothing of C (separable kernel, sigma in pixels, reflect padding).
5. Adaptive contrast: per-sample percentile stretch to [0, 1] (low / high percentiles), optional gamma.

Every stage is returned in :class:`PGCAResult`; all maps are (B, H, W) in [0, 1]. The only random
part is P's noise field, seeded by ``seed``, so PGCA is deterministic given the seed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fgmf_marl.attribution.base import Attribution, TargetKind, normalise_maps
from fgmf_marl.policy import PolicyLike, TargetLike, check_obs
from fgmf_marl.attribution.gradcam import GradCAMPlusPlus
from fgmf_marl.attribution.perturbation import PerturbationMap, cell_edges


@dataclass
class PGCAResult:
    """All PGCA stages for a batch; maps (B, H, W) in [0, 1], scores (B,)."""

    P: Tensor
    G: Tensor
    consensus: Tensor
    final: Tensor
    agreement: Tensor   # Spearman rank correlation of P and G over grid cells, in [-1, 1]
    topk_iou: Tensor    # IoU of the top-k cells of P and of G, in [0, 1]
    target: Tensor      # (B,) the explained actions

    def to(self, device: torch.device | str) -> "PGCAResult":
        return PGCAResult(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def gaussian_kernel1d(sigma: float, device: torch.device | str = "cpu") -> Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(maps: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (B, H, W) maps with reflect padding; sigma <= 0 is the identity."""
    if sigma <= 0:
        return maps
    k = gaussian_kernel1d(sigma, maps.device)
    r = k.numel() // 2
    x = maps[:, None]
    pad_h, pad_w = min(r, maps.shape[-2] - 1), min(r, maps.shape[-1] - 1)
    kh, kw = k[r - pad_h:r + pad_h + 1], k[r - pad_w:r + pad_w + 1]
    x = F.conv2d(F.pad(x, (pad_w, pad_w, 0, 0), mode="reflect"), (kw / kw.sum()).view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, pad_h, pad_h), mode="reflect"), (kh / kh.sum()).view(1, 1, -1, 1))
    return x[:, 0]


def percentile_stretch(maps: Tensor, low: float = 1.0, high: float = 99.0, gamma: float = 1.0) -> Tensor:
    """Per-sample stretch of [q_low, q_high] to [0, 1], clamped, then ``** gamma``; flat maps -> 0."""
    flat = maps.flatten(1)
    q = torch.quantile(flat, torch.tensor([low / 100, high / 100], device=maps.device, dtype=flat.dtype), dim=1)
    lo, hi = q[0][:, None], q[1][:, None]
    span = hi - lo
    out = torch.where(span > 1e-12, (flat - lo) / span.clamp_min(1e-12), torch.zeros_like(flat)).clamp(0, 1)
    if gamma != 1.0:
        out = out.pow(gamma)
    return out.reshape(maps.shape)


def cell_means(maps: Tensor, grid: int) -> Tensor:
    """(B, H, W) -> (B, g*g) means over the grid cells."""
    h, w = maps.shape[-2:]
    ys, xs = cell_edges(h, grid), cell_edges(w, grid)
    return torch.stack([maps[:, ys[i]:ys[i + 1], xs[j]:xs[j + 1]].mean(dim=(1, 2))
                        for i in range(grid) for j in range(grid)], dim=1)


def rankdata(x: Tensor) -> Tensor:
    """Average ranks along the last dim (ties share the mean rank), as scipy.stats.rankdata."""
    n = x.shape[-1]
    order = x.argsort(dim=-1, stable=True)
    sorted_x = x.gather(-1, order)
    ranks_sorted = torch.arange(1, n + 1, dtype=torch.float64, device=x.device).expand_as(sorted_x).clone()
    # average ranks within runs of equal values
    for row in range(x.shape[0]):
        vals = sorted_x[row]
        _, counts = torch.unique_consecutive(vals, return_counts=True)
        if (counts > 1).any():
            ends = counts.cumsum(0)
            starts = ends - counts
            ranks_sorted[row] = torch.repeat_interleave((starts + ends + 1).double() / 2, counts)
    ranks = torch.empty_like(ranks_sorted)
    ranks.scatter_(-1, order, ranks_sorted)
    return ranks


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation per row of (B, N) tensors; 0 where either row is constant."""
    ra, rb = rankdata(a.double()), rankdata(b.double())
    ra = ra - ra.mean(-1, keepdim=True)
    rb = rb - rb.mean(-1, keepdim=True)
    denom = (ra.norm(dim=-1) * rb.norm(dim=-1))
    return torch.where(denom > 0, (ra * rb).sum(-1) / denom.clamp_min(1e-300), torch.zeros_like(denom)).float()


def topk_iou(a: Tensor, b: Tensor, k: int) -> Tensor:
    """IoU of the index sets of the k largest entries per row of (B, N) tensors (ties broken by index)."""
    n = a.shape[-1]
    k = max(1, min(k, n))
    ma = torch.zeros_like(a, dtype=torch.bool).scatter_(-1, a.topk(k, dim=-1).indices, True)
    mb = torch.zeros_like(b, dtype=torch.bool).scatter_(-1, b.topk(k, dim=-1).indices, True)
    return (ma & mb).sum(-1).float() / (ma | mb).sum(-1).float()


class PGCA(Attribution):
    """Perturbation-gradient consensus attribution; ``attribute`` returns the final map (B, H, W).

    ``explain(obs, target)`` returns every stage as a :class:`PGCAResult`.
    """

    def __init__(self, view: PolicyLike, grid: int = 8, weight: float = 0.5, sigma: float = 1.5,
                 low_percentile: float = 1.0, high_percentile: float = 99.0, gamma: float = 1.0,
                 target_kind: TargetKind = "logit", topk_fraction: float = 0.25, seed: int = 0,
                 noise_std: float = 0.25, chunk_size: int = 1024) -> None:
        super().__init__(view, target_kind)
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"PGCA weight must be in [0, 1], got {weight}")
        if not 0.0 <= low_percentile < high_percentile <= 100.0:
            raise ValueError(f"PGCA percentiles must satisfy 0 <= low < high <= 100, got {low_percentile}, {high_percentile}")
        if gamma <= 0:
            raise ValueError(f"PGCA gamma must be > 0, got {gamma}")
        if not 0.0 < topk_fraction <= 1.0:
            raise ValueError(f"PGCA topk_fraction must be in (0, 1], got {topk_fraction}")
        self.perturbation = PerturbationMap(view, grid=grid, target_kind=target_kind, seed=seed,
                                            noise_std=noise_std, chunk_size=chunk_size)
        self.gradcam = GradCAMPlusPlus(view, target_kind=target_kind)
        self.grid, self.weight, self.sigma = grid, weight, sigma
        self.low, self.high, self.gamma, self.topk_fraction = low_percentile, high_percentile, gamma, topk_fraction

    def explain(self, inputs: Tensor, target: TargetLike = None) -> PGCAResult:
        obs = check_obs(inputs, "attribution").detach()
        target = self.resolve_target(obs, target)
        p = self.perturbation.attribute(obs, target)
        g = self.gradcam.attribute(obs, target)
        return self.from_parts(p, g, target)

    def from_parts(self, p: Tensor, g: Tensor, target: Tensor) -> PGCAResult:
        """Stages 3-5 from given P and G maps (also used by the naive reference composition)."""
        consensus = p.pow(self.weight) * g.pow(1.0 - self.weight)
        smoothed = normalise_maps(gaussian_blur(consensus, self.sigma))
        final = percentile_stretch(smoothed, self.low, self.high, self.gamma)
        pc, gc = cell_means(p, self.grid), cell_means(g, self.grid)
        k = max(1, round(self.topk_fraction * self.grid * self.grid))
        return PGCAResult(P=p, G=g, consensus=consensus, final=final, agreement=spearman(pc, gc),
                          topk_iou=topk_iou(pc, gc, k), target=target)

    def attribute(self, inputs: Tensor, target: TargetLike = None) -> Tensor:
        return self.explain(inputs, target).final
