"""PGCA: perturbation-gradient consensus attribution (docs/DESIGN.md, "PGCA").

The paper (arXiv 2412.03884) gives no algorithm we could read, so this is our concrete reading,
tuned for the regime of this project (2-4 px entities in a 48 x 48 egocentric view; each choice was
measured on held-out tuning episodes; the figures: docs/experiments/explanations.md):

1. P, perturbation at the entities' scale (``perturbation="segments"``, default): the large flat
   colour regions (floor, wall) are the canvas; each connected non-flat segment (an entity) is
   painted with the flat colour around it and P = the ReLU'd drop of the target score, on the
   segment's exact pixels (:class:`~fgmf_marl.attribution.perturbation.SegmentPerturbation`).
   *Why*: the 8 x 8 grid's 6 x 6 px cells smeared every entity over its cell and neighbours (P's
   relevance mass was chance level); segments are exact and cost ~7 forwards per agent, not 128.
   ``perturbation="grid"`` is the old grid occlusion (zero + noise, ``PerturbationMap``).
2. G, a pixel-level gradient term (``gradient="input_abs"``, default):
   ``|sum_c dS/dx_c (x_c - baseline_c)|`` with ``baseline`` the image with every segment removed
   (gradient x (input - baseline), the first-order estimate of the same counterfactual; 0 on the
   canvas). *Why*: Grad-CAM++ at the last conv map is 12 x 12 (4 px per cell) and blurs exactly what
   must be resolved; the pixel gradient is sharp and comes from the same backward pass.
   ``"input"`` keeps the positive part only (ranked pixels worse on the tuning seeds);
   ``"gradcam++"`` is the old G.
3. Consensus of P and G (``consensus``): ``"gated"`` (default) C = P * G / max_unit(G) on the pixels of
   units with P > 0, and ``fill`` * G (0.1) on the pixels P leaves at 0: each entity keeps P's value at its
   most gradient-salient pixel and G ranks the pixels inside it, so the entities' order is P's and the
   mass inside an entity moves to where the gradient says the policy looks; entities whose removal does
   not lower the score (P = 0, e.g. a teammate that raises it) are still ranked, below, by G.
   ``"arithmetic"`` w P + (1-w) G (w = 0.75) or ``"geometric"`` P^w G^(1-w).
   *Why gated*: the arithmetic mean can only average the two masses, so it lost to P on relevance mass
   (claim (a) of issue 20); gating G by P's units cannot spread mass onto entities P found irrelevant
   (docs/experiments/explanations.md, "PGCA gated by P's units").
   Agreement (per sample, in [-1, 1]) = Spearman rank correlation of P and G averaged over the
   g x g grid cells; also the top-k IoU of their most important cells, in [0, 1]. A low agreement
   tells the reviewer that the two paradigms disagree and the picture deserves less trust.
4. Gaussian smoothing of C (separable kernel, sigma in pixels, reflect padding); default sigma 0,
   since any blur at this scale spreads mass from 4 px entities onto the background.
5. Contrast (:func:`rank_preserving_stretch`): values above the ``low_percentile`` quantile are
   stretched linearly onto [delta, 1] and those below are compressed into [0, delta], then
   ``** gamma``. Why: a clipping stretch ties the top pixels (the pointing game then takes the first
   in raster order); this map is strictly increasing, so the final map ranks pixels exactly as the
   consensus does.

Every stage is returned in :class:`PGCAResult`; all maps are (B, H, W) in [0, 1]. The segment P and
the gradient G are deterministic; only the grid P's noise field is random, seeded by ``seed``.

Cost: one forward + backward on the clean batch gives the target scores (shared with P) and G
(the input gradient, or Grad-CAM++'s feature-map gradient for ``gradient="gradcam++"``); P adds one
forward per segment, in ``chunk_size`` batches under inference mode, through the view's ``logits_of_ablations``
with the clean map of that pass: a CNN recomputes only each segment's receptive field.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fgmf_marl.attribution.base import Attribution, TargetKind, normalise_maps, target_score, upsample
from fgmf_marl.attribution.gradcam import GradCAMPlusPlus, gradcam_pp_weights
from fgmf_marl.attribution.perturbation import PerturbationMap, SegmentPerturbation, background_colour, cell_edges
from fgmf_marl.policy import PolicyLike, TargetLike, check_obs


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
    evidence: Tensor    # (B,) the largest drop of the target score one segment's removal causes (NaN for grid P)

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


def rank_preserving_stretch(maps: Tensor, low: float = 0.0, gamma: float = 1.0, delta: float = 0.05) -> Tensor:
    """Strictly increasing contrast stretch of non-negative maps (B, H, W) to [0, 1], 0 kept at 0.

    With ``lo`` the ``low`` percentile and ``hi`` the maximum of each sample: values in [lo, hi] map
    linearly onto [delta, 1], values in [0, lo) onto [0, delta); then ``** gamma``. Order (and so
    every rank-based metric and the argmax) is that of the input; an all-zero map stays zero.
    """
    flat = maps.flatten(1)
    hi = flat.amax(1, keepdim=True)
    out = flat / hi.clamp_min(1e-12)                                   # the map where lo <= 0 (always when low is 0)
    if low > 0:
        lo = torch.minimum(torch.quantile(flat, low / 100, dim=1, keepdim=True), hi)
        upper = delta + (1 - delta) * (flat - lo) / (hi - lo).clamp_min(1e-12)
        lower = delta * flat / lo.clamp_min(1e-12)
        out = torch.where(lo <= 0, out, torch.where(flat >= lo, upper, lower))
    out = torch.where(hi > 0, out, torch.zeros_like(out)).clamp(0, 1)
    if gamma != 1.0:
        out = out.pow(gamma)
    return out.reshape(maps.shape)


def cell_means(maps: Tensor, grid: int) -> Tensor:
    """(B, H, W) -> (B, g*g) means over the grid cells (row-major)."""
    h, w = maps.shape[-2:]
    if h % grid == 0 and w % grid == 0:   # equal cells: one pooling call
        return F.avg_pool2d(maps[:, None], (h // grid, w // grid))[:, 0].flatten(1)
    ys, xs = cell_edges(h, grid), cell_edges(w, grid)
    return torch.stack([maps[:, ys[i]:ys[i + 1], xs[j]:xs[j + 1]].mean(dim=(1, 2))
                        for i in range(grid) for j in range(grid)], dim=1)


def rankdata(x: Tensor) -> Tensor:
    """Average ranks (1..N) along the last dim of (B, N), ties sharing their mean rank, as
    ``scipy.stats.rankdata(method="average")``.

    One sort per row, then each run of equal sorted values gets the mean of its positions: O(N log N),
    so ranking a whole 84 x 84 map is cheap (the pairwise count it replaces was O(N^2) and spent 95 % of a
    pistonball explanation study ranking maps).
    """
    x = x.double()
    values, order = x.sort(dim=-1, stable=True)
    starts = torch.ones_like(values, dtype=torch.bool)
    starts[..., 1:] = values[..., 1:] != values[..., :-1]
    run = starts.cumsum(-1) - 1                                                   # run index of each sorted entry
    position = torch.arange(1, x.shape[-1] + 1, dtype=x.dtype, device=x.device).expand_as(x)
    total = torch.zeros_like(x).scatter_add_(-1, run, position)
    count = torch.zeros_like(x).scatter_add_(-1, run, torch.ones_like(x))
    mean_rank = (total / count.clamp_min(1)).gather(-1, run)
    return torch.empty_like(x).scatter_(-1, order, mean_rank)


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


def gated_consensus(p: Tensor, g: Tensor, unit: Tensor, fill: float) -> Tensor:
    """C = P * G / max_unit(G) where P > 0, ``fill`` * G where P = 0 (module docstring, stage 3); ``unit`` numbers
    the units of the whole batch (-1 off units), as :class:`~fgmf_marl.attribution.perturbation.Segments` does,
    and max_unit(G) is 0 off units.

    Only the units' pixels and those where P > 0 are gathered (a few percent of an image); every pixel's value
    is the same expression as a dense evaluation's. Why: the dense form was a dozen passes over every pixel of
    every logged image."""
    out = (fill * g).contiguous()
    flat_u, flat_g, flat_p = unit.flatten(), g.flatten(), p.flatten()
    on = (flat_u >= 0).nonzero()[:, 0]
    units = flat_u[on]
    n = int(units.max()) + 1 if units.numel() else 0
    peak = torch.zeros(n, dtype=g.dtype, device=g.device).scatter_reduce(0, units, flat_g[on], "amax", include_self=False)
    gated = (flat_p > 0).nonzero()[:, 0]
    u, g_gated = flat_u[gated], flat_g[gated]
    zero = torch.zeros((), dtype=g.dtype, device=g.device)
    peak_gated = torch.where(u >= 0, peak[u.clamp_min(0)] if n else zero, zero)
    within = torch.where(peak_gated > 0, g_gated / peak_gated.clamp_min(1e-12), zero)
    out.view(-1)[gated] = flat_p[gated] * within
    return out


PERTURBATIONS = ("segments", "grid")
GRADIENTS = ("input", "input_abs", "gradcam++")
CONSENSUS = ("gated", "arithmetic", "geometric")


class PGCA(Attribution):
    """Perturbation-gradient consensus attribution; ``attribute`` returns the final map (B, H, W).

    ``explain(obs, target)`` returns every stage as a :class:`PGCAResult`. Defaults are the variant
    kept in issue 20 (module docstring; docs/DESIGN.md, "PGCA"). ``grid`` is the grid of the
    agreement statistics and of the large-segment split (and of P itself with ``perturbation="grid"``).
    """

    def __init__(self, view: PolicyLike, grid: int = 8, weight: float = 0.75, sigma: float = 0.0,
                 low_percentile: float = 0.0, gamma: float = 1.0,
                 target_kind: TargetKind = "logit", topk_fraction: float = 0.25, seed: int = 0,
                 noise_std: float = 0.25, chunk_size: int = 1024, perturbation: str = "segments",
                 gradient: str = "input_abs", consensus: str = "gated", fill: float = 0.1,
                 tol: float = 12 / 255) -> None:
        super().__init__(view, target_kind)
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"PGCA weight must be in [0, 1], got {weight}")
        if not 0.0 <= fill <= 1.0:
            raise ValueError(f"PGCA fill must be in [0, 1], got {fill}")
        if not 0.0 <= low_percentile < 100.0:
            raise ValueError(f"PGCA low_percentile must be in [0, 100), got {low_percentile}")
        if gamma <= 0:
            raise ValueError(f"PGCA gamma must be > 0, got {gamma}")
        if not 0.0 < topk_fraction <= 1.0:
            raise ValueError(f"PGCA topk_fraction must be in (0, 1], got {topk_fraction}")
        for name, value, allowed in (("perturbation", perturbation, PERTURBATIONS), ("gradient", gradient, GRADIENTS),
                                     ("consensus", consensus, CONSENSUS)):
            if value not in allowed:
                raise ValueError(f"PGCA {name} must be one of {allowed}, got {value!r}")
        if consensus == "gated" and perturbation != "segments":
            raise ValueError(f"PGCA consensus 'gated' needs perturbation 'segments' (its units), got {perturbation!r}")
        self.perturbation = PerturbationMap(view, grid=grid, target_kind=target_kind, seed=seed,
                                            noise_std=noise_std, chunk_size=chunk_size)
        self.segments = SegmentPerturbation(view, target_kind=target_kind, tol=tol, grid=grid, chunk_size=chunk_size)
        self.gradcam = GradCAMPlusPlus(view, target_kind=target_kind)
        self.grid, self.weight, self.fill, self.sigma = grid, weight, fill, sigma
        self.low, self.gamma, self.topk_fraction = low_percentile, gamma, topk_fraction
        self.p_kind, self.g_kind, self.consensus_kind = perturbation, gradient, consensus

    def settings(self) -> dict[str, Any]:
        """What an oversight log records about the PGCA that explained it."""
        return {"grid": self.grid, "weight": self.weight, "sigma": self.sigma, "target_kind": self.target_kind,
                "seed": self.perturbation.seed, "perturbation": self.p_kind, "gradient": self.g_kind,
                "consensus": self.consensus_kind, "fill": self.fill, "low_percentile": self.low, "gamma": self.gamma}

    def gradient_maps(self, obs: Tensor, target: Tensor, baseline: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One forward + backward: (target scores (B,), the un-normalised G map (B, H, W) of ``gradient``,
        the clean ``spatial`` map (B, D, h, w), which P's ablations reuse).

        ``input``/``input_abs``: relu / |sum_c dS/dx_c (x - baseline)_c|; ``gradcam++``: the Grad-CAM++ map of
        the same backward pass, upsampled. Only the map the variant uses is computed (its cost is per step)."""
        with torch.enable_grad():
            x = obs.detach().clone().requires_grad_(True)
            fmap = self.view.spatial(x)
            score = target_score(self.view.logits_from_spatial(fmap), target, self.target_kind)
            if self.g_kind == "gradcam++":
                (gfmap,) = torch.autograd.grad(score.sum(), [fmap])
            else:
                (gx,) = torch.autograd.grad(score.sum(), [x])
        with torch.no_grad():
            if self.g_kind == "gradcam++":
                cam = torch.relu((gradcam_pp_weights(fmap.detach(), gfmap)[:, :, None, None] * fmap.detach()).sum(1))
                g_map = torch.relu(upsample(cam, tuple(obs.shape[-2:]), self.gradcam.upsample_mode))
            else:
                lin = (gx * (obs - baseline)).sum(1)
                g_map = lin.abs() if self.g_kind == "input_abs" else torch.relu(lin)
            return score.detach(), g_map, fmap.detach()

    def explain(self, inputs: Tensor, target: TargetLike = None) -> PGCAResult:
        obs = check_obs(inputs, "attribution").detach()
        target = self.resolve_target(obs, target)
        seg = self.segments.segments(obs) if self.p_kind == "segments" else None
        baseline = seg.baseline if seg is not None else background_colour(obs)[:, :, None, None].expand_as(obs)
        score, g_map, clean_spatial = self.gradient_maps(obs, target, baseline)
        if seg is not None:
            drops, _ = self.segments.drops(obs, target, base_score=score, segments=seg, clean_spatial=clean_spatial)
            evidence = torch.relu(drops).flatten(1).amax(dim=1)
            p = normalise_maps(torch.relu(drops))
        else:
            p = self.perturbation.attribute(obs, target)
            evidence = torch.full((obs.shape[0],), math.nan)
        g = normalise_maps(g_map)
        return self.from_parts(p, g, target, evidence, unit=seg.unit if seg is not None else None)

    def from_parts(self, p: Tensor, g: Tensor, target: Tensor, evidence: Tensor | None = None,
                   unit: Tensor | None = None) -> PGCAResult:
        """Stages 3-5 from given P and G maps (also used by the naive reference composition); ``unit``
        (B, H, W), P's units as ``Segments.unit`` numbers them (-1 off units), is what ``gated`` needs."""
        if self.consensus_kind == "gated":
            if unit is None:
                raise ValueError("PGCA consensus 'gated' needs P's units (unit=...)")
            consensus = gated_consensus(p, g, unit, self.fill)
        elif self.consensus_kind == "geometric":
            consensus = p.pow(self.weight) * g.pow(1.0 - self.weight)
        else:
            consensus = self.weight * p + (1.0 - self.weight) * g
        smoothed = normalise_maps(gaussian_blur(consensus, self.sigma))
        final = rank_preserving_stretch(smoothed, self.low, self.gamma)
        pc, gc = cell_means(p, self.grid), cell_means(g, self.grid)
        k = max(1, round(self.topk_fraction * self.grid * self.grid))
        if evidence is None:
            evidence = torch.full((p.shape[0],), math.nan)
        return PGCAResult(P=p, G=g, consensus=consensus, final=final, agreement=spearman(pc, gc),
                          topk_iou=topk_iou(pc, gc, k), target=target, evidence=evidence)

    def attribute(self, inputs: Tensor, target: TargetLike = None) -> Tensor:
        return self.explain(inputs, target).final


class PGCAStage(Attribution):
    """One stage of a PGCA (``"P"``, ``"G"``, ``"consensus"`` or ``"final"``) as an attribution method,
    so that the study scores PGCA's own parts exactly as PGCA computes them."""

    def __init__(self, view: PolicyLike, stage: str = "P", **pgca_kwargs: Any) -> None:
        if stage not in ("P", "G", "consensus", "final"):
            raise ValueError(f"PGCA stage must be P, G, consensus or final, got {stage!r}")
        self.pgca = PGCA(view, **pgca_kwargs)
        super().__init__(view, self.pgca.target_kind)
        self.stage = stage

    def attribute(self, inputs: Tensor, target: TargetLike = None) -> Tensor:
        return normalise_maps(getattr(self.pgca.explain(inputs, target), self.stage))
