"""Perturbation map P: grid occlusion with zero and Gaussian-noise replacement, fully batched.

The image is cut into a g x g grid (default 8 x 8; cell edges at ``round(i * H / g)`` so any size
works). Each cell is (a) set to zero and (b) replaced by Gaussian noise; the importance of a cell is
the drop of the target score, ``s(x) - s(x_perturbed)``, averaged over the two replacements, then
ReLU, upsampled (each pixel takes its cell's value) and divided by the max.

Speed: all ``2 g^2`` perturbed copies of every sample plus the originals go through the policy as
one batch, so one call explains every agent of a step (B = envs x agents) with
``ceil(B (2 g^2 + 1) / chunk_size)`` forward passes. ``chunk_size`` bounds memory.

Noise: one field ``clamp(noise_mean + noise_std * N(0, 1), 0, 1)`` of shape (C, H, W) is drawn per
call from a generator seeded with ``seed``; every cell of every sample takes its patch from the same
field. This makes the map deterministic given the seed and lets agents of one step be compared
(each sees the same replacement), and it is exactly Captum's ``Occlusion`` with that field as the
baseline, which the tests check.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from fgmf_marl.attribution.base import Attribution, TargetKind, normalise_maps, target_score
from fgmf_marl.policy import Ablations, PolicyLike, TargetLike, check_obs


def cell_edges(size: int, grid: int) -> list[int]:
    return [round(i * size / grid) for i in range(grid + 1)]


def cell_masks(height: int, width: int, grid: int, device: torch.device | str = "cpu") -> Tensor:
    """(g*g, H, W) float masks, 1 inside the cell; cells in row-major order."""
    ys, xs = cell_edges(height, grid), cell_edges(width, grid)
    masks = torch.zeros(grid * grid, height, width, device=device)
    for i in range(grid):
        for j in range(grid):
            masks[i * grid + j, ys[i]:ys[i + 1], xs[j]:xs[j + 1]] = 1.0
    return masks


def cells_to_pixels(cells: Tensor, height: int, width: int) -> Tensor:
    """(B, g, g) cell values -> (B, H, W), each pixel taking its cell's value."""
    grid = cells.shape[-1]
    ys, xs = cell_edges(height, grid), cell_edges(width, grid)
    row = torch.tensor([i for i in range(grid) for _ in range(ys[i + 1] - ys[i])], device=cells.device)
    col = torch.tensor([j for j in range(grid) for _ in range(xs[j + 1] - xs[j])], device=cells.device)
    return cells[:, row][:, :, col]


@dataclass
class PerturbationParts:
    """Raw score drops per cell, before ReLU / normalisation."""

    drop_zero: Tensor    # (B, g, g)
    drop_noise: Tensor   # (B, g, g)
    base_score: Tensor   # (B,)


