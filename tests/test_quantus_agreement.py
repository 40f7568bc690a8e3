"""Our explanation metrics against Quantus (Hedström et al. 2023), the field's reference implementation, on the same
maps and masks: relevance mass and rank accuracy and the pointing game agree to float precision; max-sensitivity
agrees in distribution (the two draw different noise). Documented differences of definition: our relevance rank
breaks ties by raster order (maps here have no ties), and our max-sensitivity clamps x + noise to [0, 1] and keeps
samples whose prediction changed (the target action is held fixed), where Quantus does neither; inputs here stay
inside [0, 1] and predictions never change, so the definitions coincide.

The randomisation test is Quantus' ``MPRT`` itself (``fgmf_marl.attribution.randomisation``); what is ours is the
plumbing (the actor as a model, our methods as its ``explain_func``), tested here against ``quantus.MPRT`` called
directly on the same network written as a plain ``nn.Sequential``. Our Spearman (``map_similarity``, used on the
entity pixels and under attack) equals Quantus' ``correlation_spearman`` with ties (average ranks); on a constant
map ours is 0 and Quantus' nan."""
from __future__ import annotations

import copy
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import quantus
import torch
import torch.nn.functional as F
from quantus.functions.similarity_func import correlation_spearman
from torch import nn

from fgmf_marl.attribution import GradCAMPlusPlus
from fgmf_marl.attribution import metrics as M
from fgmf_marl.attribution.base import Attribution
from fgmf_marl.attribution.randomisation import ActorPath, model_randomisation
from test_attribution import make_view, random_obs

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


def test_spearman_equals_quantus_with_ties() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.random((B, H * W)), rng.random((B, H * W))
    a[a < 0.6], b[b < 0.5] = 0.0, 0.0                     # most pixels tied at zero, as segment-confined maps
    a[:, :3], b[:, :3] = 0.25, 0.25                        # and ties above zero
    mine = M.map_similarity(torch.as_tensor(a).reshape(B, H, W), torch.as_tensor(b).reshape(B, H, W))["spearman"]
    np.testing.assert_allclose(mine.numpy(), correlation_spearman(a, b, batched=True), rtol=1e-5, atol=1e-6)


class _Gradient(Attribution):
    """|d logit_target / d x| summed over channels: deterministic, and easy to write again for a plain network."""

    def attribute(self, inputs: torch.Tensor, target: object = None) -> torch.Tensor:
        x = inputs.detach().requires_grad_(True)
        score = self.view(x).gather(1, self.resolve_target(x, target)[:, None]).sum()
        return torch.autograd.grad(score, x)[0].abs().sum(1)


def _plain_gradient(model: nn.Module, inputs: np.ndarray, targets: np.ndarray, **kwargs: object) -> np.ndarray:
    x = torch.as_tensor(inputs).requires_grad_(True)
    score = model(x).gather(1, torch.as_tensor(targets).long()[:, None]).sum()
    return torch.autograd.grad(score, x)[0].abs().sum(1).numpy()


def test_mprt_of_a_policy_equals_quantus_on_the_same_network_written_plainly() -> None:
    """Same layers in the same order (logits first), same re-initialisation, same targets: the same per-layer
    Spearman per sample as ``quantus.MPRT`` on an ``nn.Sequential`` copy of the actor, and the fully randomised
    maps equal the plain network's with every layer reset as Quantus resets it (seed + 1 before each)."""
    view, obs, seed = make_view(), random_obs(6), 3
    target = view(obs).argmax(-1)
    backbone, policy = view.extractor.backbone, view.policy
    plain = copy.deepcopy(nn.Sequential(OrderedDict(convs=backbone.convs, fc=backbone.fc,
                                                    pi=policy.mlp_extractor.policy_net, action=policy.action_net)))
    torch.testing.assert_close(plain(obs), view(obs), rtol=1e-5, atol=1e-6)

    ours = model_randomisation(_Gradient, view, obs, target, seed=seed)
    x, y = obs.numpy(), target.numpy()
    metric = quantus.MPRT(layer_order="top_down", seed=seed, return_aggregate=False, disable_warnings=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = metric(model=plain, x_batch=x, y_batch=y, a_batch=_plain_gradient(plain, x, y),
                        explain_func=_plain_gradient, channel_first=True, batch_size=len(x))
    assert ours.layers == ["action_net", "mlp_extractor.policy_net.2", "mlp_extractor.policy_net.0", "backbone.fc.1",
                           "backbone.convs.4", "backbone.convs.2", "backbone.convs.0"]
    assert list(theirs) == ["original", "action", "pi.2", "pi.0", "fc.1", "convs.4", "convs.2", "convs.0"]
    for mine, reference in zip(ours.similarity.values(), theirs.values()):
        np.testing.assert_allclose(mine, reference, atol=1e-4)
    assert np.all(ours.similarity["original"] == 1.0) and ours.similarity["backbone.convs.0"].mean() < 0.5

    random_plain = copy.deepcopy(plain)
    for _, module in [m for m in random_plain.named_modules() if hasattr(m[1], "reset_parameters")][::-1]:
        torch.manual_seed(seed + 1)
        module.reset_parameters()
    torch.testing.assert_close(ours.randomised, torch.as_tensor(_plain_gradient(random_plain, x, y)), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours.original, _Gradient(view).attribute(obs, target))


def test_mprt_leaves_the_policy_and_the_random_stream_alone_and_keeps_model_free_maps() -> None:
    view, obs = make_view(), random_obs(4)
    target = view(obs).argmax(-1)
    weights = {k: v.clone() for k, v in view.state_dict().items()}
    torch.manual_seed(7)
    expected_draw = torch.rand(3)
    torch.manual_seed(7)
    gradcam = model_randomisation(GradCAMPlusPlus, view, obs, target, seed=0)
    torch.testing.assert_close(torch.rand(3), expected_draw)       # Quantus reseeds; our caller's stream is restored
    assert all(torch.equal(v, view.state_dict()[k]) for k, v in weights.items())
    assert np.nanmean(gradcam.similarity[gradcam.layers[-1]]) < 0.5

    class Edges(Attribution):
        def attribute(self, inputs: torch.Tensor, target: object = None) -> torch.Tensor:
            return F.pad((inputs[:, :, 1:] - inputs[:, :, :-1]).abs().sum(1), (0, 0, 0, 1))   # no model at all
    edges = model_randomisation(Edges, view, obs, target)
    assert all(np.all(s == 1.0) for s in edges.similarity.values())      # the model never mattered
    torch.testing.assert_close(edges.randomised, edges.original)


def test_the_actor_path_refuses_parameters_quantus_cannot_reinitialise() -> None:
    vit = make_view("vit", patch_size=6, dim=8, depth=1, heads=2)
    with pytest.raises(ValueError, match=r"backbone\.pos.*in_proj_weight"):
        ActorPath(vit)
    assert isinstance(ActorPath(make_view()).view, nn.Module)
