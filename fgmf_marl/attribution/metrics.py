"""Explanation-quality metrics (docs/DESIGN.md, "Explanation quality"); reference versions: Quantus.

All take maps (B, H, W) (non-negative, as every fgmf-marl attribution returns) and give one value
per sample (B,); ``nan`` where a metric is undefined for a sample (empty ground-truth mask, all-zero
map), so callers average with ``nanmean`` and report how many samples counted.

Localisation, against the native env's ground-truth ``relevance_mask`` (own body, landmarks,
teammates; never distractors):
- relevance mass accuracy (Arras et al. 2022): share of the map's mass inside the mask.
- relevance rank accuracy (Arras et al. 2022): with K = |mask|, share of the K highest pixels inside.
- pointing game (Zhang et al. 2018): 1 if the map's maximum (first in raster order on ties) is inside.
Faithfulness (Petsiuk et al. 2018, RISE):
- deletion AUC: remove pixels (all channels set to ``baseline``) in decreasing map order in
  ``n_steps`` equal fractions; area under the target-probability curve over the removed fraction in
  [0, 1] (trapezoid). Lower is better.
- insertion AUC: start from the baseline image and insert pixels in the same order. Higher is better.
Robustness:
- max-sensitivity (Yeh et al. 2019): max over ``n_samples`` uniform perturbations in the L-inf ball of
  radius r of ||phi(x + d) - phi(x)||_F / ||phi(x)||_F, with the target action held fixed.
- map similarity of clean vs attacked observations: Spearman rank correlation and top-k IoU.
Sanity: the model-parameter randomisation test (Adebayo et al. 2018) is Quantus' own, in
:mod:`fgmf_marl.attribution.randomisation`; :func:`support_spearman` scores its maps on the entity pixels.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from fgmf_marl.attribution.base import Attribution, target_score
from fgmf_marl.attribution.pgca import spearman, topk_iou
from fgmf_marl.policy import PolicyLike, TargetLike, as_target


def _check(maps: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    maps = torch.as_tensor(maps).float()
    masks = torch.as_tensor(masks).bool()
    if maps.shape != masks.shape or maps.ndim != 3:
        raise ValueError(f"maps and masks must both be (B, H, W), got {tuple(maps.shape)} and {tuple(masks.shape)}")
    return maps.flatten(1), masks.flatten(1)


def relevance_mass_accuracy(maps: Tensor, masks: Tensor) -> Tensor:
    a, m = _check(maps, masks)
    total = a.sum(1)
    inside = (a * m).sum(1)
    valid = (total > 0) & m.any(1)
    return torch.where(valid, inside / total.clamp_min(1e-30), torch.full_like(total, float("nan")))


def relevance_rank_accuracy(maps: Tensor, masks: Tensor) -> Tensor:
    a, m = _check(maps, masks)
    out = torch.full((a.shape[0],), float("nan"))
    order = a.argsort(dim=1, descending=True, stable=True)
    for i in range(a.shape[0]):
        k = int(m[i].sum())
        if k and float(a[i].max()) > 0:
            out[i] = m[i, order[i, :k]].float().mean()
    return out


def pointing_game(maps: Tensor, masks: Tensor) -> Tensor:
    a, m = _check(maps, masks)
    hit = m.gather(1, a.argmax(dim=1, keepdim=True)).squeeze(1).float()
    return torch.where(m.any(1) & (a.amax(1) > 0), hit, torch.full_like(hit, float("nan")))


@torch.no_grad()
def deletion_insertion_curves(view: PolicyLike, obs: Tensor, maps: Tensor, target: TargetLike, *, n_steps: int = 16,
                              baseline: float = 0.0, mode: str = "deletion", kind: str = "prob",
                              chunk_size: int = 512) -> Tensor:
    """Target score curves (B, n_steps + 1) at removed/inserted fractions 0, 1/n, ..., 1."""
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    b, c, h, w = obs.shape
    target = as_target(target, b, obs.device)
    order = maps.flatten(1).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(h * w, device=obs.device).expand(b, -1).contiguous())
    counts = [round(s * h * w / n_steps) for s in range(n_steps + 1)]
    total = b * (n_steps + 1)
    scores = torch.empty(total, device=obs.device)
    base = torch.full_like(obs, baseline)
    for start in range(0, total, chunk_size):
        idx = torch.arange(start, min(start + chunk_size, total), device=obs.device)
        sample, step = idx // (n_steps + 1), idx % (n_steps + 1)
        k = torch.tensor(counts, device=obs.device)[step]
        chosen = (rank[sample] < k[:, None]).reshape(-1, 1, h, w)   # top-k pixels of each sample
        if mode == "deletion":
            x = torch.where(chosen, base[sample], obs[sample])
        else:
            x = torch.where(chosen, obs[sample], base[sample])
        scores[idx] = target_score(view(x), target[sample], kind)
    return scores.reshape(b, n_steps + 1)


def auc(curves: Tensor) -> Tensor:
    """Trapezoid area under curves sampled at equal steps over [0, 1]."""
    n = curves.shape[1] - 1
    return (curves[:, 1:] + curves[:, :-1]).sum(1) / (2 * n)


def deletion_auc(view: PolicyLike, obs: Tensor, maps: Tensor, target: TargetLike, **kwargs: Any) -> Tensor:
    return auc(deletion_insertion_curves(view, obs, maps, target, mode="deletion", **kwargs))


def insertion_auc(view: PolicyLike, obs: Tensor, maps: Tensor, target: TargetLike, **kwargs: Any) -> Tensor:
    return auc(deletion_insertion_curves(view, obs, maps, target, mode="insertion", **kwargs))


def max_sensitivity(method: Attribution | Callable[..., Tensor], obs: Tensor, target: TargetLike, *,
                    radius: float = 8 / 255, n_samples: int = 8, seed: int = 0) -> Tensor:
    """Yeh et al. (2019) max-sensitivity with uniform noise in the L-inf ball, clamped to [0, 1]."""
    attribute = method.attribute if hasattr(method, "attribute") else method
    b = obs.shape[0]
    target = as_target(target, b, obs.device)
    ref = attribute(obs, target=target).flatten(1)
    norm = ref.norm(dim=1)
    gen = torch.Generator().manual_seed(seed)
    worst = torch.zeros(b)
    for _ in range(n_samples):
        noise = (torch.rand(obs.shape, generator=gen) * 2 - 1).to(obs.device) * radius
        other = attribute((obs + noise).clamp(0, 1), target=target).flatten(1)
        worst = torch.maximum(worst, ((other - ref).norm(dim=1) / norm.clamp_min(1e-12)).cpu())
    return torch.where(norm.cpu() > 0, worst, torch.full_like(worst, float("nan")))


def map_similarity(a: Tensor, b: Tensor, top_fraction: float = 0.1) -> dict[str, Tensor]:
    """Spearman rank correlation and top-k IoU (k = ``top_fraction`` of the pixels) per sample."""
    fa, fb = torch.as_tensor(a).float().flatten(1), torch.as_tensor(b).float().flatten(1)
    k = max(1, round(top_fraction * fa.shape[1]))
    return {"spearman": spearman(fa, fb), "topk_iou": topk_iou(fa, fb, k)}


def support_spearman(a: Tensor, b: Tensor, support: Tensor) -> Tensor:
    """Spearman rank correlation of (B, H, W) maps ``a`` and ``b`` over each sample's ``support`` pixels only.

    Why: a method whose map is zero off a model-free support (PGCA's segments) shares that support with
    every model, so the full-map Spearman measures the support, not the model; inside it the ranking is
    what the model decides. nan where a sample's support has fewer than 2 pixels or either map is constant on
    it (no ranking to compare: a model-free mask that is flat on its support must not read as "uncorrelated";
    scipy and Quantus give nan there too).
    """
    fa, fb = torch.as_tensor(a).float().flatten(1), torch.as_tensor(b).float().flatten(1)
    sup = torch.as_tensor(support).bool().flatten(1)
    if fa.shape != fb.shape or fa.shape != sup.shape:
        raise ValueError(f"maps and support must share a shape, got {tuple(a.shape)}, {tuple(b.shape)}, {tuple(support.shape)}")
    out = torch.full((fa.shape[0],), float("nan"))
    for i in range(fa.shape[0]):
        va, vb = fa[i, sup[i]], fb[i, sup[i]]
        if va.numel() >= 2 and bool(va.amax() > va.amin()) and bool(vb.amax() > vb.amin()):
            out[i] = spearman(va[None], vb[None])[0]
    return out