class PerturbationMap(Attribution):
    """Grid-occlusion map P (see the module docstring); ``attribute`` returns (B, H, W) in [0, 1]."""

    def __init__(self, view: PolicyLike, grid: int = 8, target_kind: TargetKind = "logit", noise_std: float = 0.25,
                 noise_mean: float = 0.5, seed: int = 0, chunk_size: int = 1024,
                 strategies: tuple[str, ...] = ("zero", "noise")) -> None:
        super().__init__(view, target_kind)
        if grid < 1:
            raise ValueError(f"grid must be >= 1 cell per side, got {grid}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if not strategies or set(strategies) - {"zero", "noise"}:
            raise ValueError(f"strategies must be a non-empty subset of ('zero', 'noise'), got {strategies}")
        self.grid, self.noise_std, self.noise_mean = grid, noise_std, noise_mean
        self.seed, self.chunk_size, self.strategies = seed, chunk_size, tuple(strategies)

    def noise_field(self, shape: tuple[int, int, int], device: torch.device | str = "cpu") -> Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        field = self.noise_mean + self.noise_std * torch.randn(shape, generator=gen)
        return field.clamp_(0.0, 1.0).to(device)

    @torch.no_grad()
    def parts(self, inputs: Tensor, target: TargetLike = None) -> PerturbationParts:
        """Score drops for every cell, both replacements, all samples, in ``chunk_size`` batches."""
        obs = check_obs(inputs, "attribution").detach()
        target = self.resolve_target(obs, target)
        b, c, h, w = obs.shape
        g2 = self.grid * self.grid
        masks = cell_masks(h, w, self.grid, obs.device)[:, None]          # (g2, 1, H, W)
        noise = self.noise_field((c, h, w), obs.device)
        per_sample = 2 * g2                                               # index = kind * g2 + cell
        total = b + b * per_sample                                        # originals first
        scores = torch.empty(total, device=obs.device)
        for start in range(0, total, self.chunk_size):
            idx = torch.arange(start, min(start + self.chunk_size, total), device=obs.device)
            is_orig = idx < b
            pidx = (idx - b).clamp_min(0)
            sample = torch.where(is_orig, idx, pidx // per_sample)
            kind = (pidx % per_sample) // g2
            cell = pidx % g2
            m = masks[cell] * (~is_orig)[:, None, None, None]             # (n, 1, H, W), 0 for originals
            x = obs[sample]
            batch = x * (1 - m) + (kind == 1)[:, None, None, None] * m * noise
            scores[idx] = target_score(self.view(batch), target[sample], self.target_kind)
        base = scores[:b]
        perturbed = scores[b:].reshape(b, 2, self.grid, self.grid)
        drops = base[:, None, None, None] - perturbed
        return PerturbationParts(drop_zero=drops[:, 0], drop_noise=drops[:, 1], base_score=base)

    def combine(self, parts: PerturbationParts, size: tuple[int, int]) -> Tensor:
        """Average of the chosen strategies, ReLU, upsample to pixels, normalise."""
        chosen = [parts.drop_zero if s == "zero" else parts.drop_noise for s in self.strategies]
        cells = torch.relu(torch.stack(chosen).mean(0))
        return normalise_maps(cells_to_pixels(cells, *size))

    def attribute(self, inputs: Tensor, target: TargetLike = None) -> Tensor:
        return self.combine(self.parts(inputs, target), tuple(inputs.shape[-2:]))


# ------------------------------------------------------------------------------ entity segments
"""Entity-scale perturbation units (PGCA's P stage since issue 20).

On the native env an entity is a 2-4 px sprite on a flat background, so a 6 x 6 px grid cell mixes
an entity with its neighbours and the cell map is a blur of the entity. The units here are instead
the image's own *segments*, as LIME's superpixels but exact for flat-background images:

1. flat colours per sample = mean colours of the colour bins (``bins`` levels per channel) holding
   at least ``min_share`` of the pixels (here the arena floor and the wall outside it), so small
   perturbations (an L-inf attack, the sensitivity noise) do not move them;
2. foreground = pixels farther than ``tol`` (L-inf over channels) from every flat colour; flat
   regions are the canvas, never perturbed (P = 0 there);
3. units = the 8-connected components of the foreground (label propagation by 3 x 3 max-pooling,
   equal to ``scipy.ndimage.label`` with a full structure, tested); a component larger than
   ``split_area`` pixels (a textured image with no flat background, touching sprites) is split along
   the ``grid`` cells, so a non-flat image degrades gracefully to grid occlusion;
4. a unit's importance = the drop of the target score when its pixels are painted with the flat
   colour most common on its border ("remove the entity"), ReLU; every pixel of the unit takes that
   value, flat pixels take 0.

This equals Captum's ``FeatureAblation`` with ``feature_mask`` = the units and ``baselines`` =
``Segments.baseline`` (tested), and costs one forward per unit (the entities in view, typically
5-10 per agent) instead of 2 g^2 = 128 for the 8 x 8 grid.
"""


@dataclass
class Segments:
    """Perturbation units of a batch: ``unit`` (B, H, W) long, -1 on flat regions, else a global
    unit index in [0, n_units); ``sample`` (n_units,) which sample each unit belongs to;
    ``background`` (B, C) the most common colour; ``baseline`` (B, C, H, W) the image with every
    unit painted in its fill colour (the flat colour most common on its 1 px border): "all entities
    removed", the reference of both P (one unit at a time) and G (gradient x (input - baseline))."""

    unit: Tensor
    sample: Tensor
    background: Tensor
    baseline: Tensor

    @property
    def n_units(self) -> int:
        return int(self.sample.numel())


#: colour tables up to this many bins (16 levels of 4 channels) are dense; beyond, only the colours present count
DENSE_COLOUR_KEYS = 16 ** 4
#: samples per colour table on the sparse path
SPARSE_COLOUR_CHUNK = 16


def flat_colours(obs: Tensor, bins: int = 16, min_share: float = 0.1, k: int = 4) -> tuple[Tensor, Tensor]:
    """Colours of the large flat regions: (B, k, C) mean colour of each of the ``k`` most common
    colour bins (``bins`` levels per channel) and (B, k) bool, True where the bin holds at least
    ``min_share`` of the pixels (the first, most common, is always kept)."""
    b, c, h, w = obs.shape
    n_keys = bins ** c
    sparse = n_keys > max(DENSE_COLOUR_KEYS, h * w)
    if sparse and b > SPARSE_COLOUR_CHUNK:   # bounded memory: each chunk's table has at most chunk * HW colours
        parts = [flat_colours(obs[i:i + SPARSE_COLOUR_CHUNK], bins, min_share, k) for i in range(0, b, SPARSE_COLOUR_CHUNK)]
        return torch.cat([col for col, _ in parts]), torch.cat([ok for _, ok in parts])
    q = (obs.clamp(0, 1) * (bins - 1) + 0.5).long().flatten(2)                    # (B, C, HW)
    key = torch.zeros(b, h * w, dtype=torch.long, device=obs.device)
    for ch in range(c):
        key = key * bins + q[:, ch]
    k = min(k, n_keys)
    if sparse:   # many channels (stacked frames: 16^9 bins): count only the colours present
        present, key = torch.unique(key, return_inverse=True)
        n_keys = int(present.numel())
    counts = torch.zeros(b, n_keys, device=obs.device, dtype=obs.dtype).scatter_add_(1, key, torch.ones_like(key, dtype=obs.dtype))
    sums = torch.zeros(b, n_keys, c, device=obs.device, dtype=obs.dtype).scatter_add_(
        1, key[:, :, None].expand(-1, -1, c), obs.flatten(2).transpose(1, 2))
    top = counts.topk(min(k, n_keys), dim=1)
    colours = sums.gather(1, top.indices[:, :, None].expand(-1, -1, c)) / top.values.clamp_min(1)[:, :, None]
    valid = top.values >= min_share * h * w
    valid[:, 0] = True
    if colours.shape[1] < k:   # fewer colours present than asked: pad with invalid entries
        colours = torch.cat([colours, colours.new_zeros(b, k - colours.shape[1], c)], 1)
        valid = torch.cat([valid, valid.new_zeros(b, k - valid.shape[1])], 1)
    return colours, valid


def background_colour(obs: Tensor, bins: int = 16) -> Tensor:
    """(B, C): mean colour of the pixels in each sample's most common colour bin."""
    return flat_colours(obs, bins, k=1)[0][:, 0]


#: scipy.ndimage.label structure for a (B, H, W) stack: 8-connected within each image, never across images
_EIGHT_CONNECTED_PER_IMAGE = np.zeros((3, 3, 3), dtype=bool)
_EIGHT_CONNECTED_PER_IMAGE[1] = True


def connected_components(fg: Tensor) -> Tensor:
    """8-connected component labels of boolean masks (B, H, W): 0 on the background, 1..n_b per sample.

    One ``scipy.ndimage.label`` call over the whole stack (a structure that never links two images);
    scipy numbers components in raster order, so each sample's labels form one contiguous range,
    shifted here to start at 1. Why scipy: labelling in C is far cheaper than propagating labels by
    max-pooling on every logged step (measurement: docs/experiments/explanations.md, "PGCA for small entities").
    """
    labels, _ = ndimage.label(fg.detach().cpu().numpy(), structure=_EIGHT_CONNECTED_PER_IMAGE)
    labels = torch.from_numpy(labels.astype(np.int64)).to(fg.device)
    on = labels > 0
    first = torch.where(on, labels, torch.full_like(labels, torch.iinfo(torch.int64).max)).flatten(1).amin(1)
    offset = torch.where(on.flatten(1).any(1), first - 1, torch.zeros_like(first))
    return torch.where(on, labels - offset[:, None, None], torch.zeros_like(labels))


def neighbourhood(x: Tensor, reduce: Callable[[Tensor, Tensor], Tensor], pad: int) -> Tensor:
    """``reduce`` (``torch.maximum`` / ``torch.minimum``) of each pixel's 3 x 3 neighbourhood of ``x`` (B, H, W),
    off-image neighbours read as ``pad``: a max/min pooling with stride 1 in six elementwise passes."""
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), value=pad)
    rows = reduce(reduce(padded[:, :-2], padded[:, 1:-1]), padded[:, 2:])
    return reduce(reduce(rows[..., :-2], rows[..., 1:-1]), rows[..., 2:])


