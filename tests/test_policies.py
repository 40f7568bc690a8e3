"""Speed choices that must not change the function (the CNN's channels-last layout, training-time autocast) and the
ViT's stems and head scale."""
from __future__ import annotations

import copy

import gymnasium as gym
import numpy as np
import pytest
import torch

from fgmf_marl.agents.policies import (CnnBackbone, ImageFeatures, SpaceToDepthGradConv2d, VitBackbone,
                                      compute_dtype)
from fgmf_marl.policy import Ablations


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


@pytest.mark.parametrize("channels, kernel, stride, size", [(3, 8, 4, 84), (3, 8, 4, 83), (9, 4, 2, 21), (2, 6, 3, 17)])
def test_space_to_depth_gradient_conv_equals_pytorchs_to_second_order(channels, kernel, stride, size) -> None:
    """Forward bit for bit, input / weight / bias gradients and second derivatives (an input gradient's own
    gradient for the input and the parameters, as SCOR-PIO and Hessian-vector products take) equal PyTorch's
    ``nn.Conv2d`` in float64, sizes that the stride divides and sizes it does not (rows no output reads)."""
    torch.manual_seed(0)
    reference = torch.nn.Conv2d(channels, 5, kernel, stride=stride).double()
    fast = SpaceToDepthGradConv2d(channels, 5, kernel, stride).double()
    fast.load_state_dict(reference.state_dict())
    x = torch.rand(3, channels, size, size, dtype=torch.float64, requires_grad=True)
    assert torch.equal(fast(x.detach()), reference(x.detach()))
    assert torch.equal(fast(x), reference(x))

    def derivatives(conv: torch.nn.Conv2d) -> list[torch.Tensor]:
        out = torch.tanh(conv(x)).pow(2).sum()
        first = torch.autograd.grad(out, [x, conv.weight, conv.bias], create_graph=True)
        second = torch.autograd.grad((first[0] * torch.sin(x)).sum(), [x, conv.weight, conv.bias])
        return [*first, *second]

    for mine, theirs in zip(derivatives(fast), derivatives(reference), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12)
    small = SpaceToDepthGradConv2d(2, 3, 2 * stride, stride).double()   # finite differences on a small input
    assert torch.autograd.gradgradcheck(small, (torch.rand(1, 2, 2 * stride + 3, 2 * stride + 1, dtype=torch.float64,
                                                           requires_grad=True),))


def test_space_to_depth_conv_is_the_nature_layouts_first_convolution_only() -> None:
    nature = CnnBackbone(3, 84, 84, channels=(32, 64, 64), features_dim=512, layout="nature")
    small = CnnBackbone(3, 48, 48)
    kinds = [type(m) for m in nature.convs if isinstance(m, torch.nn.Conv2d)]
    assert kinds == [SpaceToDepthGradConv2d, torch.nn.Conv2d, torch.nn.Conv2d]
    assert not any(isinstance(m, SpaceToDepthGradConv2d) for m in small.modules())
    assert list(nature.state_dict()) == [f"convs.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")] + \
        ["fc.1.weight", "fc.1.bias"]
    with pytest.raises(ValueError, match="stride >= 2 dividing the kernel"):
        SpaceToDepthGradConv2d(3, 4, 3, 2)


def test_empty_net_arch_feeds_features_to_the_heads() -> None:
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv

    from fgmf_marl.agents.config import PolicyConfig
    from fgmf_marl.agents.policy_view import PolicyView

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


def _random_ablations(batch: int, channels: int, height: int, width: int, n: int, max_side: int, seed: int) -> Ablations:
    """Irregular regions (random pixels of random boxes, some on the image's edges and corners), one label each."""
    gen = torch.Generator().manual_seed(seed)
    obs, baseline = torch.rand(batch, channels, height, width, generator=gen), torch.rand(batch, channels, height, width, generator=gen)
    region = torch.full((batch, height, width), -1, dtype=torch.long)
    sample = torch.randint(0, batch, (n,), generator=gen)
    for label in range(n):
        side_y, side_x = (int(v) for v in torch.randint(1, max_side + 1, (2,), generator=gen))
        y0 = [0, height - side_y, int(torch.randint(0, height - side_y + 1, (1,), generator=gen))][label % 3]
        x0 = [width - side_x, 0, int(torch.randint(0, width - side_x + 1, (1,), generator=gen))][label % 3]
        keep = torch.rand(side_y, side_x, generator=gen) < 0.7
        keep[0, 0] = True
        patch = region[sample[label], y0:y0 + side_y, x0:x0 + side_x]
        patch[keep] = label
    box = torch.zeros(n, 4, dtype=torch.long)
    for label in range(n):   # later regions may cover earlier ones: boxes of what is left
        ys, xs = torch.nonzero(region[sample[label]] == label, as_tuple=True)
        box[label] = torch.tensor([ys.min(), ys.max() + 1, xs.min(), xs.max() + 1]) if ys.numel() else torch.tensor([0, 1, 0, 1])
    return Ablations(obs=obs, baseline=baseline, region=region, label=torch.arange(n), sample=sample, box=box)


