"""Fair baselines for PGCA: any pixel method pooled within PGCA's own segments, and a model-free edge map.

PGCA's P stage perturbs connected colour segments (entities), and the ground truth marks whole entities, so part
of its lead over pixel methods could be the segment prior rather than the model's signal. A pixel method pooled
within the same segments (:class:`SegmentPooled`: each segment gets the mean of the method's map over its
pixels, flat background 0, as PGCA's P) has the prior too; what still separates it from PGCA is the signal.
:class:`EdgeMap` (the Sobel gradient magnitude of the image, no model at all) is the model-free baseline the
XAI-benchmark literature uses: a method that does not beat it localises edges, not evidence.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fgmf_marl.attribution.base import Attribution, normalise_maps
from fgmf_marl.attribution.perturbation import segment_units
from fgmf_marl.policy import PolicyLike, TargetLike, check_obs


def pool_within(maps: Tensor, unit: Tensor) -> Tensor:
    """Each pixel of ``maps`` (B, H, W) replaced by the mean of its unit (``unit`` (B, H, W): global unit index per
    pixel, -1 on flat background, which becomes 0)."""
    flat_maps, flat_unit = maps.flatten(), unit.flatten()
    inside = flat_unit >= 0
    n_units = int(flat_unit.max()) + 1 if bool(inside.any()) else 0
    sums = torch.zeros(n_units, dtype=maps.dtype, device=maps.device).index_add_(0, flat_unit[inside],
                                                                                 flat_maps[inside])
    counts = torch.zeros(n_units, dtype=maps.dtype, device=maps.device).index_add_(
        0, flat_unit[inside], torch.ones_like(flat_maps[inside]))
    pooled = torch.zeros_like(flat_maps)
    pooled[inside] = (sums / counts.clamp_min(1))[flat_unit[inside]]
    return pooled.reshape(maps.shape)


class SegmentPooled(Attribution):
    """``method``'s map pooled within PGCA's segments (same ``tol``, ``bins``, ``grid`` as PGCA's defaults)."""

    def __init__(self, method: Attribution, tol: float = 12 / 255, bins: int = 16, grid: int = 8) -> None:
        super().__init__(method.view, method.target_kind)
        self.method, self.tol, self.bins, self.grid = method, tol, bins, grid

    def attribute(self, inputs: Tensor, target: TargetLike = None) -> Tensor:
        obs = check_obs(inputs, "attribution").detach()
        maps = self.method.attribute(obs, target=target)
        unit = segment_units(obs, tol=self.tol, bins=self.bins, grid=self.grid).unit
        return normalise_maps(pool_within(maps, unit))


_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


class EdgeMap(Attribution):
    """Model-free control: the Sobel gradient magnitude of each channel (zero padding), summed over channels."""

    def __init__(self, view: PolicyLike) -> None:
        super().__init__(view)

    def attribute(self, inputs: Tensor, target: TargetLike = None) -> Tensor:
        obs = check_obs(inputs, "attribution").detach()
        b, c, h, w = obs.shape
        kernels = torch.stack([_SOBEL_X, _SOBEL_X.T]).to(obs)[:, None]          # (2, 1, 3, 3)
        grads = F.conv2d(obs.reshape(b * c, 1, h, w), kernels, padding=1)        # (B*C, 2, H, W)
        magnitude = grads.pow(2).sum(1).sqrt().reshape(b, c, h, w).sum(1)
        return normalise_maps(magnitude)
