"""Speed choices that must not change the function (the CNN's channels-last layout, training-time autocast) and the
ViT's stems and head scale."""
from __future__ import annotations

import copy

import gymnasium as gym
import numpy as np
import pytest
import torch

from agents.policies import CnnBackbone, ImageFeatures, VitBackbone, compute_dtype


def test_channels_last_cnn_equals_the_plain_layout() -> None:
    torch.manual_seed(0)
    fast = CnnBackbone(3, 48, 48)
    plain_convs = copy.deepcopy(fast.convs)
    assert fast.spatial(torch.rand(2, 3, 48, 48)).is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(8, 3, 48, 48, requires_grad=True)
    out = fast.head(fast.spatial(x))
    (grad,) = torch.autograd.grad(out.sum(), x)
    x2 = x.detach().clone().requires_grad_(True)
    fmap = plain_convs(x2)
    assert fmap.is_contiguous()
    out2 = fast.fc(fmap)
    (grad2,) = torch.autograd.grad(out2.sum(), x2)
    torch.testing.assert_close(out, out2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, grad2, rtol=1e-4, atol=1e-6)
    # state dicts round-trip into the channels-last model (SB3 checkpoints load by copy_)
    other = CnnBackbone(3, 48, 48)
    other.load_state_dict(fast.state_dict())
    torch.testing.assert_close(other.head(other.spatial(x.detach())), out.detach())


def test_compute_dtype_changes_only_forward_and_is_restored() -> None:
    torch.manual_seed(0)
    space = gym.spaces.Box(0, 255, (3, 48, 48), dtype=np.uint8)
    extractor = ImageFeatures(space)
    policy = torch.nn.ModuleDict({"features": extractor})
    x = torch.rand(8, 3, 48, 48)
    reference = extractor(x)
    with compute_dtype(policy, torch.bfloat16):
        assert extractor.compute_dtype == torch.bfloat16
        low = extractor(x)
        exact = extractor.head(extractor.spatial(x))  # what PolicyView, attacks and regularisers call
    assert extractor.compute_dtype == torch.float32
    assert low.dtype == torch.float32 and not torch.equal(low, reference)
    torch.testing.assert_close(low, reference, rtol=0.05, atol=0.02)  # bfloat16 keeps ~3 significant digits
    torch.testing.assert_close(exact, reference)


@pytest.mark.parametrize("stem, size, grid", [("patch", 48, (8, 8)), ("conv", 48, (6, 6)), ("conv", 84, (11, 11))])
def test_vit_stems_make_the_token_grid_and_the_head_scales_by_token_count(stem: str, size: int, grid: tuple) -> None:
    torch.manual_seed(0)
    vit = VitBackbone(3, size, size, patch_size=6, dim=16, depth=1, heads=2, stem=stem)
    fmap = vit.spatial(torch.rand(2, 3, size, size))
    assert vit.grid == grid and fmap.shape == (2, 16, *grid)
    # the head is tanh(W flatten(LN(tokens)) / sqrt(T) + b): written out with the layers' own weights
    tokens = torch.nn.functional.layer_norm(fmap.flatten(2).transpose(1, 2), (16,), vit.norm.weight, vit.norm.bias)
    fc = vit.fc[1]
    expected = torch.tanh(tokens.flatten(1) @ fc.weight.T / (grid[0] * grid[1]) ** 0.5 + fc.bias)
    torch.testing.assert_close(vit.head(fmap), expected, rtol=1e-5, atol=1e-6)


def test_vit_refuses_an_unknown_stem_and_a_patch_that_does_not_divide() -> None:
    with pytest.raises(ValueError, match="unknown ViT stem 'big'"):
        VitBackbone(3, 48, 48, stem="big")
    with pytest.raises(ValueError, match="must divide"):
        VitBackbone(3, 48, 48, patch_size=7, stem="patch")
    VitBackbone(3, 50, 50, stem="conv")   # the conv stem takes any size


def test_nature_layout_is_sb3s_nature_cnn() -> None:
    """The ``nature`` layout computes SB3's ``NatureCNN`` (the tutorial recipe's network) given its weights."""
    from stable_baselines3.common.torch_layers import NatureCNN

    torch.manual_seed(0)
    space = gym.spaces.Box(0, 255, (3, 84, 84), dtype=np.uint8)
    reference = NatureCNN(space, features_dim=512)
    ours = CnnBackbone(3, 84, 84, channels=(32, 64, 64), features_dim=512, layout="nature")
    ref_convs = [m for m in reference.cnn if isinstance(m, torch.nn.Conv2d)]
    our_convs = [m for m in ours.convs if isinstance(m, torch.nn.Conv2d)]
    for mine, theirs in zip(our_convs, ref_convs, strict=True):
        mine.load_state_dict(theirs.state_dict())
    ours.fc[1].load_state_dict(reference.linear[0].state_dict())
    x = torch.rand(4, 3, 84, 84)
    assert ours.spatial(x).shape == (4, 64, 7, 7)
    torch.testing.assert_close(ours.head(ours.spatial(x)), reference(x), rtol=1e-5, atol=1e-5)


def test_empty_net_arch_feeds_features_to_the_heads() -> None:
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv

    from agents.config import PolicyConfig
    from agents.policy_view import PolicyView

    class Images(gym.Env):
        observation_space = gym.spaces.Box(0, 255, (3, 48, 48), dtype=np.uint8)
        action_space = gym.spaces.Discrete(3)

        def reset(self, *, seed=None, options=None):
            return self.observation_space.sample(), {}

        def step(self, action):
            return self.observation_space.sample(), 0.0, False, True, {}

    config = PolicyConfig(net_arch=())
    config.validate()
    model = PPO("CnnPolicy", DummyVecEnv([Images]), policy_kwargs=config.policy_kwargs(), n_steps=8, batch_size=8)
    view = PolicyView.from_model(model)
    x = torch.rand(2, 3, 48, 48)
    features = model.policy.features_extractor(x)
    assert model.policy.action_net.in_features == config.features_dim
    torch.testing.assert_close(view(x), model.policy.action_net(features))