@pytest.mark.parametrize("layout, shape, max_side, most_local", [
    ("small", (3, 48, 48), 5, True), ("small", (2, 37, 29), 9, True), ("nature", (3, 84, 84), 6, True),
    ("nature", (1, 50, 61), 12, False)])   # a 2 x 4 last map: no window is cheaper than the full pass
def test_ablations_recompute_only_the_receptive_field_and_equal_the_full_pass(layout, shape, max_side, most_local,
                                                                              monkeypatch) -> None:
    torch.manual_seed(0)
    net = CnnBackbone(*shape, layout=layout)
    for conv in net.convs:
        if isinstance(conv, torch.nn.Conv2d):
            torch.nn.init.normal_(conv.bias, std=0.3)   # padding positions must stay zero, not ReLU(bias)
    ablations = _random_ablations(5, *shape, n=48, max_side=max_side, seed=1)
    with torch.no_grad():
        clean = net.spatial(ablations.obs)
        full = net.head(net.spatial(ablations.images()))
        full_passes: list[int] = []
        spatial = net.spatial
        monkeypatch.setattr(net, "spatial", lambda x: (full_passes.append(x.shape[0]), spatial(x))[1])
        local = net.features_of_ablations(ablations, clean)
    assert (full - net.head(clean)[ablations.sample]).abs().amax(1).gt(1e-6).float().mean() > 0.7   # ablations matter
    torch.testing.assert_close(local, full, atol=1e-5, rtol=1e-4)
    assert (sum(full_passes) < 48 // 2) == most_local


def test_large_ablations_take_the_full_pass_and_none_is_empty(monkeypatch) -> None:
    torch.manual_seed(0)
    net = CnnBackbone(3, 48, 48)
    obs = torch.rand(2, 3, 48, 48)
    region = torch.full((2, 48, 48), -1, dtype=torch.long)
    region[0, 4:44, 4:44] = 0   # reaches the whole last map
    ablations = Ablations(obs=obs, baseline=torch.zeros_like(obs), region=region, label=torch.tensor([0]),
                          sample=torch.tensor([0]), box=torch.tensor([[4, 44, 4, 44]]))
    with torch.no_grad():
        clean = net.spatial(obs)
        full_passes: list[int] = []
        spatial = net.spatial
        monkeypatch.setattr(net, "spatial", lambda x: (full_passes.append(x.shape[0]), spatial(x))[1])
        local = net.features_of_ablations(ablations, clean)
        none = net.features_of_ablations(Ablations(obs, obs, region, torch.zeros(0, dtype=torch.long),
                                                   torch.zeros(0, dtype=torch.long), torch.zeros(0, 4, dtype=torch.long)), clean)
    assert full_passes == [1]
    torch.testing.assert_close(local, net.head(spatial(ablations.images())))
    assert none.shape == (0, net.features_dim)


def test_the_cached_head_columns_follow_the_weights() -> None:
    torch.manual_seed(0)
    net = CnnBackbone(3, 48, 48)
    ablations = _random_ablations(2, 3, 48, 48, n=6, max_side=3, seed=3)
    with torch.no_grad():
        net.features_of_ablations(ablations, net.spatial(ablations.obs))
        net.fc[1].weight.mul_(-2.0)   # an in-place update, as an optimiser step or a state-dict load makes
        other = CnnBackbone(3, 48, 48)
        net.fc[1].weight = other.fc[1].weight   # a replaced parameter
        for _ in range(2):
            torch.testing.assert_close(net.features_of_ablations(ablations, net.spatial(ablations.obs)),
                                       net.head(net.spatial(ablations.images())), atol=1e-5, rtol=1e-4)
            net.fc[1].weight.mul_(0.5)


def test_policy_view_takes_the_full_pass_behind_a_gate() -> None:
    from tests.test_attribution import make_view
    view = make_view(size=48)
    ablations = _random_ablations(3, 3, 48, 48, n=12, max_side=4, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(view.logits_of_ablations(ablations, view.spatial(ablations.obs)),
                                   view(ablations.images()), atol=1e-5, rtol=1e-4)
        view.set_gate(_Halve())   # not local in general: the view must not assume it is
        torch.testing.assert_close(view.logits_of_ablations(ablations, view.spatial(ablations.obs)),
                                   view(ablations.images()), atol=1e-5, rtol=1e-4)


class _Halve(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0.5


def test_region_labels_beyond_float_precision_are_refused() -> None:
    net = CnnBackbone(3, 48, 48)
    obs = torch.rand(1, 3, 48, 48)
    region = torch.full((1, 48, 48), -1, dtype=torch.long)
    region[0, 10:12, 10:12] = 2 ** 24
    ablations = Ablations(obs=obs, baseline=obs, region=region, label=torch.tensor([2 ** 24]),
                          sample=torch.tensor([0]), box=torch.tensor([[10, 12, 10, 12]]))
    with pytest.raises(ValueError, match="region labels must be < 2\\*\\*24"):
        net.features_of_ablations(ablations, net.spatial(obs))
