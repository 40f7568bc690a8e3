"""Our explanation metrics against Quantus (Hedström et al. 2023), the field's reference implementation, on the same
maps and masks: relevance mass and rank accuracy and the pointing game agree to float precision; max-sensitivity
agrees in distribution (the two draw different noise). Documented differences of definition: our relevance rank
breaks ties by raster order (maps here have no ties), and our max-sensitivity clamps x + noise to [0, 1] and keeps
samples whose prediction changed (the target action is held fixed), where Quantus does neither; inputs here stay
inside [0, 1] and predictions never change, so the definitions coincide."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import quantus
import torch
from torch import nn

from fgmf_marl.attribution import metrics as M

B, C, H, W = 8, 3, 12, 12


@pytest.fixture
def batch() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.uniform(0.3, 0.7, (B, C, H, W)).astype(np.float32)
    maps = rng.random((B, 1, H, W)).astype(np.float32)            # continuous: no ties
    masks = rng.random((B, 1, H, W)) < 0.2
    masks[:, 0, 0, 0] = True                                       # every mask non-empty
    return x, np.zeros(B, dtype=int), maps, masks


def _quantus(metric: object, x: np.ndarray, y: np.ndarray, maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(metric(model=None, x_batch=x, y_batch=y, a_batch=maps, s_batch=masks), dtype=float)


@pytest.mark.parametrize("ours, theirs", [(M.relevance_mass_accuracy, "RelevanceMassAccuracy"),
                                          (M.relevance_rank_accuracy, "RelevanceRankAccuracy"),
                                          (M.pointing_game, "PointingGame")])
def test_localisation_metrics_equal_quantus(batch: tuple, ours: object, theirs: str) -> None:
    x, y, maps, masks = batch
    reference = _quantus(getattr(quantus, theirs)(disable_warnings=True), x, y, maps, masks)
    mine = ours(torch.as_tensor(maps[:, 0]), torch.as_tensor(masks[:, 0])).numpy()   # type: ignore[operator]
    np.testing.assert_allclose(mine, reference, rtol=1e-5, atol=1e-6)


class _ConstantClassifier(nn.Module):
    """Logits that do not depend on the input: the prediction never changes under noise."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([1.0, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(x.shape[0], 2) + 0 * x.flatten(1).sum(1, keepdim=True)


def _explanation(x: torch.Tensor) -> torch.Tensor:
    """A map that moves with the input: the channel sum, (B, H, W)."""
    return x.sum(1)


def test_max_sensitivity_agrees_with_quantus_in_distribution(batch: tuple) -> None:
    x, y, _, _ = batch
    radius, samples = 8 / 255, 200

    def explain_func(model: nn.Module, inputs: np.ndarray, targets: np.ndarray, **kwargs: object) -> np.ndarray:
        return _explanation(torch.as_tensor(inputs)).numpy()[:, None]

    metric = quantus.MaxSensitivity(nr_samples=samples, lower_bound=radius, normalise=False, abs=False,
                                    disable_warnings=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = np.asarray(metric(model=_ConstantClassifier(), x_batch=x, y_batch=y, a_batch=None,
                                      explain_func=explain_func, device="cpu"), dtype=float)
    mine = M.max_sensitivity(lambda obs, target: _explanation(obs), torch.as_tensor(x), 0, radius=radius,
                             n_samples=samples).numpy()
    assert np.isfinite(reference).all() and np.isfinite(mine).all()
    np.testing.assert_allclose(mine, reference, rtol=0.05)
    # and the scale is the definition's: the norm of a sum of C uniform draws over the map's norm
    expected = np.sqrt(H * W * C * radius ** 2 / 3) / np.linalg.norm(x.sum(1).reshape(B, -1), axis=1)
    np.testing.assert_allclose(mine, expected, rtol=0.3)
