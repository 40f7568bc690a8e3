"""Fair baselines: segment pooling against a per-unit loop, the edge map against scipy's Sobel filter, and the
study's new rows on a real policy."""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from fgmf_marl.attribution.captum_baselines import IntegratedGradientsMap
from fgmf_marl.attribution.perturbation import segment_units
from fgmf_marl.attribution.pooled import EdgeMap, SegmentPooled, pool_within
from fgmf_marl.attribution.study import default_methods
from helpers import tiny_view


def _scene(b: int = 3, size: int = 24) -> torch.Tensor:
    """Flat floor with a few coloured squares (entities), as the native env draws them."""
    gen = torch.Generator().manual_seed(0)
    obs = torch.full((b, 3, size, size), 0.2)
    for i in range(b):
        for _ in range(3):
            r, c = (int(v) for v in torch.randint(0, size - 5, (2,), generator=gen))
            obs[i, :, r:r + 4, c:c + 4] = torch.rand(3, 1, 1, generator=gen)
    return obs


def test_pooling_is_the_mean_of_each_unit_and_zero_on_the_background() -> None:
    obs = _scene()
    unit = segment_units(obs).unit
    maps = torch.rand(unit.shape, generator=torch.Generator().manual_seed(1))
    pooled = pool_within(maps, unit)
    expected = torch.zeros_like(maps)
    for u in unit.unique().tolist():
        if u >= 0:
            expected[unit == u] = maps[unit == u].mean()
    assert torch.allclose(pooled, expected, atol=1e-6)
    assert (pooled[unit < 0] == 0).all() and unit.max() >= 0


def test_the_edge_map_is_scipys_sobel_magnitude() -> None:
    obs = _scene(b=2)
    ours = EdgeMap(tiny_view(size=24)).attribute(obs)
    for i in range(2):
        x = obs[i].numpy().astype(np.float64)
        mag = sum(np.hypot(ndimage.sobel(x[c], axis=0, mode="constant"), ndimage.sobel(x[c], axis=1, mode="constant"))
                  for c in range(3))
        np.testing.assert_allclose(ours[i].numpy(), mag / mag.max(), atol=1e-5)


def test_a_pooled_method_keeps_the_segment_prior_and_the_methods_ranking_of_segments() -> None:
    view = tiny_view(size=24)
    obs = _scene()
    inner = IntegratedGradientsMap(view, n_steps=4)
    pooled = SegmentPooled(inner).attribute(obs, target=0)
    unit = segment_units(obs).unit
    assert pooled.shape == (3, 24, 24) and (pooled[unit < 0] == 0).all() and float(pooled.max()) == 1.0
    raw = pool_within(inner.attribute(obs, target=0), unit)
    assert torch.allclose(pooled, raw / raw.flatten(1).amax(1)[:, None, None], atol=1e-6)
    names = default_methods(image_size=24)
    assert {"IG (segment-pooled)", "SmoothGrad (segment-pooled)", "Grad-CAM++ (segment-pooled)",
            "G (segment-pooled)", "Edges (no model)"} <= set(names)
