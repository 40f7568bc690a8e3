"""Attribution methods against independent references: closed forms, naive loops, Captum."""
from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import DummyVecEnv
from torch import nn

from agents.policies import ImageFeatures
from agents.policy_view import PolicyView
from fgmf_marl.attribution import GradCAMPlusPlus


class _ImageEnv(gym.Env):
    def __init__(self, size: int = 24) -> None:
        self.observation_space = gym.spaces.Box(0, 255, (3, size, size), np.uint8)
        self.action_space = gym.spaces.Discrete(5)

    def reset(self, *, seed=None, options=None):
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 0.0, False, False, {}


def make_view(backbone: str = "cnn", size: int = 24, seed: int = 0, net_arch=None, **kwargs) -> PolicyView:
    torch.manual_seed(seed)
    venv = DummyVecEnv([lambda: _ImageEnv(size)])
    policy_kwargs = dict(features_extractor_class=ImageFeatures,
                         features_extractor_kwargs=dict(backbone=backbone, features_dim=16, **kwargs))
    if net_arch is not None:
        policy_kwargs["net_arch"] = net_arch
    model = PPO("CnnPolicy", venv, policy_kwargs=policy_kwargs, seed=seed, device="cpu", n_steps=8, batch_size=8)
    return PolicyView.from_model(model).eval()


def random_obs(n: int, size: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _closed_form_gradcampp(fmap: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """Grad-CAM++ written out per sample, channel and pixel (float64)."""
    b, k, h, w = fmap.shape
    cams = np.zeros((b, h, w))
    for s in range(b):
        weights = np.zeros(k)
        for c in range(k):
            total = fmap[s, c].sum()
            for i in range(h):
                for j in range(w):
                    g = grads[s, c, i, j]
                    denom = 2 * g**2 + total * g**3
                    alpha = g**2 / denom if denom != 0 else 0.0
                    weights[c] += alpha * max(g, 0.0)
        cams[s] = np.maximum((weights[:, None, None] * fmap[s]).sum(0), 0.0)
    return cams


def _head_gradient(view: PolicyView, fmap: torch.Tensor, target: np.ndarray, token_major: bool) -> np.ndarray:
    """dS/dA in closed form for logits = W_a relu(W_fc flatten(A) + b_fc) + b_a (no hidden MLP layers)."""
    fc: nn.Linear = view.extractor.backbone.fc[1]
    wfc = fc.weight.detach().double().numpy()
    bfc = fc.bias.detach().double().numpy()
    wa = view.policy.action_net.weight.detach().double().numpy()
    a = fmap.detach().double().numpy()
    b, d, h, w = a.shape
    out = np.zeros_like(a)
    for s in range(b):
        flat = a[s].reshape(d, h * w).T.reshape(-1) if token_major else a[s].reshape(-1)
        active = (wfc @ flat + bfc) > 0
        g_flat = wfc.T @ (active * wa[target[s]])
        out[s] = g_flat.reshape(h * w, d).T.reshape(d, h, w) if token_major else g_flat.reshape(d, h, w)
    return out


@pytest.mark.parametrize("backbone", ["cnn", "vit"])
def test_gradcampp_matches_closed_form(backbone: str) -> None:
    kwargs = dict(patch_size=6, dim=8, depth=1, heads=2) if backbone == "vit" else dict(channels=(4, 6, 5))
    view = make_view(backbone, net_arch=dict(pi=[], vf=[]), **kwargs)
    if backbone == "vit":  # drop the final LayerNorm so the head is affine + ReLU (closed-form gradient)
        view.extractor.backbone.norm = nn.Identity()
    obs = random_obs(4)
    target = np.array([0, 3, 1, 4])
    cam = GradCAMPlusPlus(view).attribute(obs, target=target, raw=True)
    with torch.no_grad():
        fmap = view.spatial(obs)
    grads = _head_gradient(view, fmap, target, token_major=backbone == "vit")
    expected = _closed_form_gradcampp(fmap.double().numpy(), grads)
    assert cam.shape == fmap.shape[:1] + fmap.shape[2:]
    assert expected.max() > 0  # the test compares something non-trivial
    np.testing.assert_allclose(cam.numpy(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backbone", ["cnn", "vit"])
def test_gradcampp_maps_are_image_sized_and_normalised(backbone: str) -> None:
    view = make_view(backbone, **(dict(patch_size=6, dim=8, depth=1, heads=2) if backbone == "vit" else {}))
    obs = random_obs(5)
    maps = GradCAMPlusPlus(view).attribute(obs, target=torch.tensor([0, 1, 2, 3, 4]))
    assert maps.shape == (5, 24, 24)
    assert maps.min() >= 0 and maps.max() <= 1
    peaks = maps.flatten(1).amax(1)
    assert torch.all((peaks == 0) | torch.isclose(peaks, torch.ones_like(peaks)))
    # batching agents x envs gives the same maps as one sample at a time
    single = torch.cat([GradCAMPlusPlus(view).attribute(obs[i:i + 1], target=[i]) for i in range(5)])
    torch.testing.assert_close(maps, single, rtol=1e-4, atol=1e-5)


def test_gradcampp_target_none_is_greedy_and_bad_target_rejected() -> None:
    view = make_view()
    obs = random_obs(3)
    greedy = view(obs).argmax(-1)
    method = GradCAMPlusPlus(view)
    torch.testing.assert_close(method.attribute(obs), method.attribute(obs, target=greedy))
    with pytest.raises(ValueError, match="target actions must be in"):
        method.attribute(obs, target=[0, 1, 9])
    with pytest.raises(ValueError, match="one action per sample"):
        method.attribute(obs, target=[0, 1])
    with pytest.raises(ValueError, match="float tensor"):
        method.attribute(obs[0], target=[0])