def segment_units(obs: Tensor, *, tol: float = 12 / 255, bins: int = 16, grid: int = 8,
                  split_area: int | None = None, min_share: float = 0.1) -> Segments:
    """Perturbation units of ``obs`` (B, C, H, W) in [0, 1]; see the section docstring above."""
    b, c, h, w = obs.shape
    colours, valid = flat_colours(obs, bins, min_share)                           # (B, K, C), (B, K)
    near = torch.full((b, h, w), float("inf"), device=obs.device, dtype=obs.dtype)   # L-inf to the nearest flat colour
    cls = torch.zeros(b, h, w, dtype=torch.long, device=obs.device)               # which one (the first on ties)
    for j in range(colours.shape[1]):
        if not bool(valid[:, j].any()):   # no image has this flat colour: nothing is nearer to it
            continue
        dist = (obs - colours[:, j, :, None, None]).abs_().amax(1).masked_fill_(~valid[:, j, None, None], float("inf"))
        closer = dist < near
        near, cls = torch.where(closer, dist, near), cls.masked_fill_(closer, j)
    fg = near > tol                                                                # (B, H, W)
    labels = connected_components(fg)
    split_area = split_area if split_area is not None else 2 * round(h / grid) * round(w / grid)
    ys, xs = cell_edges(h, grid), cell_edges(w, grid)
    row = torch.bucketize(torch.arange(h, device=obs.device), torch.tensor(ys[1:-1], device=obs.device), right=True)
    col = torch.bucketize(torch.arange(w, device=obs.device), torch.tensor(xs[1:-1], device=obs.device), right=True)
    cell = (row[:, None] * grid + col[None, :]).flatten()                          # (H W,) in [0, g^2)
    on = fg.flatten()
    pixel = on.nonzero()[:, 0]                                                     # foreground pixels only, raster order
    component = pixel // (h * w) * (h * w + 1) + labels.flatten()[pixel]          # numbered over the batch
    large = torch.bincount(component)[component] > split_area
    key = component * (grid * grid + 1) + torch.where(large, cell[pixel % (h * w)] + 1, 0)
    keys, inverse = torch.unique(key, return_inverse=True)
    unit = torch.full((b * h * w,), -1, dtype=torch.long, device=obs.device).masked_scatter_(on, inverse).reshape(b, h, w)
    sample = keys // ((h * w + 1) * (grid * grid + 1))
    # fill colour of each unit: the flat colour most common on its 1 px border (else the modal colour).
    # Each flat pixel votes for the largest and the smallest unit id among its 8 neighbours.
    n, k = int(sample.numel()), colours.shape[1]
    votes = torch.zeros((n + 1) * k, device=obs.device, dtype=obs.dtype)
    if n:
        ids = (unit + 1).int()                                     # 0 on flat pixels; int32 halves the passes' memory
        big = neighbourhood(ids, torch.maximum, 0)
        small = neighbourhood(torch.where(ids > 0, ids, n + 1), torch.minimum, n + 1)
        small = small.masked_fill_(small > n, 0)
        for nb in (big, small):
            ok = (~fg) & (nb > 0)
            votes.scatter_add_(0, (nb[ok].long() - 1) * k + cls[ok], torch.ones(int(ok.sum()), device=obs.device, dtype=obs.dtype))
    votes = votes.reshape(n + 1, k)
    fill_cls = torch.where(votes[:n].sum(1) > 0, votes[:n].argmax(1), torch.zeros(n, dtype=torch.long, device=obs.device))
    fill = colours[sample, fill_cls] if n else torch.zeros(0, c, device=obs.device)   # (n, C)
    baseline = obs.clone()
    baseline.permute(0, 2, 3, 1)[fg] = fill[unit[fg]]                              # units painted, flat pixels kept
    return Segments(unit=unit, sample=sample, background=colours[:, 0], baseline=baseline)


