"""SGAM: mask range and shape, the masking formula, gradient_shield as a backward-only change,
the keep-ratio prior, Grad-CAM++ distillation, and installation in a PPO policy."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fgmf_marl import config as cfglib
from fgmf_marl.agents.policy_view import PolicyView
from fgmf_marl.attribution import GradCAMPlusPlus
from fgmf_marl.config import ConfigError
from fgmf_marl.defenses.config import DefenseConfig, SgamConfig
from fgmf_marl.defenses.sgam import (SGAM, _stretch_per_image, bilinear_upsample, distillation_loss, gate_bypassed,
                                    gradcam_teacher, keep_ratio_loss)
from helpers import tiny_view


def _view(backbone: str = "cnn") -> PolicyView:
    return tiny_view(backbone)


@pytest.mark.parametrize("downsample", [1, 2, 4, 8])
@pytest.mark.parametrize("baseline", ["zero", "gray", "mean"])
def test_mask_range_shape_and_masking_formula(downsample: int, baseline: str) -> None:
    torch.manual_seed(0)
    gate = SGAM(3, downsample=downsample, baseline=baseline, init_keep=0.5)
    nn.init.normal_(gate.attention[-1].weight, std=1.0)  # a non-trivial mask
    x = torch.rand(5, 3, 48, 48)
    k = gate.mask(x)
    assert k.shape == (5, 1, 48, 48)
    assert k.min() >= 0 and k.max() <= 1 and k.std() > 1e-3
    assert gate.saliency(x).shape[-1] == 48 // downsample
    b = {"zero": torch.zeros_like(x), "gray": torch.full_like(x, 0.5),
         "mean": x.mean(dim=(2, 3), keepdim=True).expand_as(x)}[baseline]
    torch.testing.assert_close(gate(x), k * x + (1 - k) * b)


@pytest.mark.parametrize(("low", "size"), [((12, 12), (48, 48)), ((6, 6), (48, 48)), ((11, 7), (84, 30)),
                                           ((5, 9), (5, 9)), ((24, 24), (48, 48))])
def test_bilinear_upsample_equals_interpolate_in_value_and_gradient(low: tuple[int, int], size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    k = torch.rand(4, 1, *low, dtype=torch.float64, requires_grad=True)
    ours = bilinear_upsample(k, size)
    reference = F.interpolate(k, size=size, mode="bilinear", align_corners=False)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)
    g = torch.randn_like(reference)
    torch.testing.assert_close(torch.autograd.grad(ours, k, g)[0], torch.autograd.grad(reference, k, g)[0],
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("size", [(48, 48), (47, 33)])
def test_attention_pooling_is_average_pooling(size: tuple[int, int]) -> None:
    x = torch.rand(3, 3, *size, dtype=torch.float64, requires_grad=True)
    pool = SGAM(3, downsample=4).attention[0]
    ours, reference = pool(x), F.avg_pool2d(x, 2)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)
    g = torch.randn_like(reference)
    torch.testing.assert_close(torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(reference, x, g)[0])


def test_fresh_gate_is_nearly_transparent() -> None:
    gate = SGAM(3, init_keep=0.95)
    k = gate.mask(torch.rand(4, 3, 48, 48)).detach()
    assert abs(float(k.mean()) - 0.95) < 0.01


def test_gradient_shield_changes_input_gradients_but_not_the_forward_pass() -> None:
    torch.manual_seed(1)
    plain = SGAM(3, init_keep=0.5)
    nn.init.normal_(plain.attention[-1].weight, std=1.0)
    shielded = SGAM(3, init_keep=0.5, gradient_shield=True, shield_strength=0.99)
    shielded.load_state_dict(plain.state_dict())
    assert not SGAM(3).gradient_shield  # off by default
    assert "POSITIVE CONTROL" in (SGAM.__doc__ or "").upper()
    x = torch.rand(3, 3, 48, 48)
    weights = torch.randn(3, 3, 48, 48)
    grads = []
    for gate in (plain, shielded):
        xi = x.clone().requires_grad_(True)
        out = gate(xi)
        (out * weights).sum().backward()
        grads.append((out.detach(), xi.grad))
    assert torch.equal(grads[0][0], grads[1][0])
    assert not torch.allclose(grads[0][1], grads[1][1])
    # backward-only damping by (1 - strength * k): exactly the plain input gradient, scaled per pixel
    with torch.no_grad():
        k = plain.mask(x)
    torch.testing.assert_close(grads[1][1], grads[0][1] * (1 - 0.99 * k))


def test_a_focused_shield_damps_the_most_salient_pixels_and_spares_the_least_salient() -> None:
    torch.manual_seed(1)
    gate = SGAM(3, init_keep=0.5, gradient_shield=True, shield_strength=0.99)
    nn.init.normal_(gate.attention[-1].weight, std=1.0)
    gate.shield_focus = True
    x = torch.rand(3, 3, 48, 48)
    with torch.no_grad():
        k = gate.mask(x)
    lo, hi = k.amin(dim=(1, 2, 3), keepdim=True), k.amax(dim=(1, 2, 3), keepdim=True)
    xi = x.clone().requires_grad_(True)
    gate(xi).sum().backward()
    gate.gradient_shield = False
    plain = x.clone().requires_grad_(True)
    gate(plain).sum().backward()
    factor = xi.grad / plain.grad
    torch.testing.assert_close(factor, (1 - 0.99 * (k - lo) / (hi - lo)).expand_as(factor))
    flat = factor.flatten(1)
    assert torch.allclose(flat.max(dim=1).values, torch.ones(3)) and torch.allclose(flat.min(dim=1).values,
                                                                                   torch.full((3,), 0.01))
    # a gate with one keep value everywhere has no ranking to focus on: uniform damping, as unfocused
    assert torch.equal(_stretch_per_image(torch.full((2, 1, 4, 4), 0.7)), torch.ones(2, 1, 4, 4))


@pytest.mark.parametrize("rho", [0.2, 0.6])
def test_keep_ratio_prior_moves_mean_mask_toward_rho(rho: float) -> None:
    torch.manual_seed(2)
    gate = SGAM(3, init_keep=0.95)
    x = torch.rand(16, 3, 48, 48)
    opt = torch.optim.Adam(gate.parameters(), lr=1e-2)
    before = abs(float(gate.mask(x).mean()) - rho)
    for _ in range(40):
        opt.zero_grad()
        keep_ratio_loss(gate.mask(x), rho).backward()
        opt.step()
    after = abs(float(gate.mask(x).mean()) - rho)
    assert after < 0.3 * before


def test_keep_ratio_loss_closed_form() -> None:
    k = torch.tensor([[[[1.0, 0.0]]], [[[1.0, 1.0]]]])  # image means 0.5 and 1.0
    torch.testing.assert_close(keep_ratio_loss(k, 0.5), torch.tensor(((0.0) ** 2 + 0.5 ** 2) / 2))


def test_gradcam_teacher_bypasses_gate_and_distillation_trains_only_the_gate() -> None:
    view = _view()
    gate = SGAM(3)
    view.set_gate(gate)
    assert view.gate is gate
    torch.manual_seed(3)
    x = torch.rand(6, 3, 48, 48)
    actions = torch.randint(0, 5, (6,))
    teacher = gradcam_teacher(view, x, actions, size=(12, 12))
    assert view.gate is gate  # restored after the bypass
    with gate_bypassed(view):
        expected = GradCAMPlusPlus(view).attribute(x, target=actions, raw=True)
    expected = expected / expected.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    torch.testing.assert_close(teacher, expected)
    assert teacher.shape == (6, 12, 12) and not teacher.requires_grad
    assert teacher.min() >= 0 and teacher.max() <= 1

    view.policy.zero_grad()
    loss = distillation_loss(gate, x, teacher)
    loss.backward()
    assert all(p.grad is None for p in view.extractor.backbone.parameters())
    assert gate.attention[-1].weight.grad.abs().sum() > 0
    # a few steps on the distillation loss alone bring the low-res keep map toward the teacher
    opt = torch.optim.Adam(gate.parameters(), lr=1e-2)
    start = F.l1_loss(gate.keep_lowres(x)[:, 0], teacher).item()
    for _ in range(40):
        opt.zero_grad()
        distillation_loss(gate, x, teacher).backward()
        opt.step()
    assert F.l1_loss(gate.keep_lowres(x)[:, 0], teacher).item() < 0.7 * start


def test_vit_teacher_is_resized_to_the_gate_grid() -> None:
    view = _view("vit")
    teacher = gradcam_teacher(view, torch.rand(2, 3, 48, 48), torch.tensor([0, 1]), size=(12, 12))
    assert teacher.shape == (2, 12, 12)


def test_gate_needs_a_policy_with_image_features() -> None:
    with pytest.raises(TypeError, match="ImageFeatures"):
        PolicyView(nn.Linear(2, 2))  # type: ignore[arg-type]


@pytest.mark.parametrize("override, message", [
    ({"downsample": 3}, "defense.sgam.downsample"),
    ({"temperature": 0.0}, "defense.sgam.temperature"),
    ({"rho": 1.5}, "defense.sgam.rho"),
    ({"baseline": "blur"}, "defense.sgam.baseline='blur' is unknown; accepted: zero, gray, mean"),
    ({"init_keep": 1.0}, "defense.sgam.init_keep"),
    ({"shield_strength": 2.0}, "defense.sgam.shield_strength"),
    ({"distill_every": 0}, "defense.sgam.distill_every"),
])
def test_bad_sgam_config_is_a_one_line_config_error(override: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        cfglib.from_dict(DefenseConfig, {"kind": "sgam", "sgam": override})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_from_config_uses_every_knob() -> None:
    cfg = SgamConfig(hidden=4, downsample=2, tau=0.3, temperature=0.5, baseline="gray", gradient_shield=True,
                     shield_strength=0.5)
    gate = SGAM.from_config(cfg, 3)
    convs = [m for m in gate.attention if isinstance(m, torch.nn.Conv2d)]
    assert convs[0].out_channels == 4 and gate.saliency(torch.rand(1, 3, 48, 48)).shape[-1] == 24
    assert (gate.tau, gate.temperature, gate.baseline, gate.gradient_shield, gate.shield_strength) == \
        (0.3, 0.5, "gray", True, 0.5)


def test_training_forward_stores_its_keep_map_once_and_only_in_training() -> None:
    gate = SGAM(3)
    x = torch.rand(4, 3, 48, 48)
    gate.train()
    gate(x)
    keep = gate.pop_training_keep()
    assert keep is not None and keep.requires_grad and gate.pop_training_keep() is None
    torch.testing.assert_close(keep, gate.keep_lowres(x))
    gate.eval()
    gate(x)
    assert gate.pop_training_keep() is None  # rollouts, attacks and explanations leave nothing behind
    gate.train()
    with torch.no_grad():
        gate(x)
    assert gate.pop_training_keep() is None
