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
from typing import Any

import torch
from torch import Tensor

from fgmf_marl.attribution.base import Attribution, TargetKind, normalise_maps, target_score
from fgmf_marl.policy import PolicyLike, TargetLike, check_obs


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
