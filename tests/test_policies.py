"""Speed choices that must not change the function: the CNN's channels-last layout, training-time autocast."""
from __future__ import annotations

import copy

import gymnasium as gym
import numpy as np
import torch

from agents.policies import CnnBackbone, ImageFeatures, compute_dtype


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