def unit_boxes(seg: Segments) -> Tensor:
    """(n_units, 4) long: each unit's half-open bounding box (y0, y1, x0, x1) in pixels."""
    _, h, w = seg.unit.shape
    flat = seg.unit.flatten()
    on = flat >= 0
    index = torch.arange(flat.numel(), device=flat.device)[on]
    units, ys, xs = flat[on], (index // w) % h, index % w
    box = torch.empty(seg.n_units, 4, dtype=torch.long, device=flat.device)
    for column, (coords, reduce, shift) in enumerate(((ys, "amin", 0), (ys, "amax", 1), (xs, "amin", 0), (xs, "amax", 1))):
        box[:, column] = torch.zeros(seg.n_units, dtype=torch.long, device=flat.device).scatter_reduce(
            0, units, coords, reduce, include_self=False) + shift
    return box


class SegmentPerturbation(Attribution):
    """Entity-scale perturbation map P (section docstring above); ``attribute`` -> (B, H, W) in [0, 1].

    ``drops(obs, target, base_score)`` returns the raw per-pixel score drops (before ReLU) and the
    units; ``base_score`` (the clean target scores) may be passed in to share a forward already done.
    """

    def __init__(self, view: PolicyLike, target_kind: TargetKind = "logit", tol: float = 12 / 255, bins: int = 16,
                 grid: int = 8, split_area: int | None = None, chunk_size: int = 1024) -> None:
        super().__init__(view, target_kind)
        if grid < 1:
            raise ValueError(f"grid must be >= 1 cell per side, got {grid}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if not 0 <= tol < 1:
            raise ValueError(f"tol must be in [0, 1), got {tol}")
        self.tol, self.bins, self.grid, self.split_area, self.chunk_size = tol, bins, grid, split_area, chunk_size

    def segments(self, obs: Tensor) -> Segments:
        return segment_units(obs, tol=self.tol, bins=self.bins, grid=self.grid, split_area=self.split_area)

    @torch.inference_mode()
    def drops(self, inputs: Tensor, target: Tensor, base_score: Tensor | None = None,
              segments: Segments | None = None, clean_spatial: Tensor | None = None) -> tuple[Tensor, Segments]:
        """Per-pixel score drop of removing the pixel's unit (B, H, W), 0 on the background.

        ``clean_spatial`` (B, D, h, w), the view's ``spatial`` of ``inputs``, may be passed in with
        ``base_score`` to share a pass already done. The ablated copies go to the view as
        :class:`~fgmf_marl.policy.Ablations` (``view.logits_of_ablations``), so a view that knows its locality
        recomputes only what each unit can reach."""
        obs = inputs.detach()
        seg = segments if segments is not None else self.segments(obs)
        if clean_spatial is None:
            clean_spatial = self.view.spatial(obs)
        if base_score is None:
            base_score = target_score(self.view.logits_from_spatial(clean_spatial), target, self.target_kind)
        base_score, clean_spatial = base_score.detach(), clean_spatial.detach()
        n = seg.n_units
        unit_drop = torch.empty(n, device=obs.device)
        box = unit_boxes(seg)
        for start in range(0, n, self.chunk_size):
            u = torch.arange(start, min(start + self.chunk_size, n), device=obs.device)
            s = seg.sample[u]
            ablations = Ablations(obs=obs, baseline=seg.baseline, region=seg.unit, label=u, sample=s, box=box[u])
            logits = self.view.logits_of_ablations(ablations, clean_spatial)
            unit_drop[u] = base_score[s] - target_score(logits, target[s], self.target_kind)
        pix = torch.where(seg.unit >= 0, unit_drop[seg.unit.clamp_min(0)] if n else torch.zeros_like(seg.unit,
                          dtype=obs.dtype), torch.zeros((), device=obs.device))
        return pix, seg

    def attribute(self, inputs: Tensor, target: TargetLike = None) -> Tensor:
        obs = check_obs(inputs, "attribution").detach()
        target = self.resolve_target(obs, target)
        pix, _ = self.drops(obs, target)
        return normalise_maps(torch.relu(pix))


class SegmentMask(Attribution):
    """Model-free control: 1 on every perturbation unit (all non-flat pixels), 0 elsewhere.

    What PGCA's support alone scores; PGCA is informative only where it beats this row."""

    def __init__(self, view: PolicyLike, tol: float = 12 / 255, bins: int = 16, grid: int = 8) -> None:
        super().__init__(view)
        self.tol, self.bins, self.grid = tol, bins, grid

    def attribute(self, inputs: Tensor, target: TargetLike = None) -> Tensor:
        obs = check_obs(inputs, "attribution").detach()
        return (segment_units(obs, tol=self.tol, bins=self.bins, grid=self.grid).unit >= 0).to(obs.dtype)
